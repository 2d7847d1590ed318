"""One way to open any checkpoint: a released ckpt-0 directory or a slncx-tools store.

Both kinds offer the same reading interface, so the model, the loader, `verify` and the
converters never care which one they got:

    ckpt = open_checkpoint(path)
    ckpt.config, ckpt.table                 # ModelConfig and its parameter table
    ckpt.read(entry)                        # ndarray (float) or QuantizedArray (int8 + scales)
    ckpt.read_part(entry, part, index)      # part: "array" | "weight" | "scales"; index: slices
    ckpt.blocks(entry)                      # R of a quantized entry as stored (0 if float)
    ckpt.stored(entry)                      # {"dtype", "quant", "bytes"} as stored (inspect)
    ckpt.bytes_read                         # bytes read from disk so far
"""

from __future__ import annotations

from pathlib import Path

from .errors import StructureError

STORE_MANIFEST = "slncx.json"


def is_store(path) -> bool:
    return (Path(path) / STORE_MANIFEST).exists()


def open_checkpoint(path, config=None):
    """Open a store (a directory with slncx.json) or a release ckpt-0 (or its parent)."""
    p = Path(path)
    if not p.exists():
        raise StructureError(f"{p}: no such file or directory")
    if is_store(p):
        from .store import open_store  # noqa: PLC0415 (the store needs tensorstore)

        return open_store(p)
    from .release import ReleaseCheckpoint  # noqa: PLC0415

    return ReleaseCheckpoint(p, config=config)
