"""The released format: safe reader, slab reads, byte-exact writer, hostile and broken files."""

import hashlib
import io
import json
import os
import pickle
import shutil
import struct
import sys

import ml_dtypes
import numpy as np
import pytest

from pickle_oracle import original_load
from slncx_tools import picklefmt
from slncx_tools.config import TINY
from slncx_tools.errors import FormatError, StructureError, UnsafePickleError
from slncx_tools.params import param_table
from slncx_tools.quant import BF16, QuantizedArray
from slncx_tools.release import ReleaseCheckpoint, generate_checkpoint, write_tensor

LAYOUTS = ["release_layout", "per_channel_layout"]


class QuantizedWeight8bit:
    """The original loader's stub: pickles name `__main__.QuantizedWeight8bit`."""

    __module__ = "__main__"

    def __setstate__(self, state):
        self.__dict__.update(state)


@pytest.fixture
def stub_class(monkeypatch):
    monkeypatch.setattr(sys.modules["__main__"], "QuantizedWeight8bit", QuantizedWeight8bit, raising=False)


def bits(a):
    return np.ascontiguousarray(a).view(np.uint8)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_reader_matches_plain_pickle_and_manifest(tiny_dir, layout):
    manifest = json.loads((tiny_dir / "manifest.json").read_text())
    ckpt = ReleaseCheckpoint(tiny_dir / layout)
    assert ckpt.config == TINY
    assert ckpt.problems() == []
    refs = original_load([ckpt.dir / e.file for e in ckpt.table])
    for entry, meta, (cls, ref) in zip(ckpt.table, manifest["params"], refs):
        path = ckpt.dir / entry.file
        assert hashlib.sha256(path.read_bytes()).hexdigest() == meta["sha256"][layout]
        got = ckpt.read(entry)
        if entry.quantized:
            assert isinstance(got, QuantizedArray) and cls == "__main__.QuantizedWeight8bit"
            assert got.values.dtype == np.int8 and got.scales.dtype == BF16
            assert ref["weight"] == ("int8", got.values.shape, got.values.tobytes())
            assert ref["scales"] == ("bfloat16", got.scales.shape, got.scales.tobytes())
        else:
            assert ref["array"] == (got.dtype.name, got.shape, got.tobytes())


