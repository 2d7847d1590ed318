"""The released `ckpt-0` layout: one pickle per tensor, `tensor{i:05d}_000` in parameter-table order.

`ReleaseCheckpoint` reads it safely (see picklefmt: no unpickling) and lazily: headers only until a
tensor or a slab of one is asked for, and then only the bytes of that slab. `write_tensor` and
`generate_checkpoint` write the same layout (the original loader accepts what they write).
"""

from __future__ import annotations

import json
import os
import re
import threading
from pathlib import Path
from typing import Iterable, Optional

import numpy as np

from . import picklefmt
from .config import ModelConfig, infer_config
from .errors import FormatError, StructureError, SlncxError
from .params import ParamSpec, num_files, param_table
from .quant import BF16, QuantizedArray, quantize

FILE_RE = re.compile(r"^tensor(\d{5})_000$")
CONFIG_FILE = "config.json"


def find_ckpt_dir(path) -> Path:
    """`path` itself if it holds tensor files, else its `ckpt-0` subdirectory."""
    p = Path(path)
    if not p.exists():
        raise StructureError(f"{p}: no such file or directory")
    if (p / "tensor00000_000").exists():
        return p
    if (p / "ckpt-0").is_dir():
        return p / "ckpt-0"
    raise StructureError(f"{p}: not a ckpt-0 directory (no tensor00000_000 in it or in {p / 'ckpt-0'})")


def _runs(shape: tuple, itemsize: int, index: tuple):
    """Byte runs (offset, length) of a C-order slab; `index` is one slice (step 1) per dim."""
    starts = [s.start for s in index]
    lens = [s.stop - s.start for s in index]
    # The innermost dims taken whole, plus the first partial one, form one contiguous run.
    k = len(shape) - 1
    while k > 0 and lens[k] == shape[k]:
        k -= 1
    inner = itemsize
    for d in shape[k + 1 :]:
        inner *= d
    strides = [0] * len(shape)
    acc = itemsize
    for d in range(len(shape) - 1, -1, -1):
        strides[d] = acc
        acc *= shape[d]
    run = lens[k] * inner
    base = starts[k] * inner
    for outer in np.ndindex(*lens[:k]):
        yield base + sum((starts[d] + outer[d]) * strides[d] for d in range(k)), run


def normalize_index(shape: tuple, index) -> tuple:
    """A tuple of step-1 slices, one per dimension, with explicit bounds."""
    if index is None:
        index = ()
    if not isinstance(index, tuple):
        index = (index,)
    out = []
    for d, n in enumerate(shape):
        s = index[d] if d < len(index) else slice(None)
        if isinstance(s, int):
            s = slice(s, s + 1)
        start, stop, step = s.indices(n)
        if step != 1:
            raise ValueError("slab reads need step-1 slices")
        out.append(slice(start, max(start, stop)))
    return tuple(out)


