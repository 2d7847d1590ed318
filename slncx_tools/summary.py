"""What a checkpoint holds, tensor by tensor, from headers alone (for `inspect`)."""

from __future__ import annotations

from .config import PRESETS
from .errors import SlncxError


def summarize(ckpt, check: bool = False) -> dict:
    """A JSON-able description: config, one row per tensor, totals, and (with `check`) every
    problem found instead of stopping at the first."""
    problems = ckpt.problems() if check else []
    rows = []
    total_bytes = total_params = 0
    for entry in ckpt.table:
        try:
            stored = ckpt.stored(entry)
        except SlncxError:
            if not check:
                raise
            stored = {"dtype": "?", "quant": "unreadable", "bytes": 0}  # listed in `problems`
        rows.append(
            {
                "index": entry.index,
                "path": entry.path,
                "shape": list(entry.shape),
                "dtype": stored["dtype"],
                "quant": stored["quant"],
                "bytes": stored["bytes"],
            }
        )
        total_bytes += stored["bytes"]
        total_params += entry.numel
    cfg = ckpt.config
    return {
        "path": str(getattr(ckpt, "dir", getattr(ckpt, "path", ""))),
        "kind": ckpt.kind,
        "config": cfg.to_dict(),
        "preset": cfg.name if cfg.name in PRESETS and PRESETS[cfg.name] == cfg else None,
        "tensors": rows,
        "total_tensors": len(rows),
        "total_params": total_params,
        "total_bytes": total_bytes,
        "problems": problems,
    }


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n} B"
