import math

import pytest

from slncx_tools.config import SLNCX, TINY, ModelConfig, ffn_size, infer_config
from slncx_tools.errors import ConfigError
from slncx_tools.params import num_files, param_table, total_params


def test_ffn_size_formula():
    assert ffn_size(6144, 8) == 32768
    assert ffn_size(32, 2) == 48  # int(64)*2//3 = 42 -> rounded up to 48
    assert SLNCX.ffn_size == 32768 and TINY.ffn_size == 48
    for d, wf in [(100, 3.3), (128, 8), (6144, 8), (17, 1.0)]:
        f = ffn_size(d, wf)
        assert f % 8 == 0 and 0 <= f - int(wf * d) * 2 // 3 < 8


def test_slncx_preset_matches_spec():
    c = SLNCX
    assert (c.vocab_size, c.emb_size, c.num_layers, c.num_q_heads, c.num_kv_heads, c.key_size) == (
        131072, 6144, 64, 48, 8, 128)
    assert (c.num_experts, c.num_selected_experts, c.sequence_len) == (8, 2, 8192)
    assert c.attn_output_multiplier == pytest.approx(1 / math.sqrt(128))
    assert c.embedding_multiplier_scale == 78.38367176906169
    assert c.output_multiplier_scale == 0.5773502691896257


def test_slncx_table_count_order_and_total():
    table = param_table(SLNCX)
    assert len(table) == num_files(SLNCX) == 770
    assert total_params(SLNCX) == 315_684_820_992
    assert [e.index for e in table] == list(range(770))
    assert table[0].path == "params/language_model/in_out_embed/embeddings"
    assert table[1].path == "params/language_model/rms_norm/scale"
    assert table[14].path == "params/transformer/decoder_layer_1/moe/linear/w"
    assert table[26].path == "params/transformer/decoder_layer_10/moe/linear/w"
    # string order: 0, 1, 10..19, 2, 20..29, ...
    assert table[2 + 12 * 12].path.startswith("params/transformer/decoder_layer_2/")
    assert table[-1].path == "params/transformer/decoder_layer_9/router/w"
    e = table[3]
    assert e.name == "moe/linear_1/w" and e.shape == (8, 32768, 6144) and e.release_blocks == 8
    assert e.partition == (None, "model", "data")
    assert table[0].partition == (None, ("data", "model"))


def test_release_bytes_match_spec_total():
    # SPEC §1: 318,239,694,848 bytes in 770 files: exactly the int8 values, bf16 scales (R = 8
    # for the row-parallel weights, 1 for the rest) and float32 tensors of the table.
    assert sum(e.release_nbytes() for e in param_table(SLNCX)) == 318_239_694_848


def test_table_agrees_with_fixture_manifest(tiny_dir):
    import json

    manifest = json.loads((tiny_dir / "manifest.json").read_text())
    table = param_table(TINY)
    assert len(table) == len(manifest["params"])
    for entry, p in zip(table, manifest["params"]):
        assert entry.index == p["index"] and entry.path == p["path"] and list(entry.shape) == p["shape"]
        assert entry.quantized == p["quantized"]
        spec = [tuple(a) if isinstance(a, list) else a for a in p["partition_spec"]]
        assert list(entry.partition) == spec
        if entry.quantized:
            assert list(entry.scales_shape(entry.release_blocks)) == p["stored"]["scales"]["shape"]


def test_infer_config_prefers_presets_and_handles_custom():
    assert infer_config(vocab_size=512, emb_size=32, num_layers=12, q_width=128, kv_width=64, ffn=48, num_experts=8) == TINY
    c = infer_config(vocab_size=1000, emb_size=256, num_layers=3, q_width=512, kv_width=256, ffn=688, num_experts=4)
    assert (c.num_q_heads, c.num_kv_heads, c.key_size, c.ffn_size, c.num_experts) == (4, 2, 128, 688, 4)


def test_config_validation_and_roundtrip():
    with pytest.raises(ConfigError, match="multiple"):
        TINY.replace(num_q_heads=12, num_kv_heads=8)
    assert ModelConfig.from_dict(TINY.to_dict()) == TINY
    with pytest.raises(ConfigError, match="unknown"):
        ModelConfig.from_dict({**TINY.to_dict(), "bogus": 1})
