"""`slncx-tools demo`: the whole pipeline on the embedded slncx-tiny, offline, in well under a minute.

download (from a hub on 127.0.0.1 serving the embedded checkpoint, through the real download
path) → quantize to a store → reshard for an 8x1 mesh → verify checksums and parity against the
float master → sample a continuation. Each step is the same library call the CLI command makes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

REPO = "slncx/slncx-tiny"
DOWNLOAD_INCLUDE = ("ckpt-0/*", "tokenizer.model")

# Pass bounds for the int8 checkpoint against its float master on eval.txt. The model's
# perplexity there is ~42 (mean NLL ≈ 3.7 nats/token); int8 may cost at most 0.1 % of that:
# mean KL divergence ≤ 0.004 nats and |ln(perplexity ratio)| ≤ 0.004, and keep the float
# model's top token at ≥ 98 % of positions. Measured: KLD 0.0002, ln ratio 0.0001, top-1 99.2 %.
MAX_MEAN_KLD = 0.004
MAX_ABS_LN_PPL_RATIO = 0.004
MIN_TOP1 = 0.98


@dataclass
class DemoResult:
    steps: dict = field(default_factory=dict)
    seconds: float = 0.0
    ok: bool = True
    failures: list = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"steps": self.steps, "seconds": round(self.seconds, 2), "ok": self.ok, "failures": self.failures}


def run_demo(work: Path, *, mesh_spec: str = "8x1", prompt: str = "def __init__(self, ", max_new_tokens: int = 32,
             eval_tokens: int = 2048, context: int = 256, say: Callable[[str], None] = print) -> DemoResult:
    import numpy as np

    from . import hub
    from .checkpoint import open_checkpoint
    from .config import SLNCX_TINY
    from .convert import QuantizeOptions, quantize_checkpoint
    from .embedded import embedded_dir, eval_text, float_master
    from .load import load_params
    from .localhub import HubServer, files_from_dir
    from .mesh import make_mesh
    from .parity import logit_parity, windows
    from .reshard import reshard_checkpoint
    from .sampling import Generator
    from .tokenizer import Tokenizer
    from .verify import check_checkpoint

    work = Path(work)
    result = DemoResult()
    t_start = time.perf_counter()
    src = embedded_dir()
    say(f"slncx-tools demo: the whole pipeline on the embedded {SLNCX_TINY.name} "
        f"({sum(1 for _ in (src / 'ckpt-0').glob('tensor*'))} tensors), offline, in {work}")

    # 1. download from a hub on loopback, through huggingface_hub and our verified fetch
    t = time.perf_counter()
    files = {k: v for k, v in files_from_dir(src).items() if k.startswith("ckpt-0/") or k == "tokenizer.model"}
    with HubServer(files, repo=REPO) as server:
        source = hub.HubSource(REPO, endpoint=server.url)
        report = hub.download(source, work / "download", include=DOWNLOAD_INCLUDE, workers=4)
    if report.problems:
        raise RuntimeError(f"download: {report.problems[0]}")
    result.steps["download"] = {"files": len(report.outcomes), "bytes": report.received, "seconds": time.perf_counter() - t}
    say(f"[1/5] download  {len(report.outcomes)} files, {report.received:,} bytes from {server.url} "
        f"(SHA-256 checked while receiving; ckpt-0/SHA256SUMS written) -> {work / 'download'}  "
        f"{result.steps['download']['seconds']:.1f} s")

    # 2. quantize: the release's int8 is carried bit-exactly into a zarr3 store
    t = time.perf_counter()
    q = quantize_checkpoint(work / "download", work / "store", QuantizeOptions())
    result.steps["quantize"] = {"seconds": time.perf_counter() - t, "report": q}
    say(f"[2/5] quantize  release ckpt-0 -> TensorStore zarr3 store (int8 carried bit-exactly, zstd) -> "
        f"{work / 'store'}  {result.steps['quantize']['seconds']:.1f} s")

    # 3. reshard for the mesh: each device's piece becomes one chunk
    t = time.perf_counter()
    r = reshard_checkpoint(work / "store", work / f"store-{mesh_spec}", mesh_spec)
    result.steps["reshard"] = {"mesh": r["mesh"], "device_weight_bytes": r["device_weight_bytes"], "seconds": time.perf_counter() - t}
    per_device = r["device_weight_bytes"]
    per_device = max(per_device.values()) if isinstance(per_device, dict) else per_device
    say(f"[3/5] reshard   --mesh {mesh_spec}: chunk = device shard, {per_device:,} weight bytes per device -> "
        f"{work / f'store-{mesh_spec}'}  {result.steps['reshard']['seconds']:.1f} s")

    # 4. verify: checksums and values, then parity against the float master through the model
    t = time.perf_counter()
    target = work / f"store-{mesh_spec}"
    check = check_checkpoint(target)
    mesh = make_mesh(mesh_spec)
    tok = Tokenizer(work / "download" / "tokenizer.model")
    ids = tok.encode(eval_text().read_text(encoding="utf-8"))[:eval_tokens]
    parity = logit_parity(open_checkpoint(float_master()), open_checkpoint(target), windows(ids, context), mesh=mesh)
    result.steps["verify"] = {"check": check.to_dict(), "parity": parity, "seconds": time.perf_counter() - t}
    if not check.ok:
        result.failures += check.problems
    ln_ratio = parity["perplexity"]["ln_ratio"]
    if parity["kld"]["mean"] > MAX_MEAN_KLD:
        result.failures.append(f"mean KLD {parity['kld']['mean']:.5f} > {MAX_MEAN_KLD}")
    if abs(ln_ratio) > MAX_ABS_LN_PPL_RATIO:
        result.failures.append(f"|ln perplexity ratio| {abs(ln_ratio):.5f} > {MAX_ABS_LN_PPL_RATIO}")
    if parity["top1_agreement"] < MIN_TOP1:
        result.failures.append(f"top-1 agreement {parity['top1_agreement']:.4f} < {MIN_TOP1}")
    say(f"[4/5] verify    {check.arrays_hashed} arrays match slncx.json ({'OK' if check.ok else 'PROBLEMS'}); "
        f"int8 vs float master on {parity['positions']} held-out tokens: mean KLD {parity['kld']['mean']:.6f}, "
        f"p99.9 {parity['kld']['p99.9']:.4f}, top-1 {100 * parity['top1_agreement']:.2f} %, "
        f"perplexity {parity['perplexity']['reference']:.2f} -> {parity['perplexity']['candidate']:.2f} "
        f"(ratio {parity['perplexity']['ratio']:.5f})  {result.steps['verify']['seconds']:.1f} s")

    # 5. sample from the resharded store on the mesh
    t = time.perf_counter()
    params = load_params(open_checkpoint(target), mesh)
    gen = Generator(params, SLNCX_TINY, mesh).generate([tok.encode(prompt)], max_new_tokens=max_new_tokens,
                                                        temperature=0.0)
    text = tok.decode(gen.ids[0])
    result.steps["sample"] = {"prompt": prompt, "ids": [int(i) for i in gen.ids[0]], "text": text,
                              "decode_tokens_per_s": gen.decode_tokens_per_s, "seconds": time.perf_counter() - t}
    say(f"[5/5] sample    greedy on {mesh_spec}, {gen.decode_tokens_per_s:.0f} tok/s decode:")
    say("      " + (prompt + text).replace("\n", "\n      "))

    result.seconds = time.perf_counter() - t_start
    result.ok = not result.failures
    say(f"{'done' if result.ok else 'FAILED: ' + '; '.join(result.failures)} in {result.seconds:.1f} s")
    del np
    return result
