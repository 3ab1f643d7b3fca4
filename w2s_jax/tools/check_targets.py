"""The programs ``w2s compile-check`` compiles: the training loop's SFT and DPO steps and the generation
engine's prefill, insert and decode programs, each with abstract arguments (ShapeDtypeStructs carrying
their NamedShardings) and the analytic FLOPs and HBM bytes of one step."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec

from w2s_jax.core.errors import UserError
from w2s_jax.infer import engine as E
from w2s_jax.infer.sampler import CPU_COMPILER_OPTIONS, default_layer_loop
from w2s_jax.models import params as MP
from w2s_jax.models import prepare
from w2s_jax.models.decoder import platform_of
from w2s_jax.parallel.sharding import named_sharding, tree_shardings
from w2s_jax.tools.check_config import GENERATION_STAGES, CheckConfig
from w2s_jax.train.build import abstract_batch, batch_shardings, build_steps
from w2s_jax.train.config import TrainConfig


@dataclass
class Target:
    """One compile target: a jitted function and its abstract arguments (ShapeDtypeStructs with shardings)."""

    name: str
    fn: Any  # jax.jit-wrapped
    args: tuple
    flops: float  # analytic, global
    tokens: int
    detail: str = ""
    hbm_bytes: float | None = None  # analytic bytes that must cross HBM per step (global), when known
    compiler_options: dict | None = None  # as the program is compiled when it runs


def _sds(tree, shardings):
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree, shardings)


def build_targets(cfg: CheckConfig, mesh, gen_mesh) -> list[Target]:
    """SFT / DPO (the training loop's steps) and the generation engine's prefill / insert / decode
    programs for ``cfg`` on ``mesh`` / ``gen_mesh``."""
    rules = cfg.mesh.rules_table()
    targets = [_train_target(cfg, kind, mesh, rules) for kind in ("sft", "dpo") if kind in cfg.stages]
    if any(st in cfg.stages for st in GENERATION_STAGES):
        targets += [t for t in _generation_targets(cfg, gen_mesh, rules) if t.name in cfg.stages]
    return targets


def _attn_flops(mcfg, T: int) -> float:
    """Attention FLOPs per token over ``T`` keys, forward only (the model's flops_per_token term)."""
    return 4 * mcfg.n_layers * mcfg.n_heads * mcfg.head_dim * T


def _train_target(cfg: CheckConfig, kind: str, mesh, rules) -> Target:
    mcfg = cfg.model_config()
    N = mcfg.num_params
    tc: TrainConfig = getattr(cfg, kind)
    T = tc.seq_len
    if T > mcfg.max_seq_len:
        raise UserError(f"{kind}.seq_len {T} exceeds the model's max_seq_len {mcfg.max_seq_len}")
    bundle = build_steps(kind, mcfg, tc, 1000, mesh, rules)
    ab = abstract_batch(kind, tc, T)
    ab = _sds(ab, batch_shardings(ab, mesh, rules))
    frozen = None
    if bundle.frozen_sh is not None:
        frozen = _sds(MP.param_shapes(mcfg), bundle.frozen_sh)
    rows = tc.grad_accum * tc.batch_size * (1 if kind == "sft" else 2)
    # model FLOPs per token: full fine-tuning 6N; LoRA ~4N (no weight gradients for the frozen base);
    # causal attention forward + backward: 3 x half the keys
    lora = tc.lora is not None
    attn = 1.5 * _attn_flops(mcfg, T)
    per_tok = (4.0 if lora else 6.0) * N + attn * (2 / 3 if lora else 1.0)
    detail = f"{tc.grad_accum} x {tc.batch_size} {'rows' if kind == 'sft' else 'pairs'} x {T} tokens"
    if lora:
        detail += f", LoRA r={tc.lora.rank}"
    if kind == "dpo" and bundle.spec.needs_reference:
        detail += f", reference: {tc.reference}"
        if tc.reference == "lora_off":
            per_tok += 2.0 * N + attn / 3
    return Target(kind, bundle.step_fn, (bundle.abstract_state, ab, frozen), per_tok * rows * T, rows * T, detail)


def _generation_weights(gcfg, gen_mesh, rules, layer_loop: str):
    """Abstract weights as the Sampler holds them: the stacked parameters (scanned layers) or the
    prepared per-layer matrices (unrolled; laid out replicated, the unsharded CPU/GPU case)."""
    shapes = MP.param_shapes(gcfg)
    stacked = _sds(shapes, tree_shardings(gen_mesh, MP.param_axes(gcfg), shapes, rules))
    if layer_loop == "scan":
        return stacked
    prepared = jax.eval_shape(lambda p: prepare.prepare_weights(p, gcfg, fuse=True), stacked)
    rep = NamedSharding(gen_mesh, PartitionSpec())
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=rep), prepared)


