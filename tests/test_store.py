"""The store format: plain zarr3 arrays any TensorStore reader opens, a manifest, SHA-256 of logical bytes."""

import hashlib
import json

import numpy as np
import pytest
import tensorstore as ts

from slncx_tools import store as st
from slncx_tools.checkpoint import open_checkpoint
from slncx_tools.convert import QuantizeOptions, quantize_checkpoint
from slncx_tools.errors import FormatError, StructureError
from slncx_tools.quant import BF16, QuantizedArray
from slncx_tools.release import ReleaseCheckpoint


@pytest.fixture(scope="module")
def tiny_store(tiny_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("store") / "s"
    quantize_checkpoint(tiny_dir / "release_layout", out)
    return out


def test_manifest_schema(tiny_store, tiny_dir):
    raw = (tiny_store / st.MANIFEST).read_text()
    m = json.loads(raw)
    assert m["format"] == "slncx-store" and m["format_version"] == 1
    assert list(m)[-1] == "complete" and m["complete"] is True
    assert m["tool"]["name"] == "slncx-tools"
    assert len(m["tensors"]) == 146 and len(m["source"]["files"]) == 146
    src = tiny_dir / "release_layout" / "ckpt-0" / "tensor00002_000"
    assert m["source"]["files"]["tensor00002_000"] == hashlib.sha256(src.read_bytes()).hexdigest()
    rec = {r["path"]: r for r in m["tensors"]}
    moe = rec["params/transformer/decoder_layer_0/moe/linear_1/w"]
    assert moe["storage"] == {"kind": "int8", "blocks": 8, "scale_dtype": "bfloat16"}
    assert moe["partition"] == [None, "model", "data"]
    assert moe["arrays"]["weight"]["key"] == "params/transformer/decoder_layer_0/moe/linear_1/w/weight"
    assert moe["arrays"]["weight"]["chunks"] == [1, 6, 32]  # expert dim 1, model-sharded dim / 8
    emb = rec["params/language_model/in_out_embed/embeddings"]
    assert emb["storage"] == {"kind": "float", "dtype": "float32"}
    assert emb["partition"] == [None, ["data", "model"]]


def test_plain_tensorstore_reads_arrays_and_sha256_is_of_logical_bytes(tiny_store, tiny_dir):
    m = json.loads((tiny_store / st.MANIFEST).read_text())
    rel = ReleaseCheckpoint(tiny_dir / "release_layout")
    by_path = {e.path: e for e in rel.table}
    for rec in m["tensors"][:20]:
        for part, info in rec["arrays"].items():
            a = ts.open({"driver": "zarr3", "kvstore": {"driver": "file", "path": str(tiny_store / info["key"])}}).result()
            data = a.read().result()
            expected = rel.read_part(by_path[rec["path"]], part)
            assert data.dtype == expected.dtype and data.shape == expected.shape
            assert data.tobytes() == expected.tobytes()
            assert hashlib.sha256(np.ascontiguousarray(expected).tobytes()).hexdigest() == info["sha256"]


def test_store_reading_interface(tiny_store, tiny_dir):
    s = open_checkpoint(tiny_store)
    rel = ReleaseCheckpoint(tiny_dir / "release_layout")
    assert s.kind == "store" and s.config == rel.config and s.table == rel.table
    e = rel.table[3]  # moe/linear_1/w, R = 8
    v = s.read(e)
    assert isinstance(v, QuantizedArray) and v.scales.dtype == BF16 and s.blocks(e) == 8
    slab = s.read_part(e, "weight", (slice(2, 3), slice(8, 16)))
    np.testing.assert_array_equal(slab, rel.read_part(e, "weight", (slice(2, 3), slice(8, 16))))
    assert s.bytes_read > 0
    assert s.stored(e) == {"dtype": "int8", "quant": "int8 R=8 (bfloat16 scales)", "bytes": 8 * 48 * 32 + 2 * 8 * 8 * 32}
    assert s.problems() == []


def test_incomplete_store_refused(tiny_store, tmp_path):
    m = json.loads((tiny_store / st.MANIFEST).read_text())
    m["complete"] = False
    bad = tmp_path / "bad"
    bad.mkdir()
    st.write_manifest(bad, m)
    with pytest.raises(StructureError, match="incomplete store"):
        open_checkpoint(bad)
    assert not st.open_store(bad, allow_incomplete=True).complete


def test_compression_and_chunks():
    assert st.parse_compression("none") == {"codec": "none"}
    assert st.parse_compression("zstd") == {"codec": "zstd", "level": 1}
    assert st.parse_compression("zstd:9") == {"codec": "zstd", "level": 9}
    with pytest.raises(FormatError):
        st.parse_compression("gzip")
    # SLNCX shapes: chunk along the model-sharded dim, expert dim 1, ≤ 32 MiB
    assert st.default_chunks((8, 6144, 32768), (None, "data", "model"), np.int8) == (1, 6144, 4096)
    assert st.default_chunks((8, 32768, 6144), (None, "model", "data"), np.int8) == (1, 4096, 6144)
    assert st.default_chunks((131072, 6144), (None, ("data", "model")), np.float32) == (8192, 768)


def test_uncompressed_store_same_digests(tiny_dir, tiny_store, tmp_path):
    quantize_checkpoint(tiny_dir / "release_layout", tmp_path / "raw", QuantizeOptions(compression="none"))
    a = json.loads((tiny_store / st.MANIFEST).read_text())["tensors"]
    b = json.loads((tmp_path / "raw" / st.MANIFEST).read_text())["tensors"]
    assert [r["arrays"] for r in a] == [r["arrays"] for r in b]


def test_array_writer_async_hash_and_fsync_at_close(tmp_path, monkeypatch):
    """Chunk files are written without TensorStore's per-file fsync; close() fsyncs every file and
    directory of the array (and the directories above it) before it returns the digest."""
    synced = []
    real = st._fsync_path
    monkeypatch.setattr(st, "_fsync_path", lambda p, directory=False: (synced.append(str(p)), real(p, directory))[1])
    x = np.arange(64 * 32, dtype=np.float32).reshape(64, 32)
    w = st.ArrayWriter(tmp_path, "a/b/weight", x.shape, x.dtype, (16, 32), max_in_flight=3, max_in_flight_bytes=1)
    assert w.array.spec(retain_context=True).to_json()["kvstore"]["file_io_sync"] is False
    for i in range(4):
        w.write((slice(16 * i, 16 * i + 16), slice(None)), x[16 * i : 16 * i + 16])
    assert synced == []
    digest = w.close()
    assert digest == hashlib.sha256(x.tobytes()).hexdigest()
    files = {str(p) for p in (tmp_path / "a/b/weight").rglob("*") if p.is_file()}
    assert len(files) == 5 and files <= set(synced)  # 4 chunks + zarr.json
    for d in ("a/b/weight", "a/b", "a", ""):
        assert str(tmp_path / d).rstrip("/") in {s.rstrip("/") for s in synced}, d
    np.testing.assert_array_equal(st.open_array(tmp_path, "a/b/weight").read().result(), x)
    keep = st.ArrayWriter(tmp_path, "c", (4,), np.int8, (4,), fsync_each_write=True)
    assert keep.array.spec(retain_context=True).to_json()["kvstore"]["file_io_sync"] is True
    keep.write((slice(None),), np.ones(4, np.int8))
    keep.close()


def test_complete_flag_only_after_every_array_is_synced(tiny_dir, tmp_path, monkeypatch):
    synced, bad = set(), []
    real_sync, real_manifest = st.sync_tree, st.write_manifest

    def sync_tree(root, key):
        real_sync(root, key)
        synced.add(key)

    def write_manifest(root, manifest):
        if manifest.get("complete"):
            keys = {a["key"] for r in manifest["tensors"] for a in r["arrays"].values()}
            bad.extend(sorted(keys - synced))
        real_manifest(root, manifest)

    monkeypatch.setattr(st, "sync_tree", sync_tree)
    monkeypatch.setattr(st, "write_manifest", write_manifest)
    quantize_checkpoint(tiny_dir / "release_layout", tmp_path / "s")
    assert json.loads((tmp_path / "s" / st.MANIFEST).read_text())["complete"] is True
    assert len(synced) == 146 + 84 and bad == []
