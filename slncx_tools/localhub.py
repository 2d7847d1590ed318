"""A model hub on 127.0.0.1 that speaks enough of the hub's HTTP API for huggingface_hub 2.4.0.

It serves the embedded checkpoint to `slncx-tools demo` (so the demo goes through the real
download path without a network) and, with its fault injection, the download tests.

Endpoints (what the real client and our downloader use, see ../shared/HUB.md):
  GET  /api/models/{repo}/revision/{rev}[?blobs=True]   model info: sha, siblings (size, blobId, lfs)
  GET  /api/models/{repo}/tree/{rev}[/{path}]            file list (recursive)
  HEAD/GET /{repo}/resolve/{rev}/{path}                  X-Repo-Commit, ETag/X-Linked-Etag, X-Linked-Size;
                                                         LFS files: 302 to /cdn/{sha256}; small files: 200
  GET  {cdn_url}/cdn/{sha256}                   the bytes, with Range support (206)

Fault injection (set the attributes of `server.faults` before or between requests):
  drop_after[path] = n  the next GET of `path` sends n body bytes then drops the connection (once)
  fail[path] = k        the next k GETs of `path` answer 500 (path "*api*": the model-info call)
  corrupt.add(path)     serve other bytes than the advertised sha256 (same size)
  token                 when set, the API and resolve need "Authorization: Bearer <token>" (401 otherwise)
  ignore_range          answer 200 with the whole body to Range requests
  stall_after[path] = n the next GET of `path` sends n body bytes then hangs until the server stops
                        (to kill -9 a client mid-file)

Accounting: `server.bytes_served[path]` (body bytes written), `server.requests` (method, url path,
Range header, status, whether an Authorization header came, port) and `server.gets(path)`.

    with HubServer({"ckpt-0/tensor00000_000": b"..."}, repo="xai-org/slncx") as hub:
        hub.url  # http://127.0.0.1:PORT
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

TEXT_SUFFIXES = (".json", ".md", ".txt", ".gitattributes")  # kept in git; everything else is an LFS object


def is_lfs(path: str) -> bool:
    """Like the real repo's .gitattributes: weights are LFS (sha256 listed, CDN redirect), text is git."""
    return not path.endswith(TEXT_SUFFIXES)


def git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(data: bytes) -> bytes:
    return (
        "version https://git-lfs.github.com/spec/v1\n"
        f"oid sha256:{hashlib.sha256(data).hexdigest()}\nsize {len(data)}\n"
    ).encode()


def files_from_dir(root) -> dict:
    """{repo path: bytes} for every file under `root` (paths relative to it, '/'-separated)."""
    root = Path(root)
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@dataclass
class Faults:
    drop_after: dict = field(default_factory=dict)
    fail: dict = field(default_factory=dict)
    corrupt: set = field(default_factory=set)
    token: str | None = None
    ignore_range: bool = False
    stall_after: dict = field(default_factory=dict)


