"""AdamW with global-norm clipping as one elementwise pass per parameter.

Same update as ``optax.chain(optax.clip_by_global_norm(c), optax.adamw(lr, b1, b2, eps, weight_decay=wd,
mask=mask))`` (tested against it), but written as a single ``tree.map`` that reads gradient, moments and
parameter once and writes the update and the two moments. optax's chain materialises the clipped
gradients as a separate parameter-sized buffer, which on XLA:CPU costs a fresh allocation (page
faults) and an extra pass: 250 ms against 90 ms per step for the SmolLM2-135M shape. The state is
``FusedAdamWState(count, mu, nu)``; ``mu``/``nu`` mirror the parameter tree (so they take the
parameters' shardings).

:func:`make_optimizer` builds it from a :class:`~w2s_jax.train.config.TrainConfig`: the learning-rate
schedule (:func:`make_schedule`) and weight decay on the leaves :func:`decay_mask` selects.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from w2s_jax.models.config import ModelConfig
from w2s_jax.models.lora import LoRAConfig, lora_axes
from w2s_jax.models.params import param_axes
from w2s_jax.train.config import TrainConfig


class FusedAdamWState(NamedTuple):
    count: jax.Array  # int32 []: updates applied so far
    mu: Any
    nu: Any


def adamw(
    learning_rate: float | Callable[[jax.Array], jax.Array],
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    mask: Callable[[Any], Any] | None = None,
    max_grad_norm: float | None = None,
) -> optax.GradientTransformation:
    """AdamW (decoupled weight decay on the leaves where ``mask(params)`` is True) after clipping the
    gradients to global norm ``max_grad_norm`` (None or <= 0: no clipping). ``learning_rate`` is a
    number or an optax schedule of the step count (0 for the first update)."""

    def init(params):
        return FusedAdamWState(jnp.zeros([], jnp.int32), jax.tree.map(jnp.zeros_like, params),
                               jax.tree.map(jnp.zeros_like, params))

    def update(grads, state, params=None):
        if params is None:
            raise ValueError("optim.adamw needs the params in update()")
        scale = jnp.float32(1.0)
        if max_grad_norm is not None and max_grad_norm > 0:
            g_norm = optax.tree.norm(grads)  # optax.clip_by_global_norm: g / ||g|| * c when ||g|| >= c
            scale = jnp.where(g_norm < max_grad_norm, 1.0, max_grad_norm / g_norm)
        count = optax.safe_increment(state.count)
        t = count.astype(jnp.float32)
        bc1, bc2 = 1.0 - b1**t, 1.0 - b2**t
        lr = learning_rate(state.count) if callable(learning_rate) else learning_rate
        decay = mask(params) if mask is not None else jax.tree.map(lambda _: True, params)

        def one(g, mu, nu, p, dec):
            g = (g * scale).astype(mu.dtype)
            mu = b1 * mu + (1.0 - b1) * g
            nu = b2 * nu + (1.0 - b2) * (g * g)
            u = (mu / bc1) / (jnp.sqrt(nu / bc2) + eps)
            if weight_decay and dec:
                u = u + weight_decay * p.astype(u.dtype)
            return (-lr * u).astype(p.dtype), mu, nu

        out = jax.tree.map(one, grads, state.mu, state.nu, params, decay)
        pick = lambda i: jax.tree.map(lambda _, o: o[i], grads, out)  # noqa: E731
        return pick(0), FusedAdamWState(count, pick(1), pick(2))

    return optax.GradientTransformation(init, update)


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
    tx = adamw(sched, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay, mask=decay_mask,
               max_grad_norm=cfg.max_grad_norm)
    return tx, sched

