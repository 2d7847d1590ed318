"""Sampling: a jit-compiled decode loop over the model (SPEC §5), for batches of prompts.

    gen = Generator(params, cfg, mesh=None)
    out = gen.generate([[5, 6, 7], [9, 10]], max_new_tokens=16, temperature=0.7, top_p=0.9,
                       top_k=0, seed=0, on_tokens=print)
    out.ids        # new token ids per prompt (ending with eos if it stopped there)
    out.probs      # the model's probability (softmax of the logits) of each chosen token

Prompts are right-padded to one length and prefilled together; each row keeps its own position
count, so a batch gives the same tokens as running each prompt alone. Decoding runs `chunk`
steps per jitted call (a lax.while_loop that also stops once every row hit eos) and hands each
chunk to `on_tokens`, which is how the CLI streams.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from .config import ModelConfig
from .errors import SlncxError
from .model import REFERENCE_DTYPE, forward, forward_hidden, init_cache, unembed

log = logging.getLogger(__name__)
F32 = jnp.float32


def filter_logits(logits: jax.Array, top_p, top_k) -> jax.Array:
    """Mask logits [B, V] outside the top-k (k > 0) and outside the nucleus: the smallest set of
    top tokens whose probability reaches top_p (SPEC §5). Ties at the threshold are kept."""
    sorted_desc = -jnp.sort(-logits, axis=-1)  # [B, V]
    probs = jax.nn.softmax(sorted_desc, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # mass of the tokens ranked above
    keep = jnp.maximum(jnp.sum(before < top_p, axis=-1), 1)  # [B] nucleus size
    V = logits.shape[-1]
    k = jnp.where(top_k > 0, jnp.minimum(top_k, V), V)
    keep = jnp.minimum(keep, k)
    threshold = jnp.take_along_axis(sorted_desc, (keep - 1)[:, None], axis=-1)  # [B, 1]
    return jnp.where(logits >= threshold, logits, -jnp.inf)


def sample_token(key, logits: jax.Array, temperature, top_p, top_k):
    """logits [B, V] -> (ids int32 [B], model probability of each id f32 [B]). temperature <= 0
    is greedy (argmax)."""
    logits = logits.astype(F32)
    scaled = logits / jnp.maximum(temperature, 1e-6)
    sampled = jax.random.categorical(key, filter_logits(scaled, top_p, top_k), axis=-1)
    ids = jnp.where(temperature > 0, sampled, jnp.argmax(logits, axis=-1)).astype(jnp.int32)
    probs = jnp.take_along_axis(jax.nn.softmax(logits, axis=-1), ids[:, None], axis=-1)[:, 0]
    return ids, probs


@dataclass
class Generation:
    ids: list  # per prompt: new token ids (the last is eos when it stopped there)
    probs: list  # per prompt: probability of each new token under the model
    prompt_lengths: list
    prefill_s: float = 0.0
    decode_s: float = 0.0
    compile_s: float = 0.0
    decode_steps: int = 0  # batched decode steps run after the prefill
    stopped: list = field(default_factory=list)  # per prompt: ended at eos

    @property
    def decode_tokens_per_s(self) -> float:
        n = sum(len(i) for i in self.ids) - len(self.ids)  # tokens produced by decode steps
        return n / self.decode_s if self.decode_s > 0 else 0.0


class Generator:
    """Compiled prefill + decode for one params pytree (and mesh); reuse it across calls."""

    def __init__(self, params, cfg: ModelConfig, mesh=None, *, dtype=REFERENCE_DTYPE, moe: str = "grouped", chunk: int = 8):
        self.params, self.cfg, self.mesh = params, cfg, mesh
        self.dtype, self.moe, self.chunk = dtype, moe, chunk
        self._compiled: dict = {}
        self._prefill = jax.jit(self._prefill_fn, static_argnames=("capacity",))
        self._decode = jax.jit(self._decode_fn, donate_argnums=(1,))

    # --- jitted pieces --------------------------------------------------------------------------
    def _constrain_cache(self, cache):
        if self.mesh is None:
            return cache
        from .mesh import cache_specs, shardings

        return jax.lax.with_sharding_constraint(cache, shardings(self.mesh, cache_specs(self.mesh, self.cfg, cache.k.shape[1])))

    def _prefill_fn(self, params, tokens, key, settings, *, capacity):
        B, P = tokens.shape
        cache = self._constrain_cache(init_cache(self.cfg, B, capacity, self.dtype))
        h, cache = forward_hidden(params, tokens, self.cfg, cache, moe=self.moe, dtype=self.dtype)
        real = tokens != self.cfg.pad_token
        last = P - 1 - jnp.argmax(real[:, ::-1], axis=1)  # [B] index of each row's last real token
        logits = unembed(params, h[jnp.arange(B), last], self.cfg)  # [B, V]
        key, sub = jax.random.split(key)
        ids, probs = sample_token(sub, logits, *settings)
        return ids, probs, self._constrain_cache(cache), key

    def _decode_fn(self, params, state, settings, limit):
        """Up to `limit` (≤ chunk) decode steps; stops early once every row is done."""
        cache, token, done, key = state
        B, n = token.shape[0], self.chunk
        eos, pad = self.cfg.eos_token, self.cfg.pad_token
        ignore_eos = settings[3]

        def cond(c):
            i, _, _, done, _, _, _ = c
            return (i < limit) & ~jnp.all(done)

        def body(c):
            i, cache, token, done, key, out_ids, out_probs = c
            feed = jnp.where(done, pad, token)[:, None]  # finished rows feed pad: not a real token
            logits, cache = forward(params, feed, self.cfg, cache, moe=self.moe, dtype=self.dtype)
            key, sub = jax.random.split(key)
            ids, probs = sample_token(sub, logits[:, 0], *settings[:3])
            ids = jnp.where(done, pad, ids)
            out_ids = out_ids.at[:, i].set(ids)
            out_probs = out_probs.at[:, i].set(probs)
            done = done | ((ids == eos) & ~ignore_eos)
            return i + 1, cache, ids, done, key, out_ids, out_probs

        init = (jnp.int32(0), cache, token, done, key, jnp.full((B, n), pad, jnp.int32), jnp.zeros((B, n), F32))
        i, cache, token, done, key, out_ids, out_probs = jax.lax.while_loop(cond, body, init)
        return (cache, token, done, key), out_ids, out_probs, i

    def _get(self, name, fn, *args, **static):
        sig = (name, tuple(static.items())) + tuple((a.shape, str(a.dtype)) for a in jax.tree.leaves(args))
        if sig not in self._compiled:
            t0 = time.perf_counter()
            self._compiled[sig] = fn.lower(*args, **static).compile()
            self._compile_s += time.perf_counter() - t0
        return self._compiled[sig]

    # --- the loop -------------------------------------------------------------------------------
    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        *,
        max_new_tokens: int = 32,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
        seed: int = 0,
        ignore_eos: bool = False,
        on_tokens: Optional[Callable[[list], None]] = None,
    ) -> Generation:
        cfg = self.cfg
        prompts = [list(map(int, p)) for p in prompts]
        check_prompts(prompts, cfg)
        longest = max(len(p) for p in prompts)
        room = cfg.sequence_len - longest
        if max_new_tokens > room:
            log.warning("max_new_tokens %d exceeds the context (%d) left after a %d-token prompt; generating %d",
                        max_new_tokens, cfg.sequence_len, longest, room)
            max_new_tokens = room
        B = len(prompts)
        P = int(math.ceil(longest / 16) * 16)  # a few shape buckets, not one compile per length
        tokens = np.full((B, P), cfg.pad_token, np.int32)
        for b, p in enumerate(prompts):
            tokens[b, : len(p)] = p
        capacity = int(math.ceil((P + max(max_new_tokens, 1)) / 64) * 64)  # slots, not positions
        settings = (jnp.float32(temperature), jnp.float32(top_p), jnp.int32(top_k), jnp.bool_(ignore_eos))
        key = jax.random.PRNGKey(seed)
        tokens = jnp.asarray(tokens)
        self._compile_s = 0.0
        result = Generation(ids=[[] for _ in prompts], probs=[[] for _ in prompts], prompt_lengths=[len(p) for p in prompts])
        if max_new_tokens <= 0:
            return result

        prefill = self._get("prefill", self._prefill, self.params, tokens, key, settings[:3], capacity=capacity)
        t0 = time.perf_counter()
        ids, probs, cache, key = prefill(self.params, tokens, key, settings[:3])
        ids_np, probs_np = np.asarray(ids), np.asarray(probs)
        result.prefill_s = time.perf_counter() - t0
        done = np.zeros(B, bool)
        self._emit(result, ids_np[:, None], probs_np[:, None], done, ignore_eos, on_tokens)

        state = (cache, ids, jnp.asarray(done), key)
        remaining = max_new_tokens - 1
        decode = None
        t0 = time.perf_counter()
        while remaining > 0 and not done.all():
            if decode is None:
                decode = self._get("decode", self._decode, self.params, state, settings, jnp.int32(0))
                t0 = time.perf_counter()  # decode timing excludes its compilation
            step = min(self.chunk, remaining)
            state, out_ids, out_probs, n = decode(self.params, state, settings, jnp.int32(step))
            n = int(n)
            self._emit(result, np.asarray(out_ids)[:, :n], np.asarray(out_probs)[:, :n], done, ignore_eos, on_tokens)
            remaining -= n
            result.decode_steps += n
        result.decode_s = time.perf_counter() - t0 if decode is not None else 0.0
        result.compile_s = self._compile_s
        result.stopped = [bool(d) for d in done]
        return result

    def _emit(self, result, ids, probs, done, ignore_eos, on_tokens):
        """Append a chunk of new tokens [B, n] to each unfinished row; update `done` in place."""
        new = []
        for b in range(ids.shape[0]):
            row = []
            for t in range(ids.shape[1]):
                if done[b]:
                    break
                row.append(int(ids[b, t]))
                result.probs[b].append(float(probs[b, t]))
                if ids[b, t] == self.cfg.eos_token and not ignore_eos:
                    done[b] = True
            result.ids[b].extend(row)
            new.append(row)
        if on_tokens is not None:
            on_tokens(new)


def check_prompts(prompts: Sequence[Sequence[int]], cfg: ModelConfig) -> None:
    if not prompts:
        raise SlncxError("no prompt given")
    for i, p in enumerate(prompts):
        if not p:
            raise SlncxError(f"prompt {i + 1} is empty (it needs at least one token)")
        if len(p) > cfg.sequence_len:
            raise SlncxError(f"prompt {i + 1} has {len(p)} tokens, longer than the model's context of {cfg.sequence_len}")
        bad = [t for t in p if not 0 < t < cfg.vocab_size]
        if bad:
            raise SlncxError(
                f"prompt {i + 1}: token id {bad[0]} is outside 1..{cfg.vocab_size - 1} "
                f"(id {cfg.pad_token} is padding); does the tokenizer match this checkpoint?"
            )


def generate(params, cfg: ModelConfig, prompts, mesh=None, **kwargs) -> Generation:
    """One-shot convenience: Generator(params, cfg, mesh).generate(prompts, **kwargs)."""
    return Generator(params, cfg, mesh).generate(prompts, **kwargs)
