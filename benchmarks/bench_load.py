"""Benchmark loading onto 8 (fake CPU) devices on an 8-way model axis: a resharded store vs the
release pickles loaded the original way.

    .venv/bin/python benchmarks/bench_load.py [--dir /tmp/slncx-bench-load] [--keep] [--repeat N]

Data: one synthetic full-size SLNCX layer — the 12 tensors of decoder layer 0 with the SLNCX shapes
(MoE int8 [8, 6144, 32768] × 3, attention int8, R = 8 / R = 1 bf16 scales, norms, router), written
with `release.write_tensor` (about 4.9 GB), plus the two non-layer tensors of a vocab-8 config so the
directory is a complete checkpoint. `reshard --mesh 8x1` turns it into a store (chunk = shard).

Each method runs in a fresh subprocess (peak RSS from getrusage; bytes from /proc/self/io), after
`sync; echo 3 > /proc/sys/vm/drop_caches` when we may (else the numbers are page-cached, and say so):

- original (the issue's "copy each file fully, unpickle, then slice"): per file, copy it fully to
  /dev/shm and `pickle.load` it, as the original loader does, then `jax.device_put` with the
  NamedSharding, which slices it per device (the synthetic files are ours, so unpickling is safe);
- resharded: `load_params(store, mesh)`: each device's piece read as its one chunk — one positioned
  read (O_DIRECT where the filesystem allows) of the chunk file into the piece's final page-aligned
  buffer, which `jax.device_put` adopts on a CPU device without a copy.

"Read per device" is the bytes read to produce one device's data: a full file per tensor for the
original approach, its own chunk for the resharded store.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import numpy as np  # noqa: E402

NEED = 12 * 1024**3  # release + store on disk, with slack


def config():
    from slncx_tools.config import SLNCX

    return SLNCX.replace(name="SLNCX-1L", vocab_size=8, num_layers=1)


def generate(ckpt: Path) -> int:
    """Write the synthetic layer as a release ckpt-0; returns its bytes."""
    from slncx_tools.params import param_table
    from slncx_tools.quant import BF16, QuantizedArray
    from slncx_tools.release import write_tensor

    cfg = config()
    tmp = ckpt.with_name("ckpt-0.incomplete")
    tmp.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for e in param_table(cfg):
        if e.quantized:
            q = rng.integers(-127, 128, size=e.shape, dtype=np.int8)
            s = (rng.random(e.scales_shape(e.release_blocks), dtype=np.float32) * 0.01 + 1e-4).astype(BF16)
            write_tensor(tmp / e.file, QuantizedArray(q, s))
            del q
        else:
            write_tensor(tmp / e.file, rng.standard_normal(e.shape, dtype=np.float32))
    (tmp / "config.json").write_text(json.dumps(cfg.to_dict()))
    os.replace(tmp, ckpt)
    return sum(p.stat().st_size for p in ckpt.iterdir())


def io_counters() -> dict:
    out = {}
    with open("/proc/self/io") as f:
        for line in f:
            k, v = line.split(":")
            out[k] = int(v)
    return out


def run_original(ckpt_dir: Path, shm: Path, unpickle: bool = True) -> dict:
    """The issue's "original approach", as the original loader does it: per file, copy it fully to
    /dev/shm, `pickle.load` it (a stub `QuantizedWeight8bit` in __main__, as the original loader's
    module provides), then `jax.device_put` with the NamedSharding, which slices it per device.

    Unpickling a bf16 array re-initialises numpy's shared bfloat16 dtype (flags 64 -> 80), after
    which JAX rejects every bf16 array (see tests/pickle_oracle.py); we put the dtype's state back
    after each load (a few microseconds), the files being our own synthetic ones (trusted).

    `unpickle=False` ("original-safe", a reference row): the same, but step 2 is our safe reader's
    full read of the /dev/shm copy (one read into a numpy buffer) instead of `pickle.load` (which
    reads into a bytes object first) — the stand-in earlier versions of this benchmark used."""
    import pickle

    import jax
    import ml_dtypes
    from jax.sharding import NamedSharding, PartitionSpec

    from slncx_tools.mesh import make_mesh
    from slncx_tools.release import ReleaseCheckpoint
    from slncx_tools.reshard import MeshShape, layout_of, source_kind, source_parts

    class QuantizedWeight8bit:  # the original loader's class, by name: a plain attribute holder
        def __setstate__(self, state):
            self.__dict__.update(state)

    QuantizedWeight8bit.__module__ = "__main__"
    sys.modules["__main__"].QuantizedWeight8bit = QuantizedWeight8bit
    bf16 = np.dtype(ml_dtypes.bfloat16)
    bf16_state = bf16.__reduce__()[2]

    cfg = config()
    mesh = make_mesh("8x1")
    sizes = MeshShape.parse(mesh).sizes
    headers = ReleaseCheckpoint(ckpt_dir, config=cfg)  # shapes/specs only (no data read)
    plans = []
    for e in headers.table:
        parts = source_parts(headers, e)
        plans.append((e, layout_of(e, parts, source_kind(headers, e, parts), sizes)))
    shm.mkdir(parents=True, exist_ok=True)
    arrays = []
    per_device = 0
    t0 = time.perf_counter()
    for e, lays in plans:
        dst = shm / e.file
        shutil.copyfile(ckpt_dir / e.file, dst)  # 1. copy the file fully
        if unpickle:
            with open(dst, "rb") as f:
                obj = pickle.load(f)  # 2. unpickle it (the whole tensor in memory)
            bf16.__setstate__(bf16_state)
            values = {"array": obj} if isinstance(obj, np.ndarray) else {"weight": obj.weight, "scales": obj.scales}
        else:
            shm_ckpt = ReleaseCheckpoint(shm, config=cfg)
            obj = None
            values = {part: shm_ckpt.read_part(e, part) for part in lays}  # 2'. full safe read
        for part, lay in lays.items():
            full = values[part]
            per_device += full.nbytes  # every device's piece comes from the whole tensor
            if lay.regridded:  # (not on 8x1: R = 8 scales split 8 ways as they are)
                full = np.repeat(full, lay.blocks // lay.source_blocks, axis=full.ndim - 2)
            stacked = full[None] if e.layer is not None else full  # 3. slice per device: device_put
            spec = PartitionSpec(*(((None,) if e.layer is not None else ()) + tuple(lay.partition)))
            arrays.append(jax.device_put(stacked, NamedSharding(mesh, spec)))
            del full, stacked
        del obj, values
        if e.index:  # (file 0 stays: the safe reader wants it present; it is tiny here)
            os.remove(dst)
    jax.block_until_ready(arrays)
    seconds = time.perf_counter() - t0
    shutil.rmtree(shm, ignore_errors=True)
    return {"seconds": seconds, "read_per_device": per_device, "arrays": len(arrays)}


def run_resharded(store: Path) -> dict:
    import jax

    from slncx_tools.checkpoint import open_checkpoint
    from slncx_tools.load import load_params
    from slncx_tools.mesh import make_mesh
    from slncx_tools import store as st

    mesh = make_mesh("8x1")
    ckpt = open_checkpoint(store)
    t0 = time.perf_counter()
    params = load_params(ckpt, mesh)
    jax.block_until_ready(params)
    seconds = time.perf_counter() - t0
    host = st.read_manifest(store)["hosts"][0]
    shard = {}
    for c in host["chunks"]:
        shard.setdefault(c["array"], c["bytes"])
    # one device's chunks: one per array (8x1: every array is split over model or replicated)
    return {"seconds": seconds, "read_per_device": sum(shard.values()), "requested": ckpt.bytes_read,
            "arrays": len(jax.tree_util.tree_leaves(params))}


def child(args) -> None:
    before = io_counters()
    if args.run in ("original", "original-safe"):
        out = run_original(Path(args.ckpt), Path(args.shm), unpickle=args.run == "original")
    else:
        out = run_resharded(Path(args.store))
    after = io_counters()
    out["rchar"] = after["rchar"] - before["rchar"]
    out["disk_read"] = after["read_bytes"] - before["read_bytes"]
    out["peak_rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps(out))


def drop_caches() -> bool:
    try:
        subprocess.run(["sync"], check=True)
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def gb(n) -> str:
    return f"{n / 1e9:.2f} GB"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", default="/tmp/slncx-bench-load")
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--repeat", type=int, default=1, help="runs per method (alternating); the median is reported")
    ap.add_argument("--run", choices=["original", "original-safe", "resharded"])
    ap.add_argument("--ckpt")
    ap.add_argument("--store")
    ap.add_argument("--shm")
    args = ap.parse_args()
    if args.run:
        return child(args)

    root = Path(args.dir)
    root.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(root).free
    if free < NEED:
        sys.exit(f"need {gb(NEED)} free at {root}, have {gb(free)}")
    ckpt, store = root / "ckpt-0", root / "store-8x1"
    t = time.perf_counter()
    size = sum(p.stat().st_size for p in ckpt.iterdir()) if ckpt.exists() else generate(ckpt)
    print(f"synthetic layer: {gb(size)} in {ckpt} ({time.perf_counter() - t:.1f} s)", flush=True)
    if not (store / "slncx.json").exists():
        from slncx_tools.reshard import reshard_checkpoint

        t = time.perf_counter()
        shutil.rmtree(store, ignore_errors=True)
        reshard_checkpoint(ckpt, store, "8x1")
        print(f"reshard --mesh 8x1: {time.perf_counter() - t:.1f} s", flush=True)
    shm = Path("/dev/shm/slncx-bench-load") if shutil.disk_usage("/dev/shm").free > 3 * 1024**3 else root / "copy"
    runs: dict = {"original": [], "original-safe": [], "resharded": []}
    for _ in range(max(1, args.repeat)):  # alternate the methods, so machine load hits both alike
        for method in runs:
            dropped = drop_caches()
            cmd = [sys.executable, __file__, "--run", method, "--ckpt", str(ckpt), "--store", str(store), "--shm", str(shm)]
            p = subprocess.run(cmd, capture_output=True, text=True)
            if p.returncode:
                sys.exit(f"{method} failed:\n{p.stderr[-3000:]}")
            runs[method].append(dict(json.loads(p.stdout.strip().splitlines()[-1]), cold=dropped, load=os.getloadavg()[0]))
            print(f"  {method}: {runs[method][-1]['seconds']:.2f} s (load average {os.getloadavg()[0]:.1f})", flush=True)
    # the median run of each method (by seconds)
    results = {m: dict(sorted(rs, key=lambda x: x["seconds"])[(len(rs) - 1) // 2], all_seconds=[round(x["seconds"], 2) for x in rs])
               for m, rs in runs.items()}
    o, r = results["original"], results["resharded"]
    print(f"\n{'method':<28} {'seconds':>8} {'read/device':>12} {'process rchar':>14} {'disk read':>10} {'peak RSS':>9} {'cache':>7}")
    for name, x in (("release pickles (original)", o), ("  same, safe read, no unpickle", results["original-safe"]),
                    ("resharded store 8x1", r)):
        print(f"{name:<28} {x['seconds']:>8.2f} {gb(x['read_per_device']):>12} {gb(x['rchar']):>14} {gb(x['disk_read']):>10} "
              f"{gb(x['peak_rss']):>9} {'cold' if x['cold'] else 'warm':>7}")
    print(f"speed-up {o['seconds'] / r['seconds']:.1f}x, read per device {o['read_per_device'] / r['read_per_device']:.1f}x less, "
          f"peak RSS {o['peak_rss'] / r['peak_rss']:.1f}x less; resharded bytes requested {gb(r['requested'])} "
          f"(= the 8 devices' chunks)")
    print(f"(vs the safe-read variant of the original: {results['original-safe']['seconds'] / r['seconds']:.1f}x)")
    print(json.dumps(results))
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
