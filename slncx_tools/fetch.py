"""Resumable, verified single-file downloads.

One file is received into `<dest>.incomplete`, hashed while the bytes arrive, checked against the
expected size and SHA-256, and renamed onto `dest` only when it is right. An interrupted transfer
(Ctrl-C, kill -9, a dropped connection) leaves the `.incomplete` file; the next attempt, in this run
or a later one, re-reads that prefix to rebuild the hash state (a local read, much faster than the
network) and asks the source for the rest with an HTTP `Range` request.

The transfer loop (`fetch_from`) does not know HTTP: it pulls bytes from an *opener*, a function
`opener(offset)` that returns a context manager yielding `(start, chunks)` — where the chunks really
begin (`offset`, or 0 when the source ignored the range) and an iterable of byte strings. It raises
`TransientError` for what is worth retrying (connection reset, 5xx) and a `DownloadError` otherwise.
`http_opener` is the HTTP one; another source (a torrent, a mirror) only has to provide its own.

HTTP goes through `huggingface_hub`'s shared client (`get_session()`, httpx2 in 2.4.0), so proxies,
offline mode (`HF_HUB_OFFLINE`) and TLS settings are the same for the hub listing and the bytes.

`cached_download(url, sha256=...)` is the download-once-then-offline helper (the tokenizer uses it).
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ContextManager, Optional

from .errors import ChecksumError, DownloadError
from .progress import ProgressFn

log = logging.getLogger(__name__)

INCOMPLETE_SUFFIX = ".incomplete"
RETRIES = 6  # consecutive failed attempts (no byte received) before giving up on a file
BACKOFF_BASE = 1.0  # seconds before the first retry; doubles each time (tests make it tiny)
BACKOFF_MAX = 30.0
HASH_BLOCK = 8 << 20

Opener = Callable[[int], ContextManager[tuple]]


class TransientError(Exception):
    """A failure worth retrying after a pause: connection reset, timeout, 408/429/5xx."""


class AccessError(DownloadError):
    """The server refused for a reason retrying cannot fix (401/403/404): stop the whole job."""

    def __init__(self, message: str, status: int):
        super().__init__(message)
        self.status = status


class Cancelled(DownloadError):
    """The caller asked to stop (another file failed fatally, or Ctrl-C); the partial file is kept."""


@dataclass
class FetchResult:
    path: Path
    size: int
    sha256: str
    received: int  # bytes that came over the network in this call
    resumed_from: int  # bytes of an existing .incomplete file that were reused (0: fresh start)
    attempts: int  # requests made (1 when nothing went wrong)


def incomplete_path(dest) -> Path:
    dest = Path(dest)
    return dest.with_name(dest.name + INCOMPLETE_SUFFIX)


def backoff_delay(failures: int) -> float:
    """Seconds to wait after the `failures`-th consecutive failure (exponential, capped)."""
    return min(BACKOFF_MAX, BACKOFF_BASE * 2 ** (failures - 1))


def git_blob_sha1(size: int):
    """A hasher for git's blob id (what the hub lists as `blobId` for a non-LFS file)."""
    h = hashlib.sha1()
    h.update(b"blob %d\0" % size)
    return h


def hash_file(path, *, size: Optional[int] = None, stop: Optional[threading.Event] = None) -> tuple:
    """(sha256 hex, git blob sha1 hex) of a local file, read in blocks."""
    path = Path(path)
    h256 = hashlib.sha256()
    hgit = git_blob_sha1(path.stat().st_size if size is None else size)
    with open(path, "rb") as f:
        while block := f.read(HASH_BLOCK):
            if stop is not None and stop.is_set():
                raise Cancelled(f"{path}: stopped")
            h256.update(block)
            hgit.update(block)
    return h256.hexdigest(), hgit.hexdigest()