class ReleaseCheckpoint:
    """A `ckpt-0` directory, opened lazily. Thread-safe reads; counts the bytes it reads."""

    kind = "release"

    def __init__(self, path, config: Optional[ModelConfig] = None):
        self.dir = find_ckpt_dir(path)
        self._headers: dict = {}
        self._lock = threading.Lock()
        self.bytes_read = 0
        self.config = config or self._load_config()
        self.table = param_table(self.config)

    # --- structure ------------------------------------------------------------------------------
    def files(self) -> list:
        return sorted(p.name for p in self.dir.iterdir() if not p.name.startswith("."))

    def _load_config(self) -> ModelConfig:
        for candidate in (self.dir / CONFIG_FILE, self.dir.parent / CONFIG_FILE):
            if candidate.exists():
                try:
                    return ModelConfig.from_dict(json.loads(candidate.read_text()))
                except (ValueError, TypeError, SlncxError) as e:
                    raise FormatError(f"{candidate}: not a valid model config ({e})") from None
        return self.infer_config()

    def infer_config(self) -> ModelConfig:
        """The config whose table matches these files' shapes (SPEC §2 positions of layer 0)."""
        indices = [int(m.group(1)) for n in self.files() if (m := FILE_RE.match(n))]
        count = max(indices, default=-1) + 1  # a missing file in the middle is reported later
        if count < 14 or (count - 2) % 12:
            raise StructureError(
                f"{self.dir}: tensor files up to index {count - 1}; a checkpoint has 2 + 12·layers files"
            )
        emb = self._logical_shape(0)
        moe = self._logical_shape(2)  # decoder_layer_0/moe/linear/w [E, D, F]
        key = self._logical_shape(5)  # multi_head_attention/key/w [D, K·ks]
        query = self._logical_shape(7)  # multi_head_attention/query/w [D, H·ks]
        return infer_config(
            vocab_size=emb[0], emb_size=emb[1], num_layers=(count - 2) // 12,
            q_width=query[1], kv_width=key[1], ffn=moe[2], num_experts=moe[0],
        )

    def _logical_shape(self, index: int) -> tuple:
        h = self.header_at(index)
        return h.arrays["weight" if h.quantized else "array"].shape

    def header_at(self, index: int) -> picklefmt.PickledTensor:
        h = self._headers.get(index)
        if h is None:
            path = self.dir / f"tensor{index:05d}_000"
            if not path.exists():
                raise StructureError(f"{path}: missing")
            h = picklefmt.parse_file(path)
            self._headers[index] = h
        return h

    def header(self, entry: ParamSpec) -> picklefmt.PickledTensor:
        """The parsed header of an entry's file, checked against the parameter table."""
        h = self.header_at(entry.index)
        check_header(entry, h, self.dir / entry.file)
        return h

    def blocks(self, entry: ParamSpec) -> int:
        """R of a quantized entry as stored here (0 for a float tensor)."""
        h = self.header(entry)
        return h.arrays["scales"].shape[-2] if h.quantized else 0

    def stored(self, entry: ParamSpec) -> dict:
        """How the file stores an entry: dtype, quantization and data bytes (for `inspect`)."""
        h = self.header(entry)
        if h.quantized:
            w, s = h.arrays["weight"], h.arrays["scales"]
            return {"dtype": "int8", "quant": f"int8 R={s.shape[-2]} ({s.dtype} scales)", "bytes": w.nbytes + s.nbytes}
        a = h.arrays["array"]
        return {"dtype": str(a.dtype), "quant": "float", "bytes": a.nbytes}

    def problems(self) -> list:
        """Every structural problem: missing, extra, unreadable, mismatched files (empty = fine)."""
        found = []
        names = set(self.files())
        expected = {e.file for e in self.table}
        extra = sorted(names - expected - {CONFIG_FILE, "SHA256SUMS", "tokenizer.model"})
        for entry in self.table:
            path = self.dir / entry.file
            if entry.file not in names:
                found.append(f"{path}: missing ({entry.path} {list(entry.shape)})")
                continue
            try:
                self._headers.pop(entry.index, None)
                self.header(entry)
            except SlncxError as e:
                found.append(str(e))
        found += [f"{self.dir / n}: unexpected file (not part of a {num_files(self.config)}-tensor checkpoint)" for n in extra]
        return found

    def check(self) -> None:
        problems = self.problems()
        if problems:
            more = f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""
            raise StructureError(problems[0] + more)

    # --- data -----------------------------------------------------------------------------------
    def read_part(self, entry: ParamSpec, part: str, index=None) -> np.ndarray:
        """Read `part` ("array", "weight" or "scales") of an entry, or a slab of it."""
        h = self.header(entry)
        raw = h.arrays[part]
        index = normalize_index(raw.shape, index)
        out_shape = tuple(s.stop - s.start for s in index)
        if raw.inline is not None:
            full = np.frombuffer(raw.inline, dtype=raw.dtype).reshape(raw.shape, order="F" if raw.fortran else "C")
            with self._lock:
                self.bytes_read += int(np.prod(out_shape)) * raw.dtype.itemsize
            return np.array(full[index])
        if raw.fortran:
            raise FormatError(f"{self.dir / entry.file}: Fortran-ordered arrays are not supported")
        out = np.empty(out_shape, dtype=raw.dtype)
        if out.size == 0:
            return out
        flat = out.reshape(-1).view(np.uint8)
        pos = 0
        nread = 0
        path = self.dir / entry.file
        fd = os.open(path, os.O_RDONLY)
        try:
            for offset, length in _coalesce(_runs(raw.shape, raw.dtype.itemsize, index)):
                got = _pread_into(fd, flat[pos : pos + length], raw.offset + offset)
                if got != length:
                    raise FormatError(f"{path}: truncated while reading {entry.path}")
                pos += length
                nread += length
        finally:
            os.close(fd)
        with self._lock:
            self.bytes_read += nread
        return out

    def read(self, entry: ParamSpec, index=None):
        """A float tensor as an ndarray, or a quantized one as a QuantizedArray (whole)."""
        h = self.header(entry)
        if h.quantized:
            return QuantizedArray(self.read_part(entry, "weight"), self.read_part(entry, "scales"))
        return self.read_part(entry, "array", index)


def _coalesce(runs: Iterable) -> Iterable:
    cur_off = cur_len = None
    for off, length in runs:
        if cur_off is not None and cur_off + cur_len == off:
            cur_len += length
            continue
        if cur_off is not None:
            yield cur_off, cur_len
        cur_off, cur_len = off, length
    if cur_off is not None:
        yield cur_off, cur_len


