"""Tokenizer lookup (local paths) and the real SLNCX SentencePiece model."""

import pytest

from slncx_tools.tokenizer import Tokenizer, TokenizerError, find_tokenizer, load_tokenizer


def test_lookup_order(tmp_path, monkeypatch):
    monkeypatch.delenv("TOKENIZER_URL", raising=False)
    ckpt = tmp_path / "model" / "ckpt-0"
    ckpt.mkdir(parents=True)
    with pytest.raises(TokenizerError, match="--tokenizer PATH.*TOKENIZER_URL.*--tokens"):
        find_tokenizer(ckpt)
    beside = tmp_path / "model" / "tokenizer.model"
    beside.write_bytes(b"x")
    assert find_tokenizer(ckpt) == beside  # in the checkpoint's parent
    inside = ckpt / "tokenizer.model"
    inside.write_bytes(b"x")
    assert find_tokenizer(ckpt) == inside  # the checkpoint directory wins
    explicit = tmp_path / "other.model"
    explicit.write_bytes(b"x")
    assert find_tokenizer(ckpt, explicit) == explicit  # --tokenizer wins
    with pytest.raises(TokenizerError, match="no such file"):
        find_tokenizer(ckpt, tmp_path / "missing.model")


def test_not_a_sentencepiece_model(tmp_path):
    bad = tmp_path / "tokenizer.model"
    bad.write_bytes(b"not a model")
    with pytest.raises(TokenizerError, match="not a SentencePiece model"):
        Tokenizer(bad)


def test_real_tokenizer(tokenizer_path):
    tok = Tokenizer(tokenizer_path)
    assert tok.vocab_size == 131072 and tok.pad_id == 0 and tok.eos_id == 2
    ids = tok.encode("Hello world")
    assert ids and ids[0] != 1  # no BOS
    assert tok.decode(ids + [tok.eos_id]) == "Hello world"
    with pytest.raises(TokenizerError, match="do not belong together"):
        load_tokenizer(explicit=tokenizer_path, vocab_size=512)
