"""Small file-system helpers shared by download, quantize, reshard and verify."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

from .errors import StructureError

FREE_BYTES_ENV = "SLNCX_FAKE_FREE_BYTES"  # tests: pretend this much space is free
HASH_BLOCK = 8 * 1024 * 1024


def free_bytes(path) -> int:
    """Free bytes on the filesystem that will hold `path` ($SLNCX_FAKE_FREE_BYTES overrides, for tests)."""
    if os.environ.get(FREE_BYTES_ENV):
        return int(os.environ[FREE_BYTES_ENV])
    p = Path(path).absolute()
    while not p.exists():
        p = p.parent
    return shutil.disk_usage(p).free


def sha256_file(path, block: int = HASH_BLOCK) -> str:
    """SHA-256 of a whole file, read in blocks into one reused buffer."""
    h = hashlib.sha256()
    buf = bytearray(block)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


def read_sha256sums(path, *, strict: bool = False) -> dict:
    """{name: sha256} from `sha256sum` format (`<hex>  <name>` or `<hex> *<name>`).

    strict: a missing file or a malformed line is a StructureError naming it (verify's use);
    otherwise a missing file reads as empty and malformed lines are skipped (download's journal)."""
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        if strict:
            raise StructureError(f"{path}: no such file") from None
        return {}
    sums = {}
    for n, line in enumerate(text.splitlines(), 1):
        parts = line.strip().split(None, 1)
        if not parts or parts[0].startswith("#"):
            continue
        if len(parts) != 2 or len(parts[0]) != 64:
            if strict:
                raise StructureError(f"{path}:{n}: not a sha256sum line: {line.strip()!r}")
            continue
        sums[parts[1].lstrip("*")] = parts[0].lower()
    return sums
