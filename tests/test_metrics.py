"""The parity metrics against hand computations (math module, plain loops)."""

import math

import numpy as np
import pytest

from slncx_tools.metrics import compare_logits, kl_divergence, perplexity


def test_known_two_class_kld():
    # p = (1/2, 1/2), q = (1/4, 3/4): KL(p||q) = ½ ln 2 + ½ ln(2/3)
    ref = np.log([[0.5, 0.5]])
    cand = np.log([[0.25, 0.75]])
    expected = 0.5 * math.log(2) + 0.5 * math.log(2 / 3)
    assert kl_divergence(ref, cand)[0] == pytest.approx(expected, rel=1e-12)
    # logits are shift-invariant
    assert kl_divergence(ref + 7, cand - 3)[0] == pytest.approx(expected, rel=1e-12)
    assert kl_divergence(ref, ref)[0] == 0


def _naive(ref_row, cand_row):
    zp = sum(math.exp(x) for x in ref_row)
    zq = sum(math.exp(x) for x in cand_row)
    p = [math.exp(x) / zp for x in ref_row]
    q = [math.exp(x) / zq for x in cand_row]
    return p, q, sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))


def test_report_against_naive_loops():
    rng = np.random.default_rng(0)
    ref = rng.standard_normal((50, 7)) * 2
    cand = ref + rng.standard_normal((50, 7)) * 0.3
    targets = rng.integers(0, 7, 50)
    r = compare_logits(ref, cand, targets)
    klds, agree, dps, dpt, nll_p, nll_q = [], 0, [], [], 0.0, 0.0
    for i in range(50):
        p, q, kl = _naive(ref[i].tolist(), cand[i].tolist())
        klds.append(kl)
        top = max(range(7), key=lambda j: ref[i, j])
        agree += top == max(range(7), key=lambda j: cand[i, j])
        dps.append(q[top] - p[top])
        dpt.append(q[targets[i]] - p[targets[i]])
        nll_p -= math.log(p[targets[i]])
        nll_q -= math.log(q[targets[i]])
    assert r["positions"] == 50
    assert r["kld"]["mean"] == pytest.approx(sum(klds) / 50, rel=1e-9)
    assert r["kld"]["max"] == pytest.approx(max(klds), rel=1e-9)
    assert r["kld"]["median"] == pytest.approx(sorted(klds)[24] / 2 + sorted(klds)[25] / 2, rel=1e-9)
    assert r["top1_agreement"] == agree / 50
    assert r["delta_p_top"]["rms"] == pytest.approx(math.sqrt(sum(d * d for d in dps) / 50), rel=1e-9)
    assert r["delta_p_target"]["rms"] == pytest.approx(math.sqrt(sum(d * d for d in dpt) / 50), rel=1e-9)
    assert r["perplexity"]["reference"] == pytest.approx(math.exp(nll_p / 50), rel=1e-9)
    assert r["perplexity"]["ratio"] == pytest.approx(math.exp((nll_q - nll_p) / 50), rel=1e-9)
    assert r["abs_delta_logit"]["max"] == pytest.approx(np.abs(ref - cand).max())


def test_perplexity_of_uniform_is_vocab_size():
    assert perplexity(np.zeros((4, 9)), np.array([0, 3, 8, 1])) == pytest.approx(9.0)


def test_identical_logits_give_zero_difference():
    x = np.random.default_rng(1).standard_normal((10, 5))
    r = compare_logits(x, x.copy(), np.zeros(10, int))
    assert r["kld"]["max"] == 0 and r["top1_agreement"] == 1 and r["perplexity"]["ratio"] == 1
    assert r["abs_delta_logit"]["max"] == 0


def test_chunked_stats_equal_one_shot():
    from slncx_tools.metrics import concat_stats, position_stats, summarize_stats

    rng = np.random.default_rng(2)
    ref, cand = rng.standard_normal((30, 11)), rng.standard_normal((30, 11))
    t = rng.integers(0, 11, 30)
    chunked = summarize_stats(concat_stats([position_stats(ref[i:i + 7], cand[i:i + 7], t[i:i + 7]) for i in range(0, 30, 7)]))
    assert chunked == compare_logits(ref, cand, t)
