"""Compiling the training steps over a mesh: shardings, the abstract state, ahead-of-time compiles.

The pure steps (``steps.py``) are compiled with ``jax.jit`` over the mesh with explicit in/out
shardings taken from the abstract state and the state donated (``donate_argnums=0``), ahead of time
at start-up (``.lower().compile()``; compile time and ``memory_analysis()`` are logged). Compiled
executables are kept in the bundle's :class:`~w2s_jax.core.programs.ProgramCache`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from w2s_jax.core.errors import UserError
from w2s_jax.core.programs import ProgramCache
from w2s_jax.models.config import ModelConfig
from w2s_jax.models.lora import lora_axes, lora_shapes
from w2s_jax.models.params import param_axes, param_shapes
from w2s_jax.parallel.sharding import DEFAULT_RULES, Rules, make_mesh, named_sharding, tree_shardings
from w2s_jax.train.config import TrainConfig
from w2s_jax.train.optim import make_optimizer
from w2s_jax.train.steps import StepSpec, TrainState, dpo_eval, dpo_step, sft_eval, sft_step

__all__ = ["COMPILER_OPTIONS", "StepBundle", "single_mesh", "batch_shardings", "abstract_batch", "build_steps",
           "compile_steps", "memory_stats", "init_state"]

log = logging.getLogger(__name__)

# XLA options for every compile of the steps (tests lower the CPU backend's optimisation level,
# which makes tiny models compile ~3x faster)
COMPILER_OPTIONS: dict = {}


def single_mesh():
    """A one-device mesh (the default when a driver is given none)."""
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
    programs: ProgramCache = field(default_factory=ProgramCache)  # compiled steps, by everything they depend on
    compiled: dict = field(default_factory=dict)  # seq_len -> Compiled
    compile_info: dict = field(default_factory=dict)


def build_steps(kind: str, model_cfg: ModelConfig, cfg: TrainConfig, total_steps: int, mesh,
                rules: Rules = DEFAULT_RULES, tx=None, programs: ProgramCache | None = None) -> StepBundle:
    """Optimizer, abstract sharded state and the jitted step with explicit in/out shardings.
    ``programs``: where compiled steps are kept and looked up (default: a new cache for this bundle);
    pass the same cache to reuse the executables of an earlier, identical bundle."""
    programs = programs if programs is not None else ProgramCache()
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
    eval_fn = programs.get_or_make(
        ekey, lambda: jax.jit(partial(ev, spec=spec), compiler_options=dict(COMPILER_OPTIONS) or None))
    return StepBundle(spec, tx, sched, state_sh, frozen_sh, t_sh, abstract, step_fn, eval_fn, programs)


def _bytes(n) -> str:
    return f"{n / 2**20:.1f} MiB"


def compile_steps(bundle: StepBundle, kind: str, cfg: TrainConfig, lengths: Sequence[int],
                  total_steps: int | None = None) -> dict:
    """Compile the step ahead of time for each row length; returns {T: {seconds, memory}}.
    With ``total_steps`` (which fixes the schedule) executables are kept in and taken from
    ``bundle.programs`` (shared by the bundles built with the same cache)."""
    mesh, rules = bundle.spec.mesh, bundle.spec.rules
    frozen_abs = None
    if bundle.frozen_sh is not None:
        frozen_abs = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                                  param_shapes(bundle.spec.model_cfg), bundle.frozen_sh)
    info = {}
    for T in lengths:
        key = ("step", kind, bundle.spec, cfg, total_steps, T, tuple(sorted(COMPILER_OPTIONS.items())))
        hit = bundle.programs.get(key) if total_steps is not None else None
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
            bundle.programs.put(key, (compiled, info[T]))
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

