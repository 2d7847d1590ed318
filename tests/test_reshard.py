"""reshard: chunk = per-device shard on each mesh, exact scale re-gridding, digests, per-host chunk
lists, validation before writing, resume, CLI."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tensorstore as ts
from click.testing import CliRunner

from slncx_tools import store as st
from slncx_tools.checkpoint import open_checkpoint
from slncx_tools.cli import cli
from slncx_tools.config import TINY
from slncx_tools.convert import quantize_checkpoint
from slncx_tools.errors import MeshError
from slncx_tools.params import mesh_axes_of, param_table
from slncx_tools.reshard import MeshShape, plan_reshard, reshard_checkpoint

CLI = Path(sys.executable).parent / "slncx-tools"
MESHES = ["1x1", "2x1", "4x1", "8x1", "4x2", "2x4", "16x1"]


@pytest.fixture(scope="module")
def source_store(tiny_dir, tmp_path_factory):
    """The release fixture through the quantize pipeline (int8 carried, default chunking)."""
    out = tmp_path_factory.mktemp("src") / "store"
    quantize_checkpoint(tiny_dir / "release_layout", out)
    return out


@pytest.fixture(scope="module")
def resharded(source_store, tmp_path_factory):
    root = tmp_path_factory.mktemp("rs")
    made = {}

    def get(mesh):
        if mesh not in made:
            made[mesh] = root / mesh
            reshard_checkpoint(source_store, made[mesh], mesh)
        return made[mesh]

    return get


def expected_shard(shape, partition, data, model):
    """Independent arithmetic: each dim divided by the sizes of the axes that split it."""
    sizes = {"data": data, "model": model}
    partition = list(partition) + [None] * (len(shape) - len(partition))  # router/w: (data,) on [D, E]
    return [n // int(np.prod([sizes[a] for a in mesh_axes_of(p)])) for n, p in zip(shape, partition)]


def plain_open(root, key):
    return ts.open({"driver": "zarr3", "kvstore": {"driver": "file", "path": str(root / key) + "/"}}).result()


@pytest.mark.parametrize("mesh", MESHES)
def test_chunks_are_shards_and_values_carried(mesh, resharded, source_store):
    out = resharded(mesh)
    data, model = MeshShape.parse(mesh).data, MeshShape.parse(mesh).model
    src, new = st.read_manifest(source_store), st.read_manifest(out)
    assert new["complete"] and new["mesh"]["data"] == data and new["mesh"]["model"] == model
    src_recs = {r["path"]: r for r in src["tensors"]}
    source = open_checkpoint(source_store)
    by_path = {e.path: e for e in param_table(TINY)}
    regridded = 0
    for rec in new["tensors"]:
        entry = by_path[rec["path"]]
        for part, info in rec["arrays"].items():
            a = plain_open(out, info["key"])
            chunk = list(a.chunk_layout.read_chunk.shape)
            assert chunk == info["chunks"] == info["shard_shape"], (rec["path"], part)
            meta_chunk = json.loads((out / info["key"] / "zarr.json").read_text())["chunk_grid"]["configuration"]["chunk_shape"]
            assert meta_chunk == chunk
            part_spec = [None if p is None else (tuple(p) if isinstance(p, list) else p) for p in info["partition"]]
            if part == "scales" and info["shape"][-2] == 1:
                assert part_spec[-2] is None  # per-channel scales are never split
            if part != "scales":
                assert part_spec == list(entry.partition) + [None] * (len(info["shape"]) - len(entry.partition))
            assert chunk == expected_shard(info["shape"], part_spec, data, model)
            got = np.asarray(a.read().result())
            assert st.hash_array(a) == info["sha256"]
            old = src_recs[rec["path"]]["arrays"][part]
            if info["shape"] == old["shape"]:
                assert info["sha256"] == old["sha256"]  # chunking never changes logical bytes
                np.testing.assert_array_equal(got, source.read_part(entry, part))
            else:  # scales re-gridded R -> R' by repeating each block: lossless
                regridded += 1
                assert rec["action"] == "regrid_scales" and part == "scales"
                R, R2 = rec["source_blocks"], info["shape"][-2]
                assert R2 == np.lcm(R, model) and rec["storage"]["blocks"] == R2
                assert info["sha256"] != old["sha256"] and rec["path"] in new["mesh"]["regridded"]
                old_s = source.read_part(entry, "scales")
                np.testing.assert_array_equal(got, np.repeat(old_s, R2 // R, axis=-2))
                w = source.read_part(entry, "weight").astype(np.float32)
                rows = w.shape[-2]
                deq_old = w * np.repeat(old_s.astype(np.float32), rows // R, axis=-2)
                deq_new = w * np.repeat(got.astype(np.float32), rows // R2, axis=-2)
                np.testing.assert_array_equal(deq_old, deq_new)
    # TINY's R = 8 row-block weights (moe/linear_1, attention/linear) re-grid only on a 16-way axis
    assert regridded == (24 if model == 16 else 0)


def test_chunks_match_jax_shardings(resharded):
    """The shard shapes are exactly what a jax NamedSharding gives on a real 4x2 mesh."""
    from jax.sharding import NamedSharding, PartitionSpec

    from slncx_tools.mesh import make_mesh

    mesh = make_mesh("4x2")
    new = st.read_manifest(resharded("4x2"))
    for rec in new["tensors"]:
        for info in rec["arrays"].values():
            spec = PartitionSpec(*[tuple(p) if isinstance(p, list) else p for p in info["partition"]])
            assert list(NamedSharding(mesh, spec).shard_shape(tuple(info["shape"]))) == info["shard_shape"]


def test_release_source_same_digests_as_store_source(tiny_dir, resharded, tmp_path):
    out = tmp_path / "from_release"
    reshard_checkpoint(tiny_dir / "release_layout", out, "8x1", memory_budget=64 * 1024 * 1024)
    a, b = st.read_manifest(out), st.read_manifest(resharded("8x1"))
    assert [r["arrays"] for r in a["tensors"]] == [r["arrays"] for r in b["tensors"]]
    assert a["hosts"] == b["hosts"]


def test_chunkwise_write_when_a_chunk_exceeds_the_budget(source_store, tmp_path):
    """Embeddings [V, D/k] span every row: over budget they are written chunk by chunk (not C
    order) and the digest is still the C-order one, checked against the source's."""
    import slncx_tools.reshard as rs

    source = open_checkpoint(source_store)
    job = plan_reshard(source, "8x1").jobs[0]
    ordered, pieces = rs._slabs(source, job, "array", 1024)
    assert not ordered and len(list(pieces)) == 8
    arrays = rs.write_job(tmp_path, source, job, {"codec": "none"}, 1024, lambda n: None)
    assert arrays["array"]["sha256"] == source.record(job.entry)["arrays"]["array"]["sha256"]
    np.testing.assert_array_equal(plain_open(tmp_path, arrays["array"]["key"]).read().result(), source.read_part(job.entry, "array"))


