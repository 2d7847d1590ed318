"""Put a checkpoint's parameters on devices as the model's params pytree (see model.py).

`load_params(ckpt, mesh)` loads any store (resharded or not) or a release ckpt-0 onto a
`jax.sharding.Mesh` as global `jax.Array`s with NamedSharding. Per-layer tensors are stacked in
numeric layer order on a leading (replicated) layer axis. Each device's piece is read straight from
disk for that device only (`ckpt.read_part` slab reads: positioned reads of a release pickle, or the
chunks of a store; for a store written by `reshard` for this mesh, exactly one chunk per array per
device), so no host ever holds a full tensor. An uncompressed chunk (reshard's default) is read with
one positioned read (O_DIRECT where the filesystem allows; `SLNCX_DIRECT_IO=0` turns it off) straight
into the piece's final page-aligned buffer, which a CPU device adopts without a copy; accelerators
get the pieces layer by layer (see `load_sharded`). A piece replicated over several local devices (norms,
or a weight sharded over "model" only on a mesh with a data axis) is read once and copied to each.

Quantized weights load as `QWeight(values, scales)`. Scales [..., R, out] with R > 1 are split like
their weight's rows and re-gridded exactly, as `reshard` does (reshard.regrid_blocks): on a row axis
finer than R each block's scale is repeated (R' = lcm(R, k)), on a coarser one a device holds R/k
blocks; per-channel scales (R = 1) are never split. The model dequantizes any R'.
Per-row int8 embeddings (store kind "int8_rows", `quantize --embeddings int8`) load as
`model.QEmbedding(values int8 [V, D], scales [V, 1])`: values split like the float table, scales
replicated (their size-1 dimension is never split).

Multi-process JAX (several hosts). Every process runs the same code::

    jax.distributed.initialize()                # coordinator address, process count and id
    mesh = make_mesh("8x2")                     # the same global mesh over jax.devices()
    params = load_params(open_checkpoint(path), mesh)

Each process builds the same global arrays, but only its addressable devices' pieces are read
(`sharding.addressable_devices_indices_map`), then assembled with
`jax.make_array_from_single_device_arrays`; no process reads another's chunks. `jax.devices()` lists
devices process by process, so with `reshard --hosts N` host h's chunk list in the manifest is
exactly what process h reads. Without a mesh (`mesh=None`) everything goes to the default device.
"""

from __future__ import annotations

import logging
import threading
from typing import Optional

import ml_dtypes
import numpy as np

from .config import ModelConfig
from .errors import StructureError
from .params import LAYER_PARAM_NAMES, ParamSpec, layer_entries, param_table
from .progress import ProgressFn, null_progress
from .quant import QuantizedArray, RowQuantizedArray

log = logging.getLogger(__name__)
BF16 = np.dtype(ml_dtypes.bfloat16)
# Stored float32 and kept float32 by the model (embeddings, norm scales, router); other float
# (matmul) weights -> bf16, which is what the reference computes with.
KEEP_F32 = {"embeddings", "final_norm", "rms_norm/scale", "rms_norm_1/scale", "rms_norm_2/scale", "rms_norm_3/scale", "router/w"}


class ArrayCheckpoint:
    """The read interface of checkpoint.py over in-memory arrays keyed by parameter path (e.g.
    float_weights.npz: float matmul weights, which the model uses as bf16 with unit scales)."""

    kind = "arrays"

    def __init__(self, cfg: ModelConfig, arrays):
        self.config = cfg
        self.table = param_table(cfg)
        self.arrays = arrays
        self.bytes_read = 0

    def read(self, entry: ParamSpec, index=None):
        if entry.path not in self.arrays:
            raise StructureError(f"arrays: missing {entry.path}")
        value = self.arrays[entry.path]
        if not isinstance(value, (QuantizedArray, RowQuantizedArray)):
            value = np.asarray(value)
            if tuple(value.shape) != tuple(entry.shape):
                raise StructureError(f"arrays: {entry.path} has shape {list(value.shape)}, expected {list(entry.shape)}")
        return value


