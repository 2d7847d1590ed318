"""Conversion pipelines: `quantize` (any checkpoint -> store or release ckpt-0), streaming and resumable.

The reusable pieces (a reshard pipeline builds on them):

- `produce_*` functions turn one source tensor into a stream of `Slab(part, index, data)` events,
  every part in C order, one part after another, bounded by a byte budget; their reads run one
  slab ahead in a reader thread (`prefetch`) and float slabs go through the fused kernel
  `quant.quantize_slab`, so reading, quantizing and the sink's asynchronous hashing/writing overlap;
- `StoreSink` / `write_release_entry` consume such a stream into zarr3 arrays (chunk-aligned,
  hashed on the way) or into a release pickle;
- `Journal` makes a job resumable: one record per finished tensor, checked on rerun;
- `check_disk_space`, `disk_probe`, `parse_bytes` and `ErrorTable` for the CLI report.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import queue
import re
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional

import numpy as np

from . import store as st
from .disk import free_bytes, sha256_file
from .errors import DiskSpaceError, SlncxError
from .params import ParamSpec
from .progress import ProgressFn, null_progress
from .quant import BF16, ErrorStats, dequantize_f32, quantize_columns, quantize_rows, quantize_slab

log = logging.getLogger(__name__)

JOURNAL_DIR = ".slncx-progress"
DEFAULT_BUDGET = 2 * 1024**3
SLEEP_ENV = "SLNCX_TEST_SLEEP_PER_TENSOR"  # test hook: seconds to sleep after each tensor


# --- options and plan ---------------------------------------------------------------------------

@dataclass(frozen=True)
class QuantizeOptions:
    requantize: bool = False
    scale_dtype: str = "bfloat16"  # or "float32"
    include: tuple = ()
    exclude: tuple = ()
    method: str = "absmax"  # or "mse"
    embeddings: str = "float"  # or "int8"
    format: str = "store"  # or "release"
    compression: str = "zstd:1"
    workers: int = 1
    memory_budget: int = DEFAULT_BUDGET

    def job_dict(self) -> dict:
        """What determines the output (workers and budget do not)."""
        d = dataclasses.asdict(self)
        d.pop("workers")
        d.pop("memory_budget")
        d["include"], d["exclude"] = list(self.include), list(self.exclude)
        return d

    @property
    def scale_np(self) -> np.dtype:
        return BF16 if self.scale_dtype in ("bf16", "bfloat16") else np.dtype(np.float32)


@dataclass
class TensorJob:
    """What happens to one tensor: action, output storage, and the arrays to write."""

    entry: ParamSpec
    action: str  # "carry" | "float" | "quantize" | "requantize" | "quantize_rows"
    storage: dict
    arrays: dict  # part -> {"shape", "dtype", "chunks"}
    in_bytes: int
    source_parts: dict = field(default_factory=dict)  # part -> (shape, dtype) in the source

    @property
    def out_bytes(self) -> int:
        return sum(int(np.prod(a["shape"], dtype=np.int64)) * np.dtype(a["dtype"]).itemsize for a in self.arrays.values())


def parse_bytes(text) -> int:
    """"2G", "512M", "1.5GiB", "1000000" -> bytes."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*([0-9.]+)\s*([kmgt]?)(i?b)?\s*", str(text).lower())
    if not m:
        raise SlncxError(f"cannot parse a byte size from {text!r} (e.g. 2G, 512M)")
    return int(float(m.group(1)) * 1024 ** "_kmgt".index(m.group(2) or "_"))


def _selected(path: str, opts: QuantizeOptions) -> bool:
    if opts.include and not any(re.search(p, path) for p in opts.include):
        return False
    return not any(re.search(p, path) for p in opts.exclude)


def source_parts(source, entry: ParamSpec) -> dict:
    """part -> (shape, dtype) of an entry in a release or store source (headers only)."""
    if source.kind == "store":
        arrays = source.record(entry)["arrays"]
        return {p: (tuple(a["shape"]), st.DTYPES[a["dtype"]]) for p, a in arrays.items()}
    h = source.header(entry)
    return {p: (tuple(a.shape), np.dtype(a.dtype)) for p, a in h.arrays.items()}


def _source_kind(source, entry, parts) -> str:
    if source.kind == "store":
        return source.storage(entry)["kind"]
    return "int8" if "weight" in parts else "float"


