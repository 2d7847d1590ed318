"""The pure-JAX model against the reference fixtures (SPEC §6) and against itself (cache, batch)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from slncx_tools.checkpoint import open_checkpoint
from slncx_tools.config import TINY
from slncx_tools.load import ArrayCheckpoint, load_params
from slncx_tools.model import forward, init_cache, moe_dense, moe_grouped

fwd = jax.jit(lambda p, t: forward(p, t, TINY)[0])


def metrics(ours, ref):
    """mean |Δ| and top-1 agreement. A position agrees when our argmax is one of the reference's
    top-1 tokens (bf16 logits tie exactly at ~3% of positions; either choice is its top-1)."""
    ours, ref = np.asarray(ours, np.float32), np.asarray(ref, np.float32)
    top = np.take_along_axis(ref, ours.argmax(-1)[..., None], -1)[..., 0] == ref.max(-1)
    return float(np.abs(ours - ref).mean()), float(top.mean())


@pytest.fixture(scope="module")
def release(tiny_dir):
    return load_params(open_checkpoint(tiny_dir / "release_layout")), np.load(tiny_dir / "reference_mesh8.npz")


@pytest.fixture(scope="module")
def per_channel(tiny_dir):
    return load_params(open_checkpoint(tiny_dir / "per_channel_layout")), np.load(tiny_dir / "reference_mesh1.npz")


@pytest.fixture(scope="module")
def float_params(tiny_dir):
    return load_params(ArrayCheckpoint(TINY, dict(np.load(tiny_dir / "float_weights.npz"))))


@pytest.mark.parametrize("which", ["release", "per_channel"])
def test_logits_match_reference_int8(which, request):
    params, ref = request.getfixturevalue(which)
    tokens = ref["tokens"]
    real = tokens > 0  # the padded row: compare its 11 real positions (pad outputs are unused)
    mean, top1 = metrics(fwd(params, jnp.asarray(tokens))[real], ref["logits_int8"][real])
    assert mean <= 0.01 and top1 >= 0.99, (mean, top1)
    mean, top1 = metrics(fwd(params, jnp.asarray(ref["tokens_long"])), ref["logits_long_int8"])
    # Over 96 positions the reference agrees with itself (1x8 vs 1x1 mesh) on 97.9 % of top-1s:
    # routing near-ties flip isolated positions. Require that level here.
    assert mean <= 0.01 and top1 >= 0.96, (mean, top1)


def test_logits_match_reference_float_weights(float_params, tiny_dir):
    for name in ("reference_mesh1.npz", "reference_mesh8.npz"):
        ref = np.load(tiny_dir / name)
        real = ref["tokens"] > 0
        mean, top1 = metrics(fwd(float_params, jnp.asarray(ref["tokens"]))[real], ref["logits_floatw"][real])
        assert mean <= 0.01 and top1 >= 0.99, (name, mean, top1)
        mean, top1 = metrics(fwd(float_params, jnp.asarray(ref["tokens_long"])), ref["logits_long_floatw"])
        assert mean <= 0.01 and top1 >= 0.96, (name, mean, top1)


def test_int8_and_float_weights_differ_by_quantization_only(release, float_params):
    params, ref = release
    mean, _ = metrics(fwd(params, jnp.asarray(ref["tokens"])), fwd(float_params, jnp.asarray(ref["tokens"])))
    assert 0.001 < mean < 0.03  # SPEC §6: int8 moves logits by ~0.0125


@jax.jit
def _teacher_forced(params, prompt, steps):
    """Prefill `prompt` [1, P] into a cache with room to spare, then feed `steps` one at a time."""
    logits, cache = forward(params, prompt, TINY, init_cache(TINY, 1, 64))

    def step(cache, tok):
        out, cache = forward(params, tok[None, None], TINY, cache)
        return cache, out[0, 0]

    _, per_step = jax.lax.scan(step, cache, steps)
    return logits, per_step


def test_kv_cache_decode_matches_reference_steps(release):
    params, ref = release
    long = jnp.asarray(ref["tokens_long"])
    prefill_logits, steps = _teacher_forced(params, long[:, :16], long[0, 16:48])
    # row j of kv_step_logits = logits at position 16 + j, i.e. after feeding token 16 + j
    mean, top1 = metrics(steps, ref["kv_step_logits"])
    assert mean <= 0.01 and top1 >= 0.96, (mean, top1)
    # prefill + decode = one full forward over the same tokens (within bf16 noise)
    full = fwd(params, long[:, :48])[0]
    mean, top1 = metrics(jnp.concatenate([prefill_logits[0], steps]), full)
    assert mean <= 0.005 and top1 == 1.0, (mean, top1)


def test_greedy_steps_match_reference(release):
    params, ref = release
    prompt, ids = ref["decode_prompt"], ref["greedy_nocache_ids"]
    # teacher-forced: feed the reference's greedy ids, compare the logits of each step
    _, steps = _teacher_forced(params, jnp.asarray(prompt)[None], jnp.asarray(ids[:7]))
    first = fwd(params, jnp.asarray(prompt)[None])[0, -1]
    ours = jnp.concatenate([first[None], steps])
    mean, top1 = metrics(ours, ref["greedy_nocache_step_logits"])
    assert mean <= 0.01 and top1 >= 0.99, (mean, top1)
    # free-running greedy ids agree wherever the reference's margin is clear
    clear = ref["greedy_nocache_top1_margin"] > 0.05
    np.testing.assert_array_equal(np.asarray(ours.argmax(-1))[clear], ids[clear])


def test_batch_of_different_lengths_equals_one_at_a_time(release):
    params, ref = release
    a = ref["tokens_long"][0, :13]
    b = ref["tokens_long"][0, 40:47]
    batch = np.zeros((2, 13), np.int32)
    batch[0], batch[1, :7] = a, b  # right padding
    left = np.zeros((1, 13), np.int32)
    left[0, 6:] = b  # left padding: positions still count real tokens only
    together = np.asarray(fwd(params, jnp.asarray(batch)), np.float32)
    alone_a = np.asarray(fwd(params, jnp.asarray(a)[None]), np.float32)[0]
    alone_b = np.asarray(fwd(params, jnp.asarray(b)[None]), np.float32)[0]
    left_b = np.asarray(fwd(params, jnp.asarray(left)), np.float32)[0, 6:]
    np.testing.assert_allclose(together[0], alone_a, atol=0.04)
    np.testing.assert_allclose(together[1, :7], alone_b, atol=0.04)
    np.testing.assert_allclose(left_b, alone_b, atol=0.04)
    assert metrics(together[1, :7], alone_b)[0] < 0.002


def test_grouped_moe_equals_dense_moe(release):
    params, _ = release
    layer0 = jax.tree.map(lambda w: w[0], params["layers"])
    x = jax.random.normal(jax.random.PRNGKey(0), (37, TINY.emb_size), jnp.float32)
    dense = jax.jit(lambda p, x: moe_dense(p, x, TINY, jnp.float32))(layer0, x)
    for tile in (1, 4, 16, None):  # None: one bucket-sized matmul per expert (row_buckets)
        grouped = jax.jit(lambda p, x: moe_grouped(p, x, TINY, jnp.float32, tile=tile))(layer0, x)
        np.testing.assert_allclose(np.asarray(grouped), np.asarray(dense), rtol=1e-5, atol=1e-5)


def test_int8_weights_stay_int8_on_device(release):
    params, _ = release
    w = params["layers"]["moe/linear/w"]
    assert w.values.dtype == jnp.int8 and w.values.shape == (12, 8, 32, 48) and w.scales.shape == (12, 8, 1, 48)
    assert params["layers"]["multi_head_attention/linear/w"].scales.shape == (12, 8, 32)  # R = 8 kept
