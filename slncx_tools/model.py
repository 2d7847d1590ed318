"""The SLNCX model as pure JAX functions over a params pytree (SPEC §4). No Haiku, no Flax.

Params pytree (built by `load.load_params`; layer weights stacked on a leading layer axis in
numeric layer order 0..L-1, keyed by their parameter-table name):

    {"embeddings": f32 [V, D] | QEmbedding, # tied input/output embedding (QEmbedding: per-row int8)
     "final_norm": f32 [D],
     "layers": {"moe/linear/w": QWeight | bf16 [L, E, D, F], ..., "router/w": f32 [L, D, E]}}

A quantized weight is a `QWeight(values int8 [..., in, out], scales [..., R, out])`; `matmul`
dequantizes it (bf16(q) · bf16(s), one scale row per in/R input rows) right before the dot, one
layer (or one expert) at a time, so no float copy of the whole model ever exists.

`forward(params, tokens, cfg, cache)` is the whole model: prefill (many tokens) and decode (one
token per row) are the same code. Layers run under `jax.lax.scan`.
"""

from __future__ import annotations

import dataclasses
from functools import partial
from typing import Optional

import jax
import jax.numpy as jnp

from .config import ModelConfig

BF16 = jnp.bfloat16
F32 = jnp.float32
NEG_INF = -1e30  # the reference's mask value (finite: a fully masked row gives a uniform softmax, not NaN)


# --- int8 weights -------------------------------------------------------------------------------
@partial(jax.tree_util.register_dataclass, data_fields=["values", "scales"], meta_fields=[])
@dataclasses.dataclass
class QWeight:
    """int8 `values` [..., in, out] with `scales` [..., R, out]; R divides `in` (SPEC §3)."""

    values: jax.Array
    scales: jax.Array

    @property
    def shape(self):
        return self.values.shape

    def __getitem__(self, index):  # one layer / one expert: index the leading axes of both
        return QWeight(self.values[index], self.scales[index])


