"""The slncx-tools store: a directory of TensorStore zarr3 arrays plus a manifest, `slncx.json`.

Layout (format version 1)::

    OUT/slncx.json                              the manifest (written last; `complete` is its last key)
    OUT/<param path>/<part>/zarr.json, c/...    one plain zarr3 array per stored array

`<part>` is the part name of the reading interface: "array" for a float tensor, "weight" (int8
values) and "scales" for a quantized one, so `params/transformer/decoder_layer_0/moe/linear/w`
becomes the arrays `.../moe/linear/w/weight` and `.../moe/linear/w/scales`. Any zarr3 reader opens
them (codecs: `bytes` little-endian, then `zstd` unless compression is "none").

Storage kinds, as recorded per tensor in the manifest under "storage":

- ``{"kind": "float", "dtype": "float32"}``: one array "array" of the logical shape.
- ``{"kind": "int8", "blocks": R, "scale_dtype": "bfloat16"|"float32"}``: "weight" int8 [..., in, out]
  and "scales" [..., R, out]; `scales[..., r, n]` multiplies rows r·in/R … (r+1)·in/R−1 of column n.
- ``{"kind": "int8_rows", "scale_dtype": ...}`` (only `--embeddings int8`): "weight" int8 [V, D] and
  "scales" [V, 1], one scale per row. `E ≈ bf16(weight) · scales` for the lookup; the transposed pair
  (weight.T [D, V], scales.T [1, V]) is exactly an R = 1 per-output-channel weight for the tied output
  projection `h @ E.T`.

SHA-256 of an array ("sha256" in the manifest) is the digest of its logical bytes: the array's
elements in C order, each in its stored dtype, little-endian, no header, independent of chunking
and compression (`hashlib.sha256(np.ascontiguousarray(a).tobytes())` for an in-memory array).
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import shutil
import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Optional

import numpy as np

from . import __version__
from .config import ModelConfig
from .errors import ChecksumError, FormatError, StructureError
from .params import ParamSpec, param_table
from .quant import BF16, QuantizedArray

log = logging.getLogger(__name__)

MANIFEST = "slncx.json"
FORMAT = "slncx-store"
FORMAT_VERSION = 1
DEFAULT_COMPRESSION = {"codec": "zstd", "level": 1}
# Chunks of the default layout are at most this big (a reshard picks per-device shard shapes).
DEFAULT_CHUNK_BYTES = 32 * 1024 * 1024
DEFAULT_MODEL_SHARDS = 8

DTYPES = {"float32": np.dtype(np.float32), "bfloat16": BF16, "int8": np.dtype(np.int8), "float16": np.dtype(np.float16)}


def dtype_name(dtype) -> str:
    dt = np.dtype(dtype)
    for name, d in DTYPES.items():
        if d == dt:
            return name
    raise FormatError(f"dtype {dt} cannot be stored")


def parse_compression(text: str) -> dict:
    """"none", "zstd" or "zstd:LEVEL" -> {"codec": ..., "level": ...}."""
    text = (text or "").strip().lower()
    if text == "none":
        return {"codec": "none"}
    name, _, level = text.partition(":")
    if name != "zstd":
        raise FormatError(f"compression {text!r}: expected none, zstd or zstd:LEVEL")
    try:
        lvl = int(level) if level else 1
    except ValueError:
        raise FormatError(f"compression {text!r}: level must be an integer") from None
    if not -7 <= lvl <= 22:
        raise FormatError(f"compression {text!r}: zstd level must be in -7..22")
    return {"codec": "zstd", "level": lvl}


def array_key(path: str, part: str) -> str:
    """The array's directory relative to the store root, e.g. "params/…/moe/linear/w/weight"."""
    return f"{path}/{part}"


