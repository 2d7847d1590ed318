"""The per-device loader on 8 fake CPU devices: equal arrays and logits on every mesh, read accounting
(amplification 1.00), scale re-gridding finer/coarser than R, any source kind."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from slncx_tools.checkpoint import open_checkpoint
from slncx_tools.config import TINY
from slncx_tools.convert import quantize_checkpoint
from slncx_tools.errors import MeshError
from slncx_tools.load import host_params, load_params
from slncx_tools.mesh import make_mesh
from slncx_tools.model import forward
from slncx_tools.release import generate_checkpoint
from slncx_tools.reshard import reshard_checkpoint
from slncx_tools import store as st

MESHES = ["1x1", "2x1", "4x1", "8x1", "4x2", "2x4"]
fwd = jax.jit(lambda p, t: forward(p, t, TINY)[0])


@pytest.fixture(scope="module")
def stores(tiny_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("lm")
    quantize_checkpoint(tiny_dir / "release_layout", root / "store")
    made = {"store": root / "store"}

    def get(mesh):
        if mesh not in made:
            made[mesh] = root / mesh
            reshard_checkpoint(root / "store", made[mesh], mesh)
        return made[mesh]

    return get


@pytest.fixture(scope="module")
def reference(tiny_dir):
    """Unsharded host arrays and the 1x1 logits."""
    ckpt = open_checkpoint(tiny_dir / "release_layout")
    host = host_params(ckpt)
    tokens = np.load(tiny_dir / "reference_mesh8.npz")["tokens"]
    logits = np.asarray(fwd(load_params(ckpt, make_mesh("1x1")), jnp.asarray(tokens)), np.float32)
    return host, tokens, logits


def leaves(params):
    return jax.tree_util.tree_leaves_with_path(params)


def assert_same_values(params, host):
    for (path, a), (_p, b) in zip(leaves(params), leaves(host), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=jax.tree_util.keystr(path))


def local_piece_bytes(params) -> int:
    """Bytes of the distinct pieces this process's devices hold (from the arrays' own shardings)."""
    total = 0
    for _path, a in leaves(params):
        seen = {}
        for shard in a.addressable_shards:
            key = tuple((s.start, s.stop) for s in shard.index)
            seen[key] = shard.data.nbytes
        total += sum(seen.values())
    return total


def logit_metrics(ours, ref, real):
    ours, ref = ours[real], ref[real]
    top = np.take_along_axis(ref, ours.argmax(-1)[..., None], -1)[..., 0] == ref.max(-1)
    return float(np.abs(ours - ref).mean()), float(top.mean())


@pytest.mark.parametrize("mesh", MESHES)
def test_resharded_store_loads_equal_and_reads_only_local_bytes(mesh, stores, reference):
    host, tokens, ref_logits = reference
    ckpt = open_checkpoint(stores(mesh))
    jmesh = make_mesh(mesh)
    params = load_params(ckpt, jmesh)
    assert_same_values(params, host)
    for _path, a in leaves(params):
        assert a.sharding.mesh.devices.shape == jmesh.devices.shape and len(a.sharding.device_set) == jmesh.devices.size
    # read amplification 1.00: bytes requested = the distinct local pieces = the manifest's host list
    assert ckpt.bytes_read == local_piece_bytes(params) == st.read_manifest(stores(mesh))["hosts"][0]["bytes"]
    # a stacked weight: each device holds [L, its shard], the layer axis whole
    w = params["layers"]["moe/linear_1/w"]
    model = jmesh.shape["model"]
    assert w.values.addressable_shards[0].data.shape == (12, 8, 48 // model, 32 // jmesh.shape["data"])
    logits = np.asarray(fwd(params, jnp.asarray(tokens)), np.float32)
    mean, top1 = logit_metrics(logits, ref_logits, tokens > 0)
    assert mean <= 0.01 and top1 >= 0.99, (mesh, mean, top1)


@pytest.mark.parametrize("source", ["release", "store"])
def test_any_source_on_a_mesh(source, tiny_dir, stores, reference):
    """A release ckpt-0 and a default-layout store load per device too (bytes requested = local pieces)."""
    host, tokens, ref_logits = reference
    ckpt = open_checkpoint(tiny_dir / "release_layout" if source == "release" else stores("store"))
    params = load_params(ckpt, make_mesh("2x4"))
    assert_same_values(params, host)
    assert ckpt.bytes_read == local_piece_bytes(params)


def test_sixteen_way_store_onto_eight_devices(stores, reference):
    """A 16x1 store has R' = 16 scales; on 8x1 each device holds 2 of those blocks; values equal."""
    host, tokens, ref_logits = reference
    ckpt = open_checkpoint(stores("16x1"))
    params = load_params(ckpt, make_mesh("8x1"))
    s = params["layers"]["moe/linear_1/w"].scales
    assert s.shape == (12, 8, 16, 32) and s.addressable_shards[0].data.shape == (12, 8, 2, 32)
    np.testing.assert_array_equal(np.asarray(s), np.repeat(host["layers"]["moe/linear_1/w"].scales, 2, axis=-2))
    assert ckpt.bytes_read == local_piece_bytes(params)
    logits = np.asarray(fwd(params, jnp.asarray(tokens)), np.float32)
    mean, top1 = logit_metrics(logits, ref_logits, tokens > 0)
    assert mean <= 0.01 and top1 >= 0.99