def host_params(ckpt, progress: ProgressFn = null_progress) -> dict:
    """The params pytree as numpy arrays (int8 weights stay int8 + scales)."""
    from .model import QWeight

    cfg = ckpt.config
    table = ckpt.table
    total = len(table)
    done = 0

    def read(entry):
        nonlocal done
        value = ckpt.read(entry)
        done += 1
        progress(done, total, entry.path)
        if isinstance(value, (QuantizedArray, RowQuantizedArray)):
            return value
        value = np.asarray(value)
        if tuple(value.shape) != tuple(entry.shape):
            raise StructureError(f"{entry.path}: shape {list(value.shape)} does not match the config ({list(entry.shape)})")
        return value if entry.name in KEEP_F32 else value.astype(BF16)

    by_name = {e.name: e for e in table if e.layer is None}
    params = {
        "embeddings": _host_embeddings(read(by_name["embeddings"])),
        "final_norm": read(by_name["final_norm"]).astype(np.float32),
        "layers": {},
    }
    for name in LAYER_PARAM_NAMES:
        entries = layer_entries(table, name)  # numeric layer order 0..L-1
        values = [read(e) for e in entries]
        if isinstance(values[0], QuantizedArray):
            if any(not isinstance(v, QuantizedArray) for v in values):
                raise StructureError(f"{name}: some layers are quantized and some are not")
            blocks = {v.blocks for v in values}
            if len(blocks) > 1:
                raise StructureError(f"{name}: layers use different scale row blocks {sorted(blocks)}")
            params["layers"][name] = QWeight(
                np.stack([v.values for v in values]), np.stack([v.scales for v in values])
            )
        elif any(isinstance(v, QuantizedArray) for v in values):
            raise StructureError(f"{name}: some layers are quantized and some are not")
        else:
            dtype = np.float32 if name in KEEP_F32 else BF16
            params["layers"][name] = np.stack([np.asarray(v, dtype) for v in values])
    assert len(params["layers"]) == len(LAYER_PARAM_NAMES) and cfg.num_layers == len(values)
    return params


def _host_embeddings(value):
    """The embedding table for the model: float32, or per-row int8 as a model.QEmbedding."""
    if isinstance(value, RowQuantizedArray):
        from .model import QEmbedding

        return QEmbedding(value.values, value.scales)
    if isinstance(value, QuantizedArray):
        raise StructureError("embeddings: stored as a blocked int8 weight; expected float or per-row int8 (int8_rows)")
    return value


def quantized_names(params: dict) -> dict:
    from .model import QEmbedding, QWeight

    names = {name: isinstance(w, QWeight) for name, w in params["layers"].items()}
    names["embeddings"] = isinstance(params["embeddings"], QEmbedding)
    return names


def load_params(ckpt, mesh=None, *, progress: ProgressFn = null_progress) -> dict:
    """Read `ckpt` (anything with the open_checkpoint interface) into a device params pytree,
    sharded over `mesh` by the parameter table (one default device when mesh is None). With a mesh,
    each device's piece is read from disk for that device only (see the module docstring)."""
    if mesh is None or not hasattr(ckpt, "read_part"):
        params = host_params(ckpt, progress)
        return _place(params, ckpt.config, mesh)
    return load_sharded(ckpt, mesh, progress=progress)