def default_chunks(shape, partition, dtype, *, model_shards: int = DEFAULT_MODEL_SHARDS,
                   max_bytes: int = DEFAULT_CHUNK_BYTES) -> tuple:
    """Chunk shape of the default (unsharded) layout.

    Leading (expert) dims get chunk 1, a dim sharded over the model axis is split in `model_shards`
    (the release's 8-way model axis: a device of an 8x1 mesh reads whole chunks), then the first dims
    are halved while a chunk exceeds `max_bytes`.
    """
    from .params import mesh_axes_of

    shape = tuple(int(d) for d in shape)
    chunks = list(shape)
    partition = tuple(partition) + (None,) * (len(shape) - len(partition))
    for d in range(len(shape) - 2):
        chunks[d] = 1
    for d, spec in enumerate(partition[: len(shape)]):
        if "model" in mesh_axes_of(spec) and shape[d] % model_shards == 0:
            chunks[d] = shape[d] // model_shards
    itemsize = np.dtype(dtype).itemsize
    while int(np.prod(chunks)) * itemsize > max_bytes:
        for d in range(len(chunks)):
            if chunks[d] > 1 and chunks[d] % 2 == 0:
                chunks[d] //= 2
                break
        else:
            break
    return tuple(max(1, c) for c in chunks)


def zarr3_spec(root, key: str, *, shape=None, dtype=None, chunks=None, compression: Optional[dict] = None,
               create: bool = False, sync: bool = True) -> dict:
    """A plain TensorStore zarr3 spec for one array of the store.

    `sync=False` (creation only) turns off TensorStore's fsync after every chunk file
    (`file_io_sync`); whoever writes such an array must make it durable itself (`sync_tree`).
    """
    spec: dict = {"driver": "zarr3", "kvstore": {"driver": "file", "path": str(Path(root) / key) + "/"}}
    if create:
        if not sync:
            spec["kvstore"]["file_io_sync"] = False
        codecs = [{"name": "bytes", "configuration": {"endian": "little"}}]
        comp = compression or DEFAULT_COMPRESSION
        if comp.get("codec") == "zstd":
            codecs.append({"name": "zstd", "configuration": {"level": int(comp.get("level", 1)), "checksum": False}})
        spec["metadata"] = {
            "shape": [int(d) for d in shape],
            "data_type": dtype_name(dtype),
            "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": [int(c) for c in chunks]}},
            "chunk_key_encoding": {"name": "default"},
            "codecs": codecs,
            "fill_value": 0,
        }
        spec["create"] = True
        spec["delete_existing"] = True
    else:
        spec["open"] = True
    return spec


