"""The pure training steps: ``(state, batch[, frozen]) -> (state, metrics)`` for SFT and preference
optimisation, their evaluation counterparts and the reference scoring pass.

With LoRA only the adapters are in the state (trained, optimised, donated); the frozen base weights
are the separate ``frozen`` argument. Batches are ``[grad_accum, rows, seq_len]`` (see
``batching.py``); a step scans over the micro-batches and adds their gradients. Every micro-batch
loss is normalised by the counts of the *whole* accumulated batch (completion tokens for SFT, pairs
for DPO), so accumulation gives exactly the loss and gradient of one big batch.

Reference log-probabilities for DPO/IPO/hinge come either from the batch (``reference="precompute"``,
see ``reference.py``), or -- with LoRA -- from the same base weights with the adapters switched off
inside the step (``reference="lora_off"``: one more forward pass, no memory for a second model).
ORPO and SimPO need no reference. ``build.py`` compiles these functions over the mesh.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import jax
import jax.numpy as jnp
import optax
from flax import struct

from w2s_jax.models.config import ModelConfig
from w2s_jax.models.decoder import forward
from w2s_jax.models.logprobs import token_logps
from w2s_jax.parallel.sharding import DEFAULT_RULES, Rules, constrain
from w2s_jax.train import losses as L
from w2s_jax.train.config import TrainConfig

__all__ = ["TrainState", "StepSpec", "sequence_token_logps", "sft_step", "dpo_step", "sft_eval", "dpo_eval",
           "reference_logps"]


@struct.dataclass
class TrainState:
    step: jax.Array  # int32 []
    params: Any  # the trainable tree: full parameters, or the LoRA adapters
    opt_state: Any
    rng: jax.Array  # uint32 [2] raw PRNG key; per-step keys are fold_in(rng, step)
    data_pos: jax.Array  # int32 [2]: (epoch, batches of that epoch consumed)


@dataclass(frozen=True)
class StepSpec:
    """Everything static about a step (hashable; part of the compiled function's identity)."""

    model_cfg: ModelConfig
    kind: Literal["sft", "dpo"] = "sft"
    lora_scale: float | None = None  # None = full fine-tuning
    lora_dropout: float = 0.0
    loss_type: str = "sigmoid"
    beta: float = 0.1
    label_smoothing: float = 0.0
    simpo_gamma: float = 0.5
    reference: str = "precompute"
    logits_chunks: int = 1
    mesh: Any = None
    rules: Rules = DEFAULT_RULES

    @property
    def uses_lora(self) -> bool:
        return self.lora_scale is not None

    @property
    def needs_reference(self) -> bool:
        return self.kind == "dpo" and self.loss_type not in L.REFERENCE_FREE

    @classmethod
    def from_train_config(cls, kind, model_cfg, cfg: TrainConfig, mesh, rules=DEFAULT_RULES) -> StepSpec:
        lc = cfg.lora
        return cls(model_cfg, kind, None if lc is None else lc.scale, 0.0 if lc is None else lc.dropout,
                   cfg.loss_type, cfg.beta, cfg.label_smoothing, cfg.simpo_gamma, cfg.reference,
                   cfg.logits_chunks, mesh, rules)


def _split(spec: StepSpec, trainable, frozen):
    return (frozen, trainable) if spec.uses_lora else (trainable, None)


def sequence_token_logps(params, lora, mb: dict, spec: StepSpec, dropout_key=None) -> jax.Array:
    """Per-token log-probs of the targets ``[R, T]`` (float32 logits, plain autodiff: on the CPU this
    measured faster than a hand-written lm-head backward)."""
    cfg = spec.model_cfg
    kw = dict(positions=mb["positions"], segment_ids=mb["segment_ids"], lora=lora,
              lora_scale=spec.lora_scale or 1.0, lora_dropout=spec.lora_dropout if dropout_key is not None else 0.0,
              dropout_key=dropout_key, mesh=spec.mesh, rules=spec.rules)
    if spec.logits_chunks <= 1:
        logits = forward(params, mb["tokens"], cfg, **kw)
        return token_logps(logits, mb["targets"])
    # chunks of rows whose logits are recomputed in the backward pass: less memory, more compute
    hidden = forward(params, mb["tokens"], cfg, return_hidden=True, **kw)
    head = params["embed"].T if cfg.tie_embeddings else params["lm_head"]
    R, T, D = hidden.shape
    C = spec.logits_chunks
    if (R * T) % C:
        raise ValueError(f"logits_chunks={C} must divide rows*seq_len={R * T}")

    @jax.checkpoint
    def chunk(h, t):
        lg = jnp.einsum("nd,dv->nv", h, head.astype(h.dtype), preferred_element_type=jnp.float32)
        return token_logps(constrain(lg, ("batch", "vocab"), spec.mesh, spec.rules), t)

    hs = hidden.reshape(C, R * T // C, D)
    ts = mb["targets"].reshape(C, R * T // C)
    return jax.lax.map(lambda xs: chunk(*xs), (hs, ts)).reshape(R, T)


def _accumulate(micro_fn, trainable, batch, grad_sh):
    """Sum ``value_and_grad(micro_fn)`` over the leading micro-batch axis. ``micro_fn(trainable, mb,
    a) -> (loss, aux)``; returns (loss, aux, grads) summed (fp32 accumulators)."""
    grad_fn = jax.value_and_grad(micro_fn, has_aux=True)
    A = jax.tree.leaves(batch)[0].shape[0]
    if A == 1:
        (loss, aux), grads = grad_fn(trainable, jax.tree.map(lambda x: x[0], batch), jnp.int32(0))
        return loss, aux, grads

    def body(carry, xs):
        mb, a = xs
        (loss, aux), g = grad_fn(trainable, mb, a)
        c_loss, c_aux, c_g = carry
        c_g = jax.tree.map(lambda s, x: s + x.astype(jnp.float32), c_g, g)
        if grad_sh is not None:
            c_g = jax.lax.with_sharding_constraint(c_g, grad_sh)
        return (c_loss + loss, jax.tree.map(jnp.add, c_aux, aux), c_g), None

    mb0 = jax.tree.map(lambda x: x[0], batch)
    aux0 = jax.tree.map(jnp.zeros_like, jax.eval_shape(lambda: micro_fn(trainable, mb0, jnp.int32(0))[1]))
    g0 = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), trainable)
    if grad_sh is not None:
        g0 = jax.lax.with_sharding_constraint(g0, grad_sh)
    (loss, aux, grads), _ = jax.lax.scan(body, (jnp.float32(0), aux0, g0), (batch, jnp.arange(A, dtype=jnp.int32)))
    grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, trainable)
    return loss, aux, grads


