"""`download`: fetch a released checkpoint (ckpt-0) from the model hub, resumable and verified.

`huggingface_hub` does the hub protocol: the file list with each file's size and LFS SHA-256
(`HfApi.model_info(files_metadata=True)`), the commit a revision resolves to, auth headers and the
endpoint (`--endpoint`, `HF_ENDPOINT`, `HF_TOKEN`, the stored login, `HF_HUB_OFFLINE`), and the
resolve URLs. What 2.4.0 does not do and a 318 GB download needs is added here and in `fetch`
(see ../shared/HUB.md): SHA-256 computed while the bytes arrive, resume across runs from the
`.incomplete` file with a Range request, retries with backoff on 5xx and dropped connections, a disk
check before starting, and explicit failures (an API error is never mistaken for "already there").

The pieces:
  Source      where files come from: `describe()`, `list_files()` -> [RemoteFile] (path, size,
              sha256, git blob id) and `opener(file)` -> a byte-range opener for `fetch.fetch_from`.
              `HubSource` is the hub; a torrent or mirror source would implement the same three.
  plan()      what to do with each selected file: skip (complete and recorded), verify (present,
              not recorded: hash locally), resume (.incomplete present), fetch; bytes needed; free space.
  download()  runs a plan over `workers` threads, records each verified file's SHA-256 in a journal
              (so a rerun skips it without re-hashing), writes `SHA256SUMS` per top-level directory and
              runs the structural check when the files form a complete ckpt-0.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Optional, Protocol, Sequence

from . import fetch
from .disk import free_bytes, read_sha256sums
from .errors import ChecksumError, DiskSpaceError, DownloadError, SlncxError
from .progress import ProgressFn

log = logging.getLogger(__name__)

DEFAULT_REPO = "xai-org/slncx"
DEFAULT_REVISION = "main"
DEFAULT_INCLUDE = ("ckpt-0/*",)
CKPT_DIR = "ckpt-0"
SUMS_NAME = "SHA256SUMS"
JOURNAL_NAME = ".slncx-download.sha256"  # in dest: sha256sum lines, repo-relative paths


@dataclass(frozen=True)
class RemoteFile:
    path: str  # repo-relative, "/"-separated
    size: int
    sha256: Optional[str]  # LFS files: the content's SHA-256
    git_sha1: Optional[str] = None  # small (non-LFS) files: git's blob id, checked instead


class Source(Protocol):
    def describe(self) -> str: ...

    def list_files(self) -> list: ...

    def opener(self, file: RemoteFile) -> fetch.Opener: ...


# --- the hub ----------------------------------------------------------------------------------------


def _hub_error(e: Exception, what: str) -> SlncxError:
    """Turn a huggingface_hub / httpx2 exception into a one-line DownloadError."""
    from huggingface_hub import errors as hf

    status = getattr(getattr(e, "response", None), "status_code", None)
    server = ""
    response = getattr(e, "response", None)
    if response is not None and response.headers.get("X-Error-Message"):
        server = f" (hub says: {response.headers['X-Error-Message']})"
    if isinstance(e, hf.RevisionNotFoundError):
        return DownloadError(f"{what}: revision not found{server}; check --revision (a branch, tag or commit)")
    if isinstance(e, hf.GatedRepoError) or status in (401, 403) and not isinstance(e, hf.RepositoryNotFoundError):
        return DownloadError(
            f"{what}: access denied (HTTP {status}){server}; the token is missing, wrong or lacks access — "
            "pass --token or set HF_TOKEN (or `hf auth login`), and accept the model's terms on the hub"
        )
    if isinstance(e, hf.RepositoryNotFoundError):
        return DownloadError(
            f"{what}: repository not found (HTTP {status}){server}; check --repo and --endpoint "
            "(a private repo also answers this way without a valid token: pass --token or set HF_TOKEN)"
        )
    if isinstance(e, hf.OfflineModeIsEnabled):
        return DownloadError(f"{what}: offline mode is on (HF_HUB_OFFLINE is set); unset it to download")
    if status is not None:
        return DownloadError(f"{what}: HTTP {status}{server}")
    return DownloadError(f"{what}: {type(e).__name__}: {e}")


class HubSource:
    """A repo revision on a huggingface_hub-compatible hub (huggingface.co or `endpoint`)."""

    def __init__(self, repo: str = DEFAULT_REPO, revision: str = DEFAULT_REVISION, *, endpoint: Optional[str] = None,
                 token: Optional[str] = None, repo_type: str = "model"):
        self.repo = repo
        self.revision = revision
        self.endpoint = endpoint.rstrip("/") if endpoint else None
        self.token = token
        self.repo_type = repo_type
        self.commit: Optional[str] = None

    def describe(self) -> str:
        at = f"{self.revision}" + (f" ({self.commit[:12]})" if self.commit and self.commit != self.revision else "")
        where = f" on {self.endpoint}" if self.endpoint else ""
        return f"{self.repo}@{at}{where}"

    def list_files(self) -> list:
        """Every file of the revision with size and SHA-256; pins the revision to its commit."""
        import httpx2
        from huggingface_hub import HfApi, constants
        from huggingface_hub.errors import HfHubHTTPError

        api = HfApi(endpoint=self.endpoint, token=self.token)
        what = f"{self.repo}@{self.revision}"
        failures = 0
        while True:
            try:
                info = api.repo_info(self.repo, repo_type=self.repo_type, revision=self.revision,
                                     files_metadata=True, timeout=constants.HF_HUB_DOWNLOAD_TIMEOUT)
                break
            except (HfHubHTTPError, httpx2.TransportError) as e:
                status = getattr(getattr(e, "response", None), "status_code", None)
                if status is None:
                    transient = isinstance(e, httpx2.TransportError)  # reset, timeout, refused
                else:
                    transient = status in (408, 429) or status >= 500
                failures += 1
                if not transient or failures > fetch.RETRIES:
                    raise _hub_error(e, f"listing {what}") from None
                delay = fetch.backoff_delay(failures)
                log.warning("listing %s: %s; retrying in %.1f s", what, e, delay)
                time.sleep(delay)
            except Exception as e:  # OfflineModeIsEnabled, ValueError on a bad repo id...
                raise _hub_error(e, f"listing {what}") from None
        self.commit = info.sha
        files = []
        for s in info.siblings or []:
            if s.size is None:
                raise DownloadError(f"listing {what}: the hub gave no size for {s.rfilename}")
            lfs = s.lfs
            files.append(RemoteFile(s.rfilename, s.size, lfs.sha256 if lfs else None, None if lfs else s.blob_id))
        return files

    def url(self, file: RemoteFile) -> str:
        from huggingface_hub import hf_hub_url

        return hf_hub_url(self.repo, file.path, repo_type=self.repo_type, revision=self.commit or self.revision,
                          endpoint=self.endpoint)

    def opener(self, file: RemoteFile) -> fetch.Opener:
        from huggingface_hub.utils import build_hf_headers

        return fetch.http_opener(self.url(file), build_hf_headers(token=self.token))


# --- planning -------------------------------------------------------------------------------------


@dataclass
class PlannedFile:
    remote: RemoteFile
    dest: Path
    action: str  # "skip" | "verify" | "resume" | "fetch"
    have: int = 0  # bytes already on disk (partial or complete)

    @property
    def need(self) -> int:
        return 0 if self.action in ("skip", "verify") else self.remote.size - self.have


@dataclass
class Plan:
    source: str
    commit: Optional[str]
    dest: Path
    include: tuple
    exclude: tuple
    files: list
    free_bytes: int
    repo_files: int  # in the whole revision, before filtering
    ckpt_complete: bool = False  # every ckpt-0/ file of the revision is selected

    @property
    def total_bytes(self) -> int:
        return sum(f.remote.size for f in self.files)

    @property
    def need_bytes(self) -> int:
        return sum(f.need for f in self.files)

    @property
    def fits(self) -> bool:
        return self.need_bytes <= self.free_bytes

    def counts(self) -> dict:
        out = {a: 0 for a in ("fetch", "resume", "verify", "skip")}
        for f in self.files:
            out[f.action] += 1
        return out

    def ckpt_tensor_files(self) -> int:
        return sum(1 for f in self.files if f.remote.path.startswith(CKPT_DIR + "/tensor"))

    def disk_message(self) -> str:
        from .summary import human_bytes

        verdict = "ok" if self.fits else "NOT ENOUGH SPACE"
        return (
            f"disk: need {human_bytes(self.need_bytes)} ({self.need_bytes:,} bytes), "
            f"{human_bytes(self.free_bytes)} ({self.free_bytes:,} bytes) free at {self.dest}: {verdict}"
        )

    def to_dict(self) -> dict:
        return {
            "source": self.source, "commit": self.commit, "dest": str(self.dest),
            "include": list(self.include), "exclude": list(self.exclude),
            "files": [{"path": f.remote.path, "size": f.remote.size, "sha256": f.remote.sha256,
                       "action": f.action, "have": f.have} for f in self.files],
            "total_bytes": self.total_bytes, "need_bytes": self.need_bytes, "free_bytes": self.free_bytes,
            "fits": self.fits, "counts": self.counts(), "ckpt_tensor_files": self.ckpt_tensor_files(),
        }


def select(files: Iterable[RemoteFile], include: Sequence[str] = DEFAULT_INCLUDE, exclude: Sequence[str] = ()) -> list:
    """The files matching `include` and not `exclude`, with huggingface-cli's pattern rules
    (fnmatch, `*` also matches `/`, a pattern ending in `/` means everything below it)."""
    from huggingface_hub.utils import filter_repo_objects

    return list(filter_repo_objects(list(files), allow_patterns=list(include) or None,
                                    ignore_patterns=list(exclude) or None, key=lambda f: f.path))


def known_digests(dest: Path) -> dict:
    """{repo path: sha256} recorded by earlier runs (journal) or by any */SHA256SUMS under dest."""
    known = {}
    for sums in [dest / SUMS_NAME, *sorted(dest.glob(f"*/{SUMS_NAME}"))]:
        prefix = sums.parent.relative_to(dest).as_posix()
        for name, digest in read_sha256sums(sums).items():
            known[name if prefix == "." else f"{prefix}/{name}"] = digest
    known.update(read_sha256sums(dest / JOURNAL_NAME))
    return known


def plan(source: Source, dest, *, include: Sequence[str] = DEFAULT_INCLUDE, exclude: Sequence[str] = (),
         free: Optional[int] = None) -> Plan:
    """List the source, select files and decide, for each, what to do (no byte is fetched)."""
    dest = Path(dest)
    listing = source.list_files()
    selected = sorted(select(listing, include, exclude), key=lambda f: f.path)
    if not selected:
        sample = ", ".join(sorted(f.path for f in listing)[:5]) or "no files at all"
        raise DownloadError(
            f"{source.describe()}: no file matches --include {' '.join(include) or '*'}"
            + (f" --exclude {' '.join(exclude)}" if exclude else "")
            + f" ({len(listing)} files in the repo, e.g. {sample})"
        )
    known = known_digests(dest) if dest.exists() else {}
    planned = []
    for f in selected:
        target = dest / f.path
        partial = fetch.incomplete_path(target)
        if target.is_file() and target.stat().st_size == f.size:
            recorded = known.get(f.path)
            if f.sha256 is not None and recorded == f.sha256.lower():
                planned.append(PlannedFile(f, target, "skip", f.size))
            else:
                planned.append(PlannedFile(f, target, "verify", f.size))
        elif partial.is_file() and 0 < partial.stat().st_size <= f.size:
            planned.append(PlannedFile(f, target, "resume", partial.stat().st_size))
        else:
            planned.append(PlannedFile(f, target, "fetch", 0))
    in_ckpt = lambda f: f.path.startswith(CKPT_DIR + "/")  # noqa: E731
    ckpt_complete = {f.path for f in listing if in_ckpt(f)} == {f.path for f in selected if in_ckpt(f)}
    return Plan(source.describe(), getattr(source, "commit", None), dest, tuple(include), tuple(exclude), planned,
                free_bytes(dest) if free is None else free, len(listing), ckpt_complete)


# --- running --------------------------------------------------------------------------------------


@dataclass
class FileOutcome:
    path: str
    size: int
    action: str  # "skipped" | "verified" | "fetched" | "resumed" | "failed"
    sha256: Optional[str] = None
    received: int = 0
    resumed_from: int = 0
    attempts: int = 0
    seconds: float = 0.0
    error: Optional[str] = None


@dataclass
class Report:
    plan: Plan
    outcomes: list = field(default_factory=list)
    sums_files: list = field(default_factory=list)
    problems: list = field(default_factory=list)
    structure_checked: Optional[str] = None  # the ckpt-0 directory checked, if any
    seconds: float = 0.0

    @property
    def received(self) -> int:
        return sum(o.received for o in self.outcomes)

    @property
    def reused(self) -> int:
        """Bytes not fetched again: resumed prefixes plus files skipped or verified in place."""
        return sum(o.resumed_from if o.action == "resumed" else (o.size if o.action in ("skipped", "verified") else 0)
                   for o in self.outcomes)

    def to_dict(self) -> dict:
        return {
            **self.plan.to_dict(),
            "outcomes": [asdict(o) for o in self.outcomes],
            "received_bytes": self.received, "reused_bytes": self.reused,
            "sha256sums": [str(p) for p in self.sums_files], "structure_checked": self.structure_checked,
            "problems": self.problems, "seconds": round(self.seconds, 3),
        }


class _Aggregate:
    """Sums per-file byte positions into one overall ProgressFn call (thread-safe)."""

    interval = 0.1  # seconds between calls to the caller's callback (a 318 GB run has ~5M chunks)

    def __init__(self, total: int, progress: Optional[ProgressFn], start: int):
        self.total, self.progress, self.done = total, progress, start
        self.lock = threading.Lock()
        self.last_call = 0.0

    def for_file(self, base: int) -> ProgressFn:
        last = [base]

        def report(done: int, total: int, message: str = "") -> None:
            with self.lock:
                self.done += done - last[0]
                last[0] = done
                now = time.monotonic()
                if self.progress is not None and (now - self.last_call >= self.interval or done == total):
                    self.last_call = now
                    self.progress(self.done, self.total, message)

        return report


def check_disk(p: Plan) -> None:
    if not p.fits:
        raise DiskSpaceError(
            f"not enough disk space: {p.disk_message()[len('disk: '):]}; free "
            f"{p.need_bytes - p.free_bytes:,} more bytes or choose another --dest"
        )


def run(p: Plan, source: Source, *, workers: int = 8, progress: Optional[ProgressFn] = None,
        on_file: Optional[Callable[[FileOutcome], None]] = None) -> Report:
    """Fetch what `p` says (checks the disk first); raises the first error after the others finish."""
    check_disk(p)
    t0 = time.monotonic()
    p.dest.mkdir(parents=True, exist_ok=True)
    report = Report(p)
    journal = p.dest / JOURNAL_NAME
    lock = threading.Lock()
    stop = threading.Event()
    already = sum(f.have for f in p.files if f.action in ("skip", "resume"))
    agg = _Aggregate(p.total_bytes, progress, already)
    digests = {}
    errors: list = []

    def record(outcome: FileOutcome) -> None:
        with lock:
            report.outcomes.append(outcome)
            if outcome.sha256 and outcome.action != "skipped":
                with open(journal, "a") as j:
                    j.write(f"{outcome.sha256}  {outcome.path}\n")
            if outcome.sha256:
                digests[outcome.path] = outcome.sha256
        if on_file is not None:
            on_file(outcome)

    def one(pf: PlannedFile) -> None:
        f = pf.remote
        start = time.monotonic()
        if pf.action == "skip":
            record(FileOutcome(f.path, f.size, "skipped", f.sha256.lower()))
            return
        if pf.action == "verify":
            sha, git = fetch.hash_file(pf.dest, stop=stop)
            if (f.sha256 is not None and sha == f.sha256.lower()) or (f.sha256 is None and git == f.git_sha1):
                agg.for_file(0)(f.size, f.size, f.path)
                record(FileOutcome(f.path, f.size, "verified", sha, seconds=time.monotonic() - start))
                return
            log.warning("%s: present but its hash does not match the hub's; fetching it again", f.path)
            pf.dest.unlink()
        try:
            r = fetch.fetch_from(source.opener(f), pf.dest, size=f.size, sha256=f.sha256, git_sha1=f.git_sha1,
                                 progress=agg.for_file(pf.have if pf.action == "resume" else 0), stop=stop, name=f.path)
        except OSError as e:  # disk full, permissions: every other file would hit it too
            stop.set()
            record(FileOutcome(f.path, f.size, "failed", error=str(e), seconds=time.monotonic() - start))
            raise DownloadError(f"{pf.dest}: {e.strerror or e}") from None
        except BaseException as e:
            if isinstance(e, fetch.AccessError) or not isinstance(e, SlncxError):
                stop.set()  # auth / not found / Ctrl-C: the other files would fail the same way
            if not isinstance(e, fetch.Cancelled):
                record(FileOutcome(f.path, f.size, "failed", error=str(e), seconds=time.monotonic() - start))
            raise
        record(FileOutcome(f.path, f.size, "resumed" if r.resumed_from else "fetched", r.sha256, r.received,
                           r.resumed_from, r.attempts, time.monotonic() - start))

    order = sorted(p.files, key=lambda pf: -pf.need)  # biggest first: better packing over the workers
    pool = ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="download")
    try:
        futures = [pool.submit(one, pf) for pf in order]
        for fut in futures:
            try:
                fut.result()
            except fetch.Cancelled:
                pass
            except SlncxError as e:
                errors.append(e)
    except BaseException:
        stop.set()
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    pool.shutdown(wait=True)
    report.seconds = time.monotonic() - t0

    if errors:
        first = next((e for e in errors if isinstance(e, fetch.AccessError)), errors[0])
        failed = sum(1 for o in report.outcomes if o.action == "failed")
        more = f" ({failed} of {len(p.files)} files failed; rerun to resume)" if failed > 1 else ""
        raise (ChecksumError if isinstance(first, ChecksumError) else DownloadError)(f"{first}{more}") from None

    report.sums_files = write_sums(p.dest, {f.remote.path: digests[f.remote.path] for f in p.files})
    ckpt = ckpt_to_check(p)
    if ckpt is not None:
        from .release import ReleaseCheckpoint

        report.structure_checked = str(ckpt)
        try:
            report.problems = ReleaseCheckpoint(ckpt).problems()
        except SlncxError as e:
            report.problems = [str(e)]
    return report


def write_sums(dest: Path, digests: dict) -> list:
    """Write `<dir>/SHA256SUMS` for each top-level directory (names relative to it) and
    `dest/SHA256SUMS` for files at the top; merges with what is already recorded there."""
    groups: dict = {}
    for path, digest in digests.items():
        head, _, rest = path.partition("/")
        key, name = (head, rest) if rest else (".", path)
        groups.setdefault(key, {})[name] = digest
    written = []
    for key, entries in sorted(groups.items()):
        target = (dest if key == "." else dest / key) / SUMS_NAME
        merged = {**read_sha256sums(target), **entries}
        merged.pop(SUMS_NAME, None)
        tmp = target.with_name(SUMS_NAME + ".tmp")
        tmp.write_text("".join(f"{d}  {n}\n" for n, d in sorted(merged.items())))
        os.replace(tmp, target)
        written.append(target)
    return written


def ckpt_to_check(p: Plan) -> Optional[Path]:
    """dest/ckpt-0 when the selection holds every ckpt-0 file of the revision (and some tensors)."""
    if p.ckpt_tensor_files() == 0:
        return None
    return p.dest / CKPT_DIR if p.ckpt_complete else None


def download(source: Source, dest="checkpoints", *, include: Sequence[str] = DEFAULT_INCLUDE,
             exclude: Sequence[str] = (), workers: int = 8, progress: Optional[ProgressFn] = None,
             on_file: Optional[Callable[[FileOutcome], None]] = None, free: Optional[int] = None) -> Report:
    """plan() then run(): the whole `slncx-tools download`."""
    return run(plan(source, dest, include=include, exclude=exclude, free=free), source, workers=workers,
               progress=progress, on_file=on_file)