@pytest.mark.parametrize("mesh,hosts", [("8x1", 2), ("4x2", 2), ("2x4", 2), ("8x1", 4)])
def test_host_chunk_lists(mesh, hosts, resharded, source_store):
    """Each host lists exactly the chunks of its devices (from jax's own device->index map), each
    once; together the hosts cover every chunk; a chunk is on two hosts only when replicated."""
    from jax.sharding import NamedSharding, PartitionSpec

    from slncx_tools.mesh import make_mesh

    plan = plan_reshard(open_checkpoint(source_store), mesh, hosts)
    jmesh = make_mesh(mesh)
    flat = list(jmesh.devices.reshape(-1))
    per_host = len(flat) // hosts
    want = [set() for _ in range(hosts)]
    all_chunks = set()
    for key, lay in plan.array_layouts().items():
        spec = PartitionSpec(*lay.partition)
        grid = [n // s for n, s in zip(lay.shape, lay.shard)]
        all_chunks |= {(key, c) for c in np.ndindex(*grid)}
        for device, index in NamedSharding(jmesh, spec).devices_indices_map(lay.shape).items():
            chunk = tuple((s.start or 0) // n for s, n in zip(index, lay.shard))
            want[flat.index(device) // per_host].add((key, chunk))
    seen = {}
    for h, host in enumerate(plan.hosts):
        got = [(c["array"], tuple(c["chunk"])) for c in host["chunks"]]
        assert len(got) == len(set(got)), "a chunk listed twice for one host"
        assert set(got) == want[h]
        assert [d["id"] for d in host["devices"]] == list(range(h * per_host, (h + 1) * per_host))
        assert host["bytes"] == sum(c["bytes"] for c in host["chunks"])
        for c in got:
            seen.setdefault(c, []).append(h)
    assert set(seen) == all_chunks
    layouts = plan.array_layouts()
    for (key, _c), hs in seen.items():
        if len(hs) > 1:  # only pieces replicated over devices of different hosts
            assert any(p is None or p == () for p in layouts[key].partition) or "data" not in str(layouts[key].partition)
    sharded_everywhere = [k for k, l in layouts.items() if set().union(*[set(mesh_axes_of(p)) for p in l.partition]) >= {"data", "model"}]
    for key in sharded_everywhere:  # split over every axis: each chunk on exactly one host
        assert all(len(hs) == 1 for (k, _c), hs in seen.items() if k == key)


@pytest.mark.parametrize("mesh,hosts,pattern", [
    ("3x1", 1, r"^mesh 3x1: embeddings dim 1 \(32\) is not divisible by model=3"),
    ("model=32,data=1", 1, r"moe/linear/w dim 2 \(48\) is not divisible by model=32"),
    ("8x8", 1, r"embeddings dim 1 \(32\) is not divisible by data\*model=64"),
    ("model=1,data=3", 1, r"dim 1 \(32\) is not divisible by data=3"),
    ("8x1", 3, r"do not split evenly over 3 hosts"),
    ("8y1", 1, r"expected 'MxD'"),
])
def test_invalid_mesh_writes_nothing(mesh, hosts, pattern, source_store, tmp_path):
    out = tmp_path / "never"
    with pytest.raises(MeshError, match=pattern):
        reshard_checkpoint(source_store, out, mesh, hosts=hosts)
    assert not out.exists()


def test_interrupted_then_resumed_matches(source_store, resharded, tmp_path):
    out = tmp_path / "resume"
    calls = []

    def stop(done, total, label):
        calls.append(label)
        if len(calls) > 200:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        reshard_checkpoint(source_store, out, "2x4", progress=stop)
    assert not st.read_manifest(out)["complete"]
    report = reshard_checkpoint(source_store, out, "2x4")
    assert report["resumed"] > 10
    assert st.read_manifest(out)["tensors"] == st.read_manifest(resharded("2x4"))["tensors"]
    assert not (out / ".slncx-progress").exists()
    with pytest.raises(Exception, match="already holds a complete store"):
        reshard_checkpoint(source_store, out, "2x4")


def test_dry_run_memory_and_reads(source_store, tmp_path):
    r = CliRunner().invoke(cli, ["reshard", str(source_store), str(tmp_path / "o"), "--mesh", "model=4,data=2", "--hosts", "2",
                                 "--dry-run", "--json", "--batch", "4", "--context", "64"])
    assert r.exit_code == 0, r.output
    info = json.loads(r.output)
    assert not (tmp_path / "o").exists()
    # weights: every stored byte is on 8 devices / (ways it is split); all arrays are split evenly
    sizes = {"data": 2, "model": 4}
    want = 0
    for e in param_table(TINY):
        itemsize = 4 if not e.quantized else 1
        want += e.numel * itemsize // int(np.prod([sizes[a] for p in e.partition for a in mesh_axes_of(p)]))
        if e.quantized:
            rows = e.scales_shape(e.release_blocks)
            spec = list(e.partition)
            if e.release_blocks == 1:
                spec[e.row_axis] = None
            want += int(np.prod(rows)) * 2 // int(np.prod([sizes[a] for p in spec for a in mesh_axes_of(p)]))
    assert info["device_weight_bytes"] == want
    # KV cache: 2 (k, v) x L x B/data x context x K/model x head dim x f32
    assert info["kv_cache"]["device_bytes"] == 2 * 12 * 2 * 64 * 2 * 8 * 4
    assert info["device_total_bytes"] == want + info["kv_cache"]["device_bytes"]
    assert [h["devices"] for h in info["hosts"]] == [4, 4]
    assert sum(h["read_bytes"] for h in info["hosts"]) >= want * 8 // 2
    r = CliRunner().invoke(cli, ["reshard", str(source_store), str(tmp_path / "o"), "--mesh", "8x1", "--dry-run"])
    assert r.exit_code == 0 and "per device: weights" in r.output and "host 0: 8 devices" in r.output


def test_cli_runner_and_subprocess(source_store, tmp_path):
    r = CliRunner().invoke(cli, ["reshard", str(source_store), str(tmp_path / "a"), "--mesh", "2x4", "--json"])
    assert r.exit_code == 0, r.output
    report = json.loads(r.output)
    assert report["tensors"] == 146 and report["mesh"]["model"] == 2 and report["mesh"]["data"] == 4
    p = subprocess.run([str(CLI), "reshard", str(source_store), str(tmp_path / "b"), "--mesh", "16x1", "--hosts", "2", "--no-progress"],
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert "host 1: 8 devices" in p.stdout and "re-gridded (lossless) for 24 tensors" in p.stdout
    bad = subprocess.run([str(CLI), "reshard", str(source_store), str(tmp_path / "c"), "--mesh", "5x1"], capture_output=True, text=True)
    assert bad.returncode == 1 and "Traceback" not in bad.stderr
    assert bad.stderr.startswith("error: mesh 5x1:") and "not divisible by model=5" in bad.stderr
    assert not (tmp_path / "c").exists()
