"""Logit parity of two checkpoints through the embedded model, and per-tensor weight error.

`logit_parity` runs the reference first and keeps its logits (in memory, or in a temporary
memory-mapped file when large — as llama.cpp's `--kl-divergence-base` does), releases its
weights, then runs the candidate and compares position by position (metrics.py). Only one
model is ever in memory.
"""

from __future__ import annotations

import logging
import tempfile
import time

import numpy as np

from .errors import ConfigError
from .metrics import concat_stats, position_stats, summarize_stats
from .progress import ProgressFn, null_progress
from .quant import ErrorStats, QuantizedArray

log = logging.getLogger(__name__)

IN_MEMORY_LOGITS = 512 * 1024 * 1024  # bytes of reference logits kept in RAM; more goes to a temp file


def windows(ids: np.ndarray, context: int, pad: int = 0) -> np.ndarray:
    """Split a 1-D id sequence into rows of `context` tokens ([B, context], last row padded)."""
    ids = np.asarray(ids, dtype=np.int32).reshape(-1)
    if len(ids) < 2:
        raise ConfigError("need at least 2 tokens to evaluate")
    rows = -(-len(ids) // context)
    out = np.full((rows, context), pad, dtype=np.int32)
    out.reshape(-1)[: len(ids)] = ids
    return out


def random_tokens(n: int, vocab: int, seed: int, context: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return windows(rng.integers(3, vocab, n, dtype=np.int32), context)


def _model_logits(ckpt, tokens: np.ndarray, mesh, batch: int, progress: ProgressFn, label: str):
    """Yield (row slice, float32 logits [b, T, V]) for `tokens` [B, T] through the model."""
    import jax

    from .load import load_params
    from .model import forward

    params = load_params(ckpt, mesh)
    cfg = ckpt.config
    fwd = jax.jit(lambda p, t: forward(p, t, cfg)[0])
    for i in range(0, len(tokens), batch):
        chunk = tokens[i : i + batch]
        if len(chunk) < batch and len(tokens) > batch:  # keep one compiled shape
            chunk = np.concatenate([chunk, np.zeros((batch - len(chunk), chunk.shape[1]), np.int32)])
        logits = np.asarray(fwd(params, chunk), dtype=np.float32)[: len(tokens[i : i + batch])]
        progress(min(i + batch, len(tokens)), len(tokens), label)
        yield slice(i, i + len(logits)), logits
    del params


def logit_parity(ref, cand, tokens: np.ndarray, *, mesh=None, batch: int = 8,
                 progress: ProgressFn = null_progress) -> dict:
    """Run both checkpoints on `tokens` [B, T] (pad 0) and report KLD, top-1, Δp, perplexity."""
    if ref.config.vocab_size != cand.config.vocab_size or ref.config.emb_size != cand.config.emb_size:
        raise ConfigError(
            f"checkpoints are different models: vocab {ref.config.vocab_size} vs {cand.config.vocab_size}, "
            f"width {ref.config.emb_size} vs {cand.config.emb_size}"
        )
    B, T = tokens.shape
    V = ref.config.vocab_size
    nbytes = B * T * V * 4
    tmp = None
    if nbytes > IN_MEMORY_LOGITS:
        tmp = tempfile.NamedTemporaryFile(prefix="slncx-ref-logits-", suffix=".f32")
        ref_logits = np.memmap(tmp.name, dtype=np.float32, mode="w+", shape=(B, T, V))
    else:
        ref_logits = np.empty((B, T, V), np.float32)
    t0 = time.perf_counter()
    for rows, logits in _model_logits(ref, tokens, mesh, batch, progress, "reference"):
        ref_logits[rows] = logits
    t_ref = time.perf_counter() - t0
    # Positions with a real token and a real next token: [B, T-1].
    real = (tokens[:, :-1] != 0) & (tokens[:, 1:] != 0)
    chunks = []
    t0 = time.perf_counter()
    for rows, logits in _model_logits(cand, tokens, mesh, batch, progress, "candidate"):
        sel = real[rows]
        r = np.asarray(ref_logits[rows])[:, :-1][sel]
        c = logits[:, :-1][sel]
        if len(r):
            chunks.append(position_stats(r, c, tokens[rows][:, 1:][sel]))
    t_cand = time.perf_counter() - t0
    if tmp is not None:
        del ref_logits
        tmp.close()
    if not chunks:
        raise ConfigError("no position with a real next token to evaluate")
    report = summarize_stats(concat_stats(chunks))
    report["seconds"] = {"reference": round(t_ref, 2), "candidate": round(t_cand, 2)}
    return report


def weight_errors(ref, cand, progress: ProgressFn = null_progress, budget: int = 64 * 1024 * 1024) -> dict:
    """Per-tensor error of the candidate's (dequantized) weights against the reference's, read in
    slabs of at most ~`budget` bytes of float32 (one expert, a range of output columns)."""
    if [e.shape for e in ref.table] != [e.shape for e in cand.table]:
        raise ConfigError("checkpoints have different parameter tables")
    rows = []
    groups: dict = {}
    for i, entry in enumerate(ref.table):
        stats = ErrorStats()
        for index in slabs(entry.shape, budget // 4):
            stats = stats + ErrorStats.of(read_float(ref, entry, index), read_float(cand, entry, index))
        rows.append({"index": entry.index, "path": entry.path, **stats.to_dict()})
        groups[entry.name] = groups.get(entry.name, ErrorStats()) + stats
        progress(i + 1, len(ref.table), entry.path)
    return {
        "tensors": rows,
        "groups": {k: v.to_dict() for k, v in groups.items()},
        "exact": all(r["max_abs"] == 0 for r in rows),
    }


def slabs(shape: tuple, max_elements: int):
    """Index tuples covering `shape`: one leading (expert) index at a time, then ranges of the
    last (output) dimension, so that a quantized slab always holds whole scale columns."""
    shape = tuple(shape)
    if len(shape) < 2:
        yield (slice(None),) * len(shape)
        return
    rows, cols = shape[-2], shape[-1]
    step = max(1, min(cols, max_elements // max(rows, 1)))
    for lead in np.ndindex(*shape[:-2]):
        for c in range(0, cols, step):
            yield tuple(slice(i, i + 1) for i in lead) + (slice(None), slice(c, min(cols, c + step)))


def read_float(ckpt, entry, index) -> np.ndarray:
    """A slab (from `slabs`) of an entry as float32, dequantizing int8 (bf16 product)."""
    if not hasattr(ckpt, "read_part"):
        return _as_float(ckpt.read(entry))[index]
    kind = ckpt.storage(entry)["kind"] if hasattr(ckpt, "storage") else None
    if kind == "int8_rows":  # per-row int8 embeddings: one scale per row
        values = ckpt.read_part(entry, "weight", index)
        scales = ckpt.read_part(entry, "scales", index[:-1] + (slice(None),))
        return QuantizedArray(values.T, scales.T).dequantize().T.astype(np.float32)
    blocks = ckpt.blocks(entry) if entry.quantized else 0
    if not blocks:
        return np.asarray(ckpt.read_part(entry, "array", index), dtype=np.float32)
    values = ckpt.read_part(entry, "weight", index)
    scales = ckpt.read_part(entry, "scales", index[:-2] + (slice(None), index[-1]))
    return QuantizedArray(values, scales).dequantize().astype(np.float32)


def _as_float(value) -> np.ndarray:
    if isinstance(value, QuantizedArray):
        return value.dequantize().astype(np.float32)
    return np.asarray(value).astype(np.float32)
