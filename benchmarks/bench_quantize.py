"""Benchmark `quantize` on full-size SLNCX tensors: throughput vs raw disk bandwidth, and peak RSS.

    .venv/bin/python benchmarks/bench_quantize.py [--dir /tmp/slncx-bench] [--keep]

Builds (streamed, never whole in memory) a synthetic ckpt-0 of the SLNCX config cut to one layer:
the full float32 embeddings [131072, 6144] (3.2 GB), layer 0's int8 MoE weights (3 × 1.6 GB) and
attention weights, norms and router — 8.1 GB. Then, each in a fresh subprocess (peak RSS from
getrusage), with the page cache dropped first when we are allowed to:

  1. release -> store (default: int8 carried, float embeddings kept), zstd:1
  2. float attention weights + `--embeddings int8` (the float quantize path)

and compares with a sequential write+read (fsync, dd-like) of a 4 GB file measured before the first
job and again after each one (each job is held against the mean of its two neighbouring probes).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from slncx_tools import picklefmt  # noqa: E402
from slncx_tools.config import SLNCX  # noqa: E402
from slncx_tools.params import param_table  # noqa: E402
from slncx_tools.quant import BF16  # noqa: E402
from slncx_tools.release import write_tensor  # noqa: E402

CHUNK = 64 * 1024 * 1024


def drop_caches() -> bool:
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def _stream(shape, dtype, make):
    """ArrayPayload chunks: C-order rows produced by `make(rng, n_elements)` in ~64 MB pieces."""
    n = int(np.prod(shape))
    step = max(1, CHUNK // np.dtype(dtype).itemsize)

    def chunks():
        rng = np.random.default_rng(n)
        for i in range(0, n, step):
            yield make(rng, min(step, n - i)).view(np.uint8).data

    return picklefmt.ArrayPayload(tuple(shape), np.dtype(dtype), chunks)


def build(ckpt: Path, cfg, float_attention: bool, link_from: Path = None) -> int:
    """Write the synthetic ckpt-0; with `float_attention`, attention weights are float32 and every
    other file is hard-linked from `link_from` (no extra disk, no generation time). A complete
    one already there (config.json is written last) is reused."""
    if (ckpt / "config.json").exists():
        return sum((ckpt / e.file).stat().st_size for e in param_table(cfg))
    if ckpt.exists():
        shutil.rmtree(ckpt)
    ckpt.mkdir(parents=True)
    total = 0
    gauss = lambda rng, k: (rng.standard_normal(k, dtype=np.float32) * np.float32(0.02))  # noqa: E731
    for e in param_table(cfg):
        if float_attention and "attention" not in e.name:
            os.link(link_from / e.file, ckpt / e.file)
        elif float_attention:
            write_tensor(ckpt / e.file, None, arrays={"array": _stream(e.shape, np.float32, gauss)})
        elif e.quantized:
            s = e.scales_shape(e.release_blocks)
            write_tensor(ckpt / e.file, None, arrays={
                "weight": _stream(e.shape, np.int8, lambda rng, k: rng.integers(-127, 128, k, dtype=np.int8)),
                "scales": picklefmt.ArrayPayload.of(np.full(s, 0.01, dtype=BF16)),
            })
        else:
            write_tensor(ckpt / e.file, None, arrays={"array": _stream(e.shape, np.float32, gauss)})
        total += (ckpt / e.file).stat().st_size
    (ckpt / "config.json").write_text(json.dumps(cfg.to_dict()))
    return total


def disk_bandwidth(d: Path, nbytes: int) -> tuple:
    """Sequential write (with fsync) then read (cache dropped if allowed) of an nbytes file."""
    path = d / "dd.bin"
    buf = np.random.default_rng(0).integers(0, 255, CHUNK, dtype=np.uint8).tobytes()
    t0 = time.perf_counter()
    with open(path, "wb", buffering=0) as f:
        for _ in range(nbytes // CHUNK):
            f.write(buf)
        os.fsync(f.fileno())
    w = nbytes / (time.perf_counter() - t0)
    dropped = drop_caches()
    t0 = time.perf_counter()
    rb = bytearray(CHUNK)
    with open(path, "rb", buffering=0) as f:
        while f.readinto(rb):
            pass
    r = nbytes / (time.perf_counter() - t0)
    path.unlink()
    return w, r, dropped


def run_quantize(src: Path, out: Path, *args) -> dict:
    dropped = drop_caches()
    code = (
        "import json,resource,sys,time;from slncx_tools.convert import QuantizeOptions,quantize_checkpoint;"
        "t=time.perf_counter();r=quantize_checkpoint(sys.argv[1],sys.argv[2],QuantizeOptions(**json.loads(sys.argv[3])));"
        "r['seconds']=time.perf_counter()-t;u=resource.getrusage(resource.RUSAGE_SELF);r['rss']=u.ru_maxrss*1024;"
        "r['cpu']=[u.ru_utime,u.ru_stime];"
        "print(json.dumps(r,default=str))"
    )
    opts = json.dumps(dict(a.split("=", 1) for a in args)) if args else "{}"
    p = subprocess.run([sys.executable, "-c", code, str(src), str(out), opts], capture_output=True, text=True, cwd=ROOT)
    if p.returncode:
        raise SystemExit(p.stderr)
    r = json.loads(p.stdout.strip().splitlines()[-1])
    r["cache_dropped"] = dropped
    return r


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", default=None)
    ap.add_argument("--keep", action="store_true", help="keep the synthetic checkpoints (reused by a later run with --dir)")
    ap.add_argument("--jobs", default="carry,raw,float", help="comma list of: carry, raw, float")
    a = ap.parse_args()
    jobs = set(a.jobs.split(","))
    base = Path(a.dir or tempfile.mkdtemp(prefix="slncx-bench-", dir="/tmp"))
    base.mkdir(parents=True, exist_ok=True)
    need = 30 * 1024**3
    free = shutil.disk_usage(base).free
    if free < need:
        raise SystemExit(f"{base}: needs ~30 GB free, has {free / 1e9:.1f} GB")
    cfg = SLNCX.replace(name="custom", num_layers=1)
    try:
        t0 = time.perf_counter()
        src_bytes = build(base / "release" / "ckpt-0", cfg, float_attention=False)
        fsrc_bytes = build(base / "float" / "ckpt-0", cfg, float_attention=True, link_from=base / "release" / "ckpt-0")
        gen_s = time.perf_counter() - t0
        wbw, rbw, dropped = disk_bandwidth(base, 4 * 1024**3)
        probes = [(wbw, rbw)]
        rows = []
        r3 = None
        for name, src, nbytes, out, args in (
            ("carry", "release", src_bytes, "store1", ()),
            ("raw", "release", src_bytes, "store2", ("compression=none",)),
            ("float", "float", fsrc_bytes, "store3", ("embeddings=int8",)),
        ):
            if name not in jobs:
                continue
            shutil.rmtree(base / out, ignore_errors=True)
            load0 = os.getloadavg()[0]
            r = run_quantize(base / src, base / out, *args)
            r["load"] = (load0, os.getloadavg()[0])  # other work on the machine skews the numbers
            # this machine's disk is shared and its speed drifts: probe it again after every job and
            # hold each job against the mean of the probes just before and just after it
            w2, r2, _ = disk_bandwidth(base, 4 * 1024**3)
            r["disk"] = ((probes[-1][0] + w2) / 2, (probes[-1][1] + r2) / 2)
            probes.append((w2, r2))
            shutil.rmtree(base / out, ignore_errors=True)
            label = {"carry": "release -> store (carry int8, f32 emb), zstd:1", "raw": "release -> store, no compression",
                     "float": "float attn + emb -> int8, int8 MoE carried"}[name]
            rows.append((label, nbytes, r))
            if name == "float":
                r3 = r
        # disk-bound rate for a job reading I bytes and writing O bytes sequentially
        print(f"synthetic checkpoint: SLNCX, 1 layer + full embedding: {src_bytes / 1e9:.2f} GB "
              f"(+ float variant {fsrc_bytes / 1e9:.2f} GB), generated in {gen_s:.0f} s")
        print(f"raw disk: write {wbw / 1e9:.2f} GB/s (fsync), read {rbw / 1e9:.2f} GB/s "
              f"({'page cache dropped' if dropped else 'cache NOT dropped: reads may be cached'}); "
              "probed again after each job: " + ", ".join(f"w {w / 1e9:.2f} r {x / 1e9:.2f}" for w, x in probes[1:]))
        print(f"{'job':<48} {'in GB':>7} {'out GB':>7} {'s':>6} {'GB/s in':>8} {'disk-bound GB/s':>15} {'% of disk':>9} {'peak RSS':>9}")
        for name, nbytes, r in rows:
            out_b = r["out_bytes_on_disk"]
            jw, jr = r["disk"]
            bound = nbytes / (nbytes / jr + out_b / jw)  # read then write, no overlap
            rate = nbytes / r["seconds"]
            print(f"{name:<48} {nbytes / 1e9:>7.2f} {out_b / 1e9:>7.2f} {r['seconds']:>6.1f} {rate / 1e9:>8.2f} "
                  f"{bound / 1e9:>15.2f} {100 * rate / bound:>8.0f}% {r['rss'] / 1e9:>7.2f} GB")
        print("CPU seconds (user+sys) per job: " + ", ".join(f"{sum(r['cpu']):.0f} ({r['cpu'][1]:.0f} sys)" for _, _, r in rows))
        print("1-min load average before/after each job (this machine has %d cores): %s" % (
            os.cpu_count(), ", ".join(f"{r['load'][0]:.1f}/{r['load'][1]:.1f}" for _, _, r in rows)))
        g = {x["group"]: x for x in r3["groups"]} if r3 else {}
        for k in ("embeddings", "multi_head_attention/query/w"):
            if k in g:
                print(f"  error {k}: RMSE {g[k]['rmse']:.3g}, SNR {g[k]['snr_db']:.1f} dB, max {g[k]['max_abs']:.3g}")
    finally:
        if not a.keep:
            shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
