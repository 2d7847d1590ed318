"""Symmetric absmax int8 with R row-block scales (SPEC §3). Pure numpy: no I/O, no jax.

A weight [..., in, out] is stored as int8 values of the same shape and scales [..., R, out]:
`scales[..., r, n]` multiplies rows r·(in/R) … (r+1)·(in/R)−1 of column n. R = 1 is plain
per-output-channel quantization; the release uses R = 8 for the row-parallel weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import ml_dtypes
import numpy as np

from .errors import FormatError

BF16 = np.dtype(ml_dtypes.bfloat16)
QMAX = 127


@dataclass(frozen=True, eq=False)
class QuantizedArray:
    """int8 `values` [..., in, out] with `scales` [..., R, out] (bf16 or float32)."""

    values: np.ndarray
    scales: np.ndarray

    def __post_init__(self):
        v, s = self.values, self.scales
        if v.ndim < 2 or s.ndim != v.ndim:
            raise FormatError(f"quantized weight: values {v.shape} and scales {s.shape} ranks do not fit")
        if s.shape[:-2] != v.shape[:-2] or s.shape[-1] != v.shape[-1] or v.shape[-2] % s.shape[-2]:
            raise FormatError(
                f"quantized weight: scales {s.shape} do not fit values {v.shape} "
                f"(expected [..., R, {v.shape[-1]}] with R dividing {v.shape[-2]})"
            )

    @property
    def shape(self) -> tuple:
        return self.values.shape

    @property
    def blocks(self) -> int:
        return self.scales.shape[-2]

    @property
    def nbytes(self) -> int:
        return self.values.nbytes + self.scales.nbytes

    def dequantize(self) -> np.ndarray:
        """bf16(q) · s as a bf16 product (the reference's dequantization), returned as bf16."""
        return dequantize(self.values, self.scales)


def expand_scales(scales: np.ndarray, rows: int) -> np.ndarray:
    """Repeat each of the R scale rows over its rows/R input rows: [..., R, out] -> [..., rows, out]."""
    blocks = scales.shape[-2]
    if rows % blocks:
        raise FormatError(f"{blocks} scale blocks do not divide {rows} rows")
    return np.repeat(scales, rows // blocks, axis=-2)


def dequantize(values: np.ndarray, scales: np.ndarray) -> np.ndarray:
    full = expand_scales(scales, values.shape[-2])
    if full.dtype == BF16:
        return values.astype(BF16) * full  # bf16 × bf16, rounded once to bf16
    return (values.astype(np.float32) * full.astype(np.float32))


def block_absmax(w: np.ndarray, blocks: int) -> np.ndarray:
    """max |w| over each block's rows: [..., in, out] -> [..., R, out] (float32)."""
    rows, cols = w.shape[-2], w.shape[-1]
    if rows % blocks:
        raise FormatError(f"{blocks} scale blocks do not divide {rows} rows")
    grouped = np.abs(w.astype(np.float32, copy=False)).reshape(
        w.shape[:-2] + (blocks, rows // blocks, cols)
    )  # [..., R, in/R, out]
    return grouped.max(axis=-2)


def scales_from_absmax(absmax: np.ndarray, scale_dtype=BF16) -> np.ndarray:
    """s = dtype(max|w| / 127), with a zero channel given scale 1 (its values are all 0)."""
    s = (absmax.astype(np.float32) / np.float32(QMAX)).astype(scale_dtype)
    return np.where(s == 0, np.asarray(1, dtype=scale_dtype), s).astype(scale_dtype)


def quantize_with_scales(w: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """q = clip(rint(w / float32(s)), -127, 127) as int8 (a true division, as the reference does)."""
    full = expand_scales(scales, w.shape[-2]).astype(np.float32)
    q = np.rint(w.astype(np.float32, copy=False) / full)
    return np.clip(q, -QMAX, QMAX).astype(np.int8)


def quantize(w: np.ndarray, blocks: int = 1, scale_dtype=BF16) -> QuantizedArray:
    """Symmetric absmax int8 of a weight [..., in, out] with `blocks` row blocks (SPEC §3)."""
    scales = scales_from_absmax(block_absmax(w, blocks), scale_dtype)
    return QuantizedArray(quantize_with_scales(w, scales), scales)


@dataclass(frozen=True)
class ErrorStats:
    """Accumulated error of an approximation `b` of `a`; combine partial sums with `+`."""

    count: int = 0
    sum_sq_ref: float = 0.0
    sum_sq_err: float = 0.0
    sum_dot: float = 0.0
    sum_sq_approx: float = 0.0
    max_abs: float = 0.0

    @classmethod
    def of(cls, a: np.ndarray, b: np.ndarray) -> "ErrorStats":
        a = np.asarray(a, dtype=np.float64)
        b = np.asarray(b, dtype=np.float64)
        err = a - b
        return cls(
            count=a.size,
            sum_sq_ref=float(np.sum(a * a)),
            sum_sq_err=float(np.sum(err * err)),
            sum_dot=float(np.sum(a * b)),
            sum_sq_approx=float(np.sum(b * b)),
            max_abs=float(np.max(np.abs(err))) if err.size else 0.0,
        )

    def __add__(self, other: "ErrorStats") -> "ErrorStats":
        return ErrorStats(
            self.count + other.count,
            self.sum_sq_ref + other.sum_sq_ref,
            self.sum_sq_err + other.sum_sq_err,
            self.sum_dot + other.sum_dot,
            self.sum_sq_approx + other.sum_sq_approx,
            max(self.max_abs, other.max_abs),
        )

    @property
    def rmse(self) -> float:
        return (self.sum_sq_err / self.count) ** 0.5 if self.count else 0.0

    @property
    def snr_db(self) -> float:
        if self.sum_sq_err == 0:
            return float("inf")
        if self.sum_sq_ref == 0:
            return float("-inf")
        return 10.0 * np.log10(self.sum_sq_ref / self.sum_sq_err)

    @property
    def cosine(self) -> float:
        denom = (self.sum_sq_ref * self.sum_sq_approx) ** 0.5
        return self.sum_dot / denom if denom else 1.0

    def to_dict(self) -> dict:
        return {
            "count": self.count,
            "rmse": self.rmse,
            "snr_db": self.snr_db,
            "cosine": self.cosine,
            "max_abs": self.max_abs,
        }


# --- fast slab kernels (used by the converters; identical results to the reference functions above)

MSE_GRID = tuple(float(r) for r in np.round(np.linspace(1.0, 0.85, 61), 4))  # step 0.0025


def absmax_fast(w: np.ndarray, axis: int) -> np.ndarray:
    """max |w| along `axis` without a full-size |w| temporary (exactly equal to np.abs(w).max(axis))."""
    hi = np.max(w, axis=axis)
    lo = np.min(w, axis=axis)
    return np.maximum(hi, -lo).astype(np.float32, copy=False)


def round_to_bf16(x: np.ndarray) -> np.ndarray:
    """float32 -> nearest-even bf16 value, returned as float32 (bit trick; x must be finite)."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32).copy()
    u += np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))
    u &= np.uint32(0xFFFF0000)
    return u.view(np.float32)


def dequantize_f32(q: np.ndarray, scales_b: np.ndarray) -> np.ndarray:
    """bf16(q)·s as the reference computes it (a bf16 product for bf16 scales), as float32.

    `scales_b` must already broadcast against `q`. For bf16 scales the float32 product of an int8
    and a bf16 is exact, so rounding it once to bf16 equals the bf16 multiply.
    """
    prod = q.astype(np.float32) * scales_b.astype(np.float32)
    return round_to_bf16(prod) if scales_b.dtype == BF16 else prod


def quantize_columns(w: np.ndarray, blocks: int = 1, scale_dtype=BF16, method: str = "absmax",
                     grid=MSE_GRID, q_out: Optional[np.ndarray] = None):
    """SPEC §3 quantization of a slab [..., in, out] with `blocks` row blocks, vectorised.

    Returns (q int8 [..., in, out], scales [..., R, out], ErrorStats of bf16(q)·s against w).
    method "absmax" is exactly `quantize`; "mse" scales each block's absmax by the ratio from
    `grid` (which includes 1.0) that minimises its squared error, so its error is never larger.
    `q_out` (int8, the shape of w) receives the values instead of a new array.
    """
    w = np.asarray(w, dtype=np.float32)
    rows, cols = w.shape[-2], w.shape[-1]
    if rows % blocks:
        raise FormatError(f"{blocks} scale blocks do not divide {rows} rows")
    if method == "absmax":
        lead = w.shape[:-2]
        g = w.reshape((-1, blocks, rows // blocks, cols))  # [L, R, in/R, out] (a copy only if w is strided)
        q = np.empty(w.shape, np.int8) if q_out is None else q_out
        if q.shape != w.shape or q.dtype != np.int8 or not q.flags.c_contiguous:
            raise ValueError(f"q_out: expected a C-contiguous int8 array {w.shape}")
        qg = q.reshape(g.shape)  # a view (q is contiguous)
        scales = np.empty(lead + (blocks, cols), dtype=scale_dtype)
        sg = scales.reshape((-1, blocks, cols))
        stats = ErrorStats()
        for i in range(g.shape[0]):
            for r in range(blocks):
                _, s, st = quantize_slab(g[i, r], 0, scale_dtype, q_out=qg[i, r])
                sg[i, r] = s[0]
                stats = stats + st
        return q, scales, stats
    g = w.reshape(w.shape[:-2] + (blocks, rows // blocks, cols))  # [..., R, in/R, out]
    absmax = absmax_fast(g, axis=-2)  # [..., R, out]
    scales = scales_from_absmax(absmax, scale_dtype)
    q = _quantize_grouped(g, scales)
    if method == "mse":
        deq = dequantize_f32(q, scales[..., :, None, :])
        best_err = _block_sq_err(g, deq)
        for ratio in grid:
            if ratio == 1.0:
                continue
            s_r = scales_from_absmax(absmax * np.float32(ratio), scale_dtype)
            q_r = _quantize_grouped(g, s_r)
            err_r = _block_sq_err(g, dequantize_f32(q_r, s_r[..., :, None, :]))
            better = err_r < best_err  # [..., R, out]
            if better.any():
                best_err = np.where(better, err_r, best_err)
                scales = np.where(better, s_r, scales).astype(scales.dtype)
                q = np.where(better[..., None, :], q_r, q)
    else:
        raise ValueError(f"unknown method {method!r}")
    deq = dequantize_f32(q, scales[..., :, None, :])
    stats = error_stats_f32(g, deq)
    q = q.reshape(w.shape)
    if q_out is not None:
        q_out[...] = q
        q = q_out
    return q, scales, stats


# The fused kernel: one pass for max|w|, then cache-sized blocks through divide, rint, clip, the
# int8 store, the bf16 dequantization and the error sums, so every intermediate stays in L2.
KERNEL_BLOCK = 1 << 17  # elements per block (512 KiB of float32)
_VELTKAMP = np.float32(2.0**16 + 1)  # splits a float32 into its nearest 8-significant-bit part
# Scales in this range keep every product q·s and the Veltkamp split normal and finite.
_SAFE_LO, _SAFE_HI = np.float32(2.0**-100), np.float32(2.0**100)


def _round_bf16_products(p: np.ndarray, tmp: np.ndarray) -> None:
    """In place: p (exact products int·bf16, finite, normal or 0) -> nearest-even bf16 values.

    Veltkamp's split with C = 2^16 + 1 gives the float32 value rounded to 8 significant bits,
    round-to-nearest-even for these products (checked exhaustively in the tests against
    `round_to_bf16` for every q in [-127, 127] and every bf16 mantissa); 3 float ops instead of
    5 integer ones plus a copy.
    """
    np.multiply(p, _VELTKAMP, out=tmp)  # γ = C·p
    np.subtract(p, tmp, out=p)  # δ = p − γ
    np.add(tmp, p, out=p)  # γ + δ


def quantize_slab(w: np.ndarray, axis: int, scale_dtype=BF16, q_out: Optional[np.ndarray] = None,
                  block: int = KERNEL_BLOCK):
    """SPEC §3 absmax int8 of a 2-D float32 slab with one scale per column (axis 0: reduce over
    rows, scales [1, cols]) or per row (axis 1: scales [rows, 1]), in cache-sized blocks.

    Returns (q int8, scales, ErrorStats of the dequantization bf16(q)·s against w). Bit-identical
    to `quantize` / `quantize_rows`' reference formula: a true division by float32(s), rint, clip.
    """
    w = np.ascontiguousarray(w, dtype=np.float32)
    if w.ndim != 2 or axis not in (0, 1):
        raise ValueError("quantize_slab takes a 2-D slab and axis 0 or 1")
    rows, cols = w.shape
    q = np.empty(w.shape, np.int8) if q_out is None else q_out
    if q.shape != w.shape or q.dtype != np.int8:
        raise ValueError(f"q_out: expected int8 {w.shape}, got {q.dtype} {q.shape}")
    # q_out may be a strided view (a column slab of a bigger buffer): row blocks of it are written in place
    if w.size == 0:
        s = np.ones((1, cols) if axis == 0 else (rows, 1), dtype=scale_dtype)
        return q, s, ErrorStats()
    absmax = absmax_fast(w, axis)
    absmax = absmax[None, :] if axis == 0 else absmax[:, None]
    scales = scales_from_absmax(absmax, scale_dtype)
    sf = scales.astype(np.float32)
    bf16 = np.dtype(scale_dtype) == BF16
    if not (np.isfinite(absmax).all() and (sf >= _SAFE_LO).all() and (sf <= _SAFE_HI).all()):
        # non-finite weights or extreme scales: the plain reference formula (slow, exact)
        qq = quantize_with_scales(w if axis == 0 else w.T, scales if axis == 0 else scales.T)
        q[...] = qq if axis == 0 else qq.T
        d = dequantize_f32(q, scales)
        return q, scales, error_stats_f32(w, d)
    k = min(rows, max(1, block // cols))  # whole rows per block
    buf_t = np.empty((k, cols), np.float32)
    buf_d = np.empty((k, cols), np.float32)
    buf_g = np.empty((k, cols), np.float32) if bf16 else None
    ssr = sse = sdot = ssa = 0.0
    mx = 0.0
    for r0 in range(0, rows, k):
        r1 = min(rows, r0 + k)
        n = r1 - r0
        wb, t, d = w[r0:r1], buf_t[:n], buf_d[:n]
        sb = sf if axis == 0 else sf[r0:r1]
        np.divide(wb, sb, out=t)  # true division, as the reference
        np.rint(t, out=t)
        np.clip(t, -QMAX, QMAX, out=t)
        np.copyto(q[r0:r1], t, casting="unsafe")  # exact: t holds integers in [-127, 127]
        np.multiply(t, sb, out=d)  # q·s: exact for bf16 scales, the reference's product for float32
        if bf16:
            _round_bf16_products(d, buf_g[:n])
        np.subtract(wb, d, out=t)  # the error
        wf, df, ef = wb.reshape(-1), d.reshape(-1), t.reshape(-1)
        ssr += float(np.dot(wf, wf))
        sse += float(np.dot(ef, ef))
        sdot += float(np.dot(wf, df))
        ssa += float(np.dot(df, df))
        mx = max(mx, float(ef.max()), -float(ef.min()))
    return q, scales, ErrorStats(int(w.size), ssr, sse, sdot, ssa, mx)


def _quantize_grouped(g: np.ndarray, scales: np.ndarray) -> np.ndarray:
    t = g / scales.astype(np.float32)[..., :, None, :]  # true division, as the reference
    np.rint(t, out=t)
    np.clip(t, -QMAX, QMAX, out=t)
    return t.astype(np.int8)


def _block_sq_err(g: np.ndarray, deq: np.ndarray) -> np.ndarray:
    e = (g - deq).astype(np.float64)
    return np.einsum("...ij,...ij->...j", e, e)  # [..., R, out]


def error_stats_f32(a: np.ndarray, b: np.ndarray, piece: int = 1 << 22) -> ErrorStats:
    """ErrorStats of float32 arrays without float64 copies (dot products per piece, summed in float64)."""
    a = np.ascontiguousarray(a, dtype=np.float32).reshape(-1)
    b = np.ascontiguousarray(b, dtype=np.float32).reshape(-1)
    total = ErrorStats()
    for i in range(0, a.size, piece):
        x, y = a[i : i + piece], b[i : i + piece]
        e = x - y
        total = total + ErrorStats(
            count=int(x.size),
            sum_sq_ref=float(np.dot(x, x)),
            sum_sq_err=float(np.dot(e, e)),
            sum_dot=float(np.dot(x, y)),
            sum_sq_approx=float(np.dot(y, y)),
            max_abs=float(max(e.max(), -e.min())) if e.size else 0.0,
        )
    return total


@dataclass(frozen=True, eq=False)
class RowQuantizedArray:
    """Per-row int8 (the `--embeddings int8` layout): `values` [V, D] int8, `scales` [V, 1].

    Row v dequantizes as bf16(values[v]) · scales[v]. The transposed pair is an ordinary R = 1
    per-output-channel weight [D, V] with scales [1, V] — the tied output projection.
    """

    values: np.ndarray
    scales: np.ndarray

    def __post_init__(self):
        v, s = self.values, self.scales
        if v.ndim != 2 or s.shape != (v.shape[0], 1):
            raise FormatError(f"per-row quantized weight: scales {s.shape} do not fit values {v.shape} (expected [{v.shape[0] if v.ndim else '?'}, 1])")

    @property
    def shape(self) -> tuple:
        return self.values.shape

    @property
    def nbytes(self) -> int:
        return self.values.nbytes + self.scales.nbytes

    def dequantize(self) -> np.ndarray:
        return self.transposed().dequantize().T

    def transposed(self) -> QuantizedArray:
        """The output-projection view: values.T [D, V] with per-column scales [1, V]."""
        return QuantizedArray(self.values.T, self.scales.T)


def quantize_rows(w: np.ndarray, scale_dtype=BF16, method: str = "absmax", q_out: Optional[np.ndarray] = None):
    """Per-row SPEC §3 int8 of [V, D] (one scale per row): the transpose of per-column R = 1."""
    if method == "absmax":
        return quantize_slab(w, 1, scale_dtype, q_out=q_out)
    q, s, stats = quantize_columns(np.asarray(w, dtype=np.float32).T, 1, scale_dtype, method)
    q, s = np.ascontiguousarray(q.T), np.ascontiguousarray(s.T)
    if q_out is not None:
        q_out[...] = q
        q = q_out
    return q, s, stats