def _pread_into(fd: int, buf: np.ndarray, offset: int) -> int:
    """Fill `buf` from `offset` with positioned reads; returns the number of bytes read."""
    view = memoryview(buf)
    done = 0
    while done < len(view):
        n = os.preadv(fd, [view[done:]], offset + done)
        if n == 0:
            break
        done += n
    return done


def is_float_dtype(dtype) -> bool:
    return np.dtype(dtype).kind == "f" or np.dtype(dtype) == BF16


def check_header(entry: ParamSpec, h: picklefmt.PickledTensor, path) -> None:
    """Raise FormatError unless the file holds what the parameter table says it must."""
    if entry.quantized and not h.quantized:
        # A float source (dequantized, fine-tuned, or a float master): a float matrix is fine.
        a = h.arrays["array"]
        if a.shape != entry.shape or not is_float_dtype(a.dtype):
            raise FormatError(
                f"{path}: {entry.path}: expected a QuantizedWeight8bit or a float array {list(entry.shape)}, "
                f"found a {a.dtype} array {list(a.shape)}"
            )
    elif entry.quantized:
        w, s = h.arrays["weight"], h.arrays["scales"]
        if w.shape != entry.shape or w.dtype != np.int8:
            raise FormatError(
                f"{path}: {entry.path}: expected int8 weight {list(entry.shape)}, found {w.dtype} {list(w.shape)}"
            )
        rows = entry.shape[-2]
        if (
            len(s.shape) != len(entry.shape)
            or s.shape[:-2] != entry.shape[:-2]
            or s.shape[-1] != entry.shape[-1]
            or s.shape[-2] == 0
            or rows % s.shape[-2]
        ):
            raise FormatError(
                f"{path}: {entry.path}: expected scales {list(entry.scales_shape(entry.release_blocks))} "
                f"(R dividing {rows}), found {list(s.shape)}"
            )
        if s.dtype not in (BF16, np.dtype(np.float32)):
            raise FormatError(f"{path}: {entry.path}: expected bfloat16 scales, found {s.dtype}")
    else:
        if h.quantized:
            raise FormatError(f"{path}: {entry.path}: expected a float32 array {list(entry.shape)}, found a quantized weight")
        a = h.arrays["array"]
        if a.shape != entry.shape or not is_float_dtype(a.dtype):
            raise FormatError(
                f"{path}: {entry.path}: expected float32 {list(entry.shape)}, found {a.dtype} {list(a.shape)}"
            )


# --- writing ------------------------------------------------------------------------------------

def write_tensor(path, value, *, arrays: Optional[dict] = None) -> None:
    """Atomically write one release file: an ndarray, a QuantizedArray, or streamed payloads."""
    path = Path(path)
    if arrays is None:
        if isinstance(value, QuantizedArray):
            arrays = {"weight": picklefmt.ArrayPayload.of(value.values), "scales": picklefmt.ArrayPayload.of(value.scales)}
        else:
            arrays = {"array": picklefmt.ArrayPayload.of(np.asarray(value))}
    tmp = path.with_name(path.name + ".incomplete")
    try:
        with open(tmp, "wb") as f:
            picklefmt.write_file(f, arrays)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def random_float_weights(cfg: ModelConfig, entry: ParamSpec, seed: int) -> np.ndarray:
    """Deterministic random float32 weights for one entry (depends on seed and entry index only)."""
    rng = np.random.default_rng([seed, entry.index])
    if entry.name == "embeddings":
        return rng.standard_normal(entry.shape, dtype=np.float32)
    if entry.name.endswith("scale"):
        return (1.0 + 0.1 * rng.standard_normal(entry.shape)).astype(np.float32)
    fan_in = entry.shape[-2] if len(entry.shape) >= 2 else entry.shape[0]
    w = rng.standard_normal(entry.shape, dtype=np.float32) / np.float32(np.sqrt(fan_in))
    if entry.quantized:  # bf16-exact, like the fixtures' matmul weights
        w = w.astype(BF16).astype(np.float32)
    return w


def generate_checkpoint(
    cfg: ModelConfig, out, *, seed: int = 0, per_channel: bool = False, write_config: bool = True
) -> Path:
    """Write a random checkpoint for `cfg` in the released layout (R = 8 row blocks unless
    `per_channel`) into `out`/ckpt-0; returns that directory. Deterministic for a seed."""
    out = Path(out)
    final = out / "ckpt-0"
    if final.exists():
        raise SlncxError(f"{final} already exists")
    tmp = out / "ckpt-0.incomplete"
    tmp.mkdir(parents=True, exist_ok=True)
    for entry in param_table(cfg):
        w = random_float_weights(cfg, entry, seed)
        value = quantize(w, 1 if per_channel else entry.release_blocks) if entry.quantized else w
        write_tensor(tmp / entry.file, value)
    if write_config:
        (tmp / CONFIG_FILE).write_text(json.dumps(cfg.to_dict(), indent=1) + "\n")
    os.replace(tmp, final)
    return final
