"""Multi-process JAX loading, for real: two processes on 127.0.0.1 (jax.distributed, 4 fake CPU
devices each) load one store resharded for 8x1 with --hosts 2 onto the global 8-device mesh.

Each process must read exactly the bytes its manifest host entry lists (so a loader that read every
chunk in every process fails here), the two together must read every chunk (chunks of replicated
arrays once per process, all others exactly once), every local shard must equal its slice of the
unsharded arrays, and one jitted forward over the global params (gloo collectives across the two
processes) must match a single-process 1x1 run within SPEC §6 bounds."""

import hashlib
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from slncx_tools import store as st
from slncx_tools.checkpoint import open_checkpoint
from slncx_tools.config import TINY
from slncx_tools.load import host_params, load_params
from slncx_tools.mesh import make_mesh
from slncx_tools.model import forward
from slncx_tools.reshard import reshard_checkpoint

WORKER = Path(__file__).with_name("mp_load_worker.py")
MESH, HOSTS, LOCAL = "8x1", 2, 4
TIMEOUT_S = 120


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_processes(store: Path, tokens_npz: Path, logs: Path) -> list:
    """Start the HOSTS worker processes, wait (bounded) and return each one's JSON report. Output
    goes to files, not pipes: a full pipe would block one process while we wait on the other."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    files = [(logs / f"out{i}.txt", logs / f"err{i}.txt") for i in range(HOSTS)]
    procs = []
    try:
        for i, (out, err) in enumerate(files):
            with open(out, "w") as fo, open(err, "w") as fe:
                procs.append(subprocess.Popen(
                    [sys.executable, str(WORKER), str(store), MESH, str(port), str(HOSTS), str(i), str(LOCAL), str(tokens_npz)],
                    stdout=fo, stderr=fe, env=env,
                ))
        for p in procs:
            p.wait(timeout=TIMEOUT_S)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    reports = []
    for i, (p, (out, err)) in enumerate(zip(procs, files)):
        out, err = out.read_text(), err.read_text()
        assert p.returncode == 0, f"process {i} exited {p.returncode}:\n{err[-4000:]}"
        lines = [line for line in out.splitlines() if line.startswith("{")]  # gloo logs to stdout too
        assert lines, f"process {i} printed no report:\n{out[-2000:]}\n{err[-2000:]}"
        reports.append(json.loads(lines[-1]))
    return reports


def sha(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()


def test_two_processes_each_read_only_their_chunks(tiny_dir, tmp_path):
    store = tmp_path / "store"
    reshard_checkpoint(tiny_dir / "release_layout", store, MESH, hosts=HOSTS)
    manifest = st.read_manifest(store)
    hosts = manifest["hosts"]
    tokens_npz = tiny_dir / "reference_mesh8.npz"

    reports = run_processes(store, tokens_npz, tmp_path)

    # -- the global mesh is the one reshard planned for: host h's flat devices are process h's ------
    assert [r["process_index"] for r in reports] == list(range(HOSTS))
    assert all(r["process_count"] == HOSTS for r in reports)
    order = reports[0]["mesh_devices"]
    assert all(r["mesh_devices"] == order for r in reports)
    for h in range(HOSTS):
        assert [flat for flat, (_id, proc) in enumerate(order) if proc == h] == [d["id"] for d in hosts[h]["devices"]]
        assert sorted(reports[h]["local_devices"]) == sorted(i for i, proc in order if proc == h)

    # -- the manifest's host lists: together every chunk, only replicated arrays' chunks twice -------
    arrays = {i["key"]: i for r in manifest["tensors"] for i in r["arrays"].values()}
    grids = {k: [n // c for n, c in zip(i["shape"], i["chunks"])] for k, i in arrays.items()}
    every = {(k, c) for k, g in grids.items() for c in np.ndindex(*g)}
    listed = [{(c["array"], tuple(c["chunk"])) for c in h["chunks"]} for h in hosts]
    assert listed[0] | listed[1] == every
    both = listed[0] & listed[1]
    assert both and all(int(np.prod(grids[k])) == 1 for k, _c in both)  # only whole (replicated) arrays
    chunk_bytes = {(c["array"], tuple(c["chunk"])): c["bytes"] for h in hosts for c in h["chunks"]}
    store_bytes = sum(int(np.prod(i["shape"], dtype=np.int64)) * st.DTYPES[i["dtype"]].itemsize for i in arrays.values())
    assert sum(chunk_bytes.values()) == store_bytes
    assert sum(h["bytes"] for h in hosts) == store_bytes + sum(chunk_bytes[k] for k in both)

    # -- each process read exactly its host entry's bytes (half the store, not all of it) ------------
    for h, r in enumerate(reports):
        assert r["bytes_read"] == hosts[h]["bytes"], (h, r["bytes_read"], hosts[h]["bytes"])
        assert r["bytes_read"] < store_bytes

    # -- every local shard equals its slice of the unsharded arrays; all 8 devices covered once -----
    host = {jax.tree_util.keystr(p): np.asarray(a) for p, a in
            jax.tree_util.tree_leaves_with_path(host_params(open_checkpoint(tiny_dir / "release_layout")))}
    assert set(reports[0]["leaves"]) == set(reports[1]["leaves"]) == set(host)
    for name, ref in host.items():
        devices = []
        for r in reports:
            leaf = r["leaves"][name]
            assert leaf["shape"] == list(ref.shape), name
            for s in leaf["shards"]:
                want = ref[tuple(slice(a, b) for a, b in s["index"])]
                assert s["dtype"] == str(want.dtype) and s["shape"] == list(want.shape), (name, s)
                assert s["sha256"] == sha(want), (name, s["device"], s["index"])
                devices.append(s["device"])
        assert sorted(devices) == sorted(i for i, _p in order), name

    # -- one forward over the global params in both processes == the single-process 1x1 run ---------
    tokens = np.load(tokens_npz)["tokens"]
    ref_params = load_params(open_checkpoint(tiny_dir / "release_layout"), make_mesh("1x1"))
    ref = np.asarray(jax.jit(lambda p, t: forward(p, t, TINY)[0])(ref_params, jnp.asarray(tokens)), np.float32)
    real = tokens > 0
    for h, r in enumerate(reports):
        ours = np.asarray(r["logits"], np.float32)
        assert ours.shape == ref.shape
        mean = float(np.abs(ours[real] - ref[real]).mean())
        top1 = float((np.take_along_axis(ref, ours.argmax(-1)[..., None], -1)[..., 0] == ref.max(-1))[real].mean())
        assert mean <= 0.01 and top1 >= 0.99, (h, mean, top1)
    np.testing.assert_array_equal(np.asarray(reports[0]["logits"]), np.asarray(reports[1]["logits"]))
