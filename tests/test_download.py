"""`slncx-tools download` against a hub on loopback (slncx_tools/localhub.py): never the real network."""

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from slncx_tools.localhub import HubServer, files_from_dir
from slncx_tools import disk, fetch, hub
from slncx_tools.cli import cli
from slncx_tools.config import TINY
from slncx_tools.errors import ChecksumError, DiskSpaceError, DownloadError
from slncx_tools.release import ReleaseCheckpoint, generate_checkpoint

EXE = Path(sys.executable).parent / "slncx-tools"
BIG = "ckpt-0/tensor00000_000"  # the largest TINY file (65,698 bytes)


@pytest.fixture(scope="session")
def repo_files(tmp_path_factory) -> dict:
    """The repo the test hub serves: a TINY ckpt-0 written by the package, plus two root files."""
    root = tmp_path_factory.mktemp("repo")
    generate_checkpoint(TINY, root, seed=0)
    files = files_from_dir(root)
    files["README.md"] = b"# slncx\n"
    files["tokenizer.model"] = bytes(range(256)) * 4
    return files


@pytest.fixture(autouse=True)
def isolated_hf(monkeypatch, tmp_path):
    """A fresh HF_HOME, no token from the environment or the user's login, online, fast retries."""
    import huggingface_hub.constants as c

    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_ENDPOINT", disk.FREE_BYTES_ENV):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setattr(c, "HF_TOKEN_PATH", str(tmp_path / "hf-home" / "token"))
    monkeypatch.setattr(c, "HF_STORED_TOKENS_PATH", str(tmp_path / "hf-home" / "stored_tokens"))
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(fetch, "BACKOFF_BASE", 0.01)


@pytest.fixture
def server(repo_files):
    with HubServer(repo_files) as s:
        yield s


def run(server, dest, *args):
    return CliRunner().invoke(cli, ["download", "--endpoint", server.url, "--dest", str(dest), *map(str, args)])


def ckpt_files(files: dict) -> dict:
    return {k: v for k, v in files.items() if k.startswith("ckpt-0/")}


def test_full_download_writes_verified_files_and_sha256sums(server, repo_files, tmp_path):
    dest = tmp_path / "checkpoints"
    r = run(server, dest)
    assert r.exit_code == 0, r.output + repr(r.exception)
    want = ckpt_files(repo_files)  # the default --include 'ckpt-0/*'
    got = {p.relative_to(dest).as_posix() for p in dest.rglob("*") if p.is_file() and not p.name.startswith(".")}
    assert got == set(want) | {"ckpt-0/SHA256SUMS"}
    for path, data in want.items():
        assert (dest / path).read_bytes() == data
    # standard `sha256sum` format, names relative to ckpt-0, every file, checked independently
    lines = (dest / "ckpt-0" / "SHA256SUMS").read_text().splitlines()
    assert len(lines) == len(want) == 147
    for line in lines:
        digest, name = line.split("  ")
        assert hashlib.sha256((dest / "ckpt-0" / name).read_bytes()).hexdigest() == digest
    assert ReleaseCheckpoint(dest / "ckpt-0").problems() == []
    assert "structure: ok" in r.output and "147 fetched" in r.output
    assert not list(dest.rglob("*.incomplete"))
    # each byte crossed the wire once; LFS files came from the CDN origin without the Authorization header
    assert server.total_served() == sum(len(v) for v in want.values())

    # a rerun fetches nothing: every file is skipped (recorded) or re-hashed locally (small git files)
    before = server.total_served()
    r = run(server, dest, "-v")
    assert r.exit_code == 0, r.output
    assert server.total_served() == before
    assert "146 skipped" in r.output and "1 verified" in r.output


