"""fetch_url / cached_download (what the tokenizer uses for TOKENIZER_URL) against the loopback hub."""

import hashlib

import pytest

from slncx_tools.localhub import HubServer
from slncx_tools import fetch
from slncx_tools.errors import ChecksumError, DownloadError

NAME = "tokenizer.model"
DATA = bytes(range(256)) * 300  # 76,800 bytes
SHA = hashlib.sha256(DATA).hexdigest()


@pytest.fixture(autouse=True)
def fast_retries(monkeypatch):
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(fetch, "BACKOFF_BASE", 0.01)


@pytest.fixture
def server():
    with HubServer({NAME: DATA, "notes.txt": b"plain\n"}) as s:
        yield s


def url(server, name=NAME):
    return f"{server.url}/{server.repo}/resolve/main/{name}"  # a 302 to the CDN origin, like the real hub


def test_cached_download_once_then_offline(server, tmp_path):
    first = fetch.cached_download(url(server), sha256=SHA, cache_dir=tmp_path)
    assert first.read_bytes() == DATA and first.is_relative_to(tmp_path)
    assert first.with_name(NAME + ".sha256").read_text() == f"{SHA}  {NAME}\n"
    n = len(server.requests)
    assert fetch.cached_download(url(server), sha256=SHA, cache_dir=tmp_path) == first
    assert len(server.requests) == n  # no request at all
    server.stop()
    assert fetch.cached_download(url(server), sha256=SHA, cache_dir=tmp_path).read_bytes() == DATA
    assert fetch.cached_download(url(server), cache_dir=tmp_path) == first  # no pin: any recorded copy


def test_cache_location_from_environment(server, tmp_path, monkeypatch):
    monkeypatch.delenv("SLNCX_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert fetch.cache_root() == tmp_path / "xdg" / "slncx-tools"
    monkeypatch.setenv("SLNCX_CACHE", str(tmp_path / "mine"))
    path = fetch.cached_download(url(server), sha256=SHA)
    assert path.is_relative_to(tmp_path / "mine") and path.name == NAME


def test_truncated_download_is_not_left_in_the_cache_and_resumes(server, tmp_path, monkeypatch):
    monkeypatch.setattr(fetch, "RETRIES", 0)
    server.faults.drop_after[NAME] = 30_000
    with pytest.raises(DownloadError, match="gave up after 0 retries"):
        fetch.cached_download(url(server), sha256=SHA, cache_dir=tmp_path)
    target = fetch.cached_path(url(server), tmp_path)
    assert not target.exists()  # only the .incomplete prefix, never at the cached path
    assert fetch.incomplete_path(target).stat().st_size == 30_000

    assert fetch.cached_download(url(server), sha256=SHA, cache_dir=tmp_path).read_bytes() == DATA
    assert server.gets(NAME)[-1] == ("bytes=30000-", 206)
    assert server.bytes_served[NAME] == len(DATA)  # the second call fetched only the rest


def test_wrong_pin_leaves_nothing_and_a_new_pin_refetches(server, tmp_path):
    with pytest.raises(ChecksumError, match="does not match the expected 0000"):
        fetch.cached_download(url(server), sha256="0" * 64, cache_dir=tmp_path)
    target = fetch.cached_path(url(server), tmp_path)
    assert not target.exists() and not fetch.incomplete_path(target).exists()

    fetch.cached_download(url(server), cache_dir=tmp_path)  # unpinned
    served = server.bytes_served[NAME]
    fetch.cached_download(url(server), sha256=SHA, cache_dir=tmp_path)  # same digest: no refetch
    assert server.bytes_served[NAME] == served
    target.with_name(NAME + ".sha256").write_text(f"{'1' * 64}  {NAME}\n")  # a copy recorded with another digest
    assert fetch.cached_download(url(server), sha256=SHA, cache_dir=tmp_path).read_bytes() == DATA
    assert server.bytes_served[NAME] == served + len(DATA)


def test_fetch_url_verifies_size_and_reports_http_errors(server, tmp_path):
    dest = fetch.fetch_url(url(server, "notes.txt"), tmp_path / "n.txt", size=6)
    assert dest.read_bytes() == b"plain\n"
    with pytest.raises(ChecksumError, match="received 6 bytes, the hub lists 7"):
        fetch.fetch_url(url(server, "notes.txt"), tmp_path / "m.txt", size=7)
    assert not (tmp_path / "m.txt").exists() and not (tmp_path / "m.txt.incomplete").exists()
    with pytest.raises(fetch.AccessError, match="HTTP 404"):
        fetch.fetch_url(url(server, "missing.bin"), tmp_path / "x")
    server.faults.fail[NAME] = 2
    assert fetch.fetch_url(url(server), tmp_path / "t", sha256=SHA).read_bytes() == DATA
    assert [s for _, s in server.gets(NAME)] == [500, 500, 200]


def test_fetch_from_any_source(tmp_path):
    """The transfer loop knows nothing of HTTP: a source is an opener(offset) -> (start, chunks)."""
    from contextlib import contextmanager

    calls = []

    @contextmanager
    def opener(offset):
        calls.append(offset)
        if len(calls) == 1:  # first attempt: half the bytes, then a "connection reset"
            def chunks():
                yield DATA[:1000]
                raise fetch.TransientError("reset")
            yield 0, chunks()
        else:
            yield offset, [DATA[offset:]]

    r = fetch.fetch_from(opener, tmp_path / "f", size=len(DATA), sha256=SHA)
    assert calls == [0, 1000] and r.received == len(DATA) and r.attempts == 2 and r.path.read_bytes() == DATA