def _apply(state: TrainState, grads, tx, loss, aux):
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), **aux}
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics


def _dropout_key(state, spec, a):
    if not (spec.uses_lora and spec.lora_dropout > 0):
        return None
    return jax.random.fold_in(jax.random.fold_in(state.rng, state.step), a)


def sft_step(state: TrainState, batch: dict, frozen=None, *, spec: StepSpec, tx, grad_sh=None):
    """One optimizer step of masked next-token cross-entropy (mean per completion token)."""
    n_tok = jnp.sum(batch["loss_mask"])
    denom = jnp.maximum(n_tok, 1.0)

    def micro(trainable, mb, a):
        params, lora = _split(spec, trainable, frozen)
        logps = sequence_token_logps(params, lora, mb, spec, _dropout_key(state, spec, a))
        return -jnp.sum(logps * mb["loss_mask"]) / denom, {}

    loss, aux, grads = _accumulate(micro, state.params, batch, grad_sh)
    return _apply(state, grads, tx, loss, {**aux, "tokens": n_tok})


def _pref_terms(logps, mb, ref, spec: StepSpec, n_pairs, n_nll):
    """Loss (already divided by the batch totals) and summed metrics of one micro-batch."""
    B = mb["pair_mask"].shape[0]
    pm = mb["pair_mask"]
    seq = jnp.sum(logps * mb["loss_mask"], axis=-1)
    lens = jnp.sum(mb["loss_mask"], axis=-1)
    losses, per = L.preference_loss(
        spec.loss_type, seq[:B], seq[B:], ref[:B], ref[B:], chosen_len=lens[:B], rejected_len=lens[B:],
        beta=spec.beta, label_smoothing=spec.label_smoothing, gamma=spec.simpo_gamma,
    )
    loss = jnp.sum(losses * pm) / n_pairs
    aux = {k: jnp.sum(v * pm) / n_pairs for k, v in per.items()}
    if spec.loss_type == "orpo":  # TRL: NLL of the chosen sequences, prompt included, mean per token
        nll = -jnp.sum(logps[:B] * mb["nll_mask"][:B]) / n_nll
        loss = loss + nll
        aux["nll_loss"] = nll
    return loss, aux


