"""Preference losses and reward metrics against TRL's own code, evaluated in PyTorch.

TRL 1.16 keeps the DPO/IPO/hinge formulas inside ``DPOTrainer._compute_loss``, ORPO's in
``ORPOTrainer.odds_ratio_loss`` and SimPO's in ``CPOTrainer.cpo_loss``: these methods are called
unbound with a minimal stand-in for ``self`` (and, for DPO, a stand-in model that returns the given
per-token log-probs), so the numbers compared are TRL's, not a transcription."""

from collections import defaultdict
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from w2s_jax.models.logprobs import token_logps
from w2s_jax.train import losses as L

torch = pytest.importorskip("torch")
trl = pytest.importorskip("trl")

B, T = 5, 9


def _data(seed=0):
    """Per-token log-probs [2B, T-1] that are zero outside the (shifted) completion mask, the
    completion mask [2B, T] (varied lengths) and reference sums [B] each."""
    rng = np.random.default_rng(seed)
    cm = np.zeros((2 * B, T), np.int64)
    for r in range(2 * B):
        start = rng.integers(1, 4)
        end = rng.integers(start + 1, T + 1)
        cm[r, start:end] = 1
    ptl = -rng.uniform(0.05, 1.5, size=(2 * B, T - 1)) * cm[:, 1:]
    ref_c = -rng.uniform(1, 5, size=B)
    ref_r = -rng.uniform(1, 5, size=B)
    return ptl.astype(np.float32), cm, ref_c.astype(np.float32), ref_r.astype(np.float32)


def _acc():
    return SimpleNamespace(device="cpu", gather_for_metrics=lambda x: x, gather=lambda x: x, unwrap_model=lambda m: m)


def trl_dpo(loss_type, beta, ptl, cm, ref_c, ref_r):
    from trl import DPOTrainer

    n = ptl.shape[0]
    t = torch.from_numpy(ptl)

    def model(**kw):
        z = torch.zeros_like(t)
        return SimpleNamespace(log_probs=t, entropy=z, mean_logits=z, is_top1=torch.zeros_like(t, dtype=torch.bool))

    stub = SimpleNamespace(
        model=SimpleNamespace(training=True), accelerator=_acc(), aux_loss_enabled=False, ld_alpha=None,
        precompute_ref_logps=True, f_divergence_type="reverse_kl", loss_types=[loss_type], loss_weights=[1.0],
        beta=beta, label_smoothing=0.0, use_weighting=False, _metrics={"train": defaultdict(list)},
        _total_train_tokens=0, _tp_size=1, args=SimpleNamespace(),
    )
    inputs = dict(
        input_ids=torch.zeros(n, cm.shape[1], dtype=torch.long), attention_mask=torch.ones(n, cm.shape[1]),
        completion_mask=torch.from_numpy(cm), ref_chosen_logps=torch.from_numpy(ref_c),
        ref_rejected_logps=torch.from_numpy(ref_r),
    )
    loss = DPOTrainer._compute_loss(stub, model, inputs, False)
    metrics = {k: v[-1] for k, v in stub._metrics["train"].items()}
    return float(loss), metrics


def ours(loss_type, beta, ptl, cm, ref_c, ref_r, **kw):
    seq = ptl.sum(-1)
    lens = cm[:, 1:].sum(-1).astype(np.float32)
    return L.mean_preference_loss(
        loss_type, seq[:B], seq[B:], ref_c, ref_r, chosen_len=lens[:B], rejected_len=lens[B:], beta=beta, **kw
    )


NAMES = ["rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
         "logps/rejected"]


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "hinge"])
@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_dpo_family_matches_trl(loss_type, beta):
    ptl, cm, rc, rr = _data(1)
    want_loss, want = trl_dpo(loss_type, beta, ptl, cm, rc, rr)
    loss, got = ours(loss_type, beta, ptl, cm, rc, rr)
    np.testing.assert_allclose(float(loss), want_loss, rtol=2e-6, atol=1e-7)
    for k in NAMES:
        np.testing.assert_allclose(float(got[k]), want[k], rtol=2e-6, atol=1e-6, err_msg=k)
    assert float(got["loss"]) == float(loss)


def test_dpo_label_smoothing_is_conservative_dpo():
    """sigmoid + label smoothing = cDPO, which TRL computes in CPOTrainer.cpo_loss (loss_type
    sigmoid) from the log-ratio difference."""
    from trl.experimental.cpo import CPOTrainer

    ptl, cm, rc, rr = _data(2)
    seq = ptl.sum(-1)
    beta, ls = 0.3, 0.2
    stub = SimpleNamespace(alpha=0.0, loss_type="sigmoid", beta=beta, label_smoothing=ls, accelerator=_acc())
    losses, _, _ = CPOTrainer.cpo_loss(stub, torch.from_numpy(seq[:B] - rc), torch.from_numpy(seq[B:] - rr))
    loss, _ = ours("sigmoid", beta, ptl, cm, rc, rr, label_smoothing=ls)
    np.testing.assert_allclose(float(loss), float(losses.mean()), rtol=2e-6)