def load_sharded(ckpt, mesh, *, progress: ProgressFn = null_progress, workers: int = 8,
                 stream: Optional[bool] = None) -> dict:
    """The per-device loader: global arrays on `mesh` (a jax Mesh or a mesh string), each addressable
    device's piece read by `workers` threads straight into its final page-aligned host buffer.

    CPU devices (the default for `stream=None` when every device is a CPU) adopt those buffers
    without a copy, so host memory is the loaded weights themselves. Elsewhere (`stream=True`) each
    layer of a stacked weight is read, put on its devices and freed on its own, and the layers are
    joined on the devices: host memory peaks at about `workers` single-layer slabs."""
    import jax
    from jax.sharding import NamedSharding, PartitionSpec

    from .model import QWeight
    from .reshard import MeshShape, layout_of, source_kind
    from .reshard import source_parts as parts_of

    if isinstance(mesh, str):
        from .mesh import make_mesh

        mesh = make_mesh(mesh)
    cfg, table = ckpt.config, ckpt.table
    sizes = MeshShape.parse(mesh).sizes
    full = param_table(cfg)
    if len(table) != len(full):
        missing = sorted({e.path for e in full} - {e.path for e in table})
        raise StructureError(f"{getattr(ckpt, 'dir', ckpt)}: missing {len(missing)} tensors, e.g. {missing[0]}")
    kinds, lays = {}, {}
    for e in table:  # validates the whole mesh before reading anything (MeshError)
        parts = parts_of(ckpt, e)
        kinds[e.path] = source_kind(ckpt, e, parts)
        if kinds[e.path] == "int8_rows" and e.name != "embeddings":
            raise StructureError(f"{e.path}: per-row int8 is only supported for the embeddings")
        lays[e.path] = layout_of(e, parts, kinds[e.path], sizes)

    leaves = []  # (pytree slot, [entries], part, layout, loaded dtype, stacked)
    by_name = {e.name: e for e in table if e.layer is None}
    for name in ("embeddings", "final_norm"):
        e = by_name[name]
        if kinds[e.path] == "int8_rows":  # per-row int8 embeddings -> model.QEmbedding(weight, scales [V, 1])
            for part in ("weight", "scales"):
                lay = lays[e.path][part]
                leaves.append(((name, part), [e], part, lay, lay.dtype, False))
            continue
        leaves.append(((name,), [e], "array", lays[e.path]["array"], np.dtype(np.float32), False))
    for name in LAYER_PARAM_NAMES:
        entries = layer_entries(table, name)
        ks = {kinds[e.path] for e in entries}
        if len(ks) > 1:
            raise StructureError(f"{name}: some layers are quantized and some are not")
        if ks == {"int8"}:
            blocks = {lays[e.path]["scales"].source_blocks for e in entries}
            if len(blocks) > 1:
                raise StructureError(f"{name}: layers use different scale row blocks {sorted(blocks)}")
            for part in ("weight", "scales"):
                lay = lays[entries[0].path][part]
                leaves.append((("layers", name, part), entries, part, lay, lay.dtype, True))
        else:
            dtype = np.dtype(np.float32) if name in KEEP_F32 else BF16
            leaves.append((("layers", name), entries, "array", lays[entries[0].path]["array"], dtype, True))

    # one task per (leaf, distinct piece on this process's devices)
    tasks = []
    for li, (_slot, entries, part, lay, dtype, stacked) in enumerate(leaves):
        shape = ((len(entries),) if stacked else ()) + tuple(lay.shape)
        spec = PartitionSpec(*(((None,) if stacked else ()) + tuple(lay.partition)))
        sharding = NamedSharding(mesh, spec)
        pieces: dict = {}
        for device, index in sharding.addressable_devices_indices_map(shape).items():
            key = tuple(slice(*s.indices(n)[:2]) for s, n in zip(index, shape))
            pieces.setdefault(tuple((s.start, s.stop) for s in key), (key, []))[1].append(device)
        tasks.append((li, shape, sharding, list(pieces.values())))
    total = sum(int(np.prod([s.stop - s.start for s in key], dtype=np.int64)) * leaves[li][4].itemsize
                for li, _sh, _s, pieces in tasks for key, _d in pieces)
    done = [0]
    lock = threading.Lock()

    def read_piece(li: int, key: tuple, devices: list, layer: Optional[int] = None):
        """One device piece of leaf `li` onto `devices`; with `layer`, only that layer's [1, ...]
        slab of a stacked piece (streaming)."""
        _slot, entries, part, lay, dtype, stacked = leaves[li]
        if layer is not None:
            key = (slice(layer, layer + 1),) + key[1:]
        # The piece's final host buffer, page-aligned so that jax.device_put onto a CPU device adopts
        # it without a copy (an accelerator copies it and we drop it right after). Each layer's slab
        # is read straight into it: one positioned read of its chunk file for a resharded store.
        out = aligned_empty(tuple(s.stop - s.start for s in key), dtype)
        if stacked:
            for i, layer_i in enumerate(range(key[0].start, key[0].stop)):
                _read_into(ckpt, entries[layer_i], part, lay, key[1:], out[i])
        elif not _read_direct(ckpt, entries[0], part, lay, key, out):  # (no copy into `out` then)
            out = _read_slab(ckpt, entries[0], part, lay, key).astype(dtype, copy=False)
        arrays = [jax.device_put(out, d) for d in devices]
        if not adopt:
            jax.block_until_ready(arrays)  # the host buffer is free once this returns
        with lock:
            done[0] += out.nbytes
            progress(done[0], total, entries[0].path)
        return arrays

    # CPU devices adopt a whole stacked piece [L, ...] read into one host buffer (no copy; that buffer
    # is the device memory). Accelerators stream: each layer's slab is read into a small host buffer,
    # put on its devices and freed, then the L layers of a leaf are joined on the devices (one
    # concatenate per leaf, sharded like the leaf), so host memory peaks at about `workers` slabs.
    if stream is None:
        stream = any(d.platform != "cpu" for d in mesh.devices.flat)
    adopt = not stream

    def submit(pool, li: int, pieces: list):
        if stream and leaves[li][5]:
            n = len(leaves[li][1])
            return [[pool.submit(read_piece, li, key, devs, layer) for key, devs in pieces] for layer in range(n)]
        return [[pool.submit(read_piece, li, key, devs) for key, devs in pieces]]

    from concurrent.futures import ThreadPoolExecutor

    progress(0, total, "")
    built = []
    with ThreadPoolExecutor(max(1, workers)) as pool:
        if not stream:
            futures = [submit(pool, li, pieces) for li, _sh, _s, pieces in tasks]
        else:  # one leaf ahead, so that device memory holds at most two leaves' layer slabs
            futures = [submit(pool, tasks[0][0], tasks[0][3])] if tasks else []
        for t, (li, shape, sharding, _p) in enumerate(tasks):
            if stream and t + 1 < len(tasks):
                futures.append(submit(pool, tasks[t + 1][0], tasks[t + 1][3]))
            groups = futures[t]
            futures[t] = None
            if len(groups) == 1:
                built.append(jax.make_array_from_single_device_arrays(shape, sharding, [a for f in groups[0] for a in f.result()]))
                continue
            one = (1,) + tuple(shape[1:])
            layers = [jax.make_array_from_single_device_arrays(one, sharding, [a for f in g for a in f.result()]) for g in groups]
            built.append(_concat_layers(sharding)(*layers))
            del layers

    params: dict = {"layers": {}}
    for (slot, *_rest), arr in zip(leaves, built):
        if slot[0] != "layers" and len(slot) == 2:  # ("embeddings", part): per-row int8
            params.setdefault(slot[0], {})[slot[1]] = arr
        elif slot[0] != "layers":
            params[slot[0]] = arr
        elif len(slot) == 2:
            params["layers"][slot[1]] = arr
        else:
            params["layers"].setdefault(slot[1], {})[slot[2]] = arr
    for name, v in params["layers"].items():
        if isinstance(v, dict):
            params["layers"][name] = QWeight(v["weight"], v["scales"])
    if isinstance(params["embeddings"], dict):
        from .model import QEmbedding

        params["embeddings"] = QEmbedding(params["embeddings"]["weight"], params["embeddings"]["scales"])
    return params


