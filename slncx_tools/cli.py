"""The `slncx-tools` command line: a thin Click group.

Each command lives in `slncx_tools/commands/<name>.py` as `command`; the group finds them by
module name and imports one only when it runs (or when `--help` lists it), and commands import
jax/tensorstore inside their bodies, so `slncx-tools --help` stays fast.
"""

from __future__ import annotations

import importlib
import pkgutil
import sys

import click

from . import __version__


class LazyGroup(click.Group):
    def list_commands(self, ctx):
        from . import commands

        return sorted(m.name.replace("_", "-") for m in pkgutil.iter_modules(commands.__path__) if not m.name.startswith("_"))

    def get_command(self, ctx, name):
        if name not in self.list_commands(ctx):
            return None
        module = importlib.import_module(f"slncx_tools.commands.{name.replace('-', '_')}")
        return module.command


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="slncx-tools")
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
def cli(verbose):
    """Checkpoint, quantization and inference toolkit for the SLNCX mixture-of-experts model.

    Every command works on a released ckpt-0 directory (or its parent) and on the TensorStore
    stores that `quantize` and `reshard` write.
    """
    import logging

    level = logging.WARNING - 10 * verbose
    logging.basicConfig(level=max(level, logging.DEBUG), format="%(levelname)s %(name)s: %(message)s")


def main(argv=None):
    """Entry point: SlncxError becomes a one-line message and exit status 1, never a traceback."""
    from .errors import SlncxError

    try:
        cli.main(args=argv, prog_name="slncx-tools", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("Aborted.", err=True)
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except SlncxError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        click.echo("Interrupted.", err=True)
        sys.exit(130)
    sys.exit(0)
