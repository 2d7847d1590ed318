"""Decode and prefill throughput on CPU: grouped top-2 MoE vs the naive all-experts baseline.

    .venv/bin/python benchmarks/bench_decode.py

Random int8 weights (release layout) for TINY and a wider config; times exclude compilation and
are the best of 5 runs.
"""

import time

import jax
import jax.numpy as jnp
import numpy as np

from slncx_tools.config import TINY, ModelConfig
from slncx_tools.model import QWeight, forward, init_cache
from slncx_tools.params import LAYER_PARAM_NAMES, layer_entries, param_table
from slncx_tools.quant import quantize

WIDE = TINY.replace(name="WIDE", vocab_size=4096, emb_size=1024, num_layers=4, num_q_heads=8, num_kv_heads=8, key_size=128, widening_factor=8, sequence_len=1024, attn_output_multiplier=1 / 128**0.5)


def random_params(cfg: ModelConfig, seed=0):
    rng = np.random.default_rng(seed)
    table = param_table(cfg)
    layers = {}
    for name in LAYER_PARAM_NAMES:
        e = layer_entries(table, name)[0]
        shape = (cfg.num_layers,) + e.shape
        if e.quantized:
            q = quantize(rng.standard_normal(shape, dtype=np.float32) / np.sqrt(e.shape[-2]), e.release_blocks)
            layers[name] = QWeight(jnp.asarray(q.values), jnp.asarray(q.scales))
        else:
            layers[name] = jnp.asarray(1 + 0.1 * rng.standard_normal(shape, dtype=np.float32)) if "norm" in name else jnp.asarray(rng.standard_normal(shape, dtype=np.float32) / np.sqrt(e.shape[0]))
    return {"embeddings": jnp.asarray(rng.standard_normal((cfg.vocab_size, cfg.emb_size), dtype=np.float32)),
            "final_norm": jnp.ones((cfg.emb_size,), jnp.float32), "layers": layers}


def timeit(fn, *args, reps=5):
    """Best of `reps` runs after a warm-up (the minimum is the robust estimate on a shared machine)."""
    jax.block_until_ready(fn(*args))
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        best = min(best, time.perf_counter() - t0)
    return best


def bench(cfg, moe, prompt_len=128, batch=1, steps=16):
    params = random_params(cfg)
    tokens = jnp.asarray(np.random.default_rng(1).integers(3, cfg.vocab_size, (batch, prompt_len)), jnp.int32)
    prefill = jax.jit(lambda p, t: forward(p, t, cfg, init_cache(cfg, batch, prompt_len + steps), moe=moe))

    @jax.jit
    def decode(p, cache, tok):
        def step(carry, _):
            cache, tok = carry
            logits, cache = forward(p, tok, cfg, cache, moe=moe)
            return (cache, jnp.argmax(logits[:, -1:], -1).astype(jnp.int32)), None
        (cache, tok), _ = jax.lax.scan(step, (cache, tok), None, length=steps)
        return tok

    t_pre = timeit(prefill, params, tokens)
    _, cache = prefill(params, tokens)
    t_dec = timeit(decode, params, cache, tokens[:, -1:])
    return batch * prompt_len / t_pre, batch * steps / t_dec


def main():
    print(f"backend {jax.default_backend()}, {jax.device_count()} device(s)")
    print(f"{'config':<6} {'MoE':<22} {'prefill tok/s':>14} {'decode tok/s':>13}")
    for cfg in (TINY, WIDE):
        rows = {}
        for moe, label in (("grouped", "grouped top-2"), ("dense", "naive all 8 experts")):
            rows[moe] = bench(cfg, moe)
            print(f"{cfg.name:<6} {label:<22} {rows[moe][0]:>14.0f} {rows[moe][1]:>13.1f}")
        g, d = rows["grouped"], rows["dense"]
        print(f"{cfg.name:<6} {'speed-up':<22} {g[0] / d[0]:>13.2f}x {g[1] / d[1]:>12.2f}x")


if __name__ == "__main__":
    main()