class HubServer:
    def __init__(self, files: dict, *, repo: str = "xai-org/slncx", revision: str = "main"):
        self.repo = repo
        self.files = dict(files)
        self.commit = hashlib.sha1(repr(sorted((k, hashlib.sha256(v).hexdigest()) for k, v in files.items())).encode()).hexdigest()
        self.revisions = {revision: self.commit, self.commit: self.commit}
        self.faults = Faults()
        self.bytes_served: dict = {}
        self.requests: list = []
        self._lock = threading.Lock()
        self.meta = {}
        for path, data in self.files.items():
            sha = hashlib.sha256(data).hexdigest()
            lfs = is_lfs(path)
            self.meta[path] = {
                "size": len(data),
                "sha256": sha,
                "lfs": lfs,
                "blob": git_blob_id(lfs_pointer(data)) if lfs else git_blob_id(data),
            }
        self.by_sha = {m["sha256"]: p for p, m in self.meta.items() if m["lfs"]}
        # The hub and its "CDN" are two origins (two ports), like huggingface.co and its CDN: the
        # client's HEAD stops at the cross-origin 302 and reads the metadata there, and the
        # Authorization header is not forwarded to the CDN.
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._cdn = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        for s in (self._httpd, self._cdn):
            s.daemon_threads = True
        self.stopping = threading.Event()

    # --- lifecycle --------------------------------------------------------------------------------
    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    @property
    def cdn_url(self) -> str:
        host, port = self._cdn.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> "HubServer":
        for s in (self._httpd, self._cdn):
            threading.Thread(target=s.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return self

    def stop(self) -> None:
        self.stopping.set()
        for s in (self._httpd, self._cdn):
            s.shutdown()
            s.server_close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    # --- accounting -------------------------------------------------------------------------------
    def record(self, *entry) -> None:
        with self._lock:
            self.requests.append(entry)

    def served(self, path: str, n: int) -> None:
        with self._lock:
            self.bytes_served[path] = self.bytes_served.get(path, 0) + n

    def gets(self, path: str) -> list:
        """(range header, status) of each GET that delivered or refused `path`'s bytes."""
        cdn = f"/cdn/{self.meta[path]['sha256']}"
        resolve = re.compile(rf"/{re.escape(self.repo)}/resolve/[^/]+/{re.escape(path)}")
        return [(r[2], r[3]) for r in self.requests
                if r[0] == "GET" and (r[1] == cdn or resolve.fullmatch(r[1])) and r[3] != 302]

    def total_served(self) -> int:
        return sum(self.bytes_served.values())

    def take_fault(self, table: dict, key: str):
        with self._lock:
            n = table.get(key)
            if n is None:
                return None
            if table is self.faults.fail:
                if n <= 0:
                    return None
                table[key] = n - 1
                return n
            del table[key]
            return n

    # --- API bodies -------------------------------------------------------------------------------
    def model_info(self, blobs: bool) -> dict:
        siblings = []
        for path, m in self.meta.items():
            s = {"rfilename": path}
            if blobs:
                s.update(size=m["size"], blobId=m["blob"])
                if m["lfs"]:
                    s["lfs"] = {"sha256": m["sha256"], "size": m["size"], "pointerSize": len(lfs_pointer(self.files[path]))}
            siblings.append(s)
        return {
            "_id": "0" * 24, "id": self.repo, "modelId": self.repo, "author": self.repo.split("/")[0],
            "sha": self.commit, "private": False, "gated": False, "disabled": False, "downloads": 0,
            "likes": 0, "tags": [], "lastModified": "2024-03-17T00:00:00.000Z",
            "createdAt": "2024-03-17T00:00:00.000Z", "siblings": siblings,
        }

    def tree(self, prefix: str) -> list:
        out, dirs = [], set()
        for path, m in self.meta.items():
            if prefix and not path.startswith(prefix.rstrip("/") + "/"):
                continue
            parts = path.split("/")
            for i in range(1, len(parts)):
                dirs.add("/".join(parts[:i]))
            entry = {"type": "file", "oid": m["blob"], "size": m["size"], "path": path}
            if m["lfs"]:
                entry["lfs"] = {"oid": m["sha256"], "size": m["size"], "pointerSize": len(lfs_pointer(self.files[path]))}
            out.append(entry)
        out += [{"type": "directory", "oid": "0" * 40, "size": 0, "path": d} for d in sorted(dirs)]
        return out

    def content(self, path: str) -> bytes:
        data = self.files[path]
        if path in self.faults.corrupt:
            data = bytes([data[0] ^ 0xFF]) + data[1:]
        return data


def _handler(hub: HubServer):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        disable_nagle_algorithm = True  # headers and body are two writes: avoid 40 ms delayed-ACK stalls

        def log_message(self, *args):  # keep test output clean
            pass

        # --- helpers --------------------------------------------------------------------------------
        def _finish(self, status: int, body: bytes = b"", headers: dict | None = None, head: bool = False, path: str | None = None):
            self.send_response(status)
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            hub.record(self.command, urlsplit(self.path).path, self.headers.get("Range"), status,
                       "Authorization" in self.headers, self.server.server_address[1])
            if head or not body:
                return
            stall = hub.take_fault(hub.faults.stall_after, path) if path else None
            if stall is not None and stall < len(body):
                self.wfile.write(body[:stall])
                self.wfile.flush()
                hub.served(path, stall)
                hub.stopping.wait(60)
                self.close_connection = True
                return
            drop = hub.take_fault(hub.faults.drop_after, path) if path else None
            if drop is not None and drop < len(body):
                self.wfile.write(body[:drop])
                self.wfile.flush()
                if path:
                    hub.served(path, drop)
                self.close_connection = True
                return
            self.wfile.write(body)
            if path:
                hub.served(path, len(body))

        def _error(self, status: int, code: str | None = None, message: str = "", head: bool = False):
            headers = {"Content-Type": "application/json"}
            if code:
                headers["X-Error-Code"] = code
            if message:
                headers["X-Error-Message"] = message
            self._finish(status, json.dumps({"error": message or code or str(status)}).encode(), headers, head=head)

        def _authorized(self, head: bool = False) -> bool:
            if hub.faults.token is None:
                return True
            auth = self.headers.get("Authorization")
            if auth is None:
                self._error(401, "GatedRepo", f"Access to model {hub.repo} is restricted. You must be authenticated to access it.", head)
                return False
            if auth != f"Bearer {hub.faults.token}":
                self._error(401, None, "Invalid credentials in Authorization header", head)
                return False
            return True

        def _repo_rev(self, repo: str, rev: str, head: bool = False):
            if repo != hub.repo:
                self._error(404, "RepoNotFound", "Repository not found", head)
                return None
            commit = hub.revisions.get(unquote(rev))
            if commit is None:
                self._error(404, "RevisionNotFound", f"Invalid rev id: {unquote(rev)}", head)
                return None
            return commit

        # --- routes ---------------------------------------------------------------------------------
        def do_HEAD(self):
            self._route(head=True)

        def do_GET(self):
            self._route(head=False)

        def _route(self, head: bool):
            url = urlsplit(self.path)
            path = url.path
            if m := re.fullmatch(r"/api/models/([^/]+/[^/]+)/revision/([^/]+)", path):
                if hub.take_fault(hub.faults.fail, "*api*"):
                    return self._error(500, None, "Internal Error", head)
                if not self._authorized(head) or self._repo_rev(m.group(1), m.group(2), head) is None:
                    return
                body = json.dumps(hub.model_info(blobs="blobs=true" in url.query.lower())).encode()
                return self._finish(200, body, {"Content-Type": "application/json"}, head)
            if m := re.fullmatch(r"/api/models/([^/]+/[^/]+)/tree/([^/]+)(/.*)?", path):
                if not self._authorized(head) or self._repo_rev(m.group(1), m.group(2), head) is None:
                    return
                body = json.dumps(hub.tree(unquote((m.group(3) or "").lstrip("/")))).encode()
                return self._finish(200, body, {"Content-Type": "application/json"}, head)
            if m := re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path):
                if not self._authorized(head):
                    return
                commit = self._repo_rev(m.group(1), m.group(2), head)
                if commit is None:
                    return
                file = unquote(m.group(3))
                meta = hub.meta.get(file)
                if meta is None:
                    return self._error(404, "EntryNotFound", f"{file} does not exist on {m.group(2)}", head)
                if not head and hub.take_fault(hub.faults.fail, file):
                    return self._error(500, None, "Internal Error", head)
                headers = {"X-Repo-Commit": commit, "Accept-Ranges": "bytes"}
                if meta["lfs"]:
                    headers.update({
                        "ETag": f'"{meta["blob"]}"', "X-Linked-Etag": f'"{meta["sha256"]}"',
                        "X-Linked-Size": str(meta["size"]), "Location": f"{hub.cdn_url}/cdn/{meta['sha256']}",
                    })
                    return self._finish(302, b"", headers, head)
                headers["ETag"] = f'"{meta["blob"]}"'
                return self._body(file, headers, head)
            if m := re.fullmatch(r"/cdn/([0-9a-f]{64})", path):
                file = hub.by_sha.get(m.group(1))
                if file is None:
                    return self._error(404, None, "NoSuchKey", head)
                return self._body(file, {"ETag": f'"{m.group(1)}"', "Accept-Ranges": "bytes"}, head)
            return self._error(404, None, "Not Found", head)

        def _body(self, file: str, headers: dict, head: bool):
            data = hub.content(file)
            rng = self.headers.get("Range")
            if rng and not hub.faults.ignore_range:
                m = re.fullmatch(r"bytes=(\d+)-(\d*)", rng.strip())
                if m is None:
                    return self._error(400, None, f"bad range {rng}", head)
                start = int(m.group(1))
                end = int(m.group(2)) if m.group(2) else len(data) - 1
                if start >= len(data):
                    headers["Content-Range"] = f"bytes */{len(data)}"
                    return self._finish(416, b"", headers, head)
                end = min(end, len(data) - 1)
                headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
                return self._finish(206, data[start : end + 1], headers, head, path=file)
            return self._finish(200, data, headers, head, path=file)

    return Handler
