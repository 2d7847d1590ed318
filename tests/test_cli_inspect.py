import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from click.testing import CliRunner

from slncx_tools.cli import cli

EXE = Path(sys.executable).parent / "slncx-tools"


def run(*args):
    return CliRunner().invoke(cli, list(map(str, args)))


def test_inspect_table_and_json(tiny_dir):
    r = run("inspect", tiny_dir / "release_layout")
    assert r.exit_code == 0, r.output
    lines = r.output.splitlines()
    assert "params/transformer/decoder_layer_0/moe/linear_1/w" in lines[4]
    assert "8x48x32" in lines[4] and "int8 R=8 (bfloat16 scales)" in lines[4]
    assert lines[-1].startswith("146 tensors, 610,848 parameters, 753,792 bytes") and lines[-1].endswith("config: TINY")
    info = json.loads(run("inspect", "--json", tiny_dir / "per_channel_layout" / "ckpt-0").output)
    assert info["preset"] == "TINY" and info["total_tensors"] == 146 and info["problems"] == []
    row = info["tensors"][3]
    assert row["quant"].startswith("int8 R=1") and row["bytes"] == 8 * 48 * 32 + 2 * 8 * 32


def test_inspect_errors_are_one_line(tiny_dir, tmp_path):
    d = tmp_path / "ckpt-0"
    shutil.copytree(tiny_dir / "release_layout" / "ckpt-0", d)
    (d / "tensor00004_000").write_bytes((d / "tensor00004_000").read_bytes()[:300])
    (d / "tensor00009_000").unlink()
    proc = subprocess.run([EXE, "inspect", d], capture_output=True, text=True)
    assert proc.returncode == 1
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: ") and "Traceback" not in proc.stderr
    r = run("inspect", "--check", d)
    assert r.exit_code == 1
    assert "tensor00009_000: missing" in r.output and "tensor00004_000" in r.output and "truncated" in r.output
    assert "2 problem(s) found" in str(r.exception)


def test_help_is_fast_and_imports_no_jax():
    code = "import sys; from slncx_tools.cli import cli; cli.list_commands(None); " \
           "[cli.get_command(None, n) for n in cli.list_commands(None)]; " \
           "print(sorted(m for m in ('jax', 'tensorstore', 'huggingface_hub', 'sentencepiece') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
    t = time.perf_counter()
    proc = subprocess.run([EXE, "--help"], capture_output=True, text=True, env={**os.environ})
    elapsed = time.perf_counter() - t
    assert proc.returncode == 0 and "inspect" in proc.stdout
    assert elapsed < 5  # generous for a loaded CI machine; typically ~0.2 s
