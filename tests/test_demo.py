"""The embedded model and `slncx-tools demo`: the whole pipeline, fixed greedy output, training smoke test."""

import json
import subprocess
import sys
from pathlib import Path

from click.testing import CliRunner

from slncx_tools import demo
from slncx_tools.cli import cli
from slncx_tools.embedded import embedded_dir

ROOT = Path(__file__).resolve().parents[1]


def test_demo_end_to_end_meets_parity_bounds(tmp_path):
    keep = tmp_path / "artefacts"
    r = CliRunner().invoke(cli, ["demo", "--json", "--keep", str(keep)])
    assert r.exit_code == 0, r.output
    report = json.loads(r.output)
    assert report["ok"] and report["failures"] == []
    steps = report["steps"]
    assert steps["download"]["files"] == 52 and steps["download"]["bytes"] > 4_000_000
    assert steps["reshard"]["mesh"]["model"] == 8
    assert steps["verify"]["check"]["ok"] and steps["verify"]["check"]["problems"] == []
    p = steps["verify"]["parity"]
    # bounds justified in slncx_tools/demo.py from the model's perplexity (~30-40 on held-out text)
    assert p["kld"]["mean"] <= demo.MAX_MEAN_KLD and p["top1_agreement"] >= demo.MIN_TOP1
    assert abs(p["perplexity"]["ln_ratio"]) <= demo.MAX_ABS_LN_PPL_RATIO
    assert 10 < p["perplexity"]["reference"] < 80  # the model predicts text (uniform would be 4096)
    assert steps["sample"]["text"] and len(steps["sample"]["ids"]) == 32
    # artefacts kept: the downloaded release, the store and the resharded store
    assert (keep / "download" / "ckpt-0" / "SHA256SUMS").exists()
    assert (keep / "store" / "slncx.json").exists() and (keep / "store-8x1" / "slncx.json").exists()
    assert report["seconds"] < 120


def test_greedy_continuation_is_fixed():
    """slncx-tools sample on the embedded model, greedy: a fixed, plausible continuation."""
    r = CliRunner().invoke(cli, ["sample", "--prompt", "import os\n\ndef ", "--max-new-tokens", "24",
                                 "--temperature", "0", "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.output[r.output.index("{"):])
    result = out["results"][0] if "results" in out else out
    assert result["ids"] == [4046, 4028, 277, 299, 4, 262, 328, 610, 269, 609, 609, 609, 4029, 359, 587, 294,
                             420, 4025, 4, 4, 262, 328, 4, 262]
    assert result["text"] == '0(self):\n    """Return a string string string, and return the file.\n\n    """\n    '


def test_embedded_checkpoint_is_the_default_everywhere():
    r = CliRunner().invoke(cli, ["inspect", "--json"])
    info = json.loads(r.output)
    assert info["preset"] == "SLNCX-TINY" and info["total_tensors"] == 50
    assert info["path"] == str(embedded_dir() / "ckpt-0")


def test_training_script_runs_and_loss_decreases(tmp_path):
    out = tmp_path / "t"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "train_tiny.py"), "--out", str(out), "--quick", "--steps", "8",
         "--batch", "4", "--seq", "64", "--log-every", "4"],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads((out / "training.json").read_text())
    assert report["steps"] == 8 and report["last_loss"] < report["first_loss"] - 0.3
    from slncx_tools.release import ReleaseCheckpoint

    for sub in ("ckpt-0", "float/ckpt-0"):
        assert ReleaseCheckpoint(out / sub).problems() == []
    assert (out / "tokenizer.model").stat().st_size > 10_000