def test_loader_regrids_scales_finer_than_r(tmp_path):
    cfg = TINY.replace(name="R2", num_layers=2, release_row_blocks=2)
    ckpt_dir = generate_checkpoint(cfg, tmp_path)
    ckpt = open_checkpoint(ckpt_dir)
    host = host_params(open_checkpoint(ckpt_dir))
    params = load_params(ckpt, make_mesh("8x1"))
    for name in ("moe/linear_1/w", "multi_head_attention/linear/w"):
        w, h = params["layers"][name], host["layers"][name]
        assert h.scales.shape[-2] == 2 and w.scales.shape[-2] == 8  # lcm(2, 8)
        np.testing.assert_array_equal(np.asarray(w.scales), np.repeat(h.scales, 4, axis=-2))
        np.testing.assert_array_equal(np.asarray(w.values), h.values)
        assert w.scales.addressable_shards[3].data.shape[-2] == 1
    # each device reads only the one stored block its rows use (the size of its re-gridded piece)
    assert ckpt.bytes_read == local_piece_bytes(params)
    # a coarser axis: 2 devices hold one block each (R' = R), the model agrees with the unsharded one
    p1 = load_params(open_checkpoint(ckpt_dir), make_mesh("1x1"))
    p2 = load_params(open_checkpoint(ckpt_dir), make_mesh("2x1"))
    assert p2["layers"]["moe/linear_1/w"].scales.addressable_shards[0].data.shape[-2] == 1
    tokens = jnp.asarray(np.arange(1, 33, dtype=np.int32).reshape(2, 16))
    f = jax.jit(lambda p, t: forward(p, t, cfg)[0])
    base = np.asarray(f(p1, tokens), np.float32)
    for p in (p2, params):
        got = np.asarray(f(p, tokens), np.float32)
        assert np.abs(got - base).mean() <= 0.01
        assert (got.argmax(-1) == base.argmax(-1)).mean() >= 0.99


def test_invalid_mesh_refused_before_reading(tiny_dir):
    ckpt = open_checkpoint(tiny_dir / "release_layout")
    with pytest.raises(MeshError, match=r"embeddings dim 1 \(32\) is not divisible by data=3"):
        load_params(ckpt, make_mesh("model=1,data=3"))
    assert ckpt.bytes_read == 0


def test_sample_style_mesh_string(stores, reference):
    """load_sharded also takes a mesh string, and load_params(mesh=None) keeps the host path."""
    from slncx_tools.load import load_sharded

    host, *_ = reference
    assert_same_values(load_sharded(open_checkpoint(stores("8x1")), "8x1"), host)
    assert_same_values(load_params(open_checkpoint(stores("8x1"))), host)


# --- the direct chunk read (Store.read_part_into) ----------------------------------------------------

