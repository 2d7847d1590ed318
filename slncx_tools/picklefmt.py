"""The pickle layer of the released format (SPEC §3), without ever unpickling.

`parse_file` walks the pickle opcodes with a tiny stack machine that knows only the globals of
the allow-list; any other global (os.system, builtins.eval, ...) is refused before anything could
run, because nothing is ever called: the machine only records what the pickle *would* build. Large
byte strings (the array data) are not read: their offset and length are recorded so that the
caller can read any slab straight from disk.

`write_file` emits the same opcodes as CPython's pickler at protocol 4 does for a numpy array or a
`__main__.QuantizedWeight8bit` (byte-identical, tested), streaming the array data from slabs so a
tensor never has to be in memory whole.
"""

from __future__ import annotations

import io
import os
import struct
from dataclasses import dataclass
from typing import Callable, Iterable, Optional

import ml_dtypes
import numpy as np

from .errors import FormatError, UnsafePickleError

BF16 = np.dtype(ml_dtypes.bfloat16)

# Byte strings longer than this are located, not read, while parsing.
_INLINE_BYTES = 4096

# --- globals the reader accepts -----------------------------------------------------------------
_RECONSTRUCT, _NDARRAY, _DTYPE, _BFLOAT16, _QW8 = "reconstruct", "ndarray", "dtype", "bfloat16", "qw8"


def _classify_global(module: str, name: str) -> str:
    if name == "_reconstruct" and module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        return _RECONSTRUCT
    if module == "numpy" and name == "ndarray":
        return _NDARRAY
    if module == "numpy" and name == "dtype":
        return _DTYPE
    if name == "bfloat16" and (module.split(".")[0] in ("ml_dtypes", "jax", "jnp")):
        return _BFLOAT16
    if name == "QuantizedWeight8bit":
        return _QW8
    raise UnsafePickleError(f"refuses global {module}.{name}: only numpy arrays and QuantizedWeight8bit are allowed")


_ALLOWED_DTYPES = {np.dtype(t) for t in ("float32", "float16", "float64", "int8", "uint8", "int32", "int64")}


@dataclass(frozen=True)
class _Global:
    kind: str


@dataclass
class _Call:
    func: object
    args: tuple
    state: object = None


@dataclass(frozen=True)
class RawBytes:
    offset: int
    length: int


class _Mark:
    pass


_MARK = _Mark()


@dataclass(frozen=True)
class RawArray:
    """A numpy array inside a pickle file: where its bytes are and how to view them."""

    shape: tuple
    dtype: np.dtype
    offset: int
    fortran: bool = False
    inline: Optional[bytes] = None  # small arrays kept in memory while parsing

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize


@dataclass(frozen=True)
class PickledTensor:
    """What one release file holds: a plain array, or a quantized weight (values + scales)."""

    arrays: dict  # "array" for a plain ndarray, or "weight" and "scales"
    protocol: int
    file_size: int

    @property
    def quantized(self) -> bool:
        return "weight" in self.arrays


def parse_file(path) -> PickledTensor:
    """Parse a release file's opcodes; raise FormatError / UnsafePickleError naming the file."""
    path = os.fspath(path)
    name = os.path.basename(path)
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            return _parse(f, size)
    except UnsafePickleError as e:
        raise UnsafePickleError(f"{path}: {e}") from None
    except FormatError as e:
        raise FormatError(f"{path}: {e}") from None
    except OSError as e:
        raise FormatError(f"{path}: cannot read ({e.strerror or e})") from None
    except (struct.error, UnicodeDecodeError, IndexError, ValueError, TypeError) as e:
        raise FormatError(f"{name}: malformed pickle ({e})") from None


