"""`slncx-tools quantize`: bit-exact carry, SPEC §3 quantization, mse, release output, resume, errors, CLI."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from click.testing import CliRunner

from pickle_oracle import original_load
from slncx_tools import store as st
from slncx_tools.checkpoint import open_checkpoint
from slncx_tools.cli import cli
from slncx_tools.config import TINY
from slncx_tools.convert import SLEEP_ENV, QuantizeOptions, quantize_checkpoint
from slncx_tools.errors import StructureError
from slncx_tools.params import param_table
from slncx_tools.quant import RowQuantizedArray
from slncx_tools.release import ReleaseCheckpoint, write_tensor

BF16 = np.dtype(ml_dtypes.bfloat16)
CLI = Path(sys.executable).parent / "slncx-tools"


def spec3(w, axis):
    """Independent SPEC §3 (R = 1): s = bf16(max|w| over `axis` / 127); q = clip(rint(w / f32(s)))."""
    w = np.asarray(w, np.float32)
    s = (np.max(np.abs(w), axis=axis, keepdims=True) / np.float32(127.0)).astype(BF16)
    q = np.clip(np.rint(w / s.astype(np.float32)), -127, 127).astype(np.int8)
    return q, s


def deq(q, s):
    return (q.astype(BF16) * s).astype(np.float32)  # a bf16 product


@pytest.fixture(scope="module")
def release_store(tiny_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("rq") / "store"
    report = quantize_checkpoint(tiny_dir / "release_layout", out)
    return out, report


@pytest.fixture(scope="module")
def float_source(tiny_dir, tmp_path_factory):
    """A float ckpt-0 (every tensor float32) written with the release writer from float_weights.npz."""
    d = tmp_path_factory.mktemp("float") / "ckpt-0"
    d.mkdir()
    weights = np.load(tiny_dir / "float_weights.npz")
    for e in param_table(TINY):
        write_tensor(d / e.file, np.asarray(weights[e.path], np.float32))
    return d, weights


def test_release_to_store_bit_identical(release_store, tiny_dir):
    out, report = release_store
    s, rel = open_checkpoint(out), ReleaseCheckpoint(tiny_dir / "release_layout")
    for e in rel.table:
        for part in rel.header(e).arrays:
            a, b = s.read_part(e, part), rel.read_part(e, part)
            assert a.dtype == b.dtype and a.tobytes() == b.tobytes(), (e.path, part)
        assert s.blocks(e) == rel.blocks(e)
    assert all(g["snr_db"] == float("inf") for g in report["groups"])  # carried: no added error


def test_logits_unchanged_through_store(release_store, tiny_dir):
    pytest.importorskip("jax")
    model = pytest.importorskip("slncx_tools.model")
    load = pytest.importorskip("slncx_tools.load")
    tokens = np.array([[5, 17, 99, 3, 250, 7, 1, 42]], dtype=np.int32)
    outs = []
    for path in (tiny_dir / "release_layout", release_store[0]):
        ckpt = open_checkpoint(path)
        logits, _ = model.forward(load.load_params(ckpt), tokens, ckpt.config)
        outs.append(np.asarray(logits, np.float32))
    np.testing.assert_array_equal(outs[0], outs[1])


def test_float_source_matches_spec3(float_source, tmp_path):
    src, weights = float_source
    report = quantize_checkpoint(src, tmp_path / "s", QuantizeOptions(embeddings="int8"))
    s = open_checkpoint(tmp_path / "s")
    for e in s.table:
        w = np.asarray(weights[e.path], np.float32)
        if e.quantized:
            q, sc = spec3(w, axis=-2)
            v = s.read(e)
            assert s.storage(e) == {"kind": "int8", "blocks": 1, "scale_dtype": "bfloat16"}
            np.testing.assert_array_equal(v.values, q, err_msg=e.path)
            assert v.scales.tobytes() == sc.tobytes(), e.path
        elif e.name == "embeddings":
            q, sc = spec3(w, axis=-1)  # per row
            v = s.read(e)
            assert isinstance(v, RowQuantizedArray) and v.scales.shape == (w.shape[0], 1)
            np.testing.assert_array_equal(v.values, q)
            assert v.scales.tobytes() == sc.tobytes()
            np.testing.assert_array_equal(v.dequantize().astype(np.float32), deq(q, sc))
        else:  # norms, router: float32, unchanged
            assert s.read(e).dtype == np.float32 and s.read(e).tobytes() == w.tobytes()
    groups = {g["group"]: g for g in report["groups"]}
    assert 30 < groups["moe/linear/w"]["snr_db"] < 60 and groups["router/w"]["snr_db"] == float("inf")


def test_mse_never_worse_than_absmax(float_source, tmp_path):
    src, weights = float_source
    quantize_checkpoint(src, tmp_path / "abs", QuantizeOptions())
    quantize_checkpoint(src, tmp_path / "mse", QuantizeOptions(method="mse"))
    a, m = open_checkpoint(tmp_path / "abs"), open_checkpoint(tmp_path / "mse")
    better = 0
    for e in a.table:
        if not e.quantized:
            continue
        w = np.asarray(weights[e.path], np.float64)
        err = {}
        for name, c in (("abs", a), ("mse", m)):
            v = c.read(e)
            err[name] = float(np.sum((w - deq(v.values, v.scales)) ** 2))
        assert err["mse"] <= err["abs"], e.path
        better += err["mse"] < err["abs"]
    assert better > 0  # the search does something


def test_requantize_collapses_blocks(tiny_dir, tmp_path):
    report = quantize_checkpoint(tiny_dir / "release_layout", tmp_path / "r", QuantizeOptions(requantize=True, scale_dtype="float32"))
    s, rel = open_checkpoint(tmp_path / "r"), ReleaseCheckpoint(tiny_dir / "release_layout")
    for e in rel.table:
        if e.quantized and rel.blocks(e) == 8:
            v = s.read(e)
            assert v.blocks == 1 and v.scales.dtype == np.float32
            ref = rel.read(e).dequantize().astype(np.float32)
            rq = (v.values.astype(np.float32) * v.scales)
            assert np.max(np.abs(rq - ref)) <= np.max(np.abs(ref)) / 100
        elif e.quantized:  # R = 1 tensors are carried exactly
            assert s.read_part(e, "weight").tobytes() == rel.read_part(e, "weight").tobytes()
    groups = {g["group"]: g for g in report["groups"]}
    assert 0 < groups["moe/linear_1/w"]["rmse"] and groups["moe/linear/w"]["rmse"] == 0


def test_include_exclude(float_source, tmp_path):
    src, _ = float_source
    quantize_checkpoint(src, tmp_path / "s", QuantizeOptions(include=("decoder_layer_1/",), exclude=("moe/linear_1",)))
    s = open_checkpoint(tmp_path / "s")
    kinds = {e.path: s.storage(e)["kind"] for e in s.table if e.quantized}
    assert kinds["params/transformer/decoder_layer_1/moe/linear/w"] == "int8"
    assert kinds["params/transformer/decoder_layer_1/moe/linear_1/w"] == "float"
    assert kinds["params/transformer/decoder_layer_2/moe/linear/w"] == "float"


def test_release_format_byte_identical_and_plain_pickle(tiny_dir, float_source, tmp_path):
    # release -> release: every file byte-identical to the source
    quantize_checkpoint(tiny_dir / "release_layout", tmp_path / "rr", QuantizeOptions(format="release"))
    src = tiny_dir / "release_layout" / "ckpt-0"
    for e in param_table(TINY):
        assert (tmp_path / "rr" / "ckpt-0" / e.file).read_bytes() == (src / e.file).read_bytes(), e.file
    # float -> release: reloads with the same values as the store, and through plain pickle
    fsrc, _ = float_source
    quantize_checkpoint(fsrc, tmp_path / "fr", QuantizeOptions(format="release"))
    quantize_checkpoint(fsrc, tmp_path / "fs", QuantizeOptions())
    rel, s = ReleaseCheckpoint(tmp_path / "fr"), open_checkpoint(tmp_path / "fs")
    assert rel.problems() == []
    refs = original_load([rel.dir / e.file for e in rel.table])  # the original loader's way
    for e, (_, obj) in zip(rel.table, refs):
        for part in rel.header(e).arrays:
            assert rel.read_part(e, part).tobytes() == s.read_part(e, part).tobytes()
            assert obj[part][2] == s.read_part(e, part).tobytes()


def _records(out):
    d = out / ".slncx-progress"
    return len(list(d.glob("t*.json"))) if d.exists() else 0


def test_kill9_then_resume_matches_uninterrupted(tiny_dir, release_store, tmp_path):
    out = tmp_path / "k"
    env = dict(os.environ, **{SLEEP_ENV: "0.05"})
    proc = subprocess.Popen([str(CLI), "quantize", str(tiny_dir / "release_layout"), str(out), "--no-progress"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 60
    while _records(out) < 10 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    assert proc.poll() is None, "finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert 10 <= _records(out) < 146
    with pytest.raises(StructureError, match="incomplete"):
        open_checkpoint(out)
    done = subprocess.run([str(CLI), "quantize", str(tiny_dir / "release_layout"), str(out), "--json"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["resumed"] >= 10
    assert (out / st.MANIFEST).read_text() == (release_store[0] / st.MANIFEST).read_text()
    assert not (out / ".slncx-progress").exists()


def test_truncated_source_names_file(tiny_dir, tmp_path):
    src = tmp_path / "src" / "ckpt-0"
    shutil.copytree(tiny_dir / "release_layout" / "ckpt-0", src)
    bad = src / "tensor00005_000"
    bad.write_bytes(bad.read_bytes()[:300])
    result = CliRunner().invoke(cli, ["quantize", str(src), str(tmp_path / "out")])
    assert result.exit_code != 0
    assert "tensor00005_000" in str(result.exception) or "tensor00005_000" in result.output
    mf = tmp_path / "out" / st.MANIFEST
    assert not mf.exists() or not json.loads(mf.read_text())["complete"]


def test_cli_json_and_dry_run(tiny_dir, tmp_path):
    runner = CliRunner()
    r = runner.invoke(cli, ["quantize", str(tiny_dir / "release_layout"), str(tmp_path / "o"), "--dry-run", "--json"])
    assert r.exit_code == 0, r.output
    plan = json.loads(r.output)
    assert plan["tensors"] == 146 and plan["actions"]["carry"]["tensors"] == 84 and plan["enough_space"]
    assert not (tmp_path / "o").exists()
    r = runner.invoke(cli, ["quantize", str(tiny_dir / "release_layout"), str(tmp_path / "o"), "--compression", "zstd:3", "--workers", "2"])
    assert r.exit_code == 0, r.output
    assert "moe/linear_1/w" in r.output and "exact" in r.output
    assert json.loads((tmp_path / "o" / st.MANIFEST).read_text())["compression"] == {"codec": "zstd", "level": 3}
    r = runner.invoke(cli, ["quantize", str(tiny_dir / "release_layout"), str(tmp_path / "o")])
    assert r.exit_code != 0  # a complete store is never overwritten


# --- the fused kernel (quant.quantize_slab) and the read-ahead pipeline ---------------------------

from slncx_tools import convert as cv  # noqa: E402
from slncx_tools import quant as qt  # noqa: E402
from slncx_tools.quant import ErrorStats  # noqa: E402


def test_veltkamp_rounding_is_bf16_product_for_every_q_and_mantissa():
    """The kernel rounds q·s to bf16 with Veltkamp's split: exhaustively equal to the bf16 multiply
    (ties to even included) for every q in [-127, 127], every bf16 mantissa, over the safe exponents."""
    t = np.arange(-127, 128, dtype=np.float32)[:, None]
    m = np.arange(128, 256, dtype=np.float32)[None, :]
    for k in range(-99, 100, 3):
        s = m * np.float32(2.0 ** (k - 7))  # every bf16 value with exponent k
        assert s.astype(BF16).astype(np.float32).tobytes() == s.tobytes()
        p = t * s
        ref = (t.astype(BF16) * s.astype(BF16)).astype(np.float32)
        qt._round_bf16_products(p, np.empty_like(p))
        assert p.tobytes() == ref.tobytes(), k


def _spec3_stats(w, q, s):
    return ErrorStats.of(w, (q.astype(BF16) * s).astype(np.float32) if s.dtype == BF16 else q * s)


@pytest.mark.parametrize("axis", [0, 1])
@pytest.mark.parametrize("block", [1, 37, 4096, 1 << 17])
def test_kernel_matches_spec3(axis, block):
    rng = np.random.default_rng(axis * 100 + block)
    w = (rng.standard_normal((301, 203)) * 0.02).astype(np.float32)
    w[:, 5] = 0.0
    w[7, :] = 0.0  # a zero column and a zero row: scale 1, values 0
    q, s, stats = qt.quantize_slab(w, axis, block=block)
    s0 = (np.max(np.abs(w), axis=axis, keepdims=True) / np.float32(127.0)).astype(BF16)
    s0 = np.where(s0 == 0, np.asarray(1, BF16), s0)  # SPEC §3; a zero channel gets scale 1
    q0 = np.clip(np.rint(w / s0.astype(np.float32)), -127, 127).astype(np.int8)
    np.testing.assert_array_equal(q, q0)
    assert s.tobytes() == s0.tobytes() and s.shape == s0.shape
    ref = _spec3_stats(w, q0, s0)
    for f in ("sum_sq_ref", "sum_sq_err", "sum_dot", "sum_sq_approx", "max_abs"):
        assert getattr(stats, f) == pytest.approx(getattr(ref, f), rel=1e-5), f
    assert stats.count == w.size


def test_kernel_ties_divide_not_reciprocal():
    """w = (k + ½)·s exactly: a true division gives the tie and rint rounds it to even; x·(1/s) does not."""
    rng = np.random.default_rng(3)
    cols = 512
    s = (rng.uniform(1e-3, 1e-1, cols).astype(np.float32) / np.float32(127)).astype(BF16).astype(np.float32)
    k = rng.integers(-126, 126, (400, cols)).astype(np.float32)
    w = ((k + np.float32(0.5)) * s).astype(np.float32)
    w[0] = np.float32(127) * s  # pins each column's absmax so its scale is s
    for x in (w, np.nextafter(w, np.float32(np.inf)), np.nextafter(w, np.float32(-np.inf))):
        x[0] = np.float32(127) * s
        q, sc, _ = qt.quantize_slab(x, 0)
        q0, s0 = spec3(x, 0)
        np.testing.assert_array_equal(q, q0)
        assert sc.tobytes() == s0.tobytes()


@pytest.mark.parametrize("scale_dtype", [np.float32, BF16])
def test_kernel_fallback_and_float32_scales(scale_dtype):
    rng = np.random.default_rng(5)
    w = (rng.standard_normal((64, 48)) * 0.02).astype(np.float32)
    w[:, 3] *= np.float32(1e-36)  # a channel of tiny (subnormal-scale) weights: the exact fallback
    q, s, _ = qt.quantize_slab(w, 0, scale_dtype)
    a = np.max(np.abs(w), axis=0, keepdims=True)
    s0 = (a / np.float32(127)).astype(scale_dtype)
    s0 = np.where(s0 == 0, np.asarray(1, scale_dtype), s0)
    q0 = np.clip(np.rint(w / s0.astype(np.float32)), -127, 127).astype(np.int8)
    np.testing.assert_array_equal(q, q0)
    assert s.tobytes() == s0.astype(scale_dtype).tobytes()
    q2, _, _ = qt.quantize_slab(w[:, [0, 1, 2, 4]], 0, scale_dtype)  # the fast path on the rest
    np.testing.assert_array_equal(q2, q0[:, [0, 1, 2, 4]])


def test_quantize_columns_and_rows_fast_paths_match_reference():
    rng = np.random.default_rng(9)
    w = (rng.standard_normal((3, 64, 40)) * 0.05).astype(np.float32)
    for blocks in (1, 8):
        q, s, _ = qt.quantize_columns(w, blocks)
        ref = qt.quantize(w, blocks)
        np.testing.assert_array_equal(q, ref.values)
        assert s.tobytes() == ref.scales.tobytes()
    out = np.empty((64, 40), np.int8)
    q, s, _ = qt.quantize_rows(w[0], q_out=out)
    q0, s0 = spec3(w[0], 1)
    assert q is out and np.array_equal(out, q0) and s.tobytes() == s0.tobytes()
    q, s, _ = qt.quantize_rows(w[0], method="mse")
    assert q.shape == (64, 40) and s.shape == (64, 1)


def test_prefetch_order_errors_and_early_close():
    assert list(cv.prefetch(iter(range(50)), depth=2)) == list(range(50))

    def failing():
        yield 1
        raise OSError("disk gone")

    it = cv.prefetch(failing())
    assert next(it) == 1
    with pytest.raises(OSError, match="disk gone"):
        next(it)
    produced = []

    def endless():
        i = 0
        while True:
            produced.append(i)
            yield i
            i += 1

    it = cv.prefetch(endless(), depth=1)
    assert next(it) == 0
    it.close()  # stops (and joins) the reader
    n = len(produced)
    time.sleep(0.1)
    assert len(produced) == n <= 4


def _digests(out):
    m = json.loads((out / st.MANIFEST).read_text())
    return {(r["path"], p): a["sha256"] for r in m["tensors"] for p, a in r["arrays"].items()}, {
        r["path"]: r.get("error") for r in m["tensors"]}


def test_pipelined_small_slabs_equal_whole_tensor_serial(float_source, tmp_path, monkeypatch):
    """Tiny slabs (many read-ahead steps, many kernel blocks) and 2 workers give the same arrays as
    whole-tensor slabs, and both equal the plain reference formula applied to whole tensors."""
    src, weights = float_source
    opts = dict(embeddings="int8")
    quantize_checkpoint(src, tmp_path / "big", QuantizeOptions(**opts))
    monkeypatch.setattr(qt, "KERNEL_BLOCK", 97)
    orig = cv.produce

    def small(source, job, o, budget, counter, result):
        return orig(source, job, o, 64 * 1024, counter, result)  # a few rows/columns per slab

    monkeypatch.setattr(cv, "produce", small)
    quantize_checkpoint(src, tmp_path / "small", QuantizeOptions(workers=2, **opts))
    d_big, e_big = _digests(tmp_path / "big")
    d_small, e_small = _digests(tmp_path / "small")
    assert d_big == d_small
    for path, e in e_big.items():
        if e is not None:
            for k in ("sum_sq_ref", "sum_sq_err", "sum_dot", "sum_sq_approx", "max_abs"):
                assert e_small[path][k] == pytest.approx(e[k], rel=1e-5), (path, k)
    s = open_checkpoint(tmp_path / "small")
    import hashlib

    for e in s.table:
        w = np.asarray(weights[e.path], np.float32)
        if e.quantized or e.name == "embeddings":
            q, sc = spec3(w, axis=-2 if e.quantized else -1)
            assert d_small[(e.path, "weight")] == hashlib.sha256(q.tobytes()).hexdigest(), e.path
            assert d_small[(e.path, "scales")] == hashlib.sha256(sc.tobytes()).hexdigest(), e.path