def fetch_from(
    opener: Opener,
    dest,
    *,
    size: Optional[int] = None,
    sha256: Optional[str] = None,
    git_sha1: Optional[str] = None,
    progress: Optional[ProgressFn] = None,
    stop: Optional[threading.Event] = None,
    retries: Optional[int] = None,
    name: Optional[str] = None,
) -> FetchResult:
    """Receive one file from `opener` into `dest`, resuming `dest.incomplete` if present.

    Verifies `size`, `sha256` and/or `git_sha1` when given (a mismatch deletes the partial file and
    raises ChecksumError) and renames onto `dest` atomically. Retries TransientError with exponential
    backoff; the count resets whenever an attempt delivered bytes. `progress(done, size, name)` is
    called with the file's byte position (it can go back to 0 if the source ignores the range).
    """
    dest = Path(dest)
    name = name or dest.name
    sha256 = sha256 or None  # an unset pin ("" from an empty environment variable) means no pin
    retries = RETRIES if retries is None else retries
    partial = incomplete_path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    report = progress or (lambda done, total, message="": None)

    fd = os.open(partial, os.O_RDWR | os.O_CREAT, 0o644)
    with os.fdopen(fd, "r+b") as f:
        offset = f.seek(0, os.SEEK_END)
        if size is not None and offset > size:
            log.info("%s: partial file is longer than the file (%d > %d); starting over", name, offset, size)
            f.truncate(0)
            offset = 0
        # Rebuild the hash state from the bytes already on disk (the price of resuming: a local read).
        h256 = hashlib.sha256()
        hgit = git_blob_sha1(size) if git_sha1 is not None and size is not None else None
        f.seek(0)
        remaining = offset
        while remaining:
            block = f.read(min(HASH_BLOCK, remaining))
            if not block:
                raise DownloadError(f"{partial}: could not re-read the partial file")
            h256.update(block)
            if hgit is not None:
                hgit.update(block)
            remaining -= len(block)
        resumed_from = offset
        if offset:
            log.info("%s: resuming at byte %d", name, offset)
        report(offset, size or 0, name)

        received = attempts = failures = 0
        # When the partial file already holds every byte, only the checks below remain.
        while not (attempts == 0 and size is not None and offset == size and offset > 0):
            if stop is not None and stop.is_set():
                raise Cancelled(f"{name}: stopped at byte {offset}; rerun to resume")
            attempts += 1
            got = 0
            try:
                with opener(offset) as (start, chunks):
                    if start != offset:
                        log.warning("%s: the server ignored the range request; restarting from byte %d", name, start)
                        if start != 0:
                            raise DownloadError(f"{name}: server answered from byte {start}, asked for {offset}")
                        f.seek(0)
                        f.truncate(0)
                        offset = 0
                        h256 = hashlib.sha256()
                        hgit = git_blob_sha1(size) if hgit is not None else None
                    f.seek(offset)
                    for chunk in chunks:
                        if not chunk:
                            continue
                        f.write(chunk)
                        h256.update(chunk)
                        if hgit is not None:
                            hgit.update(chunk)
                        offset += len(chunk)
                        got += len(chunk)
                        received += len(chunk)
                        report(offset, size or 0, name)
                        if size is not None and offset > size:
                            break
                        if stop is not None and stop.is_set():
                            raise Cancelled(f"{name}: stopped at byte {offset}; rerun to resume")
                if size is None or offset >= size or not got:
                    break  # complete, or the source has nothing after `offset`: the checks below decide
                raise TransientError(f"connection closed at byte {offset} of {size}")  # resume from here
            except AccessError as e:
                raise AccessError(f"{name}: {e}", e.status) from None
            except TransientError as e:
                failures = 1 if got else failures + 1
                if failures > retries:
                    f.flush()
                    raise DownloadError(
                        f"{name}: {e}; gave up after {retries} retries "
                        f"({offset:,} of {size if size is not None else '?'} bytes kept in {partial}; rerun to resume)"
                    ) from None
                delay = backoff_delay(failures)
                log.warning("%s: %s; retrying in %.1f s (attempt %d)", name, e, delay, failures)
                f.flush()
                if stop is not None:
                    if stop.wait(delay):
                        raise Cancelled(f"{name}: stopped at byte {offset}; rerun to resume") from None
                else:
                    time.sleep(delay)
        f.flush()
        os.fsync(f.fileno())

    def reject(what: str) -> ChecksumError:
        partial.unlink(missing_ok=True)
        return ChecksumError(f"{name}: {what}; the bad download was deleted ({partial}), rerun to fetch it again")

    if size is not None and offset != size:
        raise reject(f"received {offset:,} bytes, the hub lists {size:,}")
    digest = h256.hexdigest()
    if sha256 is not None and digest != sha256.lower():
        raise reject(f"SHA-256 {digest} does not match the expected {sha256.lower()}")
    if hgit is not None and hgit.hexdigest() != git_sha1.lower():
        raise reject(f"git blob id {hgit.hexdigest()} does not match the expected {git_sha1.lower()}")
    os.replace(partial, dest)
    return FetchResult(dest, offset, digest, received, resumed_from, attempts)


# --- HTTP ---------------------------------------------------------------------------------------

_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")


def _status_message(status: int, url: str, response_headers) -> str:
    detail = response_headers.get("X-Error-Message") or ""
    detail = f" ({detail})" if detail else ""
    if status in (401, 403):
        return (
            f"HTTP {status}{detail} for {url}: access denied — the token is missing, wrong, or lacks access "
            "to this repo (pass --token or set HF_TOKEN; for a gated repo, accept its terms on the hub first)"
        )
    if status == 404:
        return f"HTTP 404{detail} for {url}: not found (check the repo, the revision and the file name)"
    return f"HTTP {status}{detail} for {url}"