def plan_tensor(source, entry: ParamSpec, opts: QuantizeOptions) -> TensorJob:
    parts = source_parts(source, entry)
    kind = _source_kind(source, entry, parts)
    in_bytes = sum(int(np.prod(s, dtype=np.int64)) * d.itemsize for s, d in parts.values())
    sel = _selected(entry.path, opts)
    sd = opts.scale_np
    f32 = np.dtype(np.float32)
    shape = entry.shape

    def arr(shape_, dtype, scales=False):
        chunks = tuple(shape_) if scales else st.default_chunks(shape_, entry.partition, dtype)
        return {"shape": tuple(shape_), "dtype": np.dtype(dtype), "chunks": chunks}

    if kind == "float":
        if entry.quantized and sel:
            return TensorJob(entry, "quantize", {"kind": "int8", "blocks": 1, "scale_dtype": st.dtype_name(sd)},
                             {"weight": arr(shape, np.int8), "scales": arr(entry.scales_shape(1), sd, True)}, in_bytes, parts)
        if entry.name == "embeddings" and sel and opts.embeddings == "int8":
            return TensorJob(entry, "quantize_rows", {"kind": "int8_rows", "scale_dtype": st.dtype_name(sd)},
                             {"weight": arr(shape, np.int8), "scales": arr((shape[0], 1), sd, True)}, in_bytes, parts)
        return TensorJob(entry, "float", {"kind": "float", "dtype": "float32"}, {"array": arr(shape, f32)}, in_bytes, parts)
    if kind == "int8" and opts.requantize and sel and parts["scales"][0][-2] > 1:
        return TensorJob(entry, "requantize", {"kind": "int8", "blocks": 1, "scale_dtype": st.dtype_name(sd)},
                         {"weight": arr(shape, np.int8), "scales": arr(entry.scales_shape(1), sd, True)}, in_bytes, parts)
    # carried bit-exactly: same dtypes, same scales
    if kind == "int8":
        blocks = parts["scales"][0][-2]
        storage = {"kind": "int8", "blocks": int(blocks), "scale_dtype": st.dtype_name(parts["scales"][1])}
    else:
        storage = {"kind": "int8_rows", "scale_dtype": st.dtype_name(parts["scales"][1])}
    arrays = {p: arr(s, d, scales=(p == "scales")) for p, (s, d) in parts.items()}
    return TensorJob(entry, "carry", storage, arrays, in_bytes, parts)


def plan(source, opts: QuantizeOptions) -> list:
    if opts.format == "release" and opts.embeddings == "int8":
        raise SlncxError("--embeddings int8 cannot be written as a release ckpt-0 (the original loader expects float embeddings)")
    jobs = [plan_tensor(source, e, opts) for e in source.table]
    if opts.format == "release":
        for j in jobs:
            if j.storage["kind"] == "int8_rows":
                raise SlncxError(f"{j.entry.path}: per-row int8 embeddings cannot be written as a release ckpt-0")
    return jobs


# --- producers: one tensor -> Slab events -------------------------------------------------------

@dataclass
class Slab:
    part: str
    index: tuple  # slices, one per dimension of the part
    data: np.ndarray


@dataclass
class TensorResult:
    stats: Optional[ErrorStats] = None  # None: carried exactly


def _row_bytes(shape, itemsize: int) -> int:
    return int(np.prod(shape[1:], dtype=np.int64)) * int(itemsize)


_END = object()


def prefetch(items, depth: int = 1):
    """Iterate `items` (a generator doing the reads) in a background thread, at most `depth` results
    ahead, so reading overlaps whatever the consumer does with the previous result (numpy, hashlib
    and TensorStore release the GIL). Exceptions are re-raised in the consumer; closing the
    returned generator (or an error in the consumer) stops the reader. Live results: the one being
    produced, `depth` queued and the one being consumed.
    """
    q: queue.Queue = queue.Queue(maxsize=max(1, depth))
    stop = threading.Event()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def run() -> None:
        it = iter(items)
        try:
            for item in it:
                if not put((True, item)):
                    return
            put((True, _END))
        except BaseException as e:  # noqa: BLE001 — handed to the consumer
            put((False, e))
        finally:
            close = getattr(it, "close", None)
            if close is not None:
                close()

    t = threading.Thread(target=run, name="slncx-read", daemon=True)
    t.start()
    try:
        while True:
            ok, item = q.get()
            if not ok:
                raise item
            if item is _END:
                return
            yield item
    finally:
        stop.set()
        t.join()