def _chunk_reads(ckpt):
    """(entry, part, chunk slices, shard shape, dtype) for every chunk of every array of a store."""
    from slncx_tools.reshard import chunk_slices

    for e in ckpt.table:
        for part, info in ckpt.record(e)["arrays"].items():
            chunks = tuple(info["chunks"])
            grid = [n // c for n, c in zip(info["shape"], chunks)]
            for c in np.ndindex(*grid):
                yield e, part, chunk_slices(c, chunks), chunks, st.DTYPES[info["dtype"]]


@pytest.mark.parametrize("direct", ["1", "0"])
def test_read_part_into_equals_read_part(direct, stores, monkeypatch):
    """Every chunk of an uncompressed store read straight into a buffer (O_DIRECT or buffered)
    equals TensorStore's read of the same slab, and counts the same bytes."""
    from slncx_tools.load import aligned_empty

    monkeypatch.setenv("SLNCX_DIRECT_IO", direct)
    ours, ref = open_checkpoint(stores("4x2")), open_checkpoint(stores("4x2"))
    n = 0
    for e, part, idx, shape, dtype in _chunk_reads(ours):
        out = aligned_empty(shape, dtype)
        assert ours.read_part_into(e, part, idx, out)
        np.testing.assert_array_equal(out, ref.read_part(e, part, idx), err_msg=f"{e.path}/{part}")
        n += 1
    assert n > 100 and ours.bytes_read == ref.bytes_read
    assert ours._direct_io["ok"] == (direct == "1")


def test_read_part_into_refuses_what_is_not_one_raw_chunk(stores):
    """Compressed arrays, slabs that are not exactly one chunk and dtype mismatches read nothing
    (False) so the loader falls back to TensorStore; unaligned buffers are read without O_DIRECT."""
    from slncx_tools.load import aligned_empty

    zstd = open_checkpoint(stores("store"))  # quantize's default layout: zstd
    e = next(e for e in zstd.table if e.name == "moe/linear_1/w")
    chunks = tuple(zstd.record(e)["arrays"]["weight"]["chunks"])
    assert not zstd.read_part_into(e, "weight", tuple(slice(0, c) for c in chunks), aligned_empty(chunks, np.int8))
    raw = open_checkpoint(stores("8x1"))
    info = raw.record(e)["arrays"]["weight"]
    chunks = tuple(info["chunks"])
    whole = tuple(slice(0, c) for c in chunks)
    assert not raw.read_part_into(e, "weight", whole[:-1] + (slice(1, chunks[-1] + 1),), aligned_empty(chunks, np.int8))
    assert not raw.read_part_into(e, "weight", whole, aligned_empty(chunks, np.float32))
    assert not raw.read_part_into(e, "weight", whole, aligned_empty((chunks[0] * 2,) + chunks[1:], np.int8)[::2])
    assert raw.bytes_read == 0 and zstd.bytes_read == 0
    unaligned = np.empty(int(np.prod(chunks)) + 1, np.int8)[1:].reshape(chunks)
    assert raw.read_part_into(e, "weight", whole, unaligned)
    np.testing.assert_array_equal(unaligned, raw.read_part(e, "weight", whole))


def test_read_part_into_missing_and_truncated_chunks(stores, tmp_path):
    """A chunk file TensorStore never wrote reads as the fill value; a truncated one is an error."""
    import shutil

    from slncx_tools.errors import FormatError
    from slncx_tools.load import aligned_empty

    root = tmp_path / "s"
    shutil.copytree(stores("8x1"), root)
    ckpt = open_checkpoint(root)
    e = next(e for e in ckpt.table if e.name == "multi_head_attention/query/w")
    info = ckpt.record(e)["arrays"]["weight"]
    chunks = tuple(info["chunks"])
    files = sorted(p for p in (root / info["key"] / "c").rglob("*") if p.is_file())
    files[0].unlink()
    out = aligned_empty(chunks, np.int8)
    out[...] = 7
    assert ckpt.read_part_into(e, "weight", tuple(slice(0, c) for c in chunks), out)
    assert not out.any() and ckpt.bytes_read == out.nbytes
    with open(files[1], "r+b") as f:
        f.truncate(100)
    first = tuple(int(x) for x in files[1].relative_to(root / info["key"] / "c").parts)
    idx = tuple(slice(i * c, (i + 1) * c) for i, c in zip(first, chunks))
    with pytest.raises(FormatError, match="100 bytes"):
        ckpt.read_part_into(e, "weight", idx, out)


def test_loaded_cpu_pieces_are_the_read_buffers(stores):
    """On CPU devices each piece is adopted without a copy: its buffer is page-aligned (numpy's own
    allocations are 16-aligned, so a copy made by jax would not be, bar chance) and the host RSS
    holds the weights once."""
    params = load_params(open_checkpoint(stores("8x1")), make_mesh("8x1"))
    w = params["layers"]["moe/linear_1/w"].values
    ptrs = [s.data.unsafe_buffer_pointer() for s in w.addressable_shards]
    assert len(set(ptrs)) == 8 and all(p % 4096 == 0 for p in ptrs)


def test_aligned_empty_is_adopted_by_device_put():
    from slncx_tools.load import aligned_empty

    x = aligned_empty((3, 1000), np.int8)
    x[...] = 1
    y = jax.device_put(x, jax.devices()[2])
    assert x.ctypes.data % 4096 == 0 and y.unsafe_buffer_pointer() == x.ctypes.data
    np.testing.assert_array_equal(np.asarray(y), x)


@pytest.mark.parametrize("mesh,source", [("8x1", "8x1"), ("4x2", "4x2"), ("2x4", "release")])
def test_streaming_layer_by_layer(mesh, source, stores, reference, tiny_dir):
    """The accelerator path (each layer's slab put on its devices on its own, layers joined on the
    devices), forced on CPU: same arrays and shardings, the same bytes read."""
    from slncx_tools.load import load_sharded

    host, *_ = reference
    ckpt = open_checkpoint(tiny_dir / "release_layout" if source == "release" else stores(source))
    jmesh = make_mesh(mesh)
    params = load_sharded(ckpt, jmesh, stream=True, workers=3)
    assert_same_values(params, host)
    assert ckpt.bytes_read == local_piece_bytes(params)
    ref = load_sharded(open_checkpoint(tiny_dir / "release_layout" if source == "release" else stores(source)), jmesh)
    for (path, a), (_p, b) in zip(leaves(params), leaves(ref), strict=True):
        assert a.sharding == b.sharding, jax.tree_util.keystr(path)