@pytest.mark.parametrize("layout", LAYOUTS)
def test_dequantized_within_one_step_of_float_weights(tiny_dir, layout):
    ckpt = ReleaseCheckpoint(tiny_dir / layout)
    floats = np.load(tiny_dir / "float_weights.npz")
    for entry in ckpt.table:
        if not entry.quantized:
            assert np.array_equal(ckpt.read(entry), floats[entry.path])
            continue
        q = ckpt.read(entry)
        w = floats[entry.path]
        step = np.repeat(q.scales.astype(np.float32), w.shape[-2] // q.blocks, axis=-2)
        err = np.abs(q.dequantize().astype(np.float32) - w)
        assert np.all(err <= step * 0.5 + np.abs(w) * 2**-8 + 1e-12), entry.path
        assert q.blocks == (entry.release_blocks if layout == "release_layout" else 1)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_writer_is_byte_identical_to_the_original(tiny_dir, layout, tmp_path):
    ckpt = ReleaseCheckpoint(tiny_dir / layout)
    for entry in ckpt.table:
        out = tmp_path / entry.file
        write_tensor(out, ckpt.read(entry))
        assert out.read_bytes() == (ckpt.dir / entry.file).read_bytes(), entry.file


@pytest.mark.parametrize(
    "n_weight,n_scales",
    [(10, 3), (40_000, 30_000), (60_000, 10_000), (65_536, 100), (70_000, 70_000), (3, 200_000)],
)
def test_writer_matches_cpython_pickler_framing(n_weight, n_scales, stub_class, tmp_path):
    """Against CPython's own pickler (independent reference), around the 64 KiB frame size."""
    rng = np.random.default_rng(n_weight)
    weight = rng.integers(-127, 128, size=(n_weight,), dtype=np.int8).reshape(-1, 1)
    scales = rng.standard_normal((1, n_scales)).astype(ml_dtypes.bfloat16)
    obj = QuantizedWeight8bit()
    obj.__dict__.update(weight=weight, scales=scales)
    expected = _as_numpy1(pickle.dumps(obj, protocol=4))
    # numpy pickles the bf16 dtype's *current* flags: 64 in a fresh process, 80 once any bf16 array
    # was unpickled (unpickling mutates the shared dtype; see pickle_oracle.py). The release, the
    # fixtures and our writer say 80.
    expected = expected.replace(b"K\x02K\x02K@t", b"K\x02K\x02KPt")
    buf = io.BytesIO()
    picklefmt.write_file(buf, {"weight": picklefmt.ArrayPayload.of(weight), "scales": picklefmt.ArrayPayload.of(scales)})
    assert buf.getvalue() == expected
    (tmp_path / "t").write_bytes(buf.getvalue())
    [(cls, back)] = original_load([tmp_path / "t"])
    assert back["weight"][2] == weight.tobytes() and back["scales"][2] == scales.tobytes()


def _as_numpy1(data: bytes) -> bytes:
    """numpy 2 pickles `numpy._core.multiarray`; the release (numpy 1.x) says `numpy.core.multiarray`.
    Rewrite that one string opcode and the length of the first frame, which holds it."""
    old, new = b"\x8c\x16numpy._core.multiarray", b"\x8c\x15numpy.core.multiarray"
    if old not in data:
        return data
    assert data.count(old) == 1 and data[2] == 0x95
    (frame,) = struct.unpack("<Q", data[3:11])
    return data[:3] + struct.pack("<Q", frame - 1) + data[11:].replace(old, new)


def test_written_file_loads_with_original_loader_stub(tmp_path):
    q = QuantizedArray(np.arange(-8, 8, dtype=np.int8).reshape(4, 4), np.ones((2, 4), dtype=BF16))
    write_tensor(tmp_path / "t", q)
    [(cls, obj)] = original_load([tmp_path / "t"])
    assert cls == "__main__.QuantizedWeight8bit"
    assert obj["weight"] == ("int8", (4, 4), q.values.tobytes()) and obj["scales"][0] == "bfloat16"


def test_generated_checkpoint_roundtrip_and_inference(tmp_path):
    cfg = TINY.replace(name="custom", num_layers=2, vocab_size=64)
    d = generate_checkpoint(cfg, tmp_path / "a", seed=3)
    ckpt = ReleaseCheckpoint(d)
    assert ckpt.config == cfg and ckpt.problems() == []
    (d / "config.json").unlink()
    inferred = ReleaseCheckpoint(d).config  # from shapes alone
    assert (inferred.vocab_size, inferred.num_layers, inferred.ffn_size) == (64, 2, 48)
    assert inferred.num_q_heads * inferred.key_size == 128
    d2 = generate_checkpoint(cfg, tmp_path / "b", seed=3)
    for e in param_table(cfg):
        assert (d / e.file).read_bytes() == (d2 / e.file).read_bytes()  # deterministic
    assert ReleaseCheckpoint(d2).blocks(param_table(cfg)[3]) == 8


def test_slab_reads_equal_slices(tiny_dir):
    ckpt = ReleaseCheckpoint(tiny_dir / "release_layout")
    emb, moe = ckpt.table[0], ckpt.table[3]
    full = ckpt.read(emb)
    assert np.array_equal(ckpt.read_part(emb, "array", (slice(100, 164),)), full[100:164])
    assert np.array_equal(ckpt.read_part(emb, "array", (slice(None), slice(8, 16))), full[:, 8:16])
    q = ckpt.read(moe)
    for index in [(slice(2, 5),), (slice(None), slice(6, 18)), (slice(1, 3), slice(None), slice(4, 20)), (7, slice(40, 48), slice(0, 1))]:
        expect = q.values[tuple(slice(i, i + 1) if isinstance(i, int) else i for i in index)]
        assert np.array_equal(ckpt.read_part(moe, "weight", index), expect)
    assert np.array_equal(bits(ckpt.read_part(moe, "scales", (slice(None), slice(2, 4)))), bits(q.scales[:, 2:4]))


def _rchar() -> int:
    with open("/proc/self/io") as f:
        return int(next(line for line in f if line.startswith("rchar")).split()[1])


@pytest.mark.skipif(not os.path.exists("/proc/self/io"), reason="needs /proc/self/io")
def test_slab_read_touches_only_its_bytes(tmp_path):
    """A 1 GiB tensor (a sparse file): reading 64 rows reads exactly those bytes from disk."""
    cfg = TINY.replace(name="custom", vocab_size=1 << 19, emb_size=512, num_layers=1)
    emb = param_table(cfg)[0]
    rows, cols = emb.shape
    nbytes = rows * cols * 4
    path = tmp_path / emb.file
    with open(path, "wb") as f:
        payload = picklefmt.ArrayPayload((rows, cols), np.dtype(np.float32), lambda: [_Hole(nbytes)])
        picklefmt.write_file(_SparseWriter(f), {"array": payload})
    assert os.path.getsize(path) > nbytes
    ckpt = ReleaseCheckpoint(tmp_path, config=cfg)
    ckpt.header(emb)
    overhead = -(_rchar() - _rchar())  # reading /proc/self/io counts too
    before = _rchar()
    slab = ckpt.read_part(emb, "array", (slice(1000, 1064),))
    read = _rchar() - before - overhead
    assert slab.shape == (64, cols) and not slab.any()
    assert ckpt.bytes_read == 64 * cols * 4
    assert read == 64 * cols * 4, f"read {read} bytes for a {64 * cols * 4}-byte slab of a {nbytes}-byte tensor"


class _Hole:
    """A chunk of `n` zero bytes that _SparseWriter turns into a seek (a hole in the file).
    Arrays under 64 KiB are written inside a pickle frame, so those get real bytes."""

    def __new__(cls, n):
        if n < 65536:
            return bytes(n)
        return super().__new__(cls)

    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n


class _SparseWriter:
    def __init__(self, f):
        self.f = f

    def write(self, b):
        if isinstance(b, _Hole):
            self.f.seek(b.n, io.SEEK_CUR)
        else:
            self.f.write(b)


# --- hostile and broken files -------------------------------------------------------------------


class _Evil:
    def __init__(self, func, args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def _hostile_payloads(marker):
    import builtins
    import subprocess

    yield "os.system", pickle.dumps(_Evil(os.system, (f"touch {marker}",)), protocol=4)
    yield "builtins.eval", pickle.dumps(_Evil(builtins.eval, (f"open({str(marker)!r}, 'w')",)), protocol=4)
    yield "subprocess.Popen", pickle.dumps(_Evil(subprocess.Popen, (["touch", str(marker)],)), protocol=4)
    yield "builtins.exec (protocol 0 GLOBAL)", pickle.dumps(_Evil(builtins.exec, (f"open({str(marker)!r}, 'w')",)), protocol=0)
    # a hostile object hidden inside an otherwise valid QuantizedWeight8bit state
    state = {"weight": _Evil(os.system, (f"touch {marker}",)), "scales": np.ones((1, 2), np.float32)}
    yield "nested in QuantizedWeight8bit", b"\x80\x04" + pickle.dumps(state, protocol=4)[2:]


def test_hostile_pickles_are_refused_and_never_run(tmp_path):
    marker = tmp_path / "pwned"
    for label, payload in _hostile_payloads(marker):
        path = tmp_path / "tensor00000_000"
        path.write_bytes(payload)
        with pytest.raises(UnsafePickleError) as err:
            picklefmt.parse_file(path)
        assert "tensor00000_000" in str(err.value) and "refuses global" in str(err.value), label
        assert not marker.exists(), f"{label} executed"
    # sanity: the same payload *would* run under pickle.load (so the test can fail)
    pickle.loads(pickle.dumps(_Evil(os.system, (f"touch {marker}",)), protocol=4))
    assert marker.exists()


def test_truncated_file_is_named(tiny_dir, tmp_path):
    d = tmp_path / "ckpt-0"
    shutil.copytree(tiny_dir / "release_layout" / "ckpt-0", d)
    victim = d / "tensor00003_000"
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 2])
    ckpt = ReleaseCheckpoint(d)
    with pytest.raises(FormatError, match=r"tensor00003_000.*truncated"):
        ckpt.read(ckpt.table[3])
    victim.write_bytes(data[:100])
    with pytest.raises(FormatError, match=r"tensor00003_000.*truncated"):
        ReleaseCheckpoint(d).read(ckpt.table[3])