def _pref_counts(batch):
    B = batch["pair_mask"].shape[-1]
    n_pairs = jnp.maximum(jnp.sum(batch["pair_mask"]), 1.0)
    n_nll = jnp.maximum(jnp.sum(batch["nll_mask"][:, :B]), 1.0)
    return n_pairs, n_nll


def _reference(frozen, mb, spec: StepSpec):
    """Reference summed log-probs ``[2B]``: precomputed, or the base weights with adapters off."""
    if not spec.needs_reference:
        return jnp.zeros(mb["ref_logps"].shape, jnp.float32)
    if spec.reference == "lora_off":
        if not spec.uses_lora:
            raise ValueError("reference='lora_off' needs LoRA training")
        lp = sequence_token_logps(frozen, None, mb, spec)
        return jax.lax.stop_gradient(jnp.sum(lp * mb["loss_mask"], axis=-1))
    return mb["ref_logps"]


def dpo_step(state: TrainState, batch: dict, frozen=None, *, spec: StepSpec, tx, grad_sh=None):
    """One optimizer step of the configured preference loss over ``2B`` rows (chosen, rejected)."""
    n_pairs, n_nll = _pref_counts(batch)

    def micro(trainable, mb, a):
        ref = _reference(frozen, mb, spec)
        params, lora = _split(spec, trainable, frozen)
        logps = sequence_token_logps(params, lora, mb, spec, _dropout_key(state, spec, a))
        return _pref_terms(logps, mb, ref, spec, n_pairs, n_nll)

    loss, aux, grads = _accumulate(micro, state.params, batch, grad_sh)
    return _apply(state, grads, tx, loss, {**aux, "pairs": jnp.sum(batch["pair_mask"])})


def sft_eval(trainable, batch, frozen=None, *, spec: StepSpec):
    """(summed completion NLL, completion tokens) of a batch, for an exact mean over many batches."""
    params, lora = _split(spec, trainable, frozen)

    def one(mb):
        lp = sequence_token_logps(params, lora, mb, spec)
        return -jnp.sum(lp * mb["loss_mask"]), jnp.sum(mb["loss_mask"])

    s, n = jax.lax.map(one, batch)
    return {"loss_sum": jnp.sum(s), "count": jnp.sum(n)}


def dpo_eval(trainable, batch, frozen=None, *, spec: StepSpec):
    """Metric sums over valid pairs (the ORPO NLL as a token sum) for exact means over batches."""
    params, lora = _split(spec, trainable, frozen)

    def one(mb):
        ref = _reference(frozen, mb, spec)
        lp = sequence_token_logps(params, lora, mb, spec)
        B = mb["pair_mask"].shape[0]
        loss, aux = _pref_terms(lp, mb, ref, spec, 1.0, 1.0)
        if spec.loss_type == "orpo":
            loss = loss - aux["nll_loss"]
            aux["nll_tokens"] = jnp.sum(mb["nll_mask"][:B])
        return {"loss": loss, **aux, "count": jnp.sum(mb["pair_mask"])}

    out = jax.lax.map(one, batch)
    return jax.tree.map(jnp.sum, out)


def reference_logps(params, batch, lora=None, *, spec: StepSpec):
    """Summed completion log-probs ``[A, 2B]`` of a preference batch (the scoring pass)."""
    return jax.lax.map(lambda mb: jnp.sum(sequence_token_logps(params, lora, mb, spec) * mb["loss_mask"], -1), batch)