def produce_copy(source, job: TensorJob, budget: int, counter) -> Iterator[Slab]:
    """Carry every part as stored (float -> float32), in row slabs of whole chunks (read ahead)."""

    def reads():
        for part, a in job.arrays.items():
            shape, dtype = a["shape"], a["dtype"]
            src_dtype = job.source_parts[part][1]
            for sl in st.row_slabs(shape, a["chunks"][0], _row_bytes(shape, max(src_dtype.itemsize, dtype.itemsize)), budget // 8):
                data = source.read_part(job.entry, part, (sl,))
                counter(data.nbytes)
                if data.dtype != dtype:
                    data = data.astype(dtype)
                yield Slab(part, (sl,) + (slice(None),) * (len(shape) - 1), data)

    yield from prefetch(reads())


def _float_columns(source, job: TensorJob, lead: tuple, cols: slice) -> np.ndarray:
    """A float32 column slab [in, c] of one matrix (dequantized for an int8 source)."""
    e = job.entry
    idx = lead + (slice(None), cols)
    if job.action == "requantize":
        q = source.read_part(e, "weight", idx)
        s = source.read_part(e, "scales", lead + (slice(None), cols))
        rows, blocks = q.shape[-2], s.shape[-2]
        w = dequantize_f32(q.reshape(blocks, rows // blocks, -1), s.reshape(blocks, 1, -1)).reshape(q.shape)
        return w.reshape(q.shape[-2:])
    return source.read_part(e, "array", idx).reshape(e.shape[-2], -1).astype(np.float32, copy=False)


def _quantize_into(w: np.ndarray, axis: int, q_out: np.ndarray, opts: QuantizeOptions):
    """Quantize a float slab (one scale per column for axis 0, per row for axis 1) into `q_out`."""
    if opts.method == "absmax":
        _, s, stat = quantize_slab(w, axis, opts.scale_np, q_out=q_out)  # the fused kernel
        return s, stat
    if axis == 0:
        q, s, stat = quantize_columns(w, 1, opts.scale_np, opts.method)
    else:
        q, s, stat = quantize_rows(w, opts.scale_np, opts.method)
    q_out[...] = q
    return s, stat


def produce_quantize(source, job: TensorJob, budget: int, counter, opts: QuantizeOptions, result: TensorResult) -> Iterator[Slab]:
    """Per-output-channel int8 of each matrix [in, out]; the matrix is assembled in an int8 buffer
    from column slabs (so the float slab stays within budget), then written whole (C order).
    Column slabs are read one ahead while the previous one is quantized."""
    e = job.entry
    shape = e.shape
    lead_shape = shape[:-2]
    rows, cols = shape[-2], shape[-1]
    scales = np.empty(e.scales_shape(1), dtype=opts.scale_np)
    in_item = sum(int(np.prod(s[-2:])) * d.itemsize for s, d in job.source_parts.values()) / max(1, rows * cols)
    width = max(1, min(cols, int(budget // 16 // max(1, rows * 4))))
    leads = list(np.ndindex(*lead_shape)) if lead_shape else [()]

    def reads():
        for lead in leads:
            lead_idx = tuple(slice(i, i + 1) for i in lead)
            for c0 in range(0, cols, width):
                cs = slice(c0, min(cols, c0 + width))
                w = _float_columns(source, job, lead_idx, cs)
                counter(int(w.size * in_item))
                yield lead, cs, w

    stats = ErrorStats()
    slabs = prefetch(reads())
    try:
        for lead in leads:
            lead_idx = tuple(slice(i, i + 1) for i in lead)
            buf = np.empty((rows, cols), dtype=np.int8)
            for _ in range(0, cols, width):
                lead_r, cs, w = next(slabs)
                assert lead_r == lead
                s, stat = _quantize_into(w, 0, buf[:, cs], opts)
                del w
                scales[lead + (slice(None), cs)] = s
                stats = stats + stat
            yield Slab("weight", lead_idx + (slice(None), slice(None)), buf.reshape((1,) * len(lead) + buf.shape))
            del buf
    finally:
        slabs.close()
    result.stats = stats
    yield Slab("scales", tuple(slice(None) for _ in scales.shape), scales)


def produce_quantize_rows(source, job: TensorJob, budget: int, counter, opts: QuantizeOptions, result: TensorResult) -> Iterator[Slab]:
    """Per-row int8 of [V, D] (embeddings): units of whole chunk rows, quantized in row sub-slabs
    (read one ahead) straight into the unit's int8 buffer, without transposes."""
    e = job.entry
    rows, cols = e.shape
    a = job.arrays["weight"]
    scales = np.empty((rows, 1), dtype=opts.scale_np)
    sub = max(1, int(budget // 16 // max(1, cols * 4)))
    units = list(st.row_slabs(e.shape, a["chunks"][0], cols, budget // 8))

    def reads():
        for unit in units:
            for r0 in range(unit.start, unit.stop, sub):
                rs = slice(r0, min(unit.stop, r0 + sub))
                w = source.read_part(e, "array", (rs, slice(None))).astype(np.float32, copy=False)
                counter(w.nbytes)
                yield rs, w

    stats = ErrorStats()
    slabs = prefetch(reads())
    try:
        for unit in units:
            buf = np.empty((unit.stop - unit.start, cols), dtype=np.int8)
            for _ in range(unit.start, unit.stop, sub):
                rs, w = next(slabs)
                s, stat = _quantize_into(w, 1, buf[rs.start - unit.start : rs.stop - unit.start], opts)
                del w
                scales[rs] = s
                stats = stats + stat
            yield Slab("weight", (unit, slice(None)), buf)
            del buf
    finally:
        slabs.close()
    result.stats = stats
    yield Slab("scales", (slice(None), slice(None)), scales)


def produce(source, job: TensorJob, opts: QuantizeOptions, budget: int, counter, result: TensorResult) -> Iterator[Slab]:
    if job.action in ("carry", "float"):
        return produce_copy(source, job, budget, counter)
    if job.action in ("quantize", "requantize"):
        return produce_quantize(source, job, budget, counter, opts, result)
    if job.action == "quantize_rows":
        return produce_quantize_rows(source, job, budget, counter, opts, result)
    raise ValueError(job.action)


# --- sinks --------------------------------------------------------------------------------------

def write_store_entry(root, job: TensorJob, slabs, compression: dict, budget: int) -> dict:
    """Write a tensor's slabs into its zarr3 arrays; returns the manifest "arrays" dict with digests.

    Writes (and hashing) run asynchronously, at most `budget // 4` bytes beyond the first slab in
    flight; every array is fsynced when this returns (`ArrayWriter.close`)."""
    writers = {
        part: st.ArrayWriter(root, st.array_key(job.entry.path, part), a["shape"], a["dtype"], a["chunks"], compression,
                             max_in_flight_bytes=budget // 4)
        for part, a in job.arrays.items()
    }
    try:
        for slab in slabs:
            writers[slab.part].write(slab.index, slab.data)
        digests = {part: w.close() for part, w in writers.items()}
    except BaseException:
        for w in writers.values():
            w.abort()
        raise
    return {
        part: {
            "key": st.array_key(job.entry.path, part),
            "shape": list(a["shape"]),
            "dtype": st.dtype_name(a["dtype"]),
            "chunks": list(a["chunks"]),
            "sha256": digests[part],
        }
        for part, a in job.arrays.items()
    }


def write_release_entry(ckpt_dir, job: TensorJob, slabs) -> dict:
    """Write a tensor as a release pickle (streamed); returns {"file", "sha256" of the file, arrays digests}."""
    from . import picklefmt
    from .release import write_tensor

    it = iter(slabs)
    pending: list = []
    hashes = {p: hashlib.sha256() for p in job.arrays}

    def stream(part):
        while True:
            slab = pending.pop() if pending else next(it, None)
            if slab is None:
                return
            if slab.part != part:
                pending.append(slab)
                return
            data = np.ascontiguousarray(slab.data).reshape(-1).view(np.uint8)
            hashes[part].update(data)
            yield data.data

    order = ["weight", "scales"] if "weight" in job.arrays else ["array"]
    payloads = {p: picklefmt.ArrayPayload(tuple(job.arrays[p]["shape"]), job.arrays[p]["dtype"], lambda p=p: stream(p)) for p in order}
    path = Path(ckpt_dir) / job.entry.file
    write_tensor(path, None, arrays=payloads)
    arrays = {
        p: {"shape": list(job.arrays[p]["shape"]), "dtype": st.dtype_name(job.arrays[p]["dtype"]), "sha256": hashes[p].hexdigest()}
        for p in order
    }
    return {"file": job.entry.file, "file_sha256": sha256_file(path), "arrays": arrays}


# --- resumability -------------------------------------------------------------------------------

class Journal:
    """OUT/.slncx-progress: job.json (what is being made) and one JSON record per finished tensor."""

    def __init__(self, out: Path):
        self.dir = Path(out) / JOURNAL_DIR
        self._lock = threading.Lock()

    def start(self, job: dict) -> bool:
        """Create or resume; returns True when resuming. Refuses a journal of a different job."""
        path = self.dir / "job.json"
        if path.exists():
            old = json.loads(path.read_text())
            if old != job:
                diff = sorted(k for k in set(old) | set(job) if old.get(k) != job.get(k))
                raise SlncxError(
                    f"{self.dir.parent}: holds an unfinished conversion with different settings ({', '.join(diff)}); "
                    f"rerun it with the same options or choose a new output directory"
                )
            return True
        self.dir.mkdir(parents=True, exist_ok=True)
        _atomic_write(path, json.dumps(job, indent=1, sort_keys=True))
        return False

    def done(self) -> dict:
        out = {}
        for p in sorted(self.dir.glob("t*.json")):
            try:
                rec = json.loads(p.read_text())
                out[rec["path"]] = rec
            except (OSError, ValueError, KeyError):
                p.unlink(missing_ok=True)
        return out

    def record(self, entry: ParamSpec, rec: dict) -> None:
        with self._lock:
            _atomic_write(self.dir / f"t{entry.index:05d}.json", json.dumps(rec, indent=1))

    def forget(self, entry: ParamSpec) -> None:
        (self.dir / f"t{entry.index:05d}.json").unlink(missing_ok=True)

    def remove(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def verify_store_record(root, rec: dict) -> bool:
    """True when every array of a journal record opens with its shape/dtype and re-hashes to its digest."""
    try:
        for info in rec["arrays"].values():
            a = st.open_array(root, info["key"])
            if list(a.shape) != list(info["shape"]) or st.dtype_name(a.dtype.numpy_dtype) != info["dtype"]:
                return False
            if st.hash_array(a) != info["sha256"]:
                return False
        return True
    except Exception as e:  # noqa: BLE001 — anything wrong means: redo this tensor
        log.info("resume: redoing %s (%s)", rec.get("path"), e)
        return False


def verify_release_record(ckpt_dir, rec: dict) -> bool:
    path = Path(ckpt_dir) / rec["file"]
    return path.exists() and sha256_file(path) == rec["file_sha256"]


# --- disk ---------------------------------------------------------------------------------------

def check_disk_space(out, needed: int, slack: float = 0.02) -> None:
    free = free_bytes(out)
    want = int(needed * (1 + slack)) + 64 * 1024 * 1024
    if free < want:
        from .summary import human_bytes

        raise DiskSpaceError(
            f"{out}: needs about {human_bytes(want)} free for the output, only {human_bytes(free)} available"
        )


def disk_probe(path, nbytes: int = 256 * 1024 * 1024) -> float:
    """Sequential read rate (bytes/s) of the start of a file (page-cached data reads faster)."""
    buf = bytearray(8 * 1024 * 1024)
    t0 = time.perf_counter()
    done = 0
    with open(path, "rb", buffering=0) as f:
        while done < nbytes:
            n = f.readinto(buf)
            if not n:
                break
            done += n
    dt = time.perf_counter() - t0
    return done / dt if dt > 0 and done else float("inf")


# --- the quantize pipeline ----------------------------------------------------------------------

@dataclass
class ErrorTable:
    """Per-group (parameter name) error and bytes; `carried` groups are bit-exact copies."""

    rows: dict = field(default_factory=dict)

    def add(self, group: str, stats: Optional[ErrorStats], in_bytes: int, out_bytes: int, action: str) -> None:
        r = self.rows.setdefault(group, {"tensors": 0, "in_bytes": 0, "out_bytes": 0, "stats": None, "actions": set()})
        r["tensors"] += 1
        r["in_bytes"] += in_bytes
        r["out_bytes"] += out_bytes
        r["actions"].add(action)
        if stats is not None:
            r["stats"] = stats if r["stats"] is None else r["stats"] + stats

    def to_list(self) -> list:
        out = []
        for group, r in self.rows.items():
            s = r["stats"]
            out.append({
                "group": group, "tensors": r["tensors"], "action": "+".join(sorted(r["actions"])),
                "in_bytes": r["in_bytes"], "out_bytes": r["out_bytes"],
                "rmse": s.rmse if s else 0.0, "snr_db": s.snr_db if s else float("inf"),
                "max_abs": s.max_abs if s else 0.0, "cosine": s.cosine if s else 1.0,
            })
        return out


def _stats_dict(s: Optional[ErrorStats]):
    if s is None:
        return None
    return dataclasses.asdict(s)


def _stats_from(d) -> Optional[ErrorStats]:
    return None if d is None else ErrorStats(**d)


def describe_plan(jobs: list, source, out, opts: QuantizeOptions, probe: bool = True) -> dict:
    """The dry-run report: tensors per action, bytes in/out, disk probe estimate, free space."""
    actions: dict = {}
    for j in jobs:
        a = actions.setdefault(j.action, {"tensors": 0, "in_bytes": 0, "out_bytes": 0})
        a["tensors"] += 1
        a["in_bytes"] += j.in_bytes
        a["out_bytes"] += j.out_bytes
    in_bytes = sum(j.in_bytes for j in jobs)
    out_bytes = sum(j.out_bytes for j in jobs)
    rate = None
    if probe and jobs:
        biggest = max(jobs, key=lambda j: j.in_bytes)
        f = _source_file(source, biggest.entry)
        if f is not None:
            rate = disk_probe(f)
    free = free_bytes(out)
    return {
        "source": str(getattr(source, "dir", "")), "out": str(out), "format": opts.format,
        "tensors": len(jobs), "actions": actions, "in_bytes": in_bytes, "out_bytes_max": out_bytes,
        "read_rate_bytes_per_s": rate, "estimated_seconds": (in_bytes / rate) if rate else None,
        "free_bytes": free, "enough_space": free >= out_bytes,
    }


def _source_file(source, entry) -> Optional[Path]:
    if source.kind == "release":
        return Path(source.dir) / entry.file
    return None


def _source_info(source) -> dict:
    if source.kind == "store":
        mf = Path(source.dir) / st.MANIFEST
        return {"kind": "store", "path": str(Path(source.dir).resolve()), "manifest_sha256": sha256_file(mf), "files": {}}
    return {"kind": "release", "path": str(Path(source.dir).resolve()), "files": {}}


def quantize_checkpoint(source_path, out, opts: QuantizeOptions = QuantizeOptions(), progress: ProgressFn = null_progress) -> dict:
    """Convert `source_path` (release ckpt-0 or complete store) into `out`; resumable. Returns the report."""
    from .checkpoint import open_checkpoint

    source = open_checkpoint(source_path)
    out = Path(out)
    compression = st.parse_compression(opts.compression)
    jobs = plan(source, opts)
    release = opts.format == "release"
    if not release and (out / st.MANIFEST).exists():
        if st.read_manifest(out).get("complete"):
            raise SlncxError(f"{out}: already holds a complete store; choose a new output directory")
    if release and (out / "ckpt-0").exists():
        raise SlncxError(f"{out / 'ckpt-0'}: already exists; choose a new output directory")
    if out.exists() and any(out.iterdir()) and not (out / JOURNAL_DIR / "job.json").exists():
        raise SlncxError(f"{out}: exists and is not empty (and is not an unfinished conversion to resume)")
    src_info = _source_info(source)
    job_desc = {"tool": "quantize", "source": src_info["path"], "config": source.config.to_dict(), "options": opts.job_dict()}
    out.mkdir(parents=True, exist_ok=True)
    journal = Journal(out)
    resuming = journal.start(job_desc)
    ckpt_dir = out / "ckpt-0.incomplete"
    options_json = opts.job_dict()
    manifest = st.new_manifest(source.config, source=src_info, options=options_json, compression=compression)
    if release:
        ckpt_dir.mkdir(exist_ok=True)
    else:
        st.write_manifest(out, manifest)  # complete: false until the end

    done = journal.done() if resuming else {}
    records: dict = {}
    for job in jobs:
        rec = done.get(job.entry.path)
        if rec is None:
            continue
        ok = verify_release_record(ckpt_dir, rec) if release else verify_store_record(out, rec)
        if ok:
            records[job.entry.path] = rec
        else:
            journal.forget(job.entry)
    todo = [j for j in jobs if j.entry.path not in records]
    check_disk_space(out, sum(j.out_bytes for j in todo))

    total = sum(j.in_bytes for j in jobs)
    state = {"done": sum(j.in_bytes for j in jobs if j.entry.path in records)}
    lock = threading.Lock()

    def counter(n: int, label: str = "") -> None:
        with lock:
            state["done"] += n
            progress(min(state["done"], total), total, label)

    workers = max(1, int(opts.workers))
    budget = max(64 * 1024 * 1024, int(opts.memory_budget) // workers)
    sleep = float(os.environ.get(SLEEP_ENV, "0") or 0)

    def run(job: TensorJob) -> dict:
        t0 = time.perf_counter()
        file_hash = None
        hasher = None
        src_file = _source_file(source, job.entry)
        with ThreadPoolExecutor(1) as pool:
            if src_file is not None:
                hasher = pool.submit(sha256_file, src_file)
            result = TensorResult()
            label = job.entry.path.split("/", 1)[-1]
            slabs = produce(source, job, opts, budget, lambda n: counter(n, label), result)
            if release:
                out_rec = write_release_entry(ckpt_dir, job, slabs)
                arrays = out_rec["arrays"]
                extra = {"file": out_rec["file"], "file_sha256": out_rec["file_sha256"]}
            else:
                arrays = write_store_entry(out, job, slabs, compression, budget)
                extra = {}
            if hasher is not None:
                file_hash = hasher.result()
        rec = st.tensor_record(job.entry, job.storage, arrays, action=job.action, error=_stats_dict(result.stats), **extra)
        if file_hash is not None:
            rec["source_sha256"] = file_hash
        journal.record(job.entry, rec)
        log.info("%s: %s in %.2fs", job.entry.path, job.action, time.perf_counter() - t0)
        if sleep:
            time.sleep(sleep)
        return rec

    progress(state["done"], total, "")
    if workers == 1:
        for job in todo:
            records[job.entry.path] = run(job)
    else:
        with ThreadPoolExecutor(workers) as pool:
            for job, rec in zip(todo, pool.map(run, todo)):
                records[job.entry.path] = rec

    # finish: the manifest (store) or SHA256SUMS + rename (release), then drop the journal
    table = ErrorTable()
    tensors = []
    for job in jobs:
        rec = records[job.entry.path]
        tensors.append(rec)
        table.add(job.entry.name, _stats_from(rec.get("error")), job.in_bytes, job.out_bytes, job.action)
        if "source_sha256" in rec:
            src_info["files"][job.entry.file] = rec["source_sha256"]
    if release:
        lines = [f"{r['file_sha256']}  {r['file']}\n" for r in tensors]
        (ckpt_dir / "config.json").write_text(json.dumps(source.config.to_dict(), indent=1) + "\n")
        _atomic_write(ckpt_dir / "SHA256SUMS", "".join(lines))
        os.replace(ckpt_dir, out / "ckpt-0")
    else:
        manifest["source"] = src_info
        manifest["tensors"] = tensors
        manifest["complete"] = True
        st.write_manifest(out, manifest)
    journal.remove()
    return {
        "source": str(source_path), "out": str(out), "format": opts.format, "tensors": len(jobs),
        "resumed": len(jobs) - len(todo), "in_bytes": total,
        "out_bytes": sum(j.out_bytes for j in jobs), "out_bytes_on_disk": _du(out),
        "groups": table.to_list(),
    }


def _du(path) -> int:
    total = 0
    for root, _dirs, files in os.walk(path):
        for f in files:
            try:
                total += os.path.getsize(os.path.join(root, f))
            except OSError:
                pass
    return total