def test_problems_lists_every_issue(tiny_dir, tmp_path):
    d = tmp_path / "ckpt-0"
    shutil.copytree(tiny_dir / "release_layout" / "ckpt-0", d)
    (d / "tensor00010_000").unlink()
    (d / "tensor00007_000").write_bytes((d / "tensor00005_000").read_bytes())  # query <- key: wrong shape
    (d / "stray.bin").write_bytes(b"x")
    (d / "tensor00020_000").write_bytes((d / "tensor00020_000").read_bytes()[:50])
    problems = ReleaseCheckpoint(d, config=TINY).problems()
    text = "\n".join(problems)
    assert len(problems) == 4, text
    assert "tensor00010_000: missing" in text
    assert "tensor00007_000" in text and "expected int8 weight [32, 128], found int8 [32, 64]" in text
    assert "stray.bin: unexpected file" in text
    assert "tensor00020_000" in text and "truncated" in text
    with pytest.raises(StructureError, match="and 3 more"):
        ReleaseCheckpoint(d, config=TINY).check()


def test_wrong_class_and_dtype_are_reported(tmp_path):
    e = param_table(TINY)[2]  # quantized moe/linear/w
    write_tensor(tmp_path / e.file, np.zeros(e.shape, np.float32))
    write_tensor(tmp_path / "tensor00000_000", np.zeros(param_table(TINY)[0].shape, np.float32))
    ckpt = ReleaseCheckpoint(tmp_path, config=TINY)
    ckpt.header(e)  # a float matrix where int8 is usual: a float source, accepted
    assert ckpt.read(e).dtype == np.float32
    write_tensor(tmp_path / e.file, np.zeros(e.shape, np.int32))
    with pytest.raises(FormatError, match="expected a QuantizedWeight8bit or a float array"):
        ReleaseCheckpoint(tmp_path, config=TINY).header(e)
    f = param_table(TINY)[1]
    write_tensor(tmp_path / f.file, np.zeros(f.shape, np.int32))
    with pytest.raises(FormatError, match="expected float32 \\[32\\], found int32"):
        ckpt.header(f)