_CONCAT: dict = {}


def _concat_layers(sharding):
    """A jitted concatenate of [1, ...] layer arrays into the stacked [L, ...] leaf, laid out by
    `sharding` (cached per sharding; jit caches per shape)."""
    import jax
    import jax.numpy as jnp

    fn = _CONCAT.get(sharding)
    if fn is None:
        fn = _CONCAT[sharding] = jax.jit(lambda *xs: jnp.concatenate(xs, axis=0), out_shardings=sharding)
    return fn


ALIGN = 4096  # >= XLA's CPU minimum alignment (64) for zero-copy device_put; also O_DIRECT-safe


def aligned_empty(shape: tuple, dtype) -> np.ndarray:
    """An uninitialised C-contiguous array whose data starts on an ALIGN-byte boundary."""
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    raw = np.empty(nbytes + ALIGN, np.uint8)
    off = (-raw.ctypes.data) % ALIGN
    return raw[off : off + nbytes].view(dtype).reshape(shape)


def _read_direct(ckpt, entry: ParamSpec, part: str, lay, index: tuple, out: np.ndarray) -> bool:
    """Read one device's slab straight from its chunk file into `out` when the checkpoint can
    (store.Store.read_part_into: the slab is one uncompressed chunk of the loaded dtype)."""
    return not lay.regridded and hasattr(ckpt, "read_part_into") and ckpt.read_part_into(entry, part, index, out)


def _read_into(ckpt, entry: ParamSpec, part: str, lay, index: tuple, out: np.ndarray) -> None:
    """Fill `out` with one device's slab: `_read_direct`, else via `_read_slab` (TensorStore /
    release positioned reads, re-gridding, dtype conversion) and a copy."""
    if not _read_direct(ckpt, entry, part, lay, index, out):
        out[...] = _read_slab(ckpt, entry, part, lay, index)


def _read_slab(ckpt, entry: ParamSpec, part: str, lay, index: tuple) -> np.ndarray:
    """One device's slab of one part of one tensor; scales re-gridded from the stored R blocks."""
    if not lay.regridded:
        return ckpt.read_part(entry, part, index)
    ax = len(lay.shape) - 2
    f = lay.blocks // lay.source_blocks  # each stored block is f blocks of the new grid
    start, stop = index[ax].start, index[ax].stop
    s0, s1 = start // f, -(-stop // f)
    s = ckpt.read_part(entry, part, index[:ax] + (slice(s0, s1),) + index[ax + 1 :])
    s = np.repeat(s, f, axis=ax)  # [..., (s1-s0)·f, out]
    off = start - s0 * f
    return s[(slice(None),) * ax + (slice(off, off + stop - start),)]


def _place(params: dict, cfg: ModelConfig, mesh: Optional[object]):
    import jax

    if mesh is None:
        return jax.device_put(params)
    from .mesh import check_mesh, param_specs, shardings

    check_mesh(cfg, mesh)
    return jax.device_put(params, shardings(mesh, param_specs(cfg, quantized_names(params))))
