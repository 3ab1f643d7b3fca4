"""Losses for Stage I (SFT) and Stage II (preference optimisation), as plain functions of arrays.

SFT: masked next-token cross-entropy, **averaged per completion token over the whole (effective)
batch** -- ``sum(-logp * mask) / sum(mask)`` -- as TRL's SFTTrainer and Hugging Face's
``num_items_in_batch`` normalisation do. Long completions weigh in proportion to their length and
the value does not depend on how examples are packed into rows or split into micro-batches (a
per-example mean would favour short answers and change with packing). Prompt tokens carry no loss.

Preference losses follow TRL 1.16 (``trl/trainer/dpo_trainer.py`` for sigmoid, hinge and IPO,
``trl/experimental/orpo`` for ORPO, ``trl/experimental/cpo`` with ``loss_type="simpo"`` for SimPO):

- ``sigmoid`` (DPO): ``-logsigmoid(beta*d)*(1-ls) - logsigmoid(-beta*d)*ls`` with
  ``d = (pc - rc) - (pr - rr)`` over summed completion log-probs; ``ls`` = label smoothing
  (conservative DPO; TRL 1.16 moved it to ``robust``/``aot``, with ``ls=0`` the two agree).
- ``ipo``: ``((pc - rc)/nc - (pr - rr)/nr - 1/(2*beta))**2`` (log-ratios averaged per completion
  token, as TRL does).
- ``hinge``: ``relu(1 - beta*d)``.
- ``orpo``: ``nll_chosen - beta * logsigmoid(log_odds)`` with average per-token log-probs ``a``,
  ``log_odds = (ac - ar) - (log1mexp(ac) - log1mexp(ar))`` and the NLL of the chosen sequences
  (TRL: over prompt and completion, averaged per token); no reference model. ``beta`` is ORPO's
  lambda.
- ``orpo_llamafactory``: ORPO as LLaMA-Factory 0.6.2 computes it (the paper's Stage II; docs/method.md):
  per pair ``-ac - beta * logsigmoid(log_odds)`` with the same ``log_odds``, i.e. the NLL term is the
  pair's own *average completion* log-probability (prompt masked), then the mean over pairs.
- ``simpo``: ``-logsigmoid(beta*(ac - ar - gamma/beta))*(1-ls) - logsigmoid(-...)*ls`` with average
  per-token log-probs; no reference model.

Reward metrics as TRL logs them: DPO/IPO/hinge ``rewards/* = beta * (logp - ref_logp)`` (summed
log-probs); ORPO/SimPO ``rewards/* = beta * average logp``; ``logps/*`` are the policy log-probs the
loss uses (summed for DPO/IPO/hinge, averaged for ORPO/SimPO).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

PREFERENCE_LOSSES = ("sigmoid", "ipo", "hinge", "orpo", "orpo_llamafactory", "simpo")
REFERENCE_FREE = ("orpo", "orpo_llamafactory", "simpo")


def masked_sum(x: jax.Array, mask: jax.Array, axis=None) -> jax.Array:
    return jnp.sum(x * mask.astype(x.dtype), axis=axis)


def sft_loss(logps: jax.Array, loss_mask: jax.Array, n_tokens: jax.Array | None = None) -> jax.Array:
    """Mean negative log-likelihood per completion token. ``n_tokens`` overrides the normaliser
    (the token count of the whole accumulated batch, so micro-batch losses add up exactly)."""
    if n_tokens is None:
        n_tokens = jnp.sum(loss_mask)
    return -masked_sum(logps, loss_mask) / jnp.maximum(n_tokens, 1.0)


def log1mexp(x: jax.Array) -> jax.Array:
    """log(1 - exp(x)) for x < 0, stable on both sides of -ln 2 (as TRL's ORPO)."""
    t = -0.6931471805599453
    safe_lo = jnp.where(x < t, x, t)
    safe_hi = jnp.where(x < t, t, x)
    return jnp.where(x < t, jnp.log1p(-jnp.exp(safe_lo)), jnp.log(-jnp.expm1(safe_hi)))


def preference_loss(
    loss_type: str,
    policy_chosen: jax.Array,
    policy_rejected: jax.Array,
    ref_chosen: jax.Array | None = None,
    ref_rejected: jax.Array | None = None,
    *,
    chosen_len: jax.Array | None = None,
    rejected_len: jax.Array | None = None,
    chosen_nll: jax.Array | float = 0.0,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    gamma: float = 0.5,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Per-pair losses ``[B]`` and per-pair metric values (``{name: [B]}``, TRL's names).

    ``policy_*``/``ref_*`` are *summed* completion log-probs ``[B]``; ``*_len`` the completion
    token counts (needed by IPO, ORPO, SimPO). ``chosen_nll`` (ORPO) is a scalar added to every
    pair's loss (so the batch mean adds it once). The caller averages over valid pairs.
    """
    if loss_type not in PREFERENCE_LOSSES:
        raise ValueError(f"unknown preference loss {loss_type!r}; valid: {PREFERENCE_LOSSES}")
    f32 = lambda x: None if x is None else jnp.asarray(x, jnp.float32)
    pc, pr, rc, rr = f32(policy_chosen), f32(policy_rejected), f32(ref_chosen), f32(ref_rejected)
    nc = None if chosen_len is None else jnp.maximum(f32(chosen_len), 1.0)
    nr = None if rejected_len is None else jnp.maximum(f32(rejected_len), 1.0)
    ls = label_smoothing
    if loss_type in REFERENCE_FREE:
        if nc is None or nr is None:
            raise ValueError(f"{loss_type} needs chosen_len and rejected_len")
        ac, ar = pc / nc, pr / nr
        if loss_type in ("orpo", "orpo_llamafactory"):
            log_odds = (ac - ar) - (log1mexp(ac) - log1mexp(ar))
            ratio = jax.nn.log_sigmoid(log_odds)
            extra = {"log_odds_ratio": ratio, "log_odds_chosen": log_odds}
            if loss_type == "orpo":
                losses = jnp.asarray(chosen_nll, jnp.float32) - beta * ratio
            else:  # LLaMA-Factory: each pair's average completion NLL
                losses = -ac - beta * ratio
                extra["nll_loss"] = -ac
        else:
            logits = (ac - ar) - gamma / beta
            losses = -jax.nn.log_sigmoid(beta * logits) * (1 - ls) - jax.nn.log_sigmoid(-beta * logits) * ls
            extra = {}
        chosen_rewards, rejected_rewards = beta * ac, beta * ar
        logp_c, logp_r = ac, ar
    else:
        if rc is None or rr is None:
            raise ValueError(f"{loss_type} needs reference log-probs")
        chosen_lr, rejected_lr = pc - rc, pr - rr
        d = chosen_lr - rejected_lr
        if loss_type == "sigmoid":
            losses = -jax.nn.log_sigmoid(beta * d) * (1 - ls) - jax.nn.log_sigmoid(-beta * d) * ls
        elif loss_type == "hinge":
            losses = jax.nn.relu(1.0 - beta * d)
        else:  # ipo
            if nc is None or nr is None:
                raise ValueError("ipo needs chosen_len and rejected_len")
            losses = (chosen_lr / nc - rejected_lr / nr - 1.0 / (2.0 * beta)) ** 2
        chosen_rewards, rejected_rewards = beta * chosen_lr, beta * rejected_lr
        logp_c, logp_r = pc, pr
        extra = {}
    metrics = {
        "rewards/chosen": chosen_rewards,
        "rewards/rejected": rejected_rewards,
        "rewards/accuracies": (chosen_rewards > rejected_rewards).astype(jnp.float32),
        "rewards/margins": chosen_rewards - rejected_rewards,
        "logps/chosen": logp_c,
        "logps/rejected": logp_r,
        **extra,
    }
    return losses, jax.tree.map(jax.lax.stop_gradient, metrics)


def mean_preference_loss(loss_type: str, *args, pair_mask: jax.Array | None = None, **kw):
    """Batch mean of :func:`preference_loss` over valid pairs: ``(loss, {name: scalar})``."""
    losses, per_pair = preference_loss(loss_type, *args, **kw)
    if pair_mask is None:
        pair_mask = jnp.ones_like(losses)
    n = jnp.maximum(jnp.sum(pair_mask), 1.0)
    loss = jnp.sum(losses * pair_mask) / n
    metrics = {k: jnp.sum(v * pair_mask) / n for k, v in per_pair.items()}
    metrics["loss"] = loss
    return loss, metrics
