"""Logit-parity metrics, reported the way llama.cpp's `perplexity --kl-divergence` does.

All functions take logits of the reference and the candidate model for the same positions,
[N, V] (flatten batch and sequence first, dropping pad positions), and compute in float64.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

PERCENTILES = (99.9, 99.0, 95.0, 90.0, 50.0, 10.0, 5.0, 1.0)


def log_softmax(logits: np.ndarray) -> np.ndarray:
    x = np.asarray(logits, dtype=np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def kl_divergence(ref_logits: np.ndarray, cand_logits: np.ndarray) -> np.ndarray:
    """KL(reference ‖ candidate) per position, in nats: Σ p_ref · (log p_ref − log p_cand)."""
    lp, lq = log_softmax(ref_logits), log_softmax(cand_logits)
    p = np.exp(lp)
    return np.maximum((p * (lp - lq)).sum(axis=-1), 0.0)


def perplexity(logits: np.ndarray, targets: np.ndarray) -> float:
    """exp(mean negative log-likelihood of `targets` [N] under `logits` [N, V])."""
    lp = log_softmax(logits)
    nll = -lp[np.arange(len(targets)), targets]
    return float(np.exp(nll.mean()))


def _summary(values: np.ndarray) -> dict:
    out = {"mean": float(values.mean()), "median": float(np.median(values)),
           "max": float(values.max()), "min": float(values.min())}
    for q in PERCENTILES:
        out[f"p{q:g}"] = float(np.percentile(values, q))
    return out


def position_stats(ref_logits: np.ndarray, cand_logits: np.ndarray, targets: Optional[np.ndarray] = None) -> dict:
    """Per-position figures for one chunk of positions ([N, V] logits): small [N] arrays that
    can be concatenated across chunks, so a long evaluation never holds all logits at once."""
    ref = np.asarray(ref_logits, dtype=np.float64)
    cand = np.asarray(cand_logits, dtype=np.float64)
    if ref.shape != cand.shape or ref.ndim != 2:
        raise ValueError(f"logits must both be [N, V]; got {ref.shape} and {cand.shape}")
    lp, lq = log_softmax(ref), log_softmax(cand)
    p, q = np.exp(lp), np.exp(lq)
    rows = np.arange(len(ref))
    top_ref = ref.argmax(axis=-1)
    dlogit = np.abs(ref - cand)
    stats = {
        "kld": np.maximum((p * (lp - lq)).sum(axis=-1), 0.0),
        "same_top1": top_ref == cand.argmax(axis=-1),
        "dp_top": q[rows, top_ref] - p[rows, top_ref],
        "dlogit_mean": dlogit.mean(axis=-1),
        "dlogit_max": dlogit.max(axis=-1),
    }
    if targets is not None:
        t = np.asarray(targets)
        stats["nll_ref"] = -lp[rows, t]
        stats["nll_cand"] = -lq[rows, t]
        stats["dp_target"] = q[rows, t] - p[rows, t]
    return stats


def concat_stats(chunks: list) -> dict:
    return {k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]}


def summarize_stats(stats: dict) -> dict:
    """The report (as `verify --against` prints it) from per-position figures."""
    kld, dp_top = stats["kld"], stats["dp_top"]
    report = {
        "positions": int(len(kld)),
        "kld": _summary(kld),
        "top1_agreement": float(stats["same_top1"].mean()),
        "delta_p_top": {"rms": float(np.sqrt((dp_top**2).mean())), **_summary(dp_top)},
        "abs_delta_logit": {"mean": float(stats["dlogit_mean"].mean()), "max": float(stats["dlogit_max"].max())},
    }
    if "nll_ref" in stats:
        nll_ref, nll_cand, dp = stats["nll_ref"], stats["nll_cand"], stats["dp_target"]
        ppl_ref, ppl_cand = float(np.exp(nll_ref.mean())), float(np.exp(nll_cand.mean()))
        report["perplexity"] = {
            "reference": ppl_ref,
            "candidate": ppl_cand,
            "ratio": ppl_cand / ppl_ref,
            "ln_ratio": float(nll_cand.mean() - nll_ref.mean()),
        }
        report["delta_p_target"] = {"rms": float(np.sqrt((dp**2).mean())), **_summary(dp)}
    return report


def compare_logits(ref_logits: np.ndarray, cand_logits: np.ndarray, targets: Optional[np.ndarray] = None) -> dict:
    """Everything `verify --against` reports for [N, V] logits, as a JSON-able dict.

    `targets` [N] are the next tokens (teacher forcing) for perplexity and llama.cpp's Δp of
    the correct token; without them only distribution metrics are reported.
    """
    return summarize_stats(position_stats(ref_logits, cand_logits, targets))
