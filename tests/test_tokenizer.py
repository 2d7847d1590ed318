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


def test_tokenizer_url_downloads_once_then_works_offline(tmp_path, monkeypatch):
    """TOKENIZER_URL: first use downloads into the cache (through a loopback hub with a CDN
    redirect); second use makes no request; a broken transfer never leaves a cached file."""
    import hashlib

    import huggingface_hub.constants as c

    from slncx_tools import fetch
    from slncx_tools.embedded import embedded_dir
    from slncx_tools.localhub import HubServer

    monkeypatch.setattr(c, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(fetch, "BACKOFF_BASE", 0.01)
    monkeypatch.setattr(fetch, "RETRIES", 0)
    data = (embedded_dir() / "tokenizer.model").read_bytes()
    monkeypatch.setenv("SLNCX_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("TOKENIZER_SHA256", hashlib.sha256(data).hexdigest())
    ckpt = tmp_path / "model" / "ckpt-0"  # nothing beside it
    ckpt.mkdir(parents=True)
    with HubServer({"tokenizer.model": data}, repo="slncx/tok") as hub:
        monkeypatch.setenv("TOKENIZER_URL", f"{hub.url}/slncx/tok/resolve/main/tokenizer.model")
        hub.faults.drop_after["tokenizer.model"] = 1000  # the first transfer breaks off
        with pytest.raises(Exception):
            load_tokenizer(ckpt)
        cached = list((tmp_path / "cache").rglob("tokenizer.model"))
        assert cached == [], "a truncated download must not look cached"
        tok = load_tokenizer(ckpt)  # resumes and completes
        assert tok.encode("def f():\n    return 1\n") and tok.vocab_size == 4096
        served = hub.total_served()
    tok2 = load_tokenizer(ckpt)  # hub stopped: served from the cache, no network
    assert tok2.path == tok.path and served == len(data)  # the resume did not restart from zero
