"""Reshard: lay a checkpoint out for one device mesh, so that each device's piece is one chunk.

`slncx-tools reshard SOURCE OUT --mesh 8x1` writes a store (store.py's format) whose arrays have
chunk shape = the per-device shard shape of the parameter table's PartitionSpec on that mesh. A
device (or a loading process) then reads its piece of every array as one contiguous file, and
nothing else. The manifest adds, on top of the store format:

- ``"mesh": {"data": D, "model": M, "hosts": N, "devices": D·M, ...}``;
- per array ``"partition"`` (the PartitionSpec of that part) and ``"shard_shape"`` (= "chunks");
- ``"hosts"``: per process h, the devices it holds (row-major over the (data, model) mesh, devices
  h·n/N … (h+1)·n/N−1, the order of `jax.devices()` in a multi-process run) and the chunks it
  reads (each once, even when several of its devices hold the same replicated piece) with bytes.

Scales. The int8 values and float arrays are carried bit-exactly, so their per-array SHA-256 equals
the source's (logical bytes do not depend on chunking). Scales [..., R, out] with R > 1 are split
over the mesh axes of their weight's row dimension, re-gridded to R' = lcm(R, k) row blocks for an
axis of size k: on an axis finer than R each block's scale is repeated R'/R times (lossless, the
dequantized weight is identical); on a coarser one R' = R and a shard holds R/k blocks. Such a
re-gridded scales array is a different array (different shape and digest): its tensor record says
``"action": "regrid_scales"`` with ``"source_blocks": R`` and ``storage.blocks = R'``, and the
manifest lists it under ``mesh.regridded``. Per-channel scales (R = 1) are never split.

The pure planning part (`layout_of`, `shard_shape`, `check_layout`, `device_chunks`, ...) does no
I/O; `load.py` uses the same functions to read a device's slab from any checkpoint.
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from . import store as st
from .config import ModelConfig
from .convert import (
    DEFAULT_BUDGET,
    JOURNAL_DIR,
    SLEEP_ENV,
    Journal,
    TensorJob,
    check_disk_space,
    source_parts,
    verify_store_record,
    _source_info,
)
from .disk import free_bytes
from .errors import ChecksumError, MeshError, SlncxError
from .params import DATA, MODEL, ParamSpec, mesh_axes_of
from .progress import ProgressFn, null_progress

log = logging.getLogger(__name__)

DEFAULT_COMPRESSION = "none"  # a device's read is exactly its logical bytes; int8 barely compresses
F32 = np.dtype(np.float32)
# Loaded as float32 by the model; any other float tensor is used as bfloat16 (load.KEEP_F32).
_KEEP_F32 = {"embeddings", "final_norm", "rms_norm/scale", "rms_norm_1/scale", "rms_norm_2/scale", "rms_norm_3/scale", "router/w"}


# --- the mesh -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class MeshShape:
    """Axis sizes of a ("data", "model") mesh and how its devices split over `hosts` processes."""

    data: int
    model: int
    hosts: int = 1

    @classmethod
    def parse(cls, spec, hosts: int = 1) -> "MeshShape":
        from .mesh import mesh_sizes, parse_mesh

        if hasattr(spec, "devices") and hasattr(spec, "axis_names"):  # a jax Mesh
            sizes = mesh_sizes(spec)
            data, model = sizes.get(DATA, 1), sizes.get(MODEL, 1)
        else:
            data, model = parse_mesh(spec)
        m = cls(int(data), int(model), int(hosts))
        if m.hosts < 1 or m.devices % m.hosts:
            raise MeshError(f"--hosts {hosts}: the {m.devices} devices of mesh {m} do not split evenly over {hosts} hosts")
        return m

    @property
    def sizes(self) -> dict:
        return {DATA: self.data, MODEL: self.model}

    @property
    def devices(self) -> int:
        return self.data * self.model

    def coords(self) -> list:
        """(data, model) position of each device, in flat (row-major) device order."""
        return [(i, j) for i in range(self.data) for j in range(self.model)]

    def host_of(self, flat: int) -> int:
        return flat // (self.devices // self.hosts)

    def __str__(self) -> str:
        return f"model={self.model},data={self.data}"

    def to_dict(self) -> dict:
        return {
            "data": self.data, "model": self.model, "hosts": self.hosts, "devices": self.devices,
            "axis_names": [DATA, MODEL],
            "device_order": "row-major over (data, model); host h holds flat devices h*n/N .. (h+1)*n/N-1",
        }


# --- per-array layout (pure) --------------------------------------------------------------------

def axes_size(spec, sizes: dict) -> int:
    k = 1
    for a in mesh_axes_of(spec):
        k *= sizes.get(a, 1)
    return k


def regrid_blocks(blocks: int, k: int) -> int:
    """R' for R stored row blocks on a row axis split k ways: R = 1 stays 1 (per-channel, never
    split); otherwise lcm(R, k), so every shard holds whole blocks."""
    if blocks <= 1:
        return blocks
    return blocks * k // math.gcd(blocks, k)


def part_partition(entry: ParamSpec, part: str, kind: str, blocks: int = 0) -> tuple:
    """The PartitionSpec (one AxisSpec per dim) of one stored part.

    "array"/"weight": the table's spec. "scales" [..., R, out] of an int8 weight: the weight's spec,
    with the R dimension split like the weight's rows when R > 1 and replicated when R = 1.
    Per-row embedding scales [V, 1] ("int8_rows"): split like the rows, never along the 1."""
    spec = tuple(entry.partition)
    if part != "scales":
        return spec
    if kind == "int8_rows":
        return (spec[0], None)
    if blocks <= 1:
        spec = spec[: entry.row_axis] + (None,) + spec[entry.row_axis + 1 :]
    return spec


def shard_shape(shape, partition, sizes: dict) -> tuple:
    """Per-device shape of an array split by `partition` on a mesh of `sizes` (must divide)."""
    return tuple(int(n) // axes_size(p, sizes) for n, p in zip(shape, tuple(partition) + (None,) * (len(shape) - len(partition))))


@dataclass(frozen=True)
class PartLayout:
    """One array of one tensor on a mesh: its global shape, dtype, spec and shard shape."""

    part: str
    shape: tuple
    dtype: np.dtype
    partition: tuple
    shard: tuple
    source_blocks: int = 0  # scales: R as stored in the source
    blocks: int = 0  # scales: R' on this mesh

    @property
    def shard_bytes(self) -> int:
        return int(np.prod(self.shard, dtype=np.int64)) * self.dtype.itemsize

    @property
    def regridded(self) -> bool:
        return self.part == "scales" and self.blocks != self.source_blocks


def layout_of(entry: ParamSpec, parts: dict, kind: str, sizes: dict) -> dict:
    """part -> PartLayout for an entry whose source parts are `parts` (part -> (shape, dtype))."""
    out = {}
    for part, (shape, dtype) in parts.items():
        shape = tuple(int(d) for d in shape)
        blocks = new_blocks = 0
        if part == "scales" and kind == "int8":
            blocks = shape[-2]
            k = axes_size(entry.partition[entry.row_axis], sizes)
            new_blocks = regrid_blocks(blocks, k)
            shape = shape[:-2] + (new_blocks, shape[-1])
        partition = part_partition(entry, part, kind, new_blocks)
        partition = partition + (None,) * (len(shape) - len(partition))  # router/w: (data,) on [D, E]
        check_divides(entry, part, shape, partition, sizes)
        out[part] = PartLayout(part, shape, np.dtype(dtype), partition, shard_shape(shape, partition, sizes), blocks, new_blocks)
    return out


def check_divides(entry: ParamSpec, part: str, shape, partition, sizes: dict) -> None:
    """MeshError naming the tensor and dimension when a mesh axis does not divide it."""
    for dim, (n, spec) in enumerate(zip(shape, partition)):
        k = axes_size(spec, sizes)
        if n % k:
            axes = [a for a in mesh_axes_of(spec) if sizes.get(a, 1) > 1]
            what = "*".join(axes) + f"={k}"
            name = entry.name if part in ("array", "weight") else f"{entry.name} {part}"
            where = ", every layer" if entry.layer is not None else ""
            raise MeshError(
                f"mesh {sizes.get(MODEL, 1)}x{sizes.get(DATA, 1)}: {name} dim {dim} ({n}) is not divisible by {what} "
                f"(shape {list(shape)}{where}); choose axis sizes that divide it"
            )


def source_kind(source, entry: ParamSpec, parts: dict) -> str:
    if getattr(source, "kind", None) == "store":
        return source.storage(entry)["kind"]
    return "int8" if "weight" in parts else "float"


def _entry_layout(source, entry: ParamSpec, mesh: MeshShape):
    parts = source_parts(source, entry)
    kind = source_kind(source, entry, parts)
    return kind, layout_of(entry, parts, kind, mesh.sizes)


# --- which device holds which chunk (pure) ------------------------------------------------------

def chunk_of(partition, sizes: dict, coord: tuple) -> tuple:
    """Chunk-grid index of the shard a device at (data, model) = `coord` holds.

    An entry sharded over several axes, e.g. ("data", "model"), orders them major to minor (JAX's
    convention): index = data_index · model_size + model_index."""
    pos = {DATA: coord[0], MODEL: coord[1]}
    out = []
    for spec in partition:
        i = 0
        for a in mesh_axes_of(spec):
            i = i * sizes.get(a, 1) + pos[a]
        out.append(i)
    return tuple(out)


def chunk_slices(chunk: tuple, shard: tuple) -> tuple:
    return tuple(slice(c * s, (c + 1) * s) for c, s in zip(chunk, shard))


def host_plans(layouts: dict, mesh: MeshShape) -> list:
    """Per host: its devices and the chunks it reads (once each), with bytes. `layouts` maps an
    array key ("<path>/<part>") to a PartLayout."""
    hosts = [{"host": h, "devices": [], "chunks": [], "bytes": 0} for h in range(mesh.hosts)]
    seen = [set() for _ in range(mesh.hosts)]
    for flat, coord in enumerate(mesh.coords()):
        hosts[mesh.host_of(flat)]["devices"].append({"id": flat, "data": coord[0], "model": coord[1]})
    for key, lay in layouts.items():
        for flat, coord in enumerate(mesh.coords()):
            h = mesh.host_of(flat)
            c = chunk_of(lay.partition, mesh.sizes, coord)
            if (key, c) in seen[h]:
                continue
            seen[h].add((key, c))
            hosts[h]["chunks"].append({"array": key, "chunk": list(c), "bytes": lay.shard_bytes})
            hosts[h]["bytes"] += lay.shard_bytes
    return hosts


def loaded_itemsize(entry: ParamSpec, lay: PartLayout) -> int:
    """Bytes per element once loaded: float tensors the model keeps in float32 stay 4, other float
    weights become bfloat16; int8 values and scales keep their stored dtype."""
    if lay.part == "array" and entry.name not in _KEEP_F32:
        return 2
    return lay.dtype.itemsize


def kv_cache_bytes(cfg: ModelConfig, mesh: MeshShape, batch: int, context: int, itemsize: int) -> int:
    """KV cache bytes on one device (mesh.cache_specs: batch over data and kv heads over model,
    each only when it divides)."""
    b = batch // mesh.data if batch % mesh.data == 0 else batch
    k = cfg.num_kv_heads // mesh.model if cfg.num_kv_heads % mesh.model == 0 else cfg.num_kv_heads
    return 2 * cfg.num_layers * b * context * k * cfg.key_size * itemsize


# --- the plan -----------------------------------------------------------------------------------

@dataclass
class ReshardPlan:
    source: object
    mesh: MeshShape
    jobs: list  # convert.TensorJob, arrays[part] = {"shape", "dtype", "chunks", "layout"}
    hosts: list = field(default_factory=list)

    def array_layouts(self) -> dict:
        return {st.array_key(j.entry.path, p): a["layout"] for j in self.jobs for p, a in j.arrays.items()}

    @property
    def in_bytes(self) -> int:
        return sum(j.in_bytes for j in self.jobs)

    @property
    def out_bytes(self) -> int:
        return sum(j.out_bytes for j in self.jobs)

    def device_bytes(self, loaded: bool = True) -> int:
        """Weight bytes on one device (the same on every device: all splits are even)."""
        total = 0
        for j in self.jobs:
            for a in j.arrays.values():
                lay = a["layout"]
                item = loaded_itemsize(j.entry, lay) if loaded else lay.dtype.itemsize
                total += int(np.prod(lay.shard, dtype=np.int64)) * item
        return total

    def regridded(self) -> list:
        return [j.entry.path for j in self.jobs if j.action == "regrid_scales"]


def plan_reshard(source, mesh, hosts: int = 1) -> ReshardPlan:
    """Validate `mesh` against every tensor of `source` and plan the output arrays (no I/O beyond
    the source's headers/manifest). Raises MeshError before anything is written."""
    m = mesh if isinstance(mesh, MeshShape) else MeshShape.parse(mesh, hosts)
    jobs = []
    for entry in source.table:
        parts = source_parts(source, entry)
        kind = source_kind(source, entry, parts)
        lays = layout_of(entry, parts, kind, m.sizes)
        if kind == "float":
            storage = {"kind": "float", "dtype": "float32"}
            lays = {p: _as_dtype(l, F32) for p, l in lays.items()}  # float sources are stored float32
        elif kind == "int8":
            storage = {"kind": "int8", "blocks": int(lays["scales"].blocks), "scale_dtype": st.dtype_name(lays["scales"].dtype)}
        else:
            storage = {"kind": kind, "scale_dtype": st.dtype_name(lays["scales"].dtype)}
        action = "regrid_scales" if any(l.regridded for l in lays.values()) else "carry"
        in_bytes = sum(int(np.prod(s, dtype=np.int64)) * np.dtype(d).itemsize for s, d in parts.values())
        arrays = {p: {"shape": l.shape, "dtype": l.dtype, "chunks": l.shard, "layout": l} for p, l in lays.items()}
        jobs.append(TensorJob(entry, action, storage, arrays, in_bytes, parts))
    plan = ReshardPlan(source, m, jobs)
    plan.hosts = host_plans(plan.array_layouts(), m)
    return plan


def _as_dtype(lay: PartLayout, dtype) -> PartLayout:
    return PartLayout(lay.part, lay.shape, np.dtype(dtype), lay.partition, lay.shard, lay.source_blocks, lay.blocks)


def describe(plan: ReshardPlan, out=None, *, batch: int = 1, context: Optional[int] = None, cache_itemsize: int = 4) -> dict:
    """The dry-run report: per-device memory (weights + KV cache) and per-host read bytes."""
    cfg = plan.source.config
    context = int(context or cfg.sequence_len)
    weights = plan.device_bytes()
    cache = kv_cache_bytes(cfg, plan.mesh, batch, context, cache_itemsize)
    groups: dict = {}
    for j in plan.jobs:
        g = groups.setdefault(j.entry.name, {"tensors": 0, "device_bytes": 0, "shard": {}, "action": set()})
        g["tensors"] += 1
        g["action"].add(j.action)
        for p, a in j.arrays.items():
            g["shard"][p] = list(a["layout"].shard)
            g["device_bytes"] += int(np.prod(a["layout"].shard, dtype=np.int64)) * loaded_itemsize(j.entry, a["layout"])
    info = {
        "source": str(getattr(plan.source, "dir", "")), "out": None if out is None else str(out),
        "mesh": plan.mesh.to_dict(), "tensors": len(plan.jobs),
        "device_weight_bytes": weights, "kv_cache": {"batch": batch, "context": context, "itemsize": cache_itemsize, "device_bytes": cache},
        "device_total_bytes": weights + cache,
        "hosts": [{"host": h["host"], "devices": len(h["devices"]), "chunks": len(h["chunks"]), "read_bytes": h["bytes"]} for h in plan.hosts],
        "in_bytes": plan.in_bytes, "out_bytes": plan.out_bytes, "regridded": plan.regridded(),
        "groups": [{"group": n, **{k: (sorted(v) if isinstance(v, set) else v) for k, v in g.items()}} for n, g in groups.items()],
    }
    if out is not None:
        free = free_bytes(out)
        info["free_bytes"], info["enough_space"] = free, free >= plan.out_bytes
    return info


# --- writing ------------------------------------------------------------------------------------

def _slabs(source, job: TensorJob, part: str, budget: int):
    """(index, data) pieces of one output part, each a set of whole chunks. `c_order` tells whether
    they come in C order (then the writer's running hash is the array's digest)."""
    a = job.arrays[part]
    lay: PartLayout = a["layout"]
    shape, chunks = lay.shape, lay.shard
    full = tuple(slice(None) for _ in shape)
    if lay.regridded:  # scales are small: read whole, repeat each block R'/R times
        s = source.read_part(job.entry, part)
        ax = len(shape) - 2
        return True, [(full, np.repeat(s, lay.blocks // lay.source_blocks, axis=ax).astype(lay.dtype, copy=False))]
    if not shape:
        return True, [(full, source.read_part(job.entry, part).astype(lay.dtype, copy=False))]
    row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * max(lay.dtype.itemsize, job.source_parts[part][1].itemsize)
    if chunks[0] * row_bytes <= budget or tuple(chunks[1:]) == tuple(shape[1:]):
        def rows():
            for sl in st.row_slabs(shape, chunks[0], row_bytes, budget):
                idx = (sl,) + full[1:]
                yield idx, source.read_part(job.entry, part, idx).astype(lay.dtype, copy=False)
        return True, rows()

    def by_chunk():  # a chunk spans more rows than the budget holds (e.g. embeddings [V, D/k])
        for c in np.ndindex(*(n // k for n, k in zip(shape, chunks))):
            idx = chunk_slices(c, chunks)
            yield idx, source.read_part(job.entry, part, idx).astype(lay.dtype, copy=False)
    return False, by_chunk()


def _digest_rows(source, job: TensorJob, part: str, budget: int) -> str:
    import hashlib

    lay = job.arrays[part]["layout"]
    h = hashlib.sha256()
    row_bytes = int(np.prod(lay.shape[1:], dtype=np.int64)) * max(lay.dtype.itemsize, job.source_parts[part][1].itemsize)
    for sl in st.row_slabs(lay.shape, 1, row_bytes, budget):
        data = np.ascontiguousarray(source.read_part(job.entry, part, (sl,)).astype(lay.dtype, copy=False))
        h.update(data.reshape(-1).view(np.uint8))
    return h.hexdigest()


def write_job(root, source, job: TensorJob, compression: dict, budget: int, counter) -> dict:
    """Write one tensor's arrays with chunk = shard shape; returns the manifest "arrays" dict."""
    arrays = {}
    for part, a in job.arrays.items():
        lay: PartLayout = a["layout"]
        key = st.array_key(job.entry.path, part)
        writer = st.ArrayWriter(root, key, lay.shape, lay.dtype, lay.shard, compression)
        try:
            c_order, pieces = _slabs(source, job, part, budget)
            for idx, data in pieces:
                writer.write(idx, data)
                counter(data.nbytes)
            digest = writer.close()
        except BaseException:
            writer.abort()
            raise
        if not c_order:
            digest = _digest_rows(source, job, part, budget)
        arrays[part] = {
            "key": key, "shape": list(lay.shape), "dtype": st.dtype_name(lay.dtype), "chunks": list(lay.shard),
            "shard_shape": list(lay.shard), "partition": [st.spec_json(p) for p in lay.partition], "sha256": digest,
        }
    _check_carried(source, job, arrays)
    return arrays




def _check_carried(source, job: TensorJob, arrays: dict) -> None:
    """A carried array of a store source must keep its digest (chunking never changes logical bytes)."""
    if getattr(source, "kind", None) != "store":
        return
    src = source.record(job.entry)["arrays"]
    for part, info in arrays.items():
        lay = job.arrays[part]["layout"]
        if lay.regridded or part not in src or src[part]["dtype"] != info["dtype"]:
            continue
        if src[part].get("sha256") and src[part]["sha256"] != info["sha256"]:
            raise ChecksumError(
                f"{job.entry.path}/{part}: resharded digest {info['sha256']} differs from the source's {src[part]['sha256']}"
            )


def reshard_checkpoint(source_path, out, mesh, *, hosts: int = 1, compression: str = DEFAULT_COMPRESSION,
                       memory_budget: int = DEFAULT_BUDGET, progress: ProgressFn = null_progress) -> dict:
    """Write `source_path` (a complete store or a release ckpt-0) as a store laid out for `mesh`.

    Validates the mesh against every tensor before writing anything; resumable (rerun the same
    command: verified tensors are skipped). Returns a report dict."""
    from .checkpoint import open_checkpoint

    source = open_checkpoint(source_path)
    out = Path(out)
    comp = st.parse_compression(compression)
    plan = plan_reshard(source, mesh, hosts)  # MeshError here: nothing written yet
    if (out / st.MANIFEST).exists() and st.read_manifest(out).get("complete"):
        raise SlncxError(f"{out}: already holds a complete store; choose a new output directory")
    if out.exists() and any(out.iterdir()) and not (out / JOURNAL_DIR / "job.json").exists():
        raise SlncxError(f"{out}: exists and is not empty (and is not an unfinished conversion to resume)")
    src_info = _source_info(source)
    options = {"mesh": plan.mesh.to_dict(), "compression": comp}
    job_desc = {"tool": "reshard", "source": src_info["path"], "config": source.config.to_dict(), "options": options}
    out.mkdir(parents=True, exist_ok=True)
    journal = Journal(out)
    resuming = journal.start(job_desc)
    manifest = st.new_manifest(source.config, source=src_info, options=options, compression=comp)
    st.write_manifest(out, manifest)  # complete: false until the end

    records: dict = {}
    entries = {e.path: e for e in source.table}
    for path, rec in (journal.done() if resuming else {}).items():
        if path in entries and verify_store_record(out, rec):
            records[path] = rec
        elif path in entries:
            journal.forget(entries[path])
    todo = [j for j in plan.jobs if j.entry.path not in records]
    check_disk_space(out, sum(j.out_bytes for j in todo))

    total = plan.out_bytes
    state = {"done": sum(j.out_bytes for j in plan.jobs if j.entry.path in records)}
    budget = max(64 * 1024 * 1024, int(memory_budget)) // 4
    sleep = float(os.environ.get(SLEEP_ENV, "0") or 0)
    progress(state["done"], total, "")
    for job in todo:
        label = job.entry.path.split("/", 1)[-1]

        def counter(n: int, label=label) -> None:
            state["done"] += n
            progress(min(state["done"], total), total, label)

        t0 = time.perf_counter()
        arrays = write_job(out, source, job, comp, budget, counter)
        extra = {"action": job.action}
        if job.action == "regrid_scales":
            extra["source_blocks"] = int(job.arrays["scales"]["layout"].source_blocks)
        rec = st.tensor_record(job.entry, job.storage, arrays, **extra)
        journal.record(job.entry, rec)
        records[job.entry.path] = rec
        log.info("%s: %s in %.2fs", job.entry.path, job.action, time.perf_counter() - t0)
        if sleep:
            time.sleep(sleep)

    manifest["tensors"] = [records[j.entry.path] for j in plan.jobs]
    manifest["mesh"] = dict(plan.mesh.to_dict(), regridded=plan.regridded())
    manifest["hosts"] = plan.hosts
    manifest["complete"] = True
    st.write_manifest(out, manifest)
    journal.remove()
    return {
        "source": str(source_path), "out": str(out), "mesh": plan.mesh.to_dict(), "tensors": len(plan.jobs),
        "resumed": len(plan.jobs) - len(todo), "in_bytes": plan.in_bytes, "out_bytes": plan.out_bytes,
        "device_weight_bytes": plan.device_bytes(), "regridded": plan.regridded(),
        "hosts": [{"host": h["host"], "devices": len(h["devices"]), "chunks": len(h["chunks"]), "read_bytes": h["bytes"]} for h in plan.hosts],
    }