def _generation_targets(cfg: CheckConfig, gen_mesh, rules) -> list[Target]:
    """The engine's programs as ``w2s generate`` runs them (no shared prefix, sampling with temperature):
    prefill of ``batch_size`` prompts of ``prompt_len`` tokens, insert of the prefilled rows into the
    decode slots, and the decode loop over ``batch_size`` slots (the decode state donated)."""
    g = cfg.generation
    GB, Pn, new = g.batch_size, g.prompt_len, g.max_new_tokens
    gcfg = cfg.model_config(param_dtype=g.param_dtype, remat="none")
    gcfg = gcfg.replace(max_seq_len=max(gcfg.max_seq_len, Pn + new))
    platform = platform_of(gen_mesh)
    layer_loop = default_layer_loop(platform)
    weights = _generation_weights(gcfg, gen_mesh, rules, layer_loop)
    spec = E._ESpec(cfg=gcfg, slots=GB, cache_len=Pn + new, max_new=new, prefix_len=0, greedy=False, top_k=0,
                    use_top_p=False, has_stop=False, eos_ids=tuple(i for i in (gcfg.eos_token_id,) if i is not None),
                    scan_layers=layer_loop == "scan", has_lora=False, platform=platform)
    options = dict(CPU_COMPILER_OPTIONS) if platform == "cpu" else {}
    rep = NamedSharding(gen_mesh, PartitionSpec())
    scalar = lambda dt: jax.ShapeDtypeStruct((), dt, sharding=rep)  # noqa: E731
    rows = lambda shape, dt, names: jax.ShapeDtypeStruct(  # noqa: E731
        shape, dt, sharding=named_sharding(gen_mesh, names, shape, rules))

    pspec = E._replace(spec, slots=0, cache_len=0, max_new=0, greedy=True, eos_ids=())
    pargs = (weights, None, scalar(jnp.float32), None, scalar(jnp.int32),
             rows((GB, Pn), jnp.int32, ("batch", "length")), rows((GB,), jnp.int32, ("batch",)))
    prefill = E.jit_program(E.prefill, pspec, gen_mesh, rules)
    kv, logits = jax.eval_shape(prefill, *pargs)
    lead = ("layers",) if spec.scan_layers else ()
    kv = jax.tree.map(lambda a: rows(a.shape, a.dtype, lead + E.CACHE_NAMES), kv)
    logits = rows(logits.shape, logits.dtype, ("batch", None))

    state = jax.eval_shape(lambda: E.init_state(spec, None, rules))
    state_sh = E.state_shardings(spec, gen_mesh, rules, state)
    state = jax.tree.map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh), state, state_sh)
    b = rows((GB,), jnp.int32, ("batch",))
    u = rows((GB,), jnp.uint32, ("batch",))
    iargs = (state, kv, logits, b, b, u, u, None, scalar(jnp.float32), scalar(jnp.float32))
    insert = E.jit_program(E.insert, spec, gen_mesh, rules, donate=True, out_shardings=state_sh)
    dargs = (state, weights, None, scalar(jnp.float32), None, scalar(jnp.int32), None, scalar(jnp.float32),
             scalar(jnp.float32), scalar(jnp.int32), scalar(jnp.int32))
    decode = E.jit_program(E.decode, spec, gen_mesh, rules, donate=True, out_shardings=state_sh)

    N = gcfg.num_params
    param_bytes = N * jnp.dtype(g.param_dtype).itemsize
    cache_bytes = sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(state.get("caches")))
    cache_note = f"slot caches {cache_bytes / 2**30:.1f} GiB in all"
    # insert: copies the prefilled rows into the caches and samples the first tokens (elementwise work)
    insert_flops = 2.0 * cache_bytes / jnp.dtype(gcfg.dtype).itemsize * Pn / (Pn + new) + 8.0 * GB * gcfg.vocab_size
    return [
        Target("prefill", prefill, pargs, (2 * N + _attn_flops(gcfg, Pn) / 2) * GB * Pn, GB * Pn,
               f"{GB} prompts x {Pn} tokens; {layer_loop} layers",
               hbm_bytes=param_bytes + cache_bytes * Pn / (Pn + new), compiler_options=options),
        Target("insert", insert, iargs, insert_flops, GB, f"{GB} prefilled rows into {GB} decode slots; {cache_note}",
               hbm_bytes=cache_bytes * (1 + Pn / (Pn + new)), compiler_options=options),
        Target("decode", decode, dargs, (2 * N + _attn_flops(gcfg, Pn + new)) * GB, GB,
               f"decode loop: one step = one token for {GB} slots over {Pn + new}-slot caches (x{new} per batch); "
               f"weights {param_bytes / 2**30:.1f} GiB + {cache_note}", hbm_bytes=param_bytes + cache_bytes,
               compiler_options=options),
    ]


__all__ = ["Target", "build_targets"]