def test_include_exclude(server, repo_files, tmp_path):
    dest = tmp_path / "d"
    r = run(server, dest, "--include", "ckpt-0/tensor0000*", "--include", "*.md", "--exclude", "*5_000")
    assert r.exit_code == 0, r.output + repr(r.exception)
    got = sorted(p.relative_to(dest).as_posix() for p in dest.rglob("*") if p.is_file() and not p.name.startswith("."))
    want = [f"ckpt-0/tensor0000{i}_000" for i in range(10) if i != 5]
    assert set(got) == {"README.md", "SHA256SUMS", *want, "ckpt-0/SHA256SUMS"}
    assert (dest / "SHA256SUMS").read_text() == f"{hashlib.sha256(repo_files['README.md']).hexdigest()}  README.md\n"
    assert "structure" not in r.output  # a partial selection is not checked as a ckpt-0

    r = run(server, tmp_path / "e", "--include", "nothing/*")
    assert r.exit_code == 1 and isinstance(r.exception, DownloadError)
    assert "no file matches --include nothing/*" in str(r.exception)
    assert not (tmp_path / "e").exists()


def test_resume_after_dropped_connection_does_not_restart_from_zero(server, repo_files, tmp_path):
    size, half = len(repo_files[BIG]), 30_000
    server.faults.drop_after[BIG] = half
    r = run(server, tmp_path / "d", "-v")
    assert r.exit_code == 0, r.output + repr(r.exception)
    assert (tmp_path / "d" / BIG).read_bytes() == repo_files[BIG]
    assert server.gets(BIG) == [(None, 200), (f"bytes={half}-", 206)]
    assert server.bytes_served[BIG] == size  # no byte sent twice (a restart would have cost `half` more)
    assert "1 retries" in r.output


def test_resume_across_runs_from_incomplete_file(server, repo_files, tmp_path):
    """What a kill -9 leaves: <file>.incomplete with a prefix. The rerun asks only for the rest."""
    dest = tmp_path / "d"
    (dest / "ckpt-0").mkdir(parents=True)
    size, have = len(repo_files[BIG]), 40_000
    (dest / (BIG + ".incomplete")).write_bytes(repo_files[BIG][:have])
    dry = json.loads(run(server, dest, "--dry-run", "--json").output)
    assert {f["path"]: (f["action"], f["have"]) for f in dry["files"]}[BIG] == ("resume", have)
    assert dry["need_bytes"] == dry["total_bytes"] - have

    r = run(server, dest, "-v")
    assert r.exit_code == 0, r.output + repr(r.exception)
    assert server.gets(BIG) == [(f"bytes={have}-", 206)]
    assert server.bytes_served[BIG] == size - have
    assert (dest / BIG).read_bytes() == repo_files[BIG]
    assert f"resumed at byte {have:,}" in r.output