def _parse(f: io.BufferedReader, size: int) -> PickledTensor:
    stack: list = []
    memo: dict = {}
    protocol = 0

    def read(n: int) -> bytes:
        data = f.read(n)
        if len(data) != n:
            raise FormatError(f"truncated: pickle ends at byte {f.tell()} of {size} before its STOP opcode")
        return data

    def uint(n: int) -> int:
        return int.from_bytes(read(n), "little", signed=False)

    def pop_mark() -> list:
        for i in range(len(stack) - 1, -1, -1):
            if stack[i] is _MARK:
                items = stack[i + 1 :]
                del stack[i:]
                return items
        raise FormatError("malformed pickle: MARK expected")

    def push_bytes(n: int) -> None:
        if n <= _INLINE_BYTES:
            stack.append(read(n))
            return
        offset = f.tell()
        if offset + n > size:
            raise FormatError(
                f"truncated: array data needs {n} bytes at offset {offset}, file has {size} bytes"
            )
        f.seek(n, io.SEEK_CUR)
        stack.append(RawBytes(offset, n))

    while True:
        op = f.read(1)
        if not op:
            raise FormatError(f"truncated: no STOP opcode in {size} bytes")
        c = op[0]
        if c == 0x80:  # PROTO
            protocol = uint(1)
        elif c == 0x95:  # FRAME
            read(8)
        elif c == 0x2E:  # STOP
            break
        elif c == 0x28:  # MARK
            stack.append(_MARK)
        elif c == 0x29:  # EMPTY_TUPLE
            stack.append(())
        elif c == 0x85:  # TUPLE1
            stack[-1:] = [tuple(stack[-1:])]
        elif c == 0x86:  # TUPLE2
            stack[-2:] = [tuple(stack[-2:])]
        elif c == 0x87:  # TUPLE3
            stack[-3:] = [tuple(stack[-3:])]
        elif c == 0x74:  # TUPLE
            stack.append(tuple(pop_mark()))
        elif c == 0x7D:  # EMPTY_DICT
            stack.append({})
        elif c == 0x5D:  # EMPTY_LIST
            stack.append([])
        elif c == 0x75:  # SETITEMS
            items = pop_mark()
            d = stack[-1]
            for i in range(0, len(items), 2):
                d[items[i]] = items[i + 1]
        elif c == 0x73:  # SETITEM
            v, k = stack.pop(), stack.pop()
            stack[-1][k] = v
        elif c == 0x65:  # APPENDS
            items = pop_mark()
            stack[-1].extend(items)
        elif c == 0x61:  # APPEND
            v = stack.pop()
            stack[-1].append(v)
        elif c == 0x4B:  # BININT1
            stack.append(uint(1))
        elif c == 0x4D:  # BININT2
            stack.append(uint(2))
        elif c == 0x4A:  # BININT
            stack.append(int.from_bytes(read(4), "little", signed=True))
        elif c == 0x8A:  # LONG1
            stack.append(int.from_bytes(read(uint(1)), "little", signed=True))
        elif c == 0x4E:  # NONE
            stack.append(None)
        elif c == 0x88:  # NEWTRUE
            stack.append(True)
        elif c == 0x89:  # NEWFALSE
            stack.append(False)
        elif c == 0x8C:  # SHORT_BINUNICODE
            stack.append(read(uint(1)).decode("utf-8"))
        elif c == 0x58:  # BINUNICODE
            stack.append(read(uint(4)).decode("utf-8"))
        elif c == 0x8D:  # BINUNICODE8
            stack.append(read(uint(8)).decode("utf-8"))
        elif c == 0x55:  # SHORT_BINSTRING
            stack.append(read(uint(1)).decode("latin-1"))
        elif c == 0x54:  # BINSTRING
            stack.append(read(uint(4)).decode("latin-1"))
        elif c == 0x43:  # SHORT_BINBYTES
            push_bytes(uint(1))
        elif c == 0x42:  # BINBYTES
            push_bytes(uint(4))
        elif c in (0x8E, 0x96):  # BINBYTES8, BYTEARRAY8
            push_bytes(uint(8))
        elif c == 0x94:  # MEMOIZE
            memo[len(memo)] = stack[-1]
        elif c == 0x71:  # BINPUT
            memo[uint(1)] = stack[-1]
        elif c == 0x72:  # LONG_BINPUT
            memo[uint(4)] = stack[-1]
        elif c == 0x68:  # BINGET
            stack.append(memo[uint(1)])
        elif c == 0x6A:  # LONG_BINGET
            stack.append(memo[uint(4)])
        elif c == 0x93:  # STACK_GLOBAL
            name, module = stack.pop(), stack.pop()
            stack.append(_Global(_classify_global(module, name)))
        elif c == 0x63:  # GLOBAL
            module = f.readline().decode("utf-8").rstrip("\n")
            name = f.readline().decode("utf-8").rstrip("\n")
            stack.append(_Global(_classify_global(module, name)))
        elif c in (0x52, 0x81):  # REDUCE, NEWOBJ
            args, func = stack.pop(), stack.pop()
            if not isinstance(func, _Global) or not isinstance(args, tuple):
                raise FormatError("malformed pickle: call of a non-global")
            stack.append(_Call(func, args))
        elif c == 0x62:  # BUILD
            state = stack.pop()
            obj = stack[-1]
            if not isinstance(obj, _Call):
                raise FormatError("malformed pickle: BUILD on a non-object")
            obj.state = state
        else:
            raise FormatError(f"unsupported pickle opcode {op!r} at byte {f.tell() - 1}")

    if len(stack) != 1:
        raise FormatError("malformed pickle: stack not empty at STOP")
    return _interpret(stack[0], protocol, size)


