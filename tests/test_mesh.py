"""Mesh parsing, divisibility checks, and the same logits on 1 and 8 fake CPU devices."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from slncx_tools.checkpoint import open_checkpoint
from slncx_tools.config import SLNCX, TINY
from slncx_tools.errors import MeshError
from slncx_tools.load import load_params
from slncx_tools.mesh import batch_axis, check_mesh, make_mesh, parse_mesh, partition_spec
from slncx_tools.model import forward
from slncx_tools.params import by_path


@pytest.mark.parametrize(
    "spec, expected",
    [("8x1", (1, 8)), ("1x1", (1, 1)), ("2x4", (4, 2)), ("model=8,data=2", (2, 8)), ("data=2", (2, 1)), ("8", (1, 8))],
)
def test_parse_mesh(spec, expected):
    assert parse_mesh(spec) == expected  # (data, model)


@pytest.mark.parametrize("bad", ["8y1", "model=x", "0x1", "gpu=2"])
def test_parse_mesh_rejects(bad):
    with pytest.raises(MeshError):
        parse_mesh(bad)


def test_mesh_larger_than_devices():
    with pytest.raises(MeshError, match="needs 16 devices"):
        make_mesh("16x1", devices=jax.devices()[:8])


def test_check_mesh_names_tensor_and_dimension():
    check_mesh(SLNCX, {"data": 1, "model": 8})
    check_mesh(SLNCX, {"data": 2, "model": 16})
    with pytest.raises(MeshError, match=r"moe/linear/w .*dimension 2 .*size 32768, not divisible by model = 3"):
        check_mesh(SLNCX, {"data": 1, "model": 3})
    with pytest.raises(MeshError, match="dimension"):
        check_mesh(TINY, {"data": 1, "model": 32})  # ffn 48


def test_partition_specs_from_table():
    from jax.sharding import PartitionSpec as P

    entry = by_path(SLNCX)["params/transformer/decoder_layer_0/moe/linear_1/w"]
    assert partition_spec(entry, "weight", stacked=True) == P(None, None, "model", "data")
    assert partition_spec(entry, "scales", stacked=True) == P(None, None, None, "data")  # R rows replicated


@pytest.fixture(scope="module")
def ckpt_and_ref(tiny_dir):
    return open_checkpoint(tiny_dir / "release_layout"), np.load(tiny_dir / "reference_mesh8.npz")


@pytest.mark.parametrize("spec", ["8x1", "2x4", "1x2"])
def test_sharded_logits_equal_single_device(spec, ckpt_and_ref):
    ckpt, ref = ckpt_and_ref
    if len(jax.devices()) < 8:
        pytest.skip("needs 8 devices (XLA_FLAGS=--xla_force_host_platform_device_count=8)")
    f = jax.jit(lambda p, t: forward(p, t, TINY)[0])
    tokens = jnp.asarray(ref["tokens"])
    single = np.asarray(f(load_params(ckpt), tokens), np.float32)
    mesh = make_mesh(spec)
    params = load_params(ckpt, mesh)
    w = params["layers"]["moe/linear_1/w"].values
    assert len(w.sharding.device_set) == mesh.size and w.addressable_shards[0].data.shape[2] == 48 // mesh.shape["model"]
    sharded = np.asarray(f(params, jax.device_put(tokens, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(batch_axis(mesh, 2))))), np.float32)
    real = ref["tokens"] > 0
    d = np.abs(sharded - single)[real]
    assert d.mean() <= 0.005, d.mean()
    assert (sharded.argmax(-1) == single.argmax(-1))[real].mean() >= 0.99
