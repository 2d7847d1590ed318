#!/usr/bin/env python3
"""Train `slncx-tiny`: a small model of exactly the SLNCX architecture, on the Python standard
library's own source (redistributable under the PSF license, present on every machine with Python).

    python scripts/train_tiny.py --out checkpoints/slncx-tiny            # the shipped model
    python scripts/train_tiny.py --out /tmp/t --steps 3 --quick          # a smoke run (tests)

It writes, into --out:
    tokenizer.model        SentencePiece BPE, 4096 pieces, [PAD]=0 [BOS]=1 [EOS]=2 [UNK]=3
    ckpt-0/                the release int8 layout (R = 8 row blocks for the row-parallel weights)
    float/ckpt-0/          the float master weights (bf16 matrices, f32 norms/router/embeddings)
    */ckpt-0/config.json   the ModelConfig (also the SLNCX_TINY preset in slncx_tools.config)
    training.json          data, steps, seed, losses, validation perplexity, timings

Reproducible for a seed on the same Python version (the corpus is that version's stdlib).
Needs the `train` extra (optax).
"""

from __future__ import annotations

import argparse
import glob
import io
import json
import math
import os
import sys
import sysconfig
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import numpy as np  # noqa: E402

def corpus_files() -> list:
    """The stdlib's top-level modules, sorted (deterministic for a Python version)."""
    lib = sysconfig.get_paths()["stdlib"]
    return sorted(glob.glob(os.path.join(lib, "*.py")))


def split_files(files: list) -> tuple:
    """Every 16th file is held out for validation."""
    return [f for i, f in enumerate(files) if i % 16], [f for i, f in enumerate(files) if i % 16 == 0]


def read_text(path: str) -> str:
    with open(path, encoding="utf-8", errors="replace") as f:
        return f.read()


def train_tokenizer(texts: list, vocab_size: int) -> bytes:
    import sentencepiece as spm

    def chunks():
        for t in texts:
            buf = ""
            for line in t.splitlines(keepends=True):
                buf += line
                if len(buf) > 2000:
                    yield buf
                    buf = ""
            if buf:
                yield buf

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=chunks(), model_writer=model, vocab_size=vocab_size, model_type="bpe",
        pad_id=0, bos_id=1, eos_id=2, unk_id=3,
        pad_piece="[PAD]", bos_piece="[BOS]", eos_piece="[EOS]", unk_piece="[UNK]",
        user_defined_symbols=["\n"], byte_fallback=True, normalization_rule_name="identity",
        add_dummy_prefix=False, remove_extra_whitespaces=False, allow_whitespace_only_pieces=True,
        split_digits=True, max_sentence_length=10000, num_threads=2, minloglevel=2,
        shuffle_input_sentence=False,
    )
    return model.getvalue()


def encode_all(sp, texts: list) -> np.ndarray:
    ids = []
    for t in texts:
        ids.extend(sp.encode(t))
        ids.append(2)  # [EOS] between files
    return np.asarray(ids, dtype=np.int32)


def init_params(cfg, seed: int) -> dict:
    """float32 master weights in the model's pytree layout (layers stacked, numeric order)."""
    from slncx_tools.params import LAYER_PARAMS

    rng = np.random.default_rng(seed)
    L = cfg.num_layers
    layers = {}
    for name, shape_fn, _, kind in LAYER_PARAMS:
        shape = (L,) + tuple(shape_fn(cfg))
        if kind == "float" and name.endswith("scale"):
            layers[name] = np.ones(shape, np.float32)
        else:
            fan_in = shape[-2]
            std = 1.0 / math.sqrt(fan_in)
            if name in ("multi_head_attention/linear/w", "moe/linear_1/w"):
                std /= math.sqrt(2 * L)  # residual projections start small
            layers[name] = (rng.standard_normal(shape) * std).astype(np.float32)
    return {
        # the embedding is multiplied by 78.4 on input and the logits by 0.577: start small
        "embeddings": (rng.standard_normal((cfg.vocab_size, cfg.emb_size)) * 0.02).astype(np.float32),
        "final_norm": np.ones((cfg.emb_size,), np.float32),
        "layers": layers,
    }


def make_loss(cfg):
    import jax
    import jax.numpy as jnp

    from slncx_tools import model

    def loss_fn(params, batch):  # batch int32 [B, T+1]
        inputs, targets = batch[:, :-1], batch[:, 1:]
        # The all-experts MoE: the same per-expert math as the grouped kernel the toolkit samples
        # with, but differentiable (the grouped kernel's data-dependent loops are not).
        logits, _ = model.forward(params, inputs, cfg, moe="dense")
        logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
        return nll.mean()

    return loss_fn


