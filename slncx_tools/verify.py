"""`verify`: structure, checksums and values of a checkpoint, in one streaming pass per file.

A release ckpt-0 is checked against `SHA256SUMS` (written by `download`, or given by the user):
each file is read once, front to back, hashing every byte and checking the values of its array
regions on the way. A store is checked against the SHA-256 its manifest records for each array
(digests of logical bytes, so they do not depend on chunking or compression). Values: float
tensors finite; scales finite and positive. Every problem is collected, naming file and tensor.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from .checkpoint import is_store
from .disk import read_sha256sums
from .errors import SlncxError, StructureError
from .progress import ProgressFn, null_progress

log = logging.getLogger(__name__)

BLOCK = 16 * 1024 * 1024  # bytes per read


@dataclass
class CheckReport:
    path: str
    kind: str
    tensors: int = 0
    arrays_hashed: int = 0
    bytes_hashed: int = 0
    checksums: str = "none"  # where the expected digests came from
    problems: list = field(default_factory=list)
    notes: list = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict:
        return {
            "path": self.path, "kind": self.kind, "ok": self.ok, "tensors": self.tensors,
            "arrays_hashed": self.arrays_hashed, "bytes_hashed": self.bytes_hashed,
            "checksums": self.checksums, "problems": self.problems, "notes": self.notes,
        }


def value_problems(what: str, part: str, data: np.ndarray, start: int = 0) -> list:
    """Non-finite floats; non-finite or non-positive scales. `start` = flat index of data[0]."""
    if part == "weight":
        return []
    flat = np.asarray(data).reshape(-1).astype(np.float32, copy=False)
    bad = ~np.isfinite(flat)
    kind = "non-finite"
    if part == "scales":
        bad |= ~(flat > 0)
        kind = "non-finite or non-positive"
    if not bad.any():
        return []
    first = int(np.argmax(bad))
    return [f"{what}: {int(bad.sum())} {kind} {part} value(s), first at flat index {start + first} ({flat[first]})"]


def check_checkpoint(path, *, sha256sums=None, workers: int = 4, progress: ProgressFn = null_progress) -> CheckReport:
    """Structure, checksums and values of a release ckpt-0 or a store; every problem collected."""
    if is_store(path):
        return _check_store(Path(path), workers, progress)
    return _check_release(Path(path), sha256sums, workers, progress)


class _Progress:
    def __init__(self, fn: ProgressFn, total: int):
        self.fn, self.total, self.done = fn, total, 0
        self.lock = threading.Lock()

    def __call__(self, n: int, message: str = "") -> None:
        with self.lock:
            self.done += n
            self.fn(self.done, self.total, message)


# --- release ------------------------------------------------------------------------------------

def _check_release(path: Path, sha256sums, workers: int, progress: ProgressFn) -> CheckReport:
    from .release import ReleaseCheckpoint, find_ckpt_dir

    ckpt = ReleaseCheckpoint(find_ckpt_dir(path))
    report = CheckReport(str(ckpt.dir), "release", tensors=len(ckpt.table))
    report.problems += ckpt.problems()
    sums_file = Path(sha256sums) if sha256sums else ckpt.dir / "SHA256SUMS"
    sums = None
    if sha256sums or sums_file.exists():
        sums = {os.path.basename(n): d for n, d in read_sha256sums(sums_file, strict=True).items()}
        report.checksums = str(sums_file)
        listed = {e.file for e in ckpt.table}
        for name in sorted(set(sums) - listed - {"config.json", "tokenizer.model"}):
            if not (ckpt.dir / name).exists():
                report.problems.append(f"{ckpt.dir / name}: listed in {sums_file.name} but missing")
    else:
        report.notes.append(
            f"no {sums_file.name} in {ckpt.dir} (download writes one; or pass --sha256sums FILE): "
            "checksums not compared, values and structure checked"
        )
    readable = []  # every present file is hashed; values are checked where the header parses
    for entry in ckpt.table:
        if not (ckpt.dir / entry.file).exists():
            continue  # listed by problems()
        try:
            readable.append((entry, ckpt.header(entry)))
        except SlncxError:
            readable.append((entry, None))  # listed by problems(); its checksum is still compared
    total = sum((ckpt.dir / e.file).stat().st_size for e, _ in readable)
    tick = _Progress(progress, total)

    def scan(item):
        entry, header = item
        file = ckpt.dir / entry.file
        digest, problems = _scan_release_file(file, entry.path, header, tick)
        expected = sums.get(entry.file) if sums is not None else None
        if sums is not None and expected is None:
            problems.append(f"{file}: not listed in {sums_file.name}")
        elif expected is not None and digest != expected:
            problems.append(f"{file}: SHA-256 {digest} does not match {sums_file.name} ({expected}) — {entry.path}")
        return file.stat().st_size, problems

    return _scan_all(report, scan, readable, workers)


def _scan_release_file(path: Path, what: str, header, tick) -> tuple:
    """Hash a whole file front to back; check the values of its array regions while at it."""
    h = hashlib.sha256()
    problems = []
    arrays = header.arrays if header is not None else {}
    regions = sorted((raw.offset, raw.nbytes, part, raw.dtype) for part, raw in arrays.items() if raw.inline is None)
    for part, raw in arrays.items():
        if raw.inline is not None:
            problems += value_problems(f"{path}: {what}", part, np.frombuffer(raw.inline, raw.dtype))
    buf = bytearray(BLOCK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        pos = 0

        def pump(n: int, part: Optional[str] = None, dtype=None) -> None:
            nonlocal pos
            step = BLOCK - BLOCK % (dtype.itemsize if dtype is not None else 1)
            done = 0
            while done < n:
                want = min(step, n - done)
                got = f.readinto(view[:want])
                if not got:
                    raise StructureError(f"{path}: truncated at byte {pos}")
                h.update(view[:got])
                if part is not None and got % dtype.itemsize == 0:
                    problems.extend(
                        value_problems(f"{path}: {what}", part, np.frombuffer(buf, dtype, got // dtype.itemsize), done // dtype.itemsize)
                    )
                done += got
                pos += got
                tick(got, path.name)

        for offset, nbytes, part, dtype in regions:
            pump(offset - pos)
            pump(nbytes, part, dtype)
        while True:
            got = f.readinto(view)
            if not got:
                break
            h.update(view[:got])
            tick(got, path.name)
    return h.hexdigest(), problems[:5]


# --- store --------------------------------------------------------------------------------------

def _check_store(path: Path, workers: int, progress: ProgressFn) -> CheckReport:
    from .store import open_store, row_slabs

    store = open_store(path, allow_incomplete=True)
    report = CheckReport(str(path), "store", tensors=len(store.table), checksums=str(path / "slncx.json"))
    report.problems += store.problems()
    jobs = []
    for entry in store.table:
        for part, info in store.record(entry)["arrays"].items():
            jobs.append((entry, part, info))
    from .store import DTYPES

    total = sum(int(np.prod(info["shape"], dtype=np.int64)) * DTYPES[info["dtype"]].itemsize for _, _, info in jobs)
    tick = _Progress(progress, total)

    def scan(job):
        entry, part, info = job
        what = f"{path / info['key']}: {entry.path}"
        try:
            array = store.array(entry, part)
        except SlncxError:
            return 0, []  # listed by problems()
        shape = tuple(array.shape)
        h = hashlib.sha256()
        problems = []
        itemsize = array.dtype.numpy_dtype.itemsize
        row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * itemsize if shape else itemsize
        chunk0 = int(info.get("chunks", [1])[0]) if shape else 1
        start = 0
        try:
            for sl in row_slabs(shape, chunk0, row_bytes, BLOCK * 4) if shape else [()]:
                data = np.ascontiguousarray(array[sl].read().result())
                h.update(data.reshape(-1).view(np.uint8))
                problems += value_problems(what, part, data, start)
                start += data.size
                tick(data.nbytes, entry.path)
        except Exception as e:  # a chunk that does not decode: truncated or corrupt file
            return 0, [f"{what}: unreadable {part} ({str(e).splitlines()[0][:200]})"]
        if h.hexdigest() != info.get("sha256"):
            problems.append(f"{what}: {part} SHA-256 {h.hexdigest()} does not match the manifest ({info.get('sha256')})")
        return data_bytes(shape, itemsize), problems[:5]

    return _scan_all(report, scan, jobs, workers)


def _scan_all(report: CheckReport, scan, items: list, workers: int) -> CheckReport:
    """Run `scan(item) -> (bytes hashed, problems)` over items on `workers` threads; add to report."""
    with ThreadPoolExecutor(max(1, workers)) as pool:
        for nbytes, problems in pool.map(scan, items):
            report.arrays_hashed += 1
            report.bytes_hashed += nbytes
            report.problems += problems
    return report


def data_bytes(shape, itemsize: int) -> int:
    return int(np.prod(shape, dtype=np.int64)) * itemsize