def test_kill_9_then_rerun_resumes(server, repo_files, tmp_path):
    """A real process killed mid-file; the next run continues from what reached the disk."""
    dest, stall = tmp_path / "d", 50_000
    server.faults.stall_after[BIG] = stall
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf-home")}
    proc = subprocess.Popen([EXE, "download", "--endpoint", server.url, "--dest", dest, "--include", BIG],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    partial = dest / (BIG + ".incomplete")
    deadline = time.monotonic() + 30
    while not (partial.exists() and partial.stat().st_size == stall):
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.poll() is not None else "timeout"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (dest / BIG).exists()

    r = run(server, dest, "--include", BIG)
    assert r.exit_code == 0, r.output + repr(r.exception)
    assert server.gets(BIG)[-1] == (f"bytes={stall}-", 206)
    assert server.bytes_served[BIG] == len(repo_files[BIG])
    assert (dest / BIG).read_bytes() == repo_files[BIG]


def test_retries_on_500s_then_gives_up_with_a_clear_message(server, repo_files, tmp_path, monkeypatch):
    server.faults.fail["*api*"] = 2  # the listing call too (huggingface_hub does not retry it)
    server.faults.fail[BIG] = 3
    r = run(server, tmp_path / "d", "--include", "ckpt-0/tensor0000*")
    assert r.exit_code == 0, r.output + repr(r.exception)
    assert [s for _, s in server.gets(BIG)] == [500, 500, 500, 200]
    assert (tmp_path / "d" / BIG).read_bytes() == repo_files[BIG]

    monkeypatch.setattr(fetch, "RETRIES", 2)
    server.faults.fail[BIG] = 100
    r = run(server, tmp_path / "e", "--include", BIG)
    assert r.exit_code == 1 and isinstance(r.exception, DownloadError)
    assert "HTTP 500" in str(r.exception) and "gave up after 2 retries" in str(r.exception)
    assert not (tmp_path / "e" / BIG).exists()


def test_sha256_mismatch_deletes_the_file_and_fails(server, tmp_path):
    bad = "ckpt-0/tensor00003_000"
    server.faults.corrupt.add(bad)
    dest = tmp_path / "d"
    r = run(server, dest)
    assert r.exit_code == 1 and isinstance(r.exception, ChecksumError)
    msg = str(r.exception)
    assert bad in msg and "SHA-256" in msg and "deleted" in msg
    assert not (dest / bad).exists() and not (dest / (bad + ".incomplete")).exists()
    assert (dest / "ckpt-0" / "tensor00004_000").exists()  # the other files completed
    assert not (dest / "ckpt-0" / "SHA256SUMS").exists()  # no checksum list for an incomplete download

    server.faults.corrupt.clear()  # the rerun fetches only the deleted file
    before = server.total_served()
    r = run(server, dest)
    assert r.exit_code == 0, r.output
    assert server.total_served() - before == server.meta[bad]["size"]


def test_server_ignoring_range_restarts_cleanly(server, repo_files, tmp_path):
    dest = tmp_path / "d"
    (dest / "ckpt-0").mkdir(parents=True)
    (dest / (BIG + ".incomplete")).write_bytes(b"\0" * 1000)  # garbage prefix: must not survive
    server.faults.ignore_range = True
    r = run(server, dest, "--include", BIG)
    assert r.exit_code == 0, r.output + repr(r.exception)
    assert (dest / BIG).read_bytes() == repo_files[BIG]


def test_present_files_are_verified_not_refetched(server, repo_files, tmp_path):
    """Files from an earlier tool (e.g. huggingface-cli) are hashed locally; a wrong one is fetched again."""
    dest = tmp_path / "d"
    for path, data in ckpt_files(repo_files).items():
        (dest / path).parent.mkdir(parents=True, exist_ok=True)
        (dest / path).write_bytes(data)
    wrong = "ckpt-0/tensor00007_000"
    (dest / wrong).write_bytes(b"x" * len(repo_files[wrong]))
    r = run(server, dest)
    assert r.exit_code == 0, r.output + repr(r.exception)
    assert server.bytes_served == {wrong: len(repo_files[wrong])}
    assert (dest / wrong).read_bytes() == repo_files[wrong]


def test_dry_run_lists_and_fetches_nothing(server, repo_files, tmp_path):
    dest = tmp_path / "d"
    r = run(server, dest, "--dry-run")
    assert r.exit_code == 0, r.output + repr(r.exception)
    lines = r.output.splitlines()
    assert lines[0].split() == ["ckpt-0/config.json", f"{len(repo_files['ckpt-0/config.json']):,}", "fetch"]
    total = sum(len(v) for v in ckpt_files(repo_files).values())
    assert "147 of 149 files" in r.output and f"({total:,} bytes)" in r.output
    assert "a complete TINY ckpt-0" in r.output and "SLNCX has 770" in r.output
    assert lines[-1].startswith("disk: need") and lines[-1].endswith(": ok")
    assert not dest.exists() and server.bytes_served == {}
    assert all(r[1].startswith("/api/") for r in server.requests)

    info = json.loads(run(server, dest, "--dry-run", "--json").output)
    assert info["total_bytes"] == info["need_bytes"] == total and info["fits"] and info["ckpt_tensor_files"] == 146


def test_disk_space_refusal(server, tmp_path, monkeypatch):
    monkeypatch.setenv(disk.FREE_BYTES_ENV, "100000")
    dest = tmp_path / "d"
    r = run(server, dest)
    assert r.exit_code == 1 and isinstance(r.exception, DiskSpaceError)
    msg = str(r.exception)
    assert "not enough disk space" in msg and "100,000 bytes" in msg and "788,582 bytes" in msg
    assert not dest.exists() and server.bytes_served == {}
    r = run(server, dest, "--dry-run")
    assert r.exit_code == 0 and "NOT ENOUGH SPACE" in r.output


def test_404_messages(server, tmp_path):
    r = run(server, tmp_path / "d", "--repo", "nobody/nothing")
    assert r.exit_code == 1 and "nobody/nothing" in str(r.exception) and "repository not found" in str(r.exception)
    r = run(server, tmp_path / "d", "--revision", "v9")
    assert r.exit_code == 1 and "revision not found" in str(r.exception) and "--revision" in str(r.exception)
    assert not (tmp_path / "d").exists()


def test_404_on_a_file_is_a_clear_error(server, repo_files, tmp_path):
    src = hub.HubSource(endpoint=server.url)
    p = hub.plan(src, tmp_path / "d", include=["ckpt-0/tensor0000*"])
    del server.meta["ckpt-0/tensor00001_000"]  # listed by the API, then gone from resolve
    with pytest.raises(DownloadError, match=r"tensor00001_000.*HTTP 404.*not found"):
        hub.run(p, src, workers=2)


def test_401_without_and_with_wrong_token(server, repo_files, tmp_path):
    server.faults.token = "hf_right"
    r = run(server, tmp_path / "d")
    assert r.exit_code == 1 and "access denied" in str(r.exception) and "--token" in str(r.exception)
    r = run(server, tmp_path / "d", "--token", "hf_wrong")
    assert r.exit_code == 1 and "Invalid credentials" in str(r.exception) and "token" in str(r.exception)
    assert not (tmp_path / "d").exists()

    first = len(server.requests)
    r = run(server, tmp_path / "d", "--token", "hf_right", "--include", "ckpt-0/tensor0000*")
    assert r.exit_code == 0, r.output + repr(r.exception)
    # the token went to the hub (API, resolve) and not to the CDN origin
    cdn_port = int(server.cdn_url.rsplit(":", 1)[1])
    requests = server.requests[first:]
    assert any(port == cdn_port for *_, port in requests)
    assert all(auth for *_, auth, port in requests if port != cdn_port)
    assert not any(auth for *_, auth, port in requests if port == cdn_port)


def test_subprocess_json_report(server, repo_files, tmp_path):
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf-home")}
    env.pop("HF_TOKEN", None)
    proc = subprocess.run([EXE, "download", "--endpoint", server.url, "--dest", tmp_path / "d", "--json", "--workers", "4"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["received_bytes"] == report["total_bytes"] == sum(len(v) for v in ckpt_files(repo_files).values())
    assert report["problems"] == [] and report["structure_checked"].endswith("ckpt-0")
    assert {o["action"] for o in report["outcomes"]} == {"fetched"}

    proc = subprocess.run([EXE, "download", "--endpoint", server.url, "--dest", tmp_path / "d", "--repo", "a/b"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 1 and proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1
    assert "Traceback" not in proc.stderr


def test_test_hub_also_serves_huggingface_hub(server, repo_files, tmp_path):
    """The loopback hub is faithful enough for the real client (so it tests the real protocol)."""
    from huggingface_hub import snapshot_download

    out = snapshot_download("xai-org/slncx", local_dir=tmp_path / "hf", endpoint=server.url,
                            allow_patterns=["ckpt-0/tensor0000*", "*.md"])
    assert (Path(out) / BIG).read_bytes() == repo_files[BIG]
    assert (Path(out) / "README.md").read_bytes() == repo_files["README.md"]


def test_unreachable_hub_and_offline_mode_are_explicit_failures(server, tmp_path, monkeypatch):
    """Unlike snapshot_download, a failed listing never looks like success, even with files present."""
    import huggingface_hub.constants as c

    dest = tmp_path / "d"
    (dest / "ckpt-0").mkdir(parents=True)
    (dest / "ckpt-0" / "tensor00000_000").write_bytes(b"old")
    monkeypatch.setattr(fetch, "RETRIES", 1)
    r = CliRunner().invoke(cli, ["download", "--endpoint", "http://127.0.0.1:9", "--dest", str(dest)])
    assert r.exit_code == 1 and "listing xai-org/slncx@main: ConnectError" in str(r.exception)
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    r = run(server, dest)
    assert r.exit_code == 1 and "offline mode is on" in str(r.exception)
    assert server.requests == []