def test_orpo_matches_trl():
    from trl.experimental.orpo import ORPOTrainer

    ptl, cm, _, _ = _data(3)
    lens = cm[:, 1:].sum(-1)
    avg = ptl.sum(-1) / lens
    beta = 0.25
    nll = 1.2345
    stub = SimpleNamespace(beta=beta, accelerator=_acc())
    losses, cr, rr_, ratio, log_odds = ORPOTrainer.odds_ratio_loss(
        stub, torch.from_numpy(avg[:B]), torch.from_numpy(avg[B:])
    )
    want = nll - float(losses.mean())
    loss, got = ours("orpo", beta, ptl, cm, None, None, chosen_nll=nll)
    np.testing.assert_allclose(float(loss), want, rtol=2e-6)
    np.testing.assert_allclose(float(got["rewards/chosen"]), float(cr.mean()), rtol=2e-6)
    np.testing.assert_allclose(float(got["rewards/rejected"]), float(rr_.mean()), rtol=2e-6)
    np.testing.assert_allclose(float(got["rewards/accuracies"]), float((cr > rr_).float().mean()))
    np.testing.assert_allclose(float(got["log_odds_ratio"]), float(ratio), rtol=2e-6)
    np.testing.assert_allclose(float(got["log_odds_chosen"]), float(log_odds), rtol=2e-6)
    np.testing.assert_allclose(float(got["logps/chosen"]), float(avg[:B].mean()), rtol=2e-6)


def test_log1mexp_both_branches_and_gradient_finite():
    x = jnp.array([-1e-6, -0.1, -0.6931, -0.7, -5.0, -50.0])
    ref = np.log(-np.expm1(np.asarray(x, np.float64)))
    np.testing.assert_allclose(np.asarray(L.log1mexp(x)), ref, rtol=1e-5, atol=1e-12)
    g = jax.grad(lambda v: L.log1mexp(v).sum())(x)
    assert np.all(np.isfinite(np.asarray(g)))


@pytest.mark.parametrize("ls", [0.0, 0.1])
def test_simpo_matches_trl(ls):
    from trl.experimental.cpo import CPOTrainer

    ptl, cm, _, _ = _data(4)
    lens = cm[:, 1:].sum(-1)
    avg = ptl.sum(-1) / lens
    beta, gamma = 2.0, 0.7
    stub = SimpleNamespace(alpha=0.0, loss_type="simpo", simpo_gamma=gamma, beta=beta, label_smoothing=ls,
                           accelerator=_acc())
    losses, cr, rr_ = CPOTrainer.cpo_loss(stub, torch.from_numpy(avg[:B]), torch.from_numpy(avg[B:]))
    loss, got = ours("simpo", beta, ptl, cm, None, None, gamma=gamma, label_smoothing=ls)
    np.testing.assert_allclose(float(loss), float(losses.mean()), rtol=2e-6)
    np.testing.assert_allclose(float(got["rewards/chosen"]), float(cr.mean()), rtol=2e-6)
    np.testing.assert_allclose(float(got["rewards/margins"]), float((cr - rr_).mean()), rtol=2e-6, atol=1e-7)


def test_pair_mask_excludes_padding_pairs():
    ptl, cm, rc, rr = _data(5)
    seq = ptl.sum(-1)
    lens = cm[:, 1:].sum(-1)
    pm = np.array([1, 1, 1, 0, 0], np.float32)
    loss, m = L.mean_preference_loss("sigmoid", seq[:B], seq[B:], rc, rr, chosen_len=lens[:B],
                                     rejected_len=lens[B:], beta=0.1, pair_mask=pm)
    keep = np.r_[0:3]
    loss3, m3 = L.mean_preference_loss("sigmoid", seq[:B][keep], seq[B:][keep], rc[keep], rr[keep], beta=0.1)
    np.testing.assert_allclose(float(loss), float(loss3), rtol=1e-6)
    np.testing.assert_allclose(float(m["rewards/margins"]), float(m3["rewards/margins"]), rtol=1e-6)


def test_token_logps_and_sft_loss():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 5, 11)).astype(np.float32)
    targets = rng.integers(0, 11, size=(2, 5))
    mask = (rng.uniform(size=(2, 5)) > 0.4).astype(np.float32)
    lp = np.asarray(token_logps(jnp.asarray(logits), jnp.asarray(targets)))
    t = torch.from_numpy(logits).log_softmax(-1).gather(-1, torch.from_numpy(targets)[..., None])[..., 0]
    np.testing.assert_allclose(lp, t.numpy(), rtol=1e-6, atol=1e-6)
    want = torch.nn.functional.cross_entropy(
        torch.from_numpy(logits).reshape(-1, 11), torch.from_numpy(np.where(mask > 0, targets, -100)).reshape(-1)
    )
    np.testing.assert_allclose(float(L.sft_loss(jnp.asarray(lp), jnp.asarray(mask))), float(want), rtol=1e-6)


def test_unknown_loss_type_errors():
    with pytest.raises(ValueError, match="unknown preference loss"):
        L.preference_loss("kto", jnp.zeros(2), jnp.zeros(2), jnp.zeros(2), jnp.zeros(2))