def create_array(root, key: str, shape, dtype, chunks, compression: Optional[dict] = None, sync: bool = True):
    """Create (replacing anything there) one zarr3 array; returns the TensorStore handle.

    With `sync=False` chunk files are not fsynced as they are written (see `sync_tree`).
    """
    import tensorstore as ts

    target = Path(root) / key
    if target.exists():
        shutil.rmtree(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    spec = zarr3_spec(root, key, shape=shape, dtype=dtype, chunks=chunks, compression=compression, create=True, sync=sync)
    return ts.open(spec).result()


def open_array(root, key: str):
    import tensorstore as ts

    try:
        return ts.open(zarr3_spec(root, key)).result()
    except Exception as e:  # tensorstore raises ValueError with its own message
        raise FormatError(f"{Path(root) / key}: cannot open zarr3 array ({e})") from None


def _fsync_path(path, directory: bool = False) -> None:
    fd = os.open(path, os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sync_tree(root, key: str) -> None:
    """fsync every file and directory of the array `root/key`, and the directories above it up to `root`,
    so the array (contents and names) is on disk."""
    root = Path(root)
    top = root / key
    for dirpath, _dirs, files in os.walk(top):
        for f in files:
            _fsync_path(os.path.join(dirpath, f))
        _fsync_path(dirpath, directory=True)
    p = top.parent
    while True:
        _fsync_path(p, directory=True)
        if p == root or root not in p.parents:
            break
        p = p.parent


class ArrayWriter:
    """Writes one array in chunk-aligned slabs given in C order; hashes the logical bytes as it goes.

    Each `write(index, data)` must cover whole chunks (no read-modify-write) and slabs must arrive
    in C order (each slab spans full trailing dimensions) so the running SHA-256 is the digest of the
    whole array. `write` returns at once: the hashing runs on a helper thread (in order) and the
    write in TensorStore's threads, while the caller prepares the next slab; at most
    `max_in_flight` slabs (and, beyond the first, `max_in_flight_bytes`) are held in flight.

    Durability: TensorStore's per-chunk fsync is off (it serialises every chunk write on the disk);
    instead `close()` fsyncs the array's files and directories before it returns the digest, so
    anything recorded after `close()` (a journal record, the manifest's `complete`) never refers
    to unsynced data. `fsync_each_write=True` keeps TensorStore's own per-file fsync.
    """

    def __init__(self, root, key: str, shape, dtype, chunks, compression: Optional[dict] = None, max_in_flight: int = 2,
                 max_in_flight_bytes: int = 512 * 1024 * 1024, fsync_each_write: bool = False):
        self.root = Path(root)
        self.key = key
        self.shape = tuple(shape)
        self.dtype = np.dtype(dtype)
        self.chunks = tuple(chunks)
        self.sync_each = fsync_each_write
        self.array = create_array(root, key, shape, dtype, chunks, compression, sync=fsync_each_write)
        self._hash = hashlib.sha256()
        self._hasher = ThreadPoolExecutor(1, thread_name_prefix="slncx-hash")
        self._pending: deque = deque()  # (hash future, write future, nbytes)
        self._in_flight_bytes = 0
        self.max_in_flight = max(1, int(max_in_flight))
        self.max_in_flight_bytes = int(max_in_flight_bytes)
        self.bytes_written = 0

    def _retire(self) -> None:
        hf, wf, n = self._pending.popleft()
        try:
            hf.result()
            wf.result()
        finally:
            self._in_flight_bytes -= n

    def write(self, index: tuple, data: np.ndarray) -> None:
        data = np.ascontiguousarray(data, dtype=self.dtype)
        while self._pending and (
            len(self._pending) >= self.max_in_flight or self._in_flight_bytes + data.nbytes > self.max_in_flight_bytes
        ):
            self._retire()
        hf = self._hasher.submit(self._hash.update, data.reshape(-1).view(np.uint8))
        wf = self.array[index].write(data)
        self._pending.append((hf, wf, data.nbytes))
        self._in_flight_bytes += data.nbytes
        self.bytes_written += data.nbytes

    def close(self) -> str:
        """Wait for every write, make the array durable, and return the SHA-256 of its logical bytes."""
        try:
            while self._pending:
                self._retire()
        finally:
            self._hasher.shutdown(wait=True)
        if not self.sync_each:
            sync_tree(self.root, self.key)
        return self._hash.hexdigest()

    def abort(self) -> None:
        for hf, wf, _n in self._pending:
            for f in (hf, wf):
                try:
                    f.result()
                except Exception:  # noqa: BLE001 — we are already failing
                    pass
        self._pending.clear()
        self._in_flight_bytes = 0
        self._hasher.shutdown(wait=True)


def row_slabs(shape, chunk0: int, row_bytes: int, budget: int):
    """Slices along axis 0, multiples of `chunk0` rows (whole chunks), each ≤ `budget` bytes if possible."""
    n = int(shape[0]) if shape else 1
    step = max(1, budget // max(1, row_bytes))
    step = max(chunk0, (step // chunk0) * chunk0)
    for start in range(0, n, step):
        yield slice(start, min(n, start + step))


def hash_array(array, budget: int = 256 * 1024 * 1024, progress=None) -> str:
    """SHA-256 of a TensorStore array's logical bytes, read in C-order row slabs."""
    shape = tuple(array.shape)
    h = hashlib.sha256()
    if not shape:
        h.update(np.ascontiguousarray(array.read().result()).tobytes())
        return h.hexdigest()
    row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * array.dtype.numpy_dtype.itemsize
    for sl in row_slabs(shape, 1, row_bytes, budget):
        data = np.ascontiguousarray(array[sl].read().result())
        h.update(data.reshape(-1).view(np.uint8))
        if progress:
            progress(data.nbytes)
    return h.hexdigest()


# --- manifest -----------------------------------------------------------------------------------

def read_manifest(path) -> dict:
    p = Path(path)
    mf = p / MANIFEST if p.is_dir() else p
    try:
        data = json.loads(mf.read_text())
    except FileNotFoundError:
        raise StructureError(f"{mf}: missing (not a slncx-tools store)") from None
    except (OSError, ValueError) as e:
        raise FormatError(f"{mf}: not a valid manifest ({e})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise FormatError(f"{mf}: not a slncx-tools store manifest (format {data.get('format')!r})")
    if data.get("format_version") != FORMAT_VERSION:
        raise FormatError(
            f"{mf}: store format version {data.get('format_version')} is not supported (this is version {FORMAT_VERSION})"
        )
    return data


def write_manifest(root, manifest: dict) -> None:
    """Write slncx.json atomically (temp file, fsync, rename); `complete` is always the last key."""
    root = Path(root)
    body = {k: v for k, v in manifest.items() if k != "complete"}
    body["complete"] = bool(manifest.get("complete", False))
    tmp = root / (MANIFEST + ".tmp")
    with open(tmp, "w") as f:
        f.write(json.dumps(body, indent=1, allow_nan=True) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, root / MANIFEST)


def new_manifest(cfg: ModelConfig, *, source: dict, options: dict, compression: dict) -> dict:
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "tool": {"name": "slncx-tools", "version": __version__},
        "config": cfg.to_dict(),
        "source": source,
        "options": options,
        "compression": compression,
        "tensors": [],
        "complete": False,
    }


def tensor_record(entry: ParamSpec, storage: dict, arrays: dict, **extra) -> dict:
    """One manifest row: the parameter-table entry, its storage and its arrays (key, shape, dtype, chunks, sha256)."""
    rec = {
        "index": entry.index,
        "path": entry.path,
        "name": entry.name,
        "layer": entry.layer,
        "shape": list(entry.shape),
        "partition": [spec_json(s) for s in entry.partition],
        "storage": storage,
        "arrays": arrays,
    }
    rec.update(extra)
    return rec


def spec_json(s):
    """A PartitionSpec entry as JSON (a tuple of axes becomes a list)."""
    return list(s) if isinstance(s, tuple) else s


# --- reading ------------------------------------------------------------------------------------

class Store:
    """An opened store; the same reading interface as release.ReleaseCheckpoint."""

    kind = "store"

    def __init__(self, path, manifest: dict):
        self.dir = self.path = Path(path)
        self.manifest = manifest
        self.config = ModelConfig.from_dict(manifest["config"])
        full = param_table(self.config)
        self.records = {r["path"]: r for r in manifest.get("tensors", [])}
        self.table = tuple(e for e in full if e.path in self.records)
        self._arrays: dict = {}
        self._lock = threading.Lock()
        self.bytes_read = 0
        # read_part_into: O_DIRECT (no page-cache copy or pollution) while the filesystem accepts it
        self._direct_io = {"ok": os.environ.get("SLNCX_DIRECT_IO", "1") != "0" and hasattr(os, "O_DIRECT")}

    @property
    def complete(self) -> bool:
        return bool(self.manifest.get("complete"))

    def record(self, entry: ParamSpec) -> dict:
        try:
            return self.records[entry.path]
        except KeyError:
            raise StructureError(f"{self.dir}: store has no tensor {entry.path}") from None

    def storage(self, entry: ParamSpec) -> dict:
        return self.record(entry)["storage"]

    def array(self, entry: ParamSpec, part: str):
        """The TensorStore handle of one part ("array", "weight", "scales")."""
        key = (entry.path, part)
        with self._lock:
            a = self._arrays.get(key)
        if a is None:
            rec = self.record(entry)
            if part not in rec["arrays"]:
                raise FormatError(f"{self.dir}: {entry.path} has no part {part!r} (has {sorted(rec['arrays'])})")
            info = rec["arrays"][part]
            a = open_array(self.dir, info["key"])
            if list(a.shape) != list(info["shape"]) or np.dtype(a.dtype.numpy_dtype) != DTYPES[info["dtype"]]:
                raise FormatError(
                    f"{self.dir / info['key']}: expected {info['dtype']} {info['shape']}, "
                    f"found {a.dtype.numpy_dtype} {list(a.shape)}"
                )
            with self._lock:
                self._arrays[key] = a
        return a

    def blocks(self, entry: ParamSpec) -> int:
        st = self.storage(entry)
        if st["kind"] == "int8":
            return int(st["blocks"])
        return 1 if st["kind"] == "int8_rows" else 0

    def read_part(self, entry: ParamSpec, part: str, index=None) -> np.ndarray:
        from .release import normalize_index

        a = self.array(entry, part)
        index = normalize_index(tuple(a.shape), index)
        try:
            out = np.asarray(a[index].read().result())
        except Exception as e:
            raise FormatError(f"{self.dir / self.record(entry)['arrays'][part]['key']}: unreadable ({e})") from None
        with self._lock:
            self.bytes_read += out.nbytes
        return out

    def read_part_into(self, entry: ParamSpec, part: str, index, out: np.ndarray) -> bool:
        """Read a slab that is exactly one chunk of an uncompressed array straight into `out` (a
        C-contiguous array of the chunk's shape and stored dtype): positioned reads of the chunk file
        (plain zarr3 "bytes" codec: the chunk's C-order little-endian bytes, nothing else) into the
        caller's buffer, no intermediate copy. Returns False, having read nothing, when the slab is
        not one such chunk (compressed, other codecs, other slab, other dtype): use `read_part` then.
        Counts bytes like `read_part` (a chunk never written holds the fill value and reads as it)."""
        from .release import normalize_index

        raw = self._raw_chunks(entry, part)
        if raw is None or not out.flags.c_contiguous or out.dtype != raw["dtype"]:
            return False
        index = normalize_index(raw["shape"], index)
        chunks = raw["chunks"]
        if tuple(out.shape) != chunks or any(s.start % c or s.stop - s.start != c for s, c in zip(index, chunks)):
            return False
        if chunks:
            path = raw["dir"] / (raw["prefix"] + raw["sep"].join(str(s.start // c) for s, c in zip(index, chunks)))
        else:  # a 0-d array's one chunk
            path = raw["dir"] / (raw["prefix"][:1] or "0")
        buf = out.reshape(-1).view(np.uint8)
        try:
            size = os.stat(path).st_size
        except FileNotFoundError:
            out[...] = raw["fill"]
        except OSError as e:
            raise FormatError(f"{path}: unreadable ({e})") from None
        else:
            if size != buf.nbytes:
                raise FormatError(f"{path}: chunk file has {size} bytes, expected {buf.nbytes}")
            try:
                _read_file_into(path, buf, self._direct_io)
            except OSError as e:
                raise FormatError(f"{path}: unreadable ({e})") from None
        with self._lock:
            self.bytes_read += out.nbytes
        return True

    def _raw_chunks(self, entry: ParamSpec, part: str) -> Optional[dict]:
        """Where an uncompressed array's chunk files are and their shape, or None when its chunks are
        not raw C-order little-endian bytes (cached per array; checked against the manifest)."""
        key = ("raw", entry.path, part)
        with self._lock:
            if key in self._arrays:
                return self._arrays[key]
        info = self.record(entry)["arrays"].get(part)
        raw = None
        if info is not None:
            adir = self.dir / info["key"]
            try:
                meta = json.loads((adir / "zarr.json").read_text())
            except (OSError, ValueError) as e:
                raise FormatError(f"{adir}: cannot open zarr3 array ({e})") from None
            dtype = DTYPES[info["dtype"]]
            codecs = meta.get("codecs") or []
            enc = meta.get("chunk_key_encoding") or {}
            grid = meta.get("chunk_grid") or {}
            if list(meta.get("shape", [])) != list(info["shape"]) or meta.get("data_type") != info["dtype"]:
                raise FormatError(f"{adir}: expected {info['dtype']} {info['shape']}, found {meta.get('data_type')} {meta.get('shape')}")
            plain = (len(codecs) == 1 and codecs[0].get("name") == "bytes"
                     and (codecs[0].get("configuration") or {}).get("endian", "little") == "little")
            fill = meta.get("fill_value", 0)
            if (plain and grid.get("name") == "regular" and enc.get("name") in ("default", "v2")
                    and isinstance(fill, (int, float)) and not meta.get("storage_transformers")):
                default_sep = "/" if enc["name"] == "default" else "."
                sep = (enc.get("configuration") or {}).get("separator", default_sep)
                raw = {
                    "dir": adir, "prefix": ("c" + sep) if enc["name"] == "default" else "", "sep": sep,
                    "shape": tuple(int(d) for d in meta["shape"]), "dtype": dtype, "fill": fill,
                    "chunks": tuple(int(c) for c in grid["configuration"]["chunk_shape"]),
                }
        with self._lock:
            self._arrays[key] = raw
        return raw

    def read(self, entry: ParamSpec, index=None):
        """A float tensor as an ndarray; int8 as a QuantizedArray; int8_rows as a RowQuantizedArray."""
        st = self.storage(entry)
        if st["kind"] == "float":
            return self.read_part(entry, "array", index)
        w, s = self.read_part(entry, "weight"), self.read_part(entry, "scales")
        if st["kind"] == "int8_rows":
            from .quant import RowQuantizedArray

            return RowQuantizedArray(w, s)
        return QuantizedArray(w, s)

    def stored(self, entry: ParamSpec) -> dict:
        st = self.storage(entry)
        arrays = self.record(entry)["arrays"]
        nbytes = sum(int(np.prod(a["shape"], dtype=np.int64)) * DTYPES[a["dtype"]].itemsize for a in arrays.values())
        if st["kind"] == "float":
            return {"dtype": st["dtype"], "quant": "float", "bytes": nbytes}
        if st["kind"] == "int8_rows":
            return {"dtype": "int8", "quant": f"int8 per-row ({st['scale_dtype']} scales)", "bytes": nbytes}
        return {"dtype": "int8", "quant": f"int8 R={st['blocks']} ({st['scale_dtype']} scales)", "bytes": nbytes}

    def problems(self) -> list:
        """Structural problems: tensors missing from the manifest, arrays that do not open or do not match."""
        found = []
        if not self.complete:
            found.append(f"{self.dir}: store is incomplete (no `complete` flag in {MANIFEST})")
        have = set(self.records)
        for entry in param_table(self.config):
            if entry.path not in have:
                found.append(f"{self.dir}: missing tensor {entry.path} {list(entry.shape)}")
        for entry in self.table:
            for part in self.record(entry)["arrays"]:
                try:
                    self._arrays.pop((entry.path, part), None)
                    self.array(entry, part)
                except (FormatError, StructureError) as e:
                    found.append(str(e))
        return found

    def verify_digest(self, entry: ParamSpec, part: str) -> None:
        """Re-hash one array and compare with the manifest; raise ChecksumError on mismatch."""
        info = self.record(entry)["arrays"][part]
        got = hash_array(self.array(entry, part))
        if got != info["sha256"]:
            raise ChecksumError(f"{self.dir / info['key']}: SHA-256 {got} does not match the manifest's {info['sha256']}")


DIRECT_ALIGN = 4096  # O_DIRECT: buffer address, file offset and length multiples of the block size


def _read_file_into(path, buf: np.ndarray, direct: dict) -> None:
    """Fill the uint8 array `buf` with the first buf.nbytes bytes of `path` (positioned reads, no
    intermediate buffer). While `direct["ok"]` and `buf` is DIRECT_ALIGN-aligned, the aligned bulk is
    read with O_DIRECT (disk -> buf by DMA, bypassing the page cache) and the short tail buffered; a
    filesystem that refuses O_DIRECT (tmpfs) turns it off for the store (`direct["ok"] = False`)."""
    n = buf.nbytes
    done = 0
    bulk = n - n % DIRECT_ALIGN if direct.get("ok") and buf.ctypes.data % DIRECT_ALIGN == 0 else 0
    if bulk:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
        except OSError as e:
            if e.errno != errno.EINVAL:
                raise
            direct["ok"] = False
        else:
            try:
                while done < bulk:
                    try:
                        got = os.preadv(fd, [buf[done:bulk]], done)
                    except OSError as e:
                        if e.errno != errno.EINVAL or done:
                            raise
                        direct["ok"] = False  # opened, but this filesystem/device refuses direct reads
                        break
                    if got <= 0:
                        raise OSError(errno.EIO, f"truncated ({done} of {n} bytes)")
                    done += got
            finally:
                os.close(fd)
    if done < n:
        fd = os.open(path, os.O_RDONLY)
        try:
            while done < n:  # one read returns at most ~2 GiB
                got = os.preadv(fd, [buf[done:]], done)
                if got <= 0:
                    raise OSError(errno.EIO, f"truncated ({done} of {n} bytes)")
                done += got
        finally:
            os.close(fd)


def open_store(path, allow_incomplete: bool = False) -> Store:
    """Open a store. An incomplete one (interrupted conversion) is refused unless `allow_incomplete`."""
    p = Path(path)
    manifest = read_manifest(p)
    if not manifest.get("complete") and not allow_incomplete:
        raise StructureError(
            f"{p}: incomplete store (its conversion was interrupted or failed; rerun the same command to "
            f"finish it) — refusing to use it"
        )
    return Store(p, manifest)