def dequantize(w, dtype=BF16) -> jax.Array:
    """A weight as `dtype`: bf16(q) · s (the reference's dequantization; exact in float32)."""
    if not isinstance(w, QWeight):
        return w.astype(dtype)
    rows, blocks = w.values.shape[-2], w.scales.shape[-2]
    # Scales [..., R, out]: whole along the rows (mesh.partition_spec) or split with them in R'
    # re-gridded blocks (load.load_sharded); either way repeating each over its rows/R input rows
    # lines up with the values, and XLA fuses the broadcast into the product.
    scales = jnp.repeat(w.scales, rows // blocks, axis=-2)  # [..., R, out] -> [..., in, out]
    return (w.values.astype(F32) * scales.astype(F32)).astype(dtype)


def matmul(x: jax.Array, w, dtype=BF16) -> jax.Array:
    """x [..., in] @ weight [in, out] -> [..., out], computed in `dtype` (a QWeight is
    dequantized first, one layer or one expert at a time)."""
    return jnp.einsum("...i,io->...o", x.astype(dtype), dequantize(w, dtype))


@partial(jax.tree_util.register_dataclass, data_fields=["values", "scales"], meta_fields=[])
@dataclasses.dataclass
class QEmbedding:
    """Per-row int8 embedding table (`quantize --embeddings int8`, store kind "int8_rows"):
    `values` int8 [V, D] and `scales` [V, 1], one scale per vocabulary row. Row v is
    bf16(values[v]) · scales[v]; the transposed pair (values.T [D, V], scales.T [1, V]) is an R = 1
    per-output-column weight, which is how the tied output projection uses it (`unembed`)."""

    values: jax.Array
    scales: jax.Array

    @property
    def shape(self):
        return self.values.shape


def _dequantize_rows(values: jax.Array, scales: jax.Array, dtype) -> jax.Array:
    """bf16(q) · s for rows of a QEmbedding (scales broadcast over the row), exact in float32 and
    then cast to `dtype`, exactly as `dequantize` does for a QWeight."""
    return (values.astype(F32) * scales.astype(F32)).astype(dtype)


# Bytes of dequantized embedding rows the output projection materialises at a time (per device, before
# sharding of D): the vocabulary is processed in chunks so that no float copy of the whole table
# (131072 x 6144 for SLNCX) ever exists.
UNEMBED_CHUNK_BYTES = 64 * 1024 * 1024


def _vocab_chunks(V: int, D: int, itemsize: int, chunk_bytes: int) -> int:
    """The smallest number of equal vocabulary chunks (a divisor of V) of at most chunk_bytes each."""
    need = max(1, -(-V * D * itemsize // max(chunk_bytes, 1)))
    for n in range(need, V + 1):
        if V % n == 0:
            return n
    return V


def matmul_embedding_t(h: jax.Array, table, dtype, chunk_bytes: int = UNEMBED_CHUNK_BYTES) -> jax.Array:
    """h [..., D] @ table.T -> [..., V] in `dtype` (the tied output projection). A QEmbedding is
    dequantized inside, one vocabulary chunk at a time (a lax.map over chunks of V/n rows)."""
    if not isinstance(table, QEmbedding):
        return jnp.einsum("...d,vd->...v", h, table.astype(dtype))
    V, D = table.values.shape
    h = h.astype(dtype)
    n = _vocab_chunks(V, D, jnp.dtype(dtype).itemsize, chunk_bytes)
    if n == 1:
        return jnp.einsum("...d,vd->...v", h, _dequantize_rows(table.values, table.scales, dtype))
    c = V // n
    vals, scales = table.values.reshape(n, c, D), table.scales.reshape(n, c, 1)
    out = jax.lax.map(lambda a: jnp.einsum("...d,vd->...v", h, _dequantize_rows(a[0], a[1], dtype)), (vals, scales))
    return jnp.moveaxis(out, 0, -2).reshape(h.shape[:-1] + (V,))  # [n, ..., c] -> [..., V]


# --- KV cache -----------------------------------------------------------------------------------
@partial(jax.tree_util.register_dataclass, data_fields=["k", "v", "valid", "count", "length"], meta_fields=[])
@dataclasses.dataclass
class KVCache:
    """Keys/values for S slots. All rows write slot `length` next; each row counts its own real
    (non-pad) tokens, which is its next RoPE position, and `valid` masks its pad slots."""

    k: jax.Array  # [L, B, S, K, hd] (after RoPE)
    v: jax.Array  # [L, B, S, K, hd]
    valid: jax.Array  # bool [B, S]: slot holds a real token of that row
    count: jax.Array  # int32 [B]: real tokens seen per row
    length: jax.Array  # int32 []: slots used (same for every row)

    @property
    def capacity(self) -> int:
        return self.k.shape[2]


def init_cache(cfg: ModelConfig, batch: int, capacity: int, dtype=F32) -> KVCache:
    """An empty cache of `capacity` slots (keys/values stored in `dtype`)."""
    shape = (cfg.num_layers, batch, capacity, cfg.num_kv_heads, cfg.key_size)
    return KVCache(
        k=jnp.zeros(shape, dtype),
        v=jnp.zeros(shape, dtype),
        valid=jnp.zeros((batch, capacity), bool),
        count=jnp.zeros((batch,), jnp.int32),
        length=jnp.zeros((), jnp.int32),
    )


# --- blocks -------------------------------------------------------------------------------------
def rms_norm(x: jax.Array, scale: jax.Array, eps: float, dtype=BF16) -> jax.Array:
    """float32 RMSNorm with the scale applied in float32, cast back to the activation dtype."""
    xf = x.astype(F32)
    normed = xf * jax.lax.rsqrt(jnp.mean(jnp.square(xf), axis=-1, keepdims=True) + eps)
    return (scale.astype(F32) * normed).astype(dtype)


def rope(x: jax.Array, positions: jax.Array, base: float) -> jax.Array:
    """Rotate-half RoPE in float32. x: [B, T, heads, hd]; positions: [B, T] (float32)."""
    hd = x.shape[-1]
    inv_freq = 1.0 / (base ** (jnp.arange(0, hd, 2, dtype=F32) / hd))  # [hd/2]
    phase = positions[:, :, None] * inv_freq  # [B, T, hd/2]
    phase = jnp.concatenate([phase, phase], axis=-1)[:, :, None, :]  # [B, T, 1, hd]
    x1, x2 = jnp.split(x, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return (x * jnp.cos(phase) + rotated * jnp.sin(phase)).astype(x.dtype)


def attention(p: dict, x, k_all, v_all, layer, positions, mask, start, cfg: ModelConfig, dt=BF16):
    """Grouped-query attention over the cache. x: bf16 [B, T, D]; k_all/v_all: the whole cache
    [L, B, S, K, hd] (this layer's new keys are written at slot `start`); mask: bool [B, T, S]."""
    B, T, _ = x.shape
    H, K, hd = cfg.num_q_heads, cfg.num_kv_heads, cfg.key_size
    q = matmul(x, p["multi_head_attention/query/w"], dt).reshape(B, T, H, hd)
    k = matmul(x, p["multi_head_attention/key/w"], dt).reshape(B, T, K, hd)
    v = matmul(x, p["multi_head_attention/value/w"], dt).reshape(B, T, K, hd)
    q = rope(q, positions, cfg.rope_base)
    k = rope(k, positions, cfg.rope_base)
    k_all = jax.lax.dynamic_update_slice(k_all, k[None].astype(k_all.dtype), (layer, 0, start, 0, 0))
    v_all = jax.lax.dynamic_update_slice(v_all, v[None].astype(v_all.dtype), (layer, 0, start, 0, 0))
    keys, values = k_all[layer].astype(dt), v_all[layer].astype(dt)  # [B, S, K, hd]
    q = q.reshape(B, T, K, H // K, hd)  # query head h uses kv head h // (H/K)
    logits = jnp.einsum("btkgd,bskd->bkgts", q, keys).astype(F32)  # [B, K, G, T, S]
    logits = logits * cfg.attn_output_multiplier
    cap = cfg.logit_soft_cap
    logits = cap * jnp.tanh(logits / cap)
    logits = jnp.where(mask[:, None, None], logits, NEG_INF)
    weights = jax.nn.softmax(logits, axis=-1).astype(dt)
    out = jnp.einsum("bkgts,bskd->btkgd", weights, values).reshape(B, T, H * hd)
    return matmul(out, p["multi_head_attention/linear/w"], dt), k_all, v_all


def route(router_w: jax.Array, x: jax.Array, k: int):
    """float32 router: softmax over experts, top-k probabilities NOT renormalised. x: [N, D]."""
    probs = jax.nn.softmax(jnp.dot(x.astype(F32), router_w.astype(F32)), axis=-1)  # [N, E]
    return jax.lax.top_k(probs, k)  # gates f32 [N, k], experts int32 [N, k]


def expert_weights(p: dict, e, dt=BF16):
    """Expert e's three matrices dequantized: (W_linear [D, F], W_linear_v [D, F] in `dt`,
    W_linear_1 [F, D] in float32). One expert at a time: never a float copy of all experts."""
    return (dequantize(p["moe/linear/w"][e], dt), dequantize(p["moe/linear_v/w"][e], dt),
            dequantize(p["moe/linear_1/w"][e]).astype(F32))


def expert_apply(weights, x: jax.Array, dt=BF16) -> jax.Array:
    """An expert's MLP on rows x [n, D] -> float32 [n, D], with the reference's dtypes:
    `dt` matmuls for the two up projections, gelu(tanh) and product in f32, f32 down matmul."""
    w, v, w1 = weights
    h_w = jnp.dot(x.astype(dt), w).astype(F32)  # [n, F]
    h_v = jnp.dot(x.astype(dt), v).astype(F32)  # [n, F]
    act = h_v * jax.nn.gelu(h_w, approximate=True)
    return jnp.dot(act, w1)  # [n, D]


def expert_mlp(p: dict, e, x: jax.Array, dt=BF16) -> jax.Array:
    """One expert e on rows x [n, D] -> float32 [n, D] (dequantizes e's weights, then applies them)."""
    return expert_apply(expert_weights(p, e, dt), x, dt)


def _combine(gates, out, dt):
    """Gate-weighted sum in float32 (gates rounded to `dt` first), cast to `dt`."""
    return jnp.sum(out * gates.astype(dt).astype(F32)[..., None], axis=1).astype(dt)


def row_buckets(rows: int) -> tuple:
    """The static matmul sizes an expert's rows are run in: 1, 2, 4, 8, every multiple of 8 up to 64,
    then multiples of 8 growing by ~1.25x (80, 104, 136, ...), the last one `rows` (an expert never
    has more rows than there are tokens). An expert with c rows runs one matmul of the smallest size
    ≥ c: at most 7 wasted rows up to 64, under 25 % beyond; ~2·log2(rows) sizes (compiled branches)."""
    sizes, b = [], 1
    while b < rows:
        sizes.append(b)
        b = b * 2 if b < 8 else b + 8 if b < 64 else (b * 5 // 4 + 7) // 8 * 8
    return tuple(sizes) + (max(rows, 1),)


def moe_grouped(p: dict, x: jax.Array, cfg: ModelConfig, dt=BF16, tile: Optional[int] = None) -> jax.Array:
    """Top-k MoE computing only the selected experts. The (token, expert) assignments are sorted by
    expert; then a loop over the experts: an expert with rows is dequantized once and runs its
    contiguous rows in one matmul of a static size (the smallest of `row_buckets(N)` that holds
    them, chosen with lax.switch; rows past its own are computed and discarded), an expert without
    rows is skipped. With `tile`, an expert's rows run in tiles of exactly `tile` rows instead (a
    loop with a dynamic trip count). x: [N, D] -> `dt` [N, D]. Exact (no capacity drops); matmul
    work ≈ N·k rows + ≤ 7 rows per expert (< 25 % beyond 64 rows); ≤ min(E, N·k) dequantized experts."""
    N, D = x.shape
    E, k = cfg.num_experts, cfg.num_selected_experts
    gates, experts = route(p["router/w"], x, k)
    A = N * k  # assignments
    sizes = (int(tile),) if tile else row_buckets(N)
    big = max(sizes)
    flat = experts.reshape(A)
    order = jnp.argsort(flat, stable=True)  # [A] assignment ids sorted by expert
    counts = jnp.bincount(flat, length=E)  # [E] rows per expert (each ≤ N)
    starts = jnp.cumsum(counts) - counts  # [E] first sorted row of each expert
    # sorted rows, with `big` rows of slack so no slice is ever clamped (clamping would shift it)
    rows = jnp.zeros((A + big, D), dt).at[: A].set(x[order // k].astype(dt))
    limits = jnp.asarray(sizes, jnp.int32)

    def one_expert(y, e):
        def run(y):
            weights = expert_weights(p, e, dt)  # once per layer for this expert

            def apply(size, start, remaining, y):
                out = expert_apply(weights, jax.lax.dynamic_slice_in_dim(rows, start, size), dt)  # [size, D]
                keep = (jnp.arange(size) < remaining)[:, None]
                old = jax.lax.dynamic_slice_in_dim(y, start, size)
                return jax.lax.dynamic_update_slice_in_dim(y, jnp.where(keep, out, old), start, 0)

            def body(c):
                done, y = c
                remaining = counts[e] - done
                b = jnp.minimum(jnp.searchsorted(limits, remaining), len(sizes) - 1)  # smallest size ≥ remaining
                y = jax.lax.switch(b, [partial(apply, n) for n in sizes], starts[e] + done, remaining, y)
                return done + limits[b], y

            return jax.lax.while_loop(lambda c: c[0] < counts[e], body, (jnp.int32(0), y))[1]

        return jax.lax.cond(counts[e] > 0, run, lambda y: y, y), None

    y, _ = jax.lax.scan(one_expert, jnp.zeros((A + big, D), F32), jnp.arange(E))
    out = jnp.zeros((A, D), F32).at[order].set(y[:A]).reshape(N, k, D)
    return _combine(gates, out, dt)


def moe_dense(p: dict, x: jax.Array, cfg: ModelConfig, dt=BF16) -> jax.Array:
    """The reference's way: every expert on every token, then select. A baseline, and a check."""
    N, D = x.shape
    gates, experts = route(p["router/w"], x, cfg.num_selected_experts)
    all_out = jax.vmap(lambda e: expert_mlp(p, e, x, dt))(jnp.arange(cfg.num_experts))  # [E, N, D]
    out = jnp.take_along_axis(all_out.transpose(1, 0, 2), experts[..., None], axis=1)  # [N, k, D]
    return _combine(gates, out, dt)


MOE_IMPLS = {"grouped": moe_grouped, "dense": moe_dense}


# --- the model ----------------------------------------------------------------------------------
# Activation dtype. The reference (jax 0.4.25 on CPU) casts activations to bf16 as SPEC §4 says,
# but XLA's excess-precision passes remove most of those casts inside its fused program, so its
# numbers are those of float32 activations over bf16-valued weights: `REFERENCE_DTYPE` reproduces
# them (SPEC §6 parity; this includes the f32 embedding table in and out); `jnp.bfloat16` rounds every activation as written (faster on accelerators).
REFERENCE_DTYPE = F32


def embed(params: dict, tokens: jax.Array, cfg: ModelConfig, dt=REFERENCE_DTYPE) -> jax.Array:
    table = params["embeddings"]
    if isinstance(table, QEmbedding):  # gather the int8 rows and their scales, dequantize only those
        x = _dequantize_rows(table.values[tokens], table.scales[tokens], dt)  # [B, T, D]
    else:
        x = table[tokens].astype(dt)  # f32 table rows [B, T, D]
    return x * jnp.asarray(cfg.embedding_multiplier_scale, BF16).astype(dt)


def unembed(params: dict, h: jax.Array, cfg: ModelConfig, *, chunk_bytes: int = UNEMBED_CHUNK_BYTES) -> jax.Array:
    """Final-normed h [..., D] -> bf16 logits [..., V] (tied embedding, × output multiplier)."""
    logits = matmul_embedding_t(h, params["embeddings"], h.dtype, chunk_bytes)
    return (logits * jnp.asarray(cfg.output_multiplier_scale, BF16).astype(h.dtype)).astype(BF16)


def forward_hidden(params: dict, tokens: jax.Array, cfg: ModelConfig, cache: Optional[KVCache] = None, *, moe: str = "grouped", dtype=REFERENCE_DTYPE):
    """Run the decoder on tokens [B, T] after `cache` (a fresh cache of T slots when None).
    Returns the final-normed hidden states [B, T, D] (in `dtype`) and the updated cache."""
    B, T = tokens.shape
    dt = dtype
    if cache is None:
        cache = init_cache(cfg, B, T, dt)
    real = tokens != cfg.pad_token  # [B, T]
    start = cache.length
    # A row's position = its real tokens so far: pads (left or right) do not shift positions.
    positions = (cache.count[:, None] + jnp.cumsum(real, axis=1) - 1).clip(min=0).astype(F32)
    valid = jax.lax.dynamic_update_slice(cache.valid, real, (0, start))  # [B, S]
    slot = jnp.arange(cache.capacity)  # [S]
    causal = slot[None, :] <= (start + jnp.arange(T))[:, None]  # [T, S]
    mask = causal[None] & valid[:, None, :]  # [B, T, S]
    moe_fn = MOE_IMPLS[moe]
    eps = cfg.rms_eps

    def layer_step(carry, p):
        h, k_all, v_all, i = carry
        a, k_all, v_all = attention(p, rms_norm(h, p["rms_norm/scale"], eps, dt), k_all, v_all, i, positions, mask, start, cfg, dt)
        h = h + rms_norm(a, p["rms_norm_1/scale"], eps, dt)
        m = moe_fn(p, rms_norm(h, p["rms_norm_2/scale"], eps, dt).reshape(B * T, -1), cfg, dt).reshape(B, T, -1)
        h = h + rms_norm(m, p["rms_norm_3/scale"], eps, dt)
        return (h, k_all, v_all, i + 1), None

    h = embed(params, tokens, cfg, dt)
    (h, k_all, v_all, _), _ = jax.lax.scan(layer_step, (h, cache.k, cache.v, jnp.int32(0)), params["layers"])
    h = rms_norm(h, params["final_norm"], eps, dt)
    new_cache = KVCache(k_all, v_all, valid, cache.count + real.sum(axis=1, dtype=jnp.int32), start + T)
    return h, new_cache


def forward(params: dict, tokens: jax.Array, cfg: ModelConfig, cache: Optional[KVCache] = None, *, moe: str = "grouped", dtype=REFERENCE_DTYPE):
    """tokens int32 [B, T] (pad = 0) -> (bf16 logits [B, T, V], updated KVCache).

    Prefill and decode are this same function: pass the cache returned by the previous call.
    `moe`: "grouped" (only the selected experts) or "dense" (all experts, the reference's way).
    `dtype`: activation dtype (REFERENCE_DTYPE = float32 for parity, or jnp.bfloat16)."""
    h, cache = forward_hidden(params, tokens, cfg, cache, moe=moe, dtype=dtype)
    return unembed(params, h, cfg), cache