def evaluate(loss_fn, params, data: np.ndarray, seq: int, max_batches: int = 16) -> float:
    import jax

    n = (len(data) - 1) // seq
    windows = np.stack([data[i * seq : i * seq + seq + 1] for i in range(min(n, max_batches * 8))])
    f = jax.jit(loss_fn)
    losses = [float(f(params, windows[i : i + 8])) for i in range(0, len(windows), 8)]
    return float(np.mean(losses))


def to_release(cfg, params: dict, out: Path, *, quantized: bool) -> None:
    """Write params (numpy pytree) as a release-layout ckpt-0: int8 (R = release blocks) or float."""
    from slncx_tools.params import param_table
    from slncx_tools.quant import BF16, quantize
    from slncx_tools.release import write_tensor

    out.mkdir(parents=True, exist_ok=True)
    for e in param_table(cfg):
        if e.name == "embeddings":
            w = np.asarray(params["embeddings"], np.float32)
        elif e.name == "final_norm":
            w = np.asarray(params["final_norm"], np.float32)
        else:
            w = np.asarray(params["layers"][e.name][e.layer], np.float32)
        if e.quantized:
            w = w.astype(BF16)  # the master matrices are bf16
            value = quantize(w.astype(np.float32), e.release_blocks) if quantized else w
        else:
            value = w
        write_tensor(out / e.file, value)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--steps", type=int, default=1200)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="tiny corpus, for smoke tests")
    ap.add_argument("--log-every", type=int, default=50)
    args = ap.parse_args(argv)

    import jax
    import optax
    import sentencepiece as spm

    from slncx_tools.config import SLNCX_TINY

    t0 = time.time()
    cfg = SLNCX_TINY
    files = corpus_files()
    if args.quick:
        files = files[:24]
    train_files, val_files = split_files(files)
    train_texts = [read_text(f) for f in train_files]
    val_texts = [read_text(f) for f in val_files]
    args.out.mkdir(parents=True, exist_ok=True)
    tok = train_tokenizer(train_texts, cfg.vocab_size)
    (args.out / "tokenizer.model").write_bytes(tok)
    sp = spm.SentencePieceProcessor(model_proto=tok)
    train = encode_all(sp, train_texts)
    val = encode_all(sp, val_texts)
    print(f"corpus: {len(train_files)} train / {len(val_files)} validation files, "
          f"{len(train):,} / {len(val):,} tokens", flush=True)

    params = jax.tree_util.tree_map(jax.numpy.asarray, init_params(cfg, args.seed))
    schedule = optax.warmup_cosine_decay_schedule(0.0, args.lr, min(100, args.steps // 10 + 1), args.steps, args.lr * 0.05)
    opt = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, b2=0.98, weight_decay=0.01))
    opt_state = opt.init(params)
    loss_fn = make_loss(cfg)

    @jax.jit
    def step(params, opt_state, batch):
        loss, grads = jax.value_and_grad(loss_fn)(params, batch)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    rng = np.random.default_rng(args.seed + 1)
    losses = []
    t_train = time.time()
    for i in range(args.steps):
        starts = rng.integers(0, len(train) - args.seq - 1, args.batch)
        batch = np.stack([train[s : s + args.seq + 1] for s in starts])
        params, opt_state, loss = step(params, opt_state, batch)
        losses.append(float(loss))
        if (i + 1) % args.log_every == 0 or i == 0:
            rate = (i + 1) * args.batch * args.seq / (time.time() - t_train)
            print(f"step {i + 1:5d}  loss {np.mean(losses[-args.log_every:]):.4f}  {rate:,.0f} tok/s", flush=True)
    train_s = time.time() - t_train

    host = jax.tree_util.tree_map(np.asarray, params)
    val_loss = evaluate(loss_fn, params, val, args.seq)
    config_json = json.dumps(cfg.to_dict(), indent=1) + "\n"
    for sub, quantized in (("ckpt-0", True), ("float/ckpt-0", False)):
        to_release(cfg, host, args.out / sub, quantized=quantized)
        (args.out / sub / "config.json").write_text(config_json)
    report = {
        "data": "CPython %s standard library, top-level *.py modules (PSF license); every 16th file held out"
        % sys.version.split()[0],
        "train_files": len(train_files), "validation_files": len(val_files),
        "train_tokens": int(len(train)), "validation_tokens": int(len(val)),
        "steps": args.steps, "batch": args.batch, "seq": args.seq, "lr": args.lr, "seed": args.seed,
        "tokens_seen": args.steps * args.batch * args.seq,
        "first_loss": losses[0], "last_loss": losses[-1], "final_train_loss": float(np.mean(losses[-50:])),
        "validation_loss": val_loss, "validation_perplexity": math.exp(val_loss),
        "train_seconds": round(train_s, 1), "total_seconds": round(time.time() - t0, 1),
        "losses_every_50": [float(np.mean(losses[i : i + 50])) for i in range(0, len(losses), 50)],
        "jax": jax.__version__,
    }
    (args.out / "training.json").write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps({k: v for k, v in report.items() if k != "losses_every_50"}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