def _interpret(top, protocol: int, size: int) -> PickledTensor:
    if isinstance(top, _Call) and top.func.kind == _QW8:
        state = top.state
        if not isinstance(state, dict) or set(state) != {"weight", "scales"}:
            raise FormatError(
                f"QuantizedWeight8bit state must be a dict with 'weight' and 'scales', found {_describe(state)}"
            )
        arrays = {k: _as_array(state[k], k) for k in ("weight", "scales")}
    else:
        arrays = {"array": _as_array(top, "array")}
    for key, a in arrays.items():
        if a.inline is None and a.offset + a.nbytes > size:
            raise FormatError(f"truncated: {key} needs {a.nbytes} bytes at offset {a.offset}, file has {size}")
    return PickledTensor(arrays=arrays, protocol=protocol, file_size=size)


def _describe(obj) -> str:
    if isinstance(obj, dict):
        return f"dict with keys {sorted(map(str, obj))}"
    return type(obj).__name__


def _as_array(obj, what: str) -> RawArray:
    if not (isinstance(obj, _Call) and obj.func.kind == _RECONSTRUCT):
        raise FormatError(f"{what}: expected a numpy array, found {_describe(obj)}")
    state = obj.state
    if not (isinstance(state, tuple) and len(state) == 5):
        raise FormatError(f"{what}: malformed ndarray state")
    _version, shape, dtype_obj, fortran, data = state
    if not (isinstance(shape, tuple) and all(isinstance(d, int) and d >= 0 for d in shape)):
        raise FormatError(f"{what}: malformed shape {shape!r}")
    dtype = _as_dtype(dtype_obj, what)
    count = int(np.prod(shape, dtype=np.int64))
    if isinstance(data, RawBytes):
        if data.length != count * dtype.itemsize:
            raise FormatError(
                f"{what}: {data.length} data bytes for shape {shape} {dtype} (expected {count * dtype.itemsize})"
            )
        return RawArray(tuple(shape), dtype, data.offset, bool(fortran))
    if isinstance(data, (bytes, bytearray)):
        if len(data) != count * dtype.itemsize:
            raise FormatError(
                f"{what}: {len(data)} data bytes for shape {shape} {dtype} (expected {count * dtype.itemsize})"
            )
        return RawArray(tuple(shape), dtype, -1, bool(fortran), inline=bytes(data))
    raise FormatError(f"{what}: array data is not raw bytes (pickle protocol < 3 is not supported)")


def _as_dtype(obj, what: str) -> np.dtype:
    if not (isinstance(obj, _Call) and obj.func.kind == _DTYPE and obj.args):
        raise FormatError(f"{what}: malformed dtype")
    spec = obj.args[0]
    if isinstance(spec, _Global) and spec.kind == _BFLOAT16:
        return BF16
    if not isinstance(spec, str):
        raise FormatError(f"{what}: malformed dtype {spec!r}")
    try:
        dtype = np.dtype(spec)
    except TypeError:
        raise FormatError(f"{what}: unknown dtype {spec!r}") from None
    state = obj.state
    if isinstance(state, tuple) and len(state) > 1 and state[1] in ("<", ">"):
        dtype = dtype.newbyteorder(state[1])
    if dtype.newbyteorder("=") not in _ALLOWED_DTYPES:
        raise FormatError(f"{what}: dtype {dtype} is not allowed")
    return dtype


# --- writer -------------------------------------------------------------------------------------

_FRAME_TARGET = 64 * 1024


@dataclass(frozen=True)
class ArrayPayload:
    """An array to write: its shape and dtype, and its C-order bytes as a stream of chunks."""

    shape: tuple
    dtype: np.dtype
    chunks: Callable[[], Iterable[bytes]]

    @classmethod
    def of(cls, array: np.ndarray) -> "ArrayPayload":
        a = np.ascontiguousarray(array)
        return cls(a.shape, a.dtype, lambda: [a.reshape(-1).view(np.uint8).data])

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * np.dtype(self.dtype).itemsize


