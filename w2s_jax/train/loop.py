"""Sharded SFT and preference-optimisation training: config, optimizer, pure steps, drivers.

The steps are pure functions ``(state, batch[, frozen]) -> (state, metrics)`` compiled with
``jax.jit`` over the mesh with explicit in/out shardings taken from the abstract state and the
state donated (``donate_argnums=0``), ahead of time at start-up (``.lower().compile()``; compile
time and ``memory_analysis()`` are logged). With LoRA only the adapters are in the state (trained,
optimised, donated); the frozen base weights are the separate, non-donated ``frozen`` argument.

Batches are ``[grad_accum, rows, seq_len]`` (see ``batching.py``); the step scans over the
micro-batches and adds their gradients. Every micro-batch loss is normalised by the counts of the
*whole* accumulated batch (completion tokens for SFT, pairs for DPO), so accumulation gives exactly
the loss and gradient of one big batch.

Reference log-probabilities for DPO/IPO/hinge come either from a scoring pass at start-up cached
as JSONL (``reference="precompute"``), or -- with LoRA -- from the same base weights with the
adapters switched off inside the step (``reference="lora_off"``: one more forward pass, no memory
for a second model). ORPO and SimPO need no reference.

Faults: a NaN or infinite loss raises :class:`TrainingDiverged` naming the step, before any
checkpoint of that step is written (losses are checked one step behind the device, and always
before a save), so the last good checkpoint stays intact. A run restarted with the same output
directory resumes from the newest valid checkpoint (``checkpoint.py``) and the data position stored
with it, and produces the same losses as an uninterrupted run.

Multi-host (``distributed.py``): every process builds the same global batch from the seeded batcher and
feeds only its own rows (:func:`distributed.process_local_batch`); results come to the host with
:func:`distributed.to_host`. Only process 0 writes ``metrics.jsonl``, TensorBoard logs, ``compile.json``
and the reference cache; Orbax checkpoints are written by all processes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from w2s_jax.core.errors import UserError
from w2s_jax.models.config import ModelConfig
from w2s_jax.models.decoder import forward
from w2s_jax.models.lora import LoRAConfig, init_lora, lora_axes, lora_shapes, merge_lora
from w2s_jax.models.params import param_axes, param_shapes
from w2s_jax.parallel import distributed
from w2s_jax.parallel.sharding import DEFAULT_RULES, Rules, constrain, named_sharding, tree_shardings
from w2s_jax.train import losses as L
from w2s_jax.train import optim
from w2s_jax.train.batching import (
    TEMPLATES,
    DataPosition,
    PreferenceBatcher,
    SFTBatcher,
    split_eval,
    tokenize_pairs,
    tokenize_sft,
)

log = logging.getLogger(__name__)


# XLA options for every compile of the steps (tests lower the CPU backend's optimisation level,
# which makes tiny models compile ~3x faster)
COMPILER_OPTIONS: dict = {}


class TrainingDiverged(UserError):
    """The loss became NaN or infinite; the message names the step and the last good checkpoint."""


# ----------------------------------------------------------------------------- config


@dataclass(frozen=True)
class TrainConfig:
    # optimizer (AdamW, decoupled weight decay, skipping norms and 1-D parameters)
    lr: float = 1e-5
    warmup_steps: int = 0
    warmup_ratio: float = 0.0  # used when warmup_steps == 0
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    min_lr_ratio: float = 0.0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0  # 0 = no clipping
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    # length of training: epochs, unless max_steps is set
    epochs: int = 1
    max_steps: int | None = None
    # batches: batch_size rows (SFT) or pairs (DPO) per micro-batch, grad_accum micro-batches/step
    batch_size: int = 8
    grad_accum: int = 1
    seq_len: int = 512
    packing: bool = True  # SFT only; preference rows are padded
    bucket_lengths: tuple[int, ...] = ()  # padded rows: shorter shapes (each compiles once)
    truncate: bool = False  # over-long sequences: False = error naming the id, True = truncate+count
    # how an example is tokenized: `joined` = prompt + " " + completion as one text (default);
    # `vanilla` = LLaMA-Factory's template: prompt and completion tokenized separately, concatenated
    template: Literal["joined", "vanilla"] = "joined"
    # evaluation, logging, checkpoints
    eval_fraction: float = 0.0
    eval_every: int = 0  # 0 = only at the end
    log_every: int = 10
    save_every: int = 0  # 0 = only at the end
    keep: int = 2
    async_checkpointing: bool = True
    seed: int = 0
    tensorboard: bool = True
    progress: bool = True
    # LoRA (None = full fine-tuning)
    lora: LoRAConfig | None = None
    # preference optimisation
    loss_type: Literal["sigmoid", "ipo", "hinge", "orpo", "orpo_llamafactory", "simpo"] = "sigmoid"
    beta: float = 0.1
    label_smoothing: float = 0.0
    simpo_gamma: float = 0.5
    reference: Literal["precompute", "lora_off"] = "precompute"
    # loss over vocab: split the rows into this many chunks whose logits are recomputed in the
    # backward pass (saves the [rows, T, V] logits residual; 1 = off)
    logits_chunks: int = 1

    def __post_init__(self):
        if self.loss_type not in L.PREFERENCE_LOSSES:
            raise ValueError(f"unknown loss_type {self.loss_type!r}; valid: {L.PREFERENCE_LOSSES}")
        if self.schedule not in ("cosine", "linear", "constant"):
            raise ValueError(f"unknown schedule {self.schedule!r}")
        if self.reference not in ("precompute", "lora_off"):
            raise ValueError(f"unknown reference mode {self.reference!r}")
        if self.batch_size < 1 or self.grad_accum < 1 or self.seq_len < 2:
            raise ValueError("batch_size and grad_accum must be >= 1 and seq_len >= 2")
        if self.max_steps is None and self.epochs < 1:
            raise ValueError("set epochs >= 1 or max_steps")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps must be >= 1 (or null: train for `epochs`), got {self.max_steps}")
        if self.beta <= 0:
            raise ValueError("beta must be > 0")
        finite = lambda x: isinstance(x, (int, float)) and math.isfinite(x)  # noqa: E731
        for name, ok, want in (
            ("lr", finite(self.lr) and self.lr >= 0, "a finite number >= 0"),
            ("warmup_steps", self.warmup_steps >= 0, ">= 0"),
            ("warmup_ratio", finite(self.warmup_ratio) and 0 <= self.warmup_ratio <= 1, "in [0, 1]"),
            ("min_lr_ratio", finite(self.min_lr_ratio) and self.min_lr_ratio >= 0, "a finite number >= 0"),
            ("weight_decay", finite(self.weight_decay) and self.weight_decay >= 0, "a finite number >= 0"),
            ("max_grad_norm", finite(self.max_grad_norm) and self.max_grad_norm >= 0, "a finite number >= 0"),
            ("eps", finite(self.eps) and self.eps > 0, "a finite number > 0"),
            ("eval_fraction", finite(self.eval_fraction) and 0 <= self.eval_fraction < 1, "in [0, 1)"),
            ("keep", self.keep >= 1, ">= 1"),
            ("logits_chunks", self.logits_chunks >= 1, ">= 1"),
        ):
            if not ok:
                raise ValueError(f"{name} must be {want}, got {getattr(self, name)}")


# ----------------------------------------------------------------------------- optimizer


def make_schedule(cfg: TrainConfig, total_steps: int) -> optax.Schedule:
    total = max(int(total_steps), 1)
    warm = cfg.warmup_steps or int(math.ceil(cfg.warmup_ratio * total))
    warm = min(warm, total)
    end = cfg.lr * cfg.min_lr_ratio
    if cfg.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(0.0, cfg.lr, warm, max(total, warm + 1), end)
    if cfg.schedule == "linear":
        decay = optax.linear_schedule(cfg.lr, end, max(total - warm, 1))
    else:
        decay = optax.constant_schedule(cfg.lr)
    if warm == 0:
        return decay
    return optax.join_schedules([optax.linear_schedule(0.0, cfg.lr, warm), decay], [warm])


def decay_mask(tree) -> Any:
    """True for weights that get weight decay, decided by the model's logical axis metadata
    (``param_axes`` / ``lora_axes``, or an NNX variable's own ``out_sharding``): not norm scales (axes
    ``("norm",)`` or ``("layers", "norm")``), and at least 2 axes besides ``layers`` (so LoRA factors
    decay). Leaves the model does not declare decay when they are at least 2-D."""
    cfg = ModelConfig()
    tables = (param_axes(cfg), lora_axes(cfg, LoRAConfig()))

    def axes_of(names):
        for node in tables:
            for n in names:
                node = node.get(n) if isinstance(node, dict) else None
            if isinstance(node, tuple):
                return node
        return None

    def decide(path, x):
        if hasattr(x, "get_metadata"):  # an nnx.Variable (an nnx.State of the model): its own metadata
            axes = x.get_metadata().get("out_sharding")
            return x.replace(x.ndim >= 2 if axes is None else decide_axes(tuple(axes)))
        axes = axes_of([str(getattr(k, "key", getattr(k, "name", ""))) for k in path])
        return x.ndim >= 2 if axes is None else decide_axes(axes)

    def decide_axes(axes):
        return axes[-1] != "norm" and sum(a != "layers" for a in axes) >= 2

    return jax.tree_util.tree_map_with_path(decide, tree, is_leaf=lambda x: hasattr(x, "get_metadata"))


def make_optimizer(cfg: TrainConfig, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """Clipping + AdamW as one pass per parameter (``optim.adamw``; equal to optax's
    ``chain(clip_by_global_norm, adamw(mask=decay_mask))``, tested)."""
    sched = make_schedule(cfg, total_steps)
    tx = optim.adamw(sched, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay, mask=decay_mask,
                     max_grad_norm=cfg.max_grad_norm)
    return tx, sched


# ----------------------------------------------------------------------------- state


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
        logits, _ = forward(params, mb["tokens"], cfg, **kw)
        return L.token_logps(logits, mb["targets"])
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
        return L.token_logps(constrain(lg, ("batch", "vocab"), spec.mesh, spec.rules), t)

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


# ----------------------------------------------------------------------------- shardings


def _single_mesh():
    from w2s_jax.parallel.sharding import make_mesh

    return make_mesh({"data": 1}, jax.devices()[:1])


def _replicated(mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def _opt_shardings(opt_abstract, trainable_abstract, trainable_sh, mesh):
    """Optimizer-state leaves that mirror a parameter get its sharding; the rest is replicated."""
    table = {}
    for (path, x), sh in zip(jax.tree_util.tree_flatten_with_path(trainable_abstract)[0],
                             jax.tree.leaves(trainable_sh)):
        table[tuple(path)] = (tuple(x.shape), sh)
    rep = _replicated(mesh)

    def pick(path, x):
        path = tuple(path)
        for k in range(len(path)):
            hit = table.get(path[k:])
            if hit is not None and hit[0] == tuple(x.shape):
                return hit[1]
        return rep

    return jax.tree_util.tree_map_with_path(pick, opt_abstract)


def batch_shardings(batch_like: dict, mesh, rules: Rules = DEFAULT_RULES) -> dict:
    out = {}
    for k, v in batch_like.items():
        names = (None, "batch", "length")[: len(v.shape)]
        out[k] = named_sharding(mesh, names, v.shape, rules)
    return out


def abstract_batch(kind: str, cfg: TrainConfig, T: int) -> dict:
    A, R = cfg.grad_accum, cfg.batch_size
    i32, f32 = jnp.int32, jnp.float32
    if kind == "sft":
        shp = (A, R, T)
        return {"tokens": jax.ShapeDtypeStruct(shp, i32), "targets": jax.ShapeDtypeStruct(shp, i32),
                "loss_mask": jax.ShapeDtypeStruct(shp, f32), "segment_ids": jax.ShapeDtypeStruct(shp, i32),
                "positions": jax.ShapeDtypeStruct(shp, i32)}
    shp = (A, 2 * R, T)
    return {"tokens": jax.ShapeDtypeStruct(shp, i32), "targets": jax.ShapeDtypeStruct(shp, i32),
            "loss_mask": jax.ShapeDtypeStruct(shp, f32), "segment_ids": jax.ShapeDtypeStruct(shp, i32),
            "positions": jax.ShapeDtypeStruct(shp, i32), "nll_mask": jax.ShapeDtypeStruct(shp, f32),
            "ref_logps": jax.ShapeDtypeStruct((A, 2 * R), f32), "pair_mask": jax.ShapeDtypeStruct((A, R), f32)}


@dataclass
class StepBundle:
    """The optimizer, the shardings and the (compiled) step/eval functions of one run."""

    spec: StepSpec
    tx: Any
    schedule: Any
    state_sh: Any
    frozen_sh: Any
    trainable_sh: Any
    abstract_state: Any
    step_fn: Callable  # jitted
    eval_fn: Callable  # jitted
    compiled: dict = field(default_factory=dict)  # seq_len -> Compiled
    compile_info: dict = field(default_factory=dict)


def build_steps(kind: str, model_cfg: ModelConfig, cfg: TrainConfig, total_steps: int, mesh,
                rules: Rules = DEFAULT_RULES, tx=None) -> StepBundle:
    """Optimizer, abstract sharded state and the jitted step with explicit in/out shardings."""
    spec = StepSpec.from_train_config(kind, model_cfg, cfg, mesh, rules)
    if spec.needs_reference and spec.reference == "lora_off" and not spec.uses_lora:
        raise UserError("train.reference=lora_off needs LoRA (train.lora); use `precompute` for full fine-tuning")
    if tx is None:
        tx, sched = make_optimizer(cfg, total_steps)
    else:
        sched = None
    p_shapes, p_axes = param_shapes(model_cfg), param_axes(model_cfg)
    p_sh = tree_shardings(mesh, p_axes, p_shapes, rules)
    if spec.uses_lora:
        t_shapes = lora_shapes(model_cfg, cfg.lora)
        t_sh = tree_shardings(mesh, lora_axes(model_cfg, cfg.lora), t_shapes, rules)
        frozen_sh = p_sh
    else:
        t_shapes, t_sh, frozen_sh = p_shapes, p_sh, None
    opt_abstract = jax.eval_shape(tx.init, t_shapes)
    rep = _replicated(mesh)
    state_sh = TrainState(step=rep, params=t_sh, opt_state=_opt_shardings(opt_abstract, t_shapes, t_sh, mesh),
                          rng=rep, data_pos=rep)
    abstract = TrainState(
        step=jax.ShapeDtypeStruct((), jnp.int32), params=t_shapes, opt_state=opt_abstract,
        rng=jax.ShapeDtypeStruct((2,), jnp.uint32), data_pos=jax.ShapeDtypeStruct((2,), jnp.int32),
    )
    abstract = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), abstract, state_sh)
    fn = sft_step if kind == "sft" else dpo_step
    ev = sft_eval if kind == "sft" else dpo_eval
    bsh = batch_shardings(abstract_batch(kind, cfg, cfg.seq_len), mesh, rules)
    step_fn = jax.jit(partial(fn, spec=spec, tx=tx, grad_sh=t_sh), in_shardings=(state_sh, bsh, frozen_sh),
                      out_shardings=(state_sh, None), donate_argnums=0,
                      compiler_options=dict(COMPILER_OPTIONS) or None)
    ekey = ("eval", kind, spec, tuple(sorted(COMPILER_OPTIONS.items())))
    eval_fn = _cache_get(ekey)
    if eval_fn is None:
        eval_fn = _cache_put(ekey, jax.jit(partial(ev, spec=spec), compiler_options=dict(COMPILER_OPTIONS) or None))
    return StepBundle(spec, tx, sched, state_sh, frozen_sh, t_sh, abstract, step_fn, eval_fn)


# compiled steps of this process, so that a run restarted in the same process (or an identical
# second run) does not compile again; keyed by everything the executable depends on
_CACHE: dict = {}
_CACHE_MAX = 16


def _cache_get(key):
    return _CACHE.get(key)


def _cache_put(key, value):
    if len(_CACHE) >= _CACHE_MAX:
        _CACHE.pop(next(iter(_CACHE)))
    _CACHE[key] = value
    return value


def _bytes(n) -> str:
    return f"{n / 2**20:.1f} MiB"


def compile_steps(bundle: StepBundle, kind: str, cfg: TrainConfig, lengths: Sequence[int],
                  total_steps: int | None = None) -> dict:
    """Compile the step ahead of time for each row length; returns {T: {seconds, memory}}.
    With ``total_steps`` (which fixes the schedule) executables are reused within the process."""
    mesh, rules = bundle.spec.mesh, bundle.spec.rules
    frozen_abs = None
    if bundle.frozen_sh is not None:
        frozen_abs = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                                  param_shapes(bundle.spec.model_cfg), bundle.frozen_sh)
    info = {}
    for T in lengths:
        key = ("step", kind, bundle.spec, cfg, total_steps, T, tuple(sorted(COMPILER_OPTIONS.items())))
        hit = _cache_get(key) if total_steps is not None else None
        if hit is not None:
            bundle.compiled[T] = hit[0]
            info[T] = dict(hit[1], cached=True)
            continue
        ab = abstract_batch(kind, cfg, T)
        bsh = batch_shardings(ab, mesh, rules)
        ab = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), ab, bsh)
        fn = sft_step if kind == "sft" else dpo_step
        jitted = jax.jit(partial(fn, spec=bundle.spec, tx=bundle.tx, grad_sh=bundle.trainable_sh),
                         in_shardings=(bundle.state_sh, bsh, bundle.frozen_sh),
                         out_shardings=(bundle.state_sh, None), donate_argnums=0)
        t0 = time.perf_counter()
        compiled = jitted.lower(bundle.abstract_state, ab, frozen_abs).compile(
            compiler_options=dict(COMPILER_OPTIONS) or None)
        secs = time.perf_counter() - t0
        mem = memory_stats(compiled)
        bundle.compiled[T] = compiled
        info[T] = {"compile_seconds": secs, "memory": mem}
        if total_steps is not None:
            _cache_put(key, (compiled, info[T]))
        log.info("compiled %s step for [%d, %d, %d] in %.1fs; memory: %s", kind, cfg.grad_accum,
                 cfg.batch_size * (1 if kind == "sft" else 2), T, secs,
                 {k: _bytes(v) for k, v in mem.items()})
    bundle.compile_info.update(info)
    return info


def memory_stats(compiled) -> dict:
    try:
        m = compiled.memory_analysis()
    except Exception:  # noqa: BLE001 -- not every backend reports it
        return {}
    if m is None:
        return {}
    out = {}
    for k in ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes", "temp_size_in_bytes",
              "generated_code_size_in_bytes"):
        v = getattr(m, k, None)
        if v is not None:
            out[k] = int(v)
    if out:
        out["peak_estimate_bytes"] = (out.get("argument_size_in_bytes", 0) + out.get("output_size_in_bytes", 0)
                                      - out.get("alias_size_in_bytes", 0) + out.get("temp_size_in_bytes", 0))
    return out


def init_state(bundle: StepBundle, trainable, seed: int) -> TrainState:
    """A fresh state holding ``trainable`` (placed with the state's shardings)."""
    trainable = jax.device_put(trainable, bundle.trainable_sh)
    opt_sh = bundle.state_sh.opt_state
    opt_state = jax.jit(bundle.tx.init, out_shardings=opt_sh)(trainable)
    rep = bundle.state_sh.step
    return TrainState(
        step=jax.device_put(jnp.int32(0), rep), params=trainable, opt_state=opt_state,
        rng=jax.device_put(jax.random.PRNGKey(seed), rep),
        data_pos=jax.device_put(np.zeros((2,), np.int32), rep),
    )


# ----------------------------------------------------------------------------- drivers


@dataclass
class TrainModel:
    """What the drivers train: parameters, config, tokenizer and optionally an existing adapter.
    ``checkpoint_io.LoadedModel`` has the same attributes."""

    params: Any
    cfg: ModelConfig
    tokenizer: Any = None
    lora: Any = None
    lora_cfg: LoRAConfig | None = None


@dataclass
class TrainResult:
    params: Any  # final base parameters (trained ones for full fine-tuning)
    lora: Any  # final adapters (None for full fine-tuning)
    lora_cfg: LoRAConfig | None
    step: int
    history: list[dict]  # per-step metrics of this process, {"step", "loss", ...}
    eval_history: list[dict]
    model_dir: Path | None
    resumed_from: int | None
    compile_info: dict
    n_truncated: int = 0  # sequences cut to seq_len (train.truncate=true)
    n_dropped: int = 0  # of those, examples with no completion token left (not trained on)


def _start_model(model, cfg: TrainConfig):
    """The base parameters training starts from: an adapter the model already has is merged into
    them (a LoRA run then trains a fresh adapter on top; the reference is the merged model)."""
    params = model.params
    if getattr(model, "lora", None) is not None:
        lcfg = model.lora_cfg
        if lcfg is None:
            raise UserError("model has a LoRA adapter but no LoRA config")
        params = jax.jit(partial(merge_lora, cfg=model.cfg, scale=lcfg.scale))(params, model.lora)
    return params


def _params_fingerprint(params, model_cfg: ModelConfig, extra: dict) -> str:
    from w2s_jax.io.orbax import tree_checksums

    blob = json.dumps({"cfg": asdict(model_cfg), "sums": tree_checksums(params), **extra}, sort_keys=True,
                      default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def pair_key(p) -> str:
    """The content key of a tokenised pair: a hash of its chosen and rejected token ids and prompt
    lengths. Record ids are not unique across pairs (MATH and OlympicArena give up to three pairs per
    question, all with the question's id), so the reference cache is keyed by content."""
    h = hashlib.sha256()
    for ex in (p.chosen, p.rejected):
        h.update(np.asarray(ex.ids, np.int32).tobytes())
        h.update(b"|%d;" % int(ex.n_prompt))
    return h.hexdigest()[:24]


def precompute_reference(params, model_cfg: ModelConfig, pairs, cfg: TrainConfig, mesh, rules=DEFAULT_RULES,
                         cache_path: str | os.PathLike | None = None, fingerprint: str = "") -> list:
    """Reference log-probs of every pair (a scoring pass with the start weights), cached as JSONL
    ``{key, id, ref_chosen, ref_rejected, fingerprint}`` keyed by the pair's content
    (:func:`pair_key`); a cache with another fingerprint (or without keys) is recomputed."""
    from dataclasses import replace

    from w2s_jax.core.jsonl import read_jsonl, write_jsonl_atomic

    if not pairs:
        return []
    keys = [pair_key(p) for p in pairs]
    table = None
    if cache_path is not None and Path(cache_path).is_file():
        try:
            rows = read_jsonl(cache_path, required=("key", "ref_chosen", "ref_rejected", "fingerprint"))
            table = {str(r["key"]): r for r in rows if r["fingerprint"] == fingerprint}
            if not all(k in table for k in keys):
                table = None
        except UserError as e:
            log.warning("ignoring unreadable reference cache %s: %s", cache_path, e)
    # every process must take the same branch (the scoring pass is one SPMD program)
    if distributed.all_true(table is not None):
        log.info("reference log-probs from cache %s", cache_path)
        return [replace(p, ref_chosen=float(table[k]["ref_chosen"]), ref_rejected=float(table[k]["ref_rejected"]))
                for p, k in zip(pairs, keys)]
    spec = StepSpec(model_cfg, "dpo", mesh=mesh, rules=rules, logits_chunks=cfg.logits_chunks)
    batcher = PreferenceBatcher(pairs, cfg.batch_size, cfg.seq_len, grad_accum=1, shuffle=False, drop_last=False,
                                bucket_lengths=cfg.bucket_lengths)
    p_sh = tree_shardings(mesh, param_axes(model_cfg), param_shapes(model_cfg), rules)
    params = jax.device_put(params, p_sh)
    fn = jax.jit(partial(reference_logps, spec=spec), compiler_options=dict(COMPILER_OPTIONS) or None)
    out: dict[int, tuple[float, float]] = {}  # pair index -> (chosen, rejected)
    t0 = time.perf_counter()
    for T, rows in batcher.plan(0):
        b = batcher.build(T, rows)
        b = distributed.process_local_batch(b, batch_shardings(b, mesh, rules))
        lp = distributed.to_host(fn(params, b))[0]
        B = len(rows)
        for r, idx in enumerate(rows):
            if idx:
                out[idx[0]] = (float(lp[r]), float(lp[B + r]))
    if len(out) != len(pairs):  # never expected: every pair is in exactly one row of the plan
        raise RuntimeError(f"reference pass scored {len(out)} of {len(pairs)} pairs")
    log.info("reference log-probs of %d pairs in %.1fs", len(out), time.perf_counter() - t0)
    if cache_path is not None and distributed.is_main_process():
        rows_out, seen = [], set()
        for i, (p, k) in enumerate(zip(pairs, keys)):
            if k not in seen:
                seen.add(k)
                rows_out.append({"key": k, "id": p.id, "ref_chosen": out[i][0], "ref_rejected": out[i][1],
                                 "fingerprint": fingerprint})
        write_jsonl_atomic(cache_path, rows_out)
    return [replace(p, ref_chosen=out[i][0], ref_rejected=out[i][1]) for i, p in enumerate(pairs)]


def run_sft(model, records: Sequence[dict], cfg: TrainConfig, out_dir: str | os.PathLike, *, mesh=None,
            rules: Rules = DEFAULT_RULES, eval_records: Sequence[dict] | None = None, export_hf: bool = False,
            checkpoint_dir: str | None = None, on_step: Callable | None = None) -> TrainResult:
    """Supervised fine-tuning on ``{id, prompt, completion}`` records. See :func:`run_training`."""
    return run_training("sft", model, records, cfg, out_dir, mesh=mesh, rules=rules, eval_records=eval_records,
                        export_hf=export_hf, checkpoint_dir=checkpoint_dir, on_step=on_step)


def run_dpo(model, records: Sequence[dict], cfg: TrainConfig, out_dir: str | os.PathLike, *, mesh=None,
            rules: Rules = DEFAULT_RULES, eval_records: Sequence[dict] | None = None, export_hf: bool = False,
            ref_cache: str | os.PathLike | None = None, checkpoint_dir: str | None = None,
            on_step: Callable | None = None) -> TrainResult:
    """Preference optimisation (``cfg.loss_type``) on ``{id, prompt, chosen, rejected}`` records.
    ``ref_cache``: JSONL file for the precomputed reference log-probs (default
    ``<out_dir>/ref_logps.jsonl``). See :func:`run_training`."""
    return run_training("dpo", model, records, cfg, out_dir, mesh=mesh, rules=rules, eval_records=eval_records,
                        export_hf=export_hf, ref_cache=ref_cache, checkpoint_dir=checkpoint_dir, on_step=on_step)


def _finite_or_raise(step: int, metrics: dict, ckpt_dir: str, last_saved: int | None) -> dict:
    host = {k: float(v) for k, v in distributed.to_host(metrics).items()}
    if not math.isfinite(host["loss"]):
        where = f"step {last_saved} in {ckpt_dir}" if last_saved is not None else "none saved yet"
        raise TrainingDiverged(
            f"training diverged: loss is {host['loss']} at step {step} (grad norm {host.get('grad_norm')}); "
            f"stopped without saving; last good checkpoint: {where}. Lower train.lr or check the data."
        )
    return host


def run_training(kind: str, model, records, cfg: TrainConfig, out_dir, *, mesh=None, rules: Rules = DEFAULT_RULES,
                 eval_records=None, export_hf: bool = False, ref_cache=None, checkpoint_dir: str | None = None,
                 on_step: Callable | None = None) -> TrainResult:
    """Train and save. ``model``: a :class:`TrainModel` or ``checkpoint_io.LoadedModel``.

    Writes under ``out_dir``: ``checkpoints/`` (or ``checkpoint_dir``, may be ``gs://``),
    ``metrics.jsonl``, ``tensorboard/``, ``compile.json`` and the final model in ``model/`` (plus
    ``hf/`` when ``export_hf``). With full fine-tuning the parameter buffers passed in are donated
    to the training state (do not use them afterwards; the result holds the trained ones).
    ``on_step(step, host_metrics)`` is called after each step's loss is checked (tests use it to
    interrupt a run). Multi-host: every process calls this with the same arguments; only process 0
    writes files other than checkpoints, and all return once the model directory is complete.
    """
    from tqdm.auto import tqdm

    from w2s_jax.io.orbax import Checkpointer
    from w2s_jax.train.metrics_log import MetricsLogger

    if kind not in ("sft", "dpo"):
        raise ValueError(kind)
    out = Path(out_dir)
    from w2s_jax.io.native import META_FILE, check_output_dir

    # model directories are replaced only when w2s-jax wrote them: refuse now, not after training
    check_output_dir(out / "model", (META_FILE,))
    for sub in ("hf", "peft", "hf_base") if export_hf else ():
        check_output_dir(out / sub)
    out.mkdir(parents=True, exist_ok=True)  # (on every process: checkpoints may go under it)
    main = distributed.is_main_process()
    mesh = mesh if mesh is not None else _single_mesh()
    mcfg: ModelConfig = model.cfg
    tok = model.tokenizer
    if tok is None:
        raise UserError("training needs the model's tokenizer")
    if cfg.seq_len > mcfg.max_seq_len:
        log.warning("train.seq_len=%d exceeds the model's max_seq_len=%d", cfg.seq_len, mcfg.max_seq_len)

    # --- data
    if kind == "sft":
        enc = TEMPLATES[cfg.template]
        items, stats = tokenize_sft(records, tok, cfg.seq_len, cfg.truncate, enc)
        ev_items = tokenize_sft(eval_records, tok, cfg.seq_len, cfg.truncate, enc)[0] if eval_records else None
    else:
        enc = TEMPLATES[cfg.template]
        items, stats = tokenize_pairs(records, tok, cfg.seq_len, cfg.truncate, enc)
        ev_items = tokenize_pairs(eval_records, tok, cfg.seq_len, cfg.truncate, enc)[0] if eval_records else None
    if stats.n_truncated:
        log.warning("%d sequences truncated to seq_len=%d (%d examples dropped: nothing left to learn)",
                    stats.n_truncated, cfg.seq_len, stats.n_dropped)
    if not items:
        raise UserError("no training examples")
    if ev_items is None:
        items, ev_items = split_eval(items, cfg.eval_fraction, cfg.seed)

    base = _start_model(model, cfg)
    if kind == "dpo" and cfg.loss_type not in L.REFERENCE_FREE and cfg.reference == "precompute":
        have = all(("ref_chosen" in r and "ref_rejected" in r) for r in records)
        if not have:
            fp = _params_fingerprint(base, mcfg, {"seq_len": cfg.seq_len, "tok": getattr(tok, "spec", repr(tok)),
                                                 "template": cfg.template})
            cache = ref_cache if ref_cache is not None else out / "ref_logps.jsonl"
            both = precompute_reference(base, mcfg, items + list(ev_items or []), cfg, mesh, rules, cache, fp)
            items, ev_items = both[: len(items)], both[len(items):]

    def make_batcher(xs, train: bool):
        kw = dict(grad_accum=cfg.grad_accum if train else 1, seed=cfg.seed, shuffle=train, drop_last=train,
                  bucket_lengths=cfg.bucket_lengths)
        if kind == "sft":
            return SFTBatcher(xs, cfg.batch_size, cfg.seq_len, packing=cfg.packing, **kw)
        return PreferenceBatcher(xs, cfg.batch_size, cfg.seq_len, **kw)

    batcher = make_batcher(items, True)
    eval_batcher = make_batcher(ev_items, False) if ev_items else None
    if cfg.max_steps is not None:
        total, epochs = int(cfg.max_steps), None
    else:
        total, epochs = sum(batcher.num_batches(e) for e in range(cfg.epochs)), cfg.epochs
    if total < 1:
        raise UserError("no training steps: fewer examples than one batch (lower train.batch_size)")

    # --- steps, state
    bundle = build_steps(kind, mcfg, cfg, total, mesh, rules)
    if cfg.lora is not None:
        frozen = jax.device_put(base, bundle.frozen_sh)
        trainable0 = init_lora(mcfg, cfg.lora, jax.random.fold_in(jax.random.PRNGKey(cfg.seed), 1))
    else:
        frozen, trainable0 = None, base
    ckpt_dir = checkpoint_dir or str(out / "checkpoints")
    ckpt = Checkpointer(ckpt_dir, keep=cfg.keep, async_save=cfg.async_checkpointing)
    restored = ckpt.restore_latest(bundle.abstract_state)
    if restored is not None:
        state = restored.state
        resumed_from = restored.step
        del trainable0
        log.info("resuming from checkpoint step %d", resumed_from)
    else:
        state = init_state(bundle, trainable0, cfg.seed)
        resumed_from = None
    step = int(distributed.to_host(state.step))
    epoch, index = (int(x) for x in distributed.to_host(state.data_pos))
    start_pos = pos = DataPosition(epoch, index)

    compile_info = compile_steps(bundle, kind, cfg, batcher.shapes(), total)
    if main:
        (out / "compile.json").write_text(json.dumps({str(k): v for k, v in compile_info.items()}, indent=1))

    logger = MetricsLogger(out, tensorboard=cfg.tensorboard, resume_step=step if resumed_from is not None else 0)
    history: list[dict] = []
    eval_history: list[dict] = []
    window: list[dict] = []
    last_saved = resumed_from
    rep = bundle.state_sh.step
    bar = tqdm(total=total, initial=step, disable=not (cfg.progress and main), desc=kind, dynamic_ncols=True)

    def run_eval(at_step):
        if eval_batcher is None or (eval_history and eval_history[-1]["step"] == at_step):
            return
        sums: dict = {}
        for T, rows in eval_batcher.plan(0):
            b = eval_batcher.build(T, rows)
            b = distributed.process_local_batch(b, batch_shardings(b, mesh, rules))
            r = distributed.to_host(bundle.eval_fn(state.params, b, frozen))
            for k, v in r.items():
                sums[k] = sums.get(k, 0.0) + float(v)
        if kind == "sft":
            res = {"loss": sums["loss_sum"] / max(sums["count"], 1.0), "tokens": sums["count"]}
        else:
            n = max(sums.pop("count"), 1.0)
            nll_tok = sums.pop("nll_tokens", None)
            res = {k: v / n for k, v in sums.items()}
            if nll_tok is not None:
                res["nll_loss"] = sums["nll_loss"] / max(nll_tok, 1.0)
                res["loss"] = res["loss"] + res["nll_loss"]
        res = {"step": at_step, **res}
        eval_history.append(res)
        logger.log(at_step, {k: v for k, v in res.items() if k != "step"}, split="eval")

    def save(at_step, at_pos):
        nonlocal state, last_saved
        state = state.replace(data_pos=jax.device_put(np.array([at_pos.epoch, at_pos.index], np.int32), rep))
        ckpt.save(at_step, state, {"data_pos": [at_pos.epoch, at_pos.index], "kind": kind,
                                   "config": json.loads(json.dumps(asdict(cfg), default=str))})
        last_saved = at_step

    pending = None  # (step, device metrics, pos) not yet checked
    t_window = time.perf_counter()

    def check(p):
        s, m, _ = p
        host = _finite_or_raise(s, m, ckpt_dir, last_saved)
        host["step"] = s
        history.append(host)
        window.append(host)
        if on_step is not None:
            on_step(s, host)
        return host

    try:
        if step < total:
            for pos, batch in batcher.batches(start=start_pos, epochs=epochs):
                T = batch["tokens"].shape[-1]
                # the same global batch on every process; each feeds only its own rows
                batch = distributed.process_local_batch(batch, batch_shardings(batch, mesh, rules))
                state, metrics = bundle.compiled[T](state, batch, frozen)
                step += 1
                if pending is not None:
                    check(pending)
                pending = (step, metrics, pos)
                due_log = cfg.log_every > 0 and step % cfg.log_every == 0
                due_save = cfg.save_every > 0 and step % cfg.save_every == 0
                due_eval = cfg.eval_every > 0 and step % cfg.eval_every == 0
                last = step >= total
                if due_log or due_save or due_eval or last:
                    check(pending)
                    pending = None
                if due_log or last:
                    dt = time.perf_counter() - t_window
                    agg = {k: float(np.mean([w[k] for w in window])) for k in window[0] if k != "step"}
                    agg["lr"] = float(bundle.schedule(step - 1)) if bundle.schedule is not None else 0.0
                    agg["steps_per_sec"] = len(window) / max(dt, 1e-9)
                    if "tokens" in agg:
                        agg["tokens_per_sec"] = agg["tokens"] * agg["steps_per_sec"]
                    logger.log(step, agg)
                    bar.set_postfix(loss=f"{agg['loss']:.4f}")
                    window.clear()
                    t_window = time.perf_counter()
                bar.update(1)
                if due_save or last:
                    save(step, pos)
                if due_eval:
                    run_eval(step)
                if last:
                    break
        if pending is not None:
            check(pending)
            pending = None
        if last_saved != step:
            save(step, pos)
        run_eval(step)
    finally:
        bar.close()
        ckpt.close()
        logger.close()

    # --- final model
    params_out, lora_out = (frozen, state.params) if cfg.lora is not None else (state.params, None)
    from w2s_jax.io.native import save_model

    model_dir = out / "model"
    save_model(model_dir, params_out, mcfg, tok, lora=lora_out, lora_cfg=cfg.lora)
    if export_hf:
        hf_source = getattr(model, "source", None) if getattr(model, "format", "") == "hf" else None
        _export_hf(out, params_out, lora_out, cfg.lora, mcfg, tok,
                   base_changed=getattr(model, "lora", None) is not None, source=hf_source)
    distributed.sync("train: model written")  # other processes may load the model process 0 wrote
    return TrainResult(params_out, lora_out, cfg.lora, step, history, eval_history, model_dir, resumed_from,
                       compile_info, stats.n_truncated, stats.n_dropped)


def _export_hf(out: Path, params, lora, lora_cfg, mcfg, tok, base_changed: bool, source) -> None:
    """Full fine-tuning: a Hugging Face dir ``<out>/hf``. LoRA: a PEFT adapter dir ``<out>/peft``
    whose base is the loaded Hugging Face checkpoint, or ``<out>/hf_base`` (written here) when the
    model did not come from a Hugging Face dir or an earlier adapter was merged into it."""
    from w2s_jax.io.convert import lora_to_peft, params_to_hf

    if lora is None:
        params_to_hf(out / "hf", params, mcfg, tok)
        return
    base_ref = source
    if base_changed or not source:
        params_to_hf(out / "hf_base", params, mcfg, tok)
        base_ref = str((out / "hf_base").resolve())
    lora_to_peft(out / "peft", lora, lora_cfg, mcfg, base_model_name_or_path=base_ref, tokenizer=tok)