def http_opener(url: str, headers: Optional[dict] = None, *, timeout: Optional[float] = None) -> Opener:
    """An opener for `fetch_from` that GETs `url` from `offset` with a Range request.

    Redirects are followed (the hub answers with a 302 to its CDN; httpx drops the Authorization
    header when the redirect leaves the origin). 408/429/5xx and connection errors are transient;
    401/403/404 raise AccessError; anything else DownloadError.
    """

    @contextmanager
    def opener(offset: int):
        import httpx2
        from huggingface_hub import constants
        from huggingface_hub.errors import OfflineModeIsEnabled
        from huggingface_hub.utils import get_session

        request_headers = dict(headers or {})
        request_headers["Accept-Encoding"] = "identity"  # sizes and ranges are about the stored bytes
        if offset:
            request_headers["Range"] = f"bytes={offset}-"
        t = constants.HF_HUB_DOWNLOAD_TIMEOUT if timeout is None else timeout
        try:
            with get_session().stream("GET", url, headers=request_headers, timeout=t, follow_redirects=True) as response:
                status = response.status_code
                start = offset
                if status == 206:
                    m = _CONTENT_RANGE.match(response.headers.get("Content-Range", ""))
                    start = int(m.group(1)) if m else 0
                elif status == 200:
                    start = 0
                elif status == 416:  # nothing left after `offset`: the partial file is complete (or too long)
                    yield offset, ()
                    return
                elif status in (408, 429) or status >= 500:
                    raise TransientError(f"HTTP {status} from {response.url}")
                elif status in (401, 403, 404):
                    raise AccessError(_status_message(status, url, response.headers), status)
                else:
                    raise DownloadError(_status_message(status, url, response.headers))

                def chunks():
                    try:
                        yield from response.iter_bytes()
                    except httpx2.TransportError as e:  # reset, timeout, body shorter than Content-Length
                        raise TransientError(f"{type(e).__name__}: {e}") from None

                yield start, chunks()
        except httpx2.TransportError as e:
            raise TransientError(f"{type(e).__name__}: {e}") from None
        except OfflineModeIsEnabled as e:
            raise DownloadError(f"cannot fetch {url}: offline mode is on (HF_HUB_OFFLINE); {e}") from None

    return opener


def fetch_url(
    url: str,
    dest,
    *,
    sha256: Optional[str] = None,
    size: Optional[int] = None,
    headers: Optional[dict] = None,
    progress: Optional[ProgressFn] = None,
) -> Path:
    """Download `url` to `dest` (resumable via `dest.incomplete`, verified, atomic); returns `dest`."""
    return fetch_from(http_opener(url, headers), dest, size=size, sha256=sha256, progress=progress).path


# --- user cache -----------------------------------------------------------------------------------


def cache_root(cache_dir=None) -> Path:
    """`cache_dir`, else $SLNCX_CACHE, else $XDG_CACHE_HOME/slncx-tools, else ~/.cache/slncx-tools."""
    if cache_dir is not None:
        return Path(cache_dir)
    if os.environ.get("SLNCX_CACHE"):
        return Path(os.environ["SLNCX_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "slncx-tools"


def cached_path(url: str, cache_dir=None) -> Path:
    """Where `cached_download` keeps `url`: <root>/downloads/<sha256(url)[:16]>/<basename>."""
    key = hashlib.sha256(url.encode()).hexdigest()[:16]
    base = url.split("?", 1)[0].rstrip("/").rsplit("/", 1)[-1] or "download"
    return cache_root(cache_dir) / "downloads" / key / base


def cached_download(
    url: str,
    *,
    sha256: Optional[str] = None,
    cache_dir=None,
    headers: Optional[dict] = None,
    progress: Optional[ProgressFn] = None,
) -> Path:
    """Download `url` once into the user cache and return the cached path; later calls make no request.

    The SHA-256 of what was received is stored next to the file (`<file>.sha256`). When `sha256` is
    given it is checked on download, and a cached copy recorded with another digest is fetched again
    (the pin changed). A failed or interrupted download never leaves a file at the returned path.
    """
    sha256 = sha256 or None  # e.g. os.environ.get("TOKENIZER_SHA256") set to ""
    path = cached_path(url, cache_dir)
    sidecar = path.with_name(path.name + ".sha256")
    if path.exists() and sidecar.exists():
        recorded = sidecar.read_text().split()[0] if sidecar.read_text().strip() else ""
        if sha256 is None or recorded == sha256.lower():
            log.debug("%s: cached at %s", url, path)
            return path
        log.info("%s: cached copy has SHA-256 %s, expected %s; downloading again", url, recorded, sha256)
        path.unlink()
    result = fetch_from(http_opener(url, headers), path, sha256=sha256, progress=progress, name=url)
    tmp = sidecar.with_name(sidecar.name + ".tmp")
    tmp.write_text(f"{result.sha256}  {path.name}\n")
    os.replace(tmp, sidecar)
    return path