class _Writer:
    """Emits opcodes the way CPython's protocol-4 pickler frames them."""

    def __init__(self, out):
        self.out = out
        self.frame = bytearray()
        self.memo: dict = {}

    def op(self, data: bytes) -> None:
        self.frame += data

    def memoize(self, key=None) -> None:
        if key is not None:
            self.memo[key] = len(self.memo)
        else:
            self.memo[object()] = len(self.memo)
        self.op(b"\x94")

    def commit(self) -> None:
        if len(self.frame) >= 4:
            self.out.write(b"\x95" + struct.pack("<Q", len(self.frame)))
        self.out.write(self.frame)
        self.frame = bytearray()

    def string(self, s: str) -> None:
        key = ("str", s)
        if key in self.memo:
            self.get(self.memo[key])
            return
        b = s.encode("utf-8")
        self.op((b"\x8c" + bytes([len(b)]) if len(b) < 256 else b"X" + struct.pack("<I", len(b))) + b)
        self.memoize(key)

    def get(self, index: int) -> None:
        self.op(b"h" + bytes([index]) if index < 256 else b"j" + struct.pack("<I", index))

    def global_(self, module: str, name: str) -> None:
        key = ("global", module, name)
        if key in self.memo:
            self.get(self.memo[key])
            return
        self.string(module)
        self.string(name)
        self.op(b"\x93")
        self.memoize(key)

    def int_(self, v: int) -> None:
        if 0 <= v < 256:
            self.op(b"K" + bytes([v]))
        elif 0 <= v < 65536:
            self.op(b"M" + struct.pack("<H", v))
        elif -(2**31) <= v < 2**31:
            self.op(b"J" + struct.pack("<i", v))
        else:
            n = (v.bit_length() + 8) // 8
            self.op(b"\x8a" + bytes([n]) + v.to_bytes(n, "little", signed=True))

    def tuple_end(self, n: int, marked: bool) -> None:
        if marked:
            self.op(b"t")
        else:
            self.op({0: b")", 1: b"\x85", 2: b"\x86", 3: b"\x87"}[n])
        self.memoize()

    def small_bytes(self, b: bytes, key=None) -> None:
        if key is not None and key in self.memo:
            self.get(self.memo[key])
            return
        self.op(b"C" + bytes([len(b)]) + b)
        self.memoize(key)

    def large_bytes(self, payload: ArrayPayload) -> None:
        n = payload.nbytes
        header = (b"C" + bytes([n])) if n < 256 else (b"B" + struct.pack("<I", n)) if n < 2**32 else (b"\x8e" + struct.pack("<Q", n))
        if n >= _FRAME_TARGET:
            self.commit()
            self.out.write(header)
            written = 0
            for chunk in payload.chunks():
                self.out.write(chunk)
                written += len(chunk)
        else:
            self.op(header)
            written = 0
            for chunk in payload.chunks():
                self.op(bytes(chunk))
                written += len(chunk)
        if written != n:
            raise FormatError(f"array stream gave {written} bytes, expected {n}")
        self.memoize()

    def ndarray(self, a: ArrayPayload) -> None:
        self.global_("numpy.core.multiarray", "_reconstruct")
        self.global_("numpy", "ndarray")
        self.int_(0)
        self.tuple_end(1, False)  # (0,)
        self.small_bytes(b"b", key=("bytes", b"b"))
        self.tuple_end(3, False)
        self.op(b"R")
        self.memoize()
        # state: (1, shape, dtype, is_fortran, data)
        self.op(b"(")
        self.int_(1)
        marked = len(a.shape) > 3
        if marked:
            self.op(b"(")
        for d in a.shape:
            self.int_(d)
        self.tuple_end(len(a.shape), marked)
        self.dtype(np.dtype(a.dtype))
        self.op(b"\x89")  # is_fortran = False
        self.large_bytes(a)
        self.tuple_end(5, True)
        self.op(b"b")

    def dtype(self, dt: np.dtype) -> None:
        self.global_("numpy", "dtype")
        if dt == BF16:
            self.global_("ml_dtypes", "bfloat16")
        else:
            self.string(dt.str[1:])
        self.op(b"\x89\x88")  # align=False, copy=True
        self.tuple_end(3, False)
        self.op(b"R")
        self.memoize()
        self.op(b"(")
        self.int_(3)
        self.string(dt.str[0] if dt.str[0] != "=" else "<")
        self.op(b"NNN")
        if dt == BF16:
            self.int_(2), self.int_(2), self.int_(80)
        else:
            self.int_(-1), self.int_(-1), self.int_(0)
        self.tuple_end(8, True)
        self.op(b"b")


def write_file(out, arrays: dict) -> None:
    """Write a plain array ({"array": payload}) or a QuantizedWeight8bit ({"weight", "scales"})."""
    w = _Writer(out)
    out.write(b"\x80\x04")
    if set(arrays) == {"array"}:
        w.ndarray(arrays["array"])
    elif set(arrays) == {"weight", "scales"}:
        w.global_("__main__", "QuantizedWeight8bit")
        w.op(b")")
        w.op(b"\x81")
        w.memoize()
        w.op(b"}")
        w.memoize()
        w.op(b"(")
        for key in ("weight", "scales"):
            w.string(key)
            w.ndarray(arrays[key])
        w.op(b"u")
        w.op(b"b")
    else:
        raise ValueError(f"unknown array set {sorted(arrays)}")
    w.op(b".")
    w.commit()
