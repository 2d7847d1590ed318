"""Where the embedded checkpoint (checkpoints/slncx-tiny, see its README) lives once installed.

In a source checkout or an editable install it is `checkpoints/slncx-tiny` beside the package; a
regular install puts the same files under `<prefix>/share/slncx-tools/slncx-tiny`.
"""

from __future__ import annotations

import sys
from pathlib import Path

from .errors import StructureError

NAME = "slncx-tiny"


def embedded_dir() -> Path:
    """The embedded model's directory: ckpt-0/ (int8), float/ckpt-0/, tokenizer.model, eval.txt."""
    candidates = [
        Path(__file__).resolve().parents[1] / "checkpoints" / NAME,
        Path(sys.prefix) / "share" / "slncx-tools" / NAME,
    ]
    for c in candidates:
        if (c / "ckpt-0" / "tensor00000_000").exists():
            return c
    raise StructureError(
        f"the embedded checkpoint is not installed (looked in {', '.join(map(str, candidates))}); "
        "pass a checkpoint path"
    )


def float_master() -> Path:
    return embedded_dir() / "float"


def eval_text() -> Path:
    return embedded_dir() / "eval.txt"
