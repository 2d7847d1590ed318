"""Argument helpers shared by commands (not a command: the group skips modules starting with _)."""

from pathlib import Path

import click


def source_and_out(paths: tuple) -> tuple:
    """`[SOURCE] OUT`: one path is OUT with the embedded checkpoint as SOURCE."""
    if len(paths) == 1:
        from ..embedded import embedded_dir

        return str(embedded_dir()), paths[0]
    if len(paths) != 2:
        raise click.UsageError(f"expected [SOURCE] OUT, got {len(paths)} paths")
    if not Path(paths[0]).is_dir():
        raise click.BadParameter(f"{paths[0]}: no such directory", param_hint="SOURCE")
    return paths