def test_full_size_slncx_release_is_inspected_from_headers(tmp_path):
    """All 770 files of a full-size SLNCX ckpt-0 as sparse files (318 GB logical, ~0 on disk):
    the reader infers the SLNCX preset and checks every header without reading the data."""
    from slncx_tools.config import SLNCX
    from slncx_tools.summary import summarize

    d = tmp_path / "ckpt-0"
    d.mkdir()
    for e in param_table(SLNCX):
        if e.quantized:
            arrays = {
                "weight": picklefmt.ArrayPayload(e.shape, np.dtype(np.int8), lambda e=e: [_Hole(e.numel)]),
                "scales": picklefmt.ArrayPayload(e.scales_shape(e.release_blocks), BF16, lambda e=e: [_Hole(2 * int(np.prod(e.scales_shape(e.release_blocks))))]),
            }
        else:
            arrays = {"array": picklefmt.ArrayPayload(e.shape, np.dtype(np.float32), lambda e=e: [_Hole(4 * e.numel)])}
        with open(d / e.file, "wb") as f:
            picklefmt.write_file(_SparseWriter(f), arrays)
    before = _rchar()
    info = summarize(ReleaseCheckpoint(tmp_path), check=True)
    read = _rchar() - before
    assert info["preset"] == "SLNCX" and info["problems"] == []
    assert info["total_tensors"] == 770 and info["total_params"] == 315_684_820_992
    assert info["total_bytes"] == 318_239_694_848
    assert read < 770 * 2 * 16384, f"read {read} bytes to inspect headers"
