"""`w2s compile-check CONFIG --topology v5p-128`: will this config fit on that TPU slice, and how fast?

Compiles the config's SFT step, DPO step and the generation steps (prefill and one decode step of
the KV-cache loop) ahead of time for a TPU topology on a CPU-only machine: libtpu describes the
slice's devices, the config's mesh is laid over them, and each step is ``jax.jit(...).lower(abstract
arguments with NamedShardings).compile()``. Nothing is allocated. For each stage it prints per-chip
memory (``compiled.memory_analysis()``: arguments, outputs, temporaries, total) against the chip's
HBM, FLOPs per step (``compiled.cost_analysis()`` and the analytic estimate) and the step time at
50% of peak bf16 FLOP/s (and, for decoding, the time to stream the bytes it touches at HBM
bandwidth). Exit status 1 when a stage does not fit.

Config: a small YAML (see ``configs/tpu/*.yaml``)::

    model: llama2-70b            # preset name (model.py PRESETS)
    model_overrides: {}          # ModelConfig fields, e.g. {n_layers: 2}
    seq_len: 1024
    batch_size: 64               # SFT: global sequences per step
    dpo_batch_size: 32           # DPO: global preference pairs per step (2x sequences)
    dpo_reference: model         # model (reference forward in the step) | precomputed | none (ORPO)
    lora: null                   # or {rank: 64, alpha: 16, targets: [q, k, v, o, gate, up, down]}
    remat: full                  # none | full | dots | dots_no_batch
    param_dtype: float32         # trained parameters (master copy); LoRA: the frozen base's dtype
    dtype: bfloat16              # compute dtype
    opt_dtype: float32           # Adam moments
    mesh: {data: 1, fsdp: -1, tensor: 1, sequence: 1}
    generation: {batch_size: 256, prompt_len: 512, max_new_tokens: 1024, param_dtype: bfloat16,
                 mesh: null}     # generation mesh; null = the training mesh
    stages: [sft, dpo, prefill, decode]

``--set key=value`` overrides any key (dotted for nested ones: ``--set generation.batch_size=128``).
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from w2s_jax.errors import UserError

STAGES = ("sft", "dpo", "prefill", "decode")


# ----------------------------------------------------------------------------- config


@dataclass
class LoraSection:
    rank: int = 64
    alpha: float = 16.0
    targets: list[str] = field(default_factory=lambda: ["q", "k", "v", "o", "gate", "up", "down"])


@dataclass
class GenerationSection:
    batch_size: int = 256
    prompt_len: int = 512
    max_new_tokens: int = 1024
    param_dtype: str = "bfloat16"
    cache_dtype: str | None = None  # default: compute dtype
    mesh: dict | None = None  # None: the training mesh


@dataclass
class CheckConfig:
    model: str = "tiny"
    model_overrides: dict = field(default_factory=dict)
    seq_len: int = 1024
    batch_size: int = 64
    dpo_batch_size: int | None = None  # default batch_size // 2
    dpo_reference: str = "model"  # model | precomputed | none
    lora: LoraSection | None = None
    remat: str = "full"
    param_dtype: str = "float32"
    dtype: str = "bfloat16"
    opt_dtype: str = "float32"
    mesh: dict = field(default_factory=lambda: {"fsdp": -1})
    rules: dict | None = None
    generation: GenerationSection = field(default_factory=GenerationSection)
    stages: list[str] = field(default_factory=lambda: list(STAGES))


def _build(cls, data: Any, where: str):
    if not isinstance(data, dict):
        raise UserError(f"config `{where or '<root>'}` must be a mapping, got {type(data).__name__}")
    names = {f.name: f for f in dataclasses.fields(cls)}
    kw = {}
    for key, value in data.items():
        dotted = f"{where}.{key}" if where else key
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f" (did you mean `{close[0]}`?)" if close else ""
            raise UserError(f"unknown config key `{dotted}`{hint}")
        sub = {"lora": LoraSection, "generation": GenerationSection}.get(key) if cls is CheckConfig else None
        if sub is not None and value is not None:
            if key == "lora" and isinstance(value, int) and not isinstance(value, bool):
                value = {"rank": value}
            value = _build(sub, value, dotted)
        kw[key] = value
    cfg = cls(**kw)
    return cfg


def _apply_set(data: dict, overrides: list[str]) -> dict:
    import yaml

    for item in overrides:
        if "=" not in item:
            raise UserError(f"--set expects key=value, got `{item}`")
        key, raw = item.split("=", 1)
        value = yaml.safe_load(raw)
        parts = key.strip().split(".")
        cur = data
        for p in parts[:-1]:
            if not isinstance(cur.get(p), dict):
                cur[p] = {}
            cur = cur[p]
        cur[parts[-1]] = value
    return data


def load_check_config(path: str | Path, overrides: list[str] = ()) -> CheckConfig:
    import yaml

    p = Path(path)
    if not p.is_file():
        raise UserError(f"config file {p} does not exist")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise UserError(f"{p}: invalid YAML: {e}") from None
    data = _apply_set(dict(data), list(overrides))
    cfg = _build(CheckConfig, data, "")
    bad = [s for s in cfg.stages if s not in STAGES]
    if bad:
        raise UserError(f"config key `stages`: unknown stage(s) {bad}; valid: {list(STAGES)}")
    if cfg.dpo_reference not in ("model", "precomputed", "none"):
        raise UserError("config key `dpo_reference` must be model, precomputed or none")
    return cfg


# ----------------------------------------------------------------------------- report


@dataclass
class StageReport:
    stage: str
    ok: bool = True
    error: str | None = None
    arguments: int = 0  # bytes per chip
    outputs: int = 0
    aliased: int = 0  # donated arguments reused for outputs
    temporaries: int = 0
    code: int = 0
    total: int = 0  # arguments + outputs - aliased + temporaries + code
    hbm: int = 0
    fits: bool = False
    flops_compiled: float | None = None  # per chip, from cost_analysis (loops counted once by XLA)
    flops_analytic: float = 0.0  # per chip
    bytes_accessed: float | None = None  # per chip, from cost_analysis
    tokens: int = 0  # global tokens processed per step
    time_50: float = 0.0  # seconds at 50% of peak bf16 FLOP/s (analytic FLOPs)
    time_hbm: float | None = None  # seconds to move the accessed bytes at HBM bandwidth
    compile_s: float = 0.0
    detail: str = ""


@dataclass
class Report:
    topology: str
    accelerator_type: str
    chip: str
    num_chips: int
    num_hosts: int
    hbm_per_chip: int
    peak_flops_per_chip: float
    mesh: dict
    model: str
    num_params: int
    stages: list[StageReport]

    @property
    def fits(self) -> bool:
        return all(s.ok and s.fits for s in self.stages)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["fits"] = self.fits
        return d


def _gib(n: float | None) -> str:
    return "-" if n is None else f"{n / (1 << 30):.2f}"


def _secs(t: float | None) -> str:
    if t is None:
        return "-"
    if t < 1e-3:
        return f"{t * 1e6:.0f} us"
    if t < 1:
        return f"{t * 1e3:.1f} ms"
    return f"{t:.2f} s"


def _flops(f: float | None) -> str:
    return "-" if f is None else f"{f:.3g}"


def format_report(r: Report) -> str:
    head = (
        f"{r.model} ({r.num_params / 1e9:.2f}B params) on {r.accelerator_type} = {r.topology}: {r.num_chips} chips "
        f"({r.chip}, {r.hbm_per_chip / (1 << 30):.0f} GiB HBM, {r.peak_flops_per_chip / 1e12:.0f} TFLOP/s bf16), "
        f"{r.num_hosts} hosts; mesh {r.mesh}"
    )
    cols = ["stage", "args GiB", "out GiB", "alias GiB", "temp GiB", "total GiB", "HBM GiB", "fits",
            "FLOPs/chip (XLA)", "FLOPs/chip (model)", "t @50% peak", "t @HBM BW", "compile"]
    rows = []
    for s in r.stages:
        if not s.ok:
            rows.append([s.stage, "error", "", "", "", "", _gib(s.hbm), "NO", "", "", "", "", f"{s.compile_s:.0f} s"])
            continue
        rows.append([
            s.stage, _gib(s.arguments), _gib(s.outputs), _gib(s.aliased), _gib(s.temporaries), _gib(s.total),
            _gib(s.hbm), "yes" if s.fits else "NO", _flops(s.flops_compiled), _flops(s.flops_analytic),
            _secs(s.time_50), _secs(s.time_hbm), f"{s.compile_s:.0f} s",
        ])
    lines = [head, "", "| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    lines += ["| " + " | ".join(map(str, row)) + " |" for row in rows]
    notes = [f"- {s.stage}: {s.detail}" for s in r.stages if s.detail]
    errors = [f"- {s.stage}: ERROR {s.error}" for s in r.stages if not s.ok]
    if notes or errors:
        lines += [""] + notes + errors
    lines.append("")
    lines.append("FITS" if r.fits else "DOES NOT FIT")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- compile targets


@dataclass
class Target:
    """One compile target: a jitted function and its abstract arguments (ShapeDtypeStructs with shardings)."""

    name: str
    fn: Any  # jax.jit-wrapped
    args: tuple
    flops: float  # analytic, global
    tokens: int
    detail: str = ""


def _sds(tree, shardings):
    import jax

    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree, shardings)


def _opt_shardings(opt_shapes, params_abs, params_shard, mesh):
    """Optimizer-state shardings: every params-shaped subtree (Adam's mu, nu) like the params, the rest
    (step counts) replicated."""
    import jax
    from jax.sharding import NamedSharding, PartitionSpec

    p_struct = jax.tree.structure(params_abs)
    rep = NamedSharding(mesh, PartitionSpec())

    def is_params_like(x):
        return jax.tree.structure(x) == p_struct and jax.tree.leaves(x) != [x]

    return jax.tree.map(lambda x: params_shard if is_params_like(x) else rep, opt_shapes, is_leaf=is_params_like)


def _next_token_logp(logits, tokens):
    """Log-probabilities of tokens[:, 1:] under logits[:, :-1] -> [B, T-1] (float32)."""
    import jax
    import jax.numpy as jnp

    lp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
    return jnp.take_along_axis(lp, tokens[:, 1:, None], axis=-1)[..., 0]


def build_targets(cfg: CheckConfig, mesh, gen_mesh) -> list[Target]:
    """SFT / DPO / prefill / decode targets for ``cfg`` on ``mesh`` (the swap point for train.py's steps)."""
    import jax
    import jax.numpy as jnp
    import optax
    from jax.sharding import NamedSharding, PartitionSpec

    from w2s_jax import lora as lora_mod
    from w2s_jax import model as M
    from w2s_jax.sharding import logical_to_spec, rules_from_config, tree_shardings

    rules = rules_from_config(cfg.rules)
    mcfg = M.get_preset(cfg.model, **cfg.model_overrides).replace(
        remat=cfg.remat, param_dtype=cfg.param_dtype, dtype=cfg.dtype
    )
    T = cfg.seq_len
    if T > mcfg.max_seq_len:
        raise UserError(f"seq_len {T} exceeds the model's max_seq_len {mcfg.max_seq_len}")
    lcfg = None
    if cfg.lora is not None:
        lcfg = lora_mod.LoRAConfig(rank=cfg.lora.rank, alpha=cfg.lora.alpha, targets=tuple(cfg.lora.targets))
    N = mcfg.num_params
    attn_per_token = 12 * mcfg.n_layers * mcfg.n_heads * mcfg.head_dim * T / 2

    def batch_sharding(m, shape):
        return NamedSharding(m, logical_to_spec(("batch", "length"), shape, m, rules))

    replicated = NamedSharding(mesh, PartitionSpec())
    opt = optax.adamw(1e-5, mu_dtype=jnp.dtype(cfg.opt_dtype))
    opt_dtype = jnp.dtype(cfg.opt_dtype)

    # trainable / frozen trees
    p_shapes = M.param_shapes(mcfg)
    p_shard = tree_shardings(mesh, M.param_axes(mcfg), p_shapes, rules)
    params_abs = _sds(p_shapes, p_shard)
    if lcfg is None:
        train_abs = params_abs
        train_shard = p_shard
        frozen_abs = None
        frozen_shard = None
    else:
        l_shapes = lora_mod.lora_shapes(mcfg, lcfg, jnp.float32)
        train_shard = tree_shardings(mesh, lora_mod.lora_axes(mcfg, lcfg), l_shapes, rules)
        train_abs = _sds(l_shapes, train_shard)
        frozen_abs, frozen_shard = params_abs, p_shard

    # Adam moments in opt_dtype (nu follows the parameter dtype in optax: cast the init)
    def opt_init(p):
        st = opt.init(p)
        return jax.tree.map(lambda x: x.astype(opt_dtype) if x.ndim > 0 else x, st)

    opt_shapes = jax.eval_shape(opt_init, train_abs)
    opt_shard = _opt_shardings(opt_shapes, train_abs, train_shard, mesh)
    opt_abs = _sds(opt_shapes, opt_shard)
    state_abs = {"params": train_abs, "opt": opt_abs}
    state_shard = {"params": train_shard, "opt": opt_shard}

    def split(trainable, frozen):
        return (trainable, None) if lcfg is None else (frozen, trainable)

    def fwd(params, lora, tokens, segs):
        logits, _ = M.forward(
            params, tokens, mcfg, segment_ids=segs, lora=lora, lora_scale=lcfg.scale if lcfg else 1.0,
            mesh=mesh, rules=rules,
        )
        return logits

    def apply_update(state, grads):
        updates, new_opt = opt.update(grads, state["opt"], state["params"])
        new_opt = jax.tree.map(lambda n, o: n.astype(o.dtype), new_opt, state["opt"])
        new_params = jax.tree.map(lambda p, u: (p.astype(jnp.float32) + u).astype(p.dtype), state["params"], updates)
        return {"params": new_params, "opt": new_opt}

    targets: list[Target] = []
    # model FLOPs per trained token: full 6N; LoRA ~4N (no weight gradients of the frozen base)
    train_mult = 6.0 if lcfg is None else 4.0
    train_flops_tok = train_mult * N + (attn_per_token if lcfg is None else attn_per_token * 2 / 3)
    frozen_in = () if lcfg is None else (frozen_abs,)
    frozen_sh = () if lcfg is None else (frozen_shard,)

    if "sft" in cfg.stages:
        B = cfg.batch_size

        def sft_loss(trainable, frozen, batch):
            params, lora = split(trainable, frozen)
            logits = fwd(params, lora, batch["tokens"], batch["segment_ids"])
            lp = _next_token_logp(logits, batch["tokens"])
            mask = batch["loss_mask"][:, 1:].astype(jnp.float32)
            return -(lp * mask).sum() / jnp.maximum(mask.sum(), 1.0)

        def sft_step(state, *rest):
            frozen = rest[0] if lcfg is not None else None
            batch = rest[-1]
            loss, grads = jax.value_and_grad(sft_loss)(state["params"], frozen, batch)
            return apply_update(state, grads), {"loss": loss}

        bsh = batch_sharding(mesh, (B, T))
        batch_abs = {k: jax.ShapeDtypeStruct((B, T), jnp.int32, sharding=bsh)
                     for k in ("tokens", "segment_ids", "loss_mask")}
        fn = jax.jit(sft_step, in_shardings=(state_shard, *frozen_sh, {k: bsh for k in batch_abs}),
                     out_shardings=(state_shard, {"loss": replicated}), donate_argnums=0)
        targets.append(Target("sft", fn, (state_abs, *frozen_in, batch_abs), train_flops_tok * B * T, B * T,
                              f"{B} x {T} tokens"))

    if "dpo" in cfg.stages:
        P = cfg.dpo_batch_size or max(1, cfg.batch_size // 2)
        ref_mode = cfg.dpo_reference
        ref_in: tuple = ()
        ref_sh: tuple = ()
        if ref_mode == "model" and lcfg is None:  # full fine-tuning: a frozen copy in the generation dtype
            ref_cfg = mcfg.replace(param_dtype=cfg.generation.param_dtype)
            r_shapes = M.param_shapes(ref_cfg)
            r_shard = tree_shardings(mesh, M.param_axes(ref_cfg), r_shapes, rules)
            ref_in, ref_sh = (_sds(r_shapes, r_shard),), (r_shard,)

        def seq_logps(params, lora, batch):
            logits = fwd(params, lora, batch["tokens"], batch["segment_ids"])
            lp = _next_token_logp(logits, batch["tokens"])
            return (lp * batch["loss_mask"][:, 1:]).sum(-1)

        def dpo_loss(trainable, frozen, ref, batch):
            params, lora = split(trainable, frozen)
            logps = seq_logps(params, lora, batch)
            if ref_mode == "model":
                if lcfg is None:
                    ref_lp = seq_logps(ref, None, batch)
                else:  # LoRA: the reference is the base model without adapters
                    ref_lp = seq_logps(frozen, None, batch)
                ref_lp = jax.lax.stop_gradient(ref_lp)
            elif ref_mode == "precomputed":
                ref_lp = batch["ref_logps"]
            else:
                ref_lp = jnp.zeros_like(logps)
            margin = (logps[:P] - ref_lp[:P]) - (logps[P:] - ref_lp[P:])
            return -jax.nn.log_sigmoid(0.1 * margin).mean()

        def dpo_step(state, *rest):
            frozen = rest[0] if lcfg is not None else None
            ref = rest[len(frozen_in)] if ref_in else None
            batch = rest[-1]
            loss, grads = jax.value_and_grad(dpo_loss)(state["params"], frozen, ref, batch)
            return apply_update(state, grads), {"loss": loss}

        bsh = batch_sharding(mesh, (2 * P, T))
        batch_abs = {k: jax.ShapeDtypeStruct((2 * P, T), jnp.int32, sharding=bsh)
                     for k in ("tokens", "segment_ids", "loss_mask")}
        batch_shard = {k: bsh for k in batch_abs}
        if ref_mode == "precomputed":
            vsh = NamedSharding(mesh, logical_to_spec(("batch",), (2 * P,), mesh, rules))
            batch_abs["ref_logps"] = jax.ShapeDtypeStruct((2 * P,), jnp.float32, sharding=vsh)
            batch_shard["ref_logps"] = vsh
        fn = jax.jit(dpo_step, in_shardings=(state_shard, *frozen_sh, *ref_sh, batch_shard),
                     out_shardings=(state_shard, {"loss": replicated}), donate_argnums=0)
        ref_flops = 2 * N + attn_per_token / 3 if ref_mode == "model" else 0.0
        targets.append(Target("dpo", fn, (state_abs, *frozen_in, *ref_in, batch_abs),
                              (train_flops_tok + ref_flops) * 2 * P * T, 2 * P * T,
                              f"{P} pairs x {T} tokens, reference: {ref_mode}"))

    g = cfg.generation
    if "prefill" in cfg.stages or "decode" in cfg.stages:
        gcfg = mcfg.replace(param_dtype=g.param_dtype, remat="none")
        S = g.prompt_len + g.max_new_tokens
        gcfg = gcfg.replace(max_seq_len=max(gcfg.max_seq_len, S))
        GB = g.batch_size
        cache_dtype = jnp.dtype(g.cache_dtype or cfg.dtype)
        gp_shapes = M.param_shapes(gcfg)
        gp_shard = tree_shardings(gen_mesh, M.param_axes(gcfg), gp_shapes, rules)
        gparams_abs = _sds(gp_shapes, gp_shard)
        cshape = (gcfg.n_layers, GB, S, gcfg.n_kv_heads, gcfg.head_dim)
        c_struct = {"k": jax.ShapeDtypeStruct(cshape, cache_dtype), "v": jax.ShapeDtypeStruct(cshape, cache_dtype)}
        c_shard = tree_shardings(gen_mesh, M.cache_axes(), c_struct, rules)
        cache_abs = _sds(c_struct, c_shard)
        g_rep = NamedSharding(gen_mesh, PartitionSpec())
        vsh = NamedSharding(gen_mesh, logical_to_spec(("batch",), (GB,), gen_mesh, rules))
        kv_start_abs = jax.ShapeDtypeStruct((GB,), jnp.int32, sharding=vsh)
        key_abs = jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=g_rep)
        gen_param_bytes = N * jnp.dtype(g.param_dtype).itemsize
        cache_bytes = 2 * math.prod(cshape) * cache_dtype.itemsize

        def sample(logits, key):
            return jax.random.categorical(key, logits[:, -1].astype(jnp.float32)).astype(jnp.int32)

        if "prefill" in cfg.stages:
            Pn = g.prompt_len
            psh = batch_sharding(gen_mesh, (GB, Pn))
            prompt_abs = jax.ShapeDtypeStruct((GB, Pn), jnp.int32, sharding=psh)

            def prefill(params, cache, prompts, kv_start, key):
                pos = jnp.maximum(jnp.arange(Pn, dtype=jnp.int32)[None, :] - kv_start[:, None], 0)
                logits, cache = M.forward(params, prompts, gcfg, positions=pos, cache=cache, cache_index=0,
                                          kv_start=kv_start, mesh=gen_mesh, rules=rules)
                return sample(logits, key), cache

            fn = jax.jit(prefill, in_shardings=(gp_shard, c_shard, psh, vsh, g_rep), out_shardings=(vsh, c_shard),
                         donate_argnums=1)
            attn = 4 * gcfg.n_layers * gcfg.n_heads * gcfg.head_dim * S  # full cache is attended (masked)
            targets.append(Target("prefill", fn, (gparams_abs, cache_abs, prompt_abs, kv_start_abs, key_abs),
                                  (2 * N + attn) * GB * Pn, GB * Pn,
                                  f"{GB} prompts x {Pn} tokens; KV cache {cache_bytes / 2**30:.1f} GiB global"))

        if "decode" in cfg.stages:
            tsh = batch_sharding(gen_mesh, (GB, 1))
            tok_abs = jax.ShapeDtypeStruct((GB, 1), jnp.int32, sharding=tsh)
            idx_abs = jax.ShapeDtypeStruct((), jnp.int32, sharding=g_rep)

            def decode(params, cache, tokens, index, kv_start, key):
                pos = index - kv_start[:, None]
                logits, cache = M.forward(params, tokens, gcfg, positions=pos, cache=cache, cache_index=index,
                                          kv_start=kv_start, mesh=gen_mesh, rules=rules)
                return sample(logits, key), cache

            fn = jax.jit(decode, in_shardings=(gp_shard, c_shard, tsh, g_rep, vsh, g_rep),
                         out_shardings=(vsh, c_shard), donate_argnums=1)
            attn = 4 * gcfg.n_layers * gcfg.n_heads * gcfg.head_dim * S
            targets.append(Target("decode", fn, (gparams_abs, cache_abs, tok_abs, idx_abs, kv_start_abs, key_abs),
                                  (2 * N + attn) * GB, GB,
                                  f"one token for {GB} rows, cache {S}; x{g.max_new_tokens} new tokens; "
                                  f"weights {gen_param_bytes / 2**30:.0f} GiB + cache "
                                  f"{cache_bytes / 2**30:.0f} GiB global"))
    return targets


# ----------------------------------------------------------------------------- run


def _cost(compiled) -> dict:
    try:
        ca = compiled.cost_analysis()
    except Exception:  # some backends do not implement it
        return {}
    if isinstance(ca, (list, tuple)):
        ca = ca[0] if ca else {}
    return dict(ca or {})


def compile_target(t: Target, hbm: int, chips: int, peak: float, bandwidth: float) -> StageReport:
    rep = StageReport(t.name, hbm=hbm, tokens=t.tokens, detail=t.detail)
    rep.flops_analytic = t.flops / chips
    rep.time_50 = rep.flops_analytic / (0.5 * peak)
    t0 = time.time()
    try:
        compiled = t.fn.lower(*t.args).compile()
    except Exception as e:  # an XLA error (e.g. out of memory at compile time) is a failed stage
        rep.ok = False
        rep.error = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
        rep.compile_s = time.time() - t0
        return rep
    rep.compile_s = time.time() - t0
    ma = compiled.memory_analysis()
    if ma is not None:
        rep.arguments = int(ma.argument_size_in_bytes)
        rep.outputs = int(ma.output_size_in_bytes)
        rep.aliased = int(ma.alias_size_in_bytes)
        rep.temporaries = int(ma.temp_size_in_bytes)
        rep.code = int(getattr(ma, "generated_code_size_in_bytes", 0) or 0)
        rep.total = rep.arguments + rep.outputs - rep.aliased + rep.temporaries + rep.code
    rep.fits = rep.total <= hbm
    cost = _cost(compiled)
    if "flops" in cost:
        rep.flops_compiled = float(cost["flops"])
    if "bytes accessed" in cost:
        rep.bytes_accessed = float(cost["bytes accessed"])
        rep.time_hbm = rep.bytes_accessed / bandwidth if bandwidth else None
    return rep


def device_mesh(mesh_shape: dict, devices: list):
    """The config's mesh over ``devices``, in an ICI-friendly device order when the platform knows one."""
    import numpy as np

    from w2s_jax.sharding import MESH_AXES, make_mesh

    probe = make_mesh(mesh_shape, devices)  # resolves -1 and validates
    sizes = [probe.shape[a] for a in MESH_AXES]
    try:
        from jax.experimental import mesh_utils

        ordered = mesh_utils.create_device_mesh(sizes, devices[: math.prod(sizes)]).reshape(-1)
        return make_mesh(mesh_shape, list(np.asarray(ordered)))
    except Exception:
        return probe


def _layer_costs(cfg: CheckConfig, mesh, gen_mesh) -> dict[str, tuple[float, float]]:
    """XLA cost of each stage at 0 and 1 layers -> {stage: (flops per layer, bytes per layer, flops at 0, bytes at 0)}.

    XLA's cost analysis counts a loop body once, whatever its trip count, so the full (scanned) model's
    figures miss L-1 layers. Compiling the same step with 0 and 1 layers gives the outside-the-loop cost
    and one layer's cost (remat recomputation and collectives included); the total is f0 + L * (f1 - f0).
    """
    out: dict = {}
    per = {}
    for n in (0, 1):
        c = dataclasses.replace(cfg, model_overrides={**cfg.model_overrides, "n_layers": n})
        for t in build_targets(c, mesh, gen_mesh):
            try:
                cost = _cost(t.fn.lower(*t.args).compile())
            except Exception:
                continue
            per.setdefault(t.name, {})[n] = (float(cost.get("flops", 0.0)), float(cost.get("bytes accessed", 0.0)))
    for name, d in per.items():
        if 0 in d and 1 in d:
            out[name] = (d[1][0] - d[0][0], d[1][1] - d[0][1], d[0][0], d[0][1])
    return out


def check(cfg: CheckConfig, topology: str, devices: list | None = None, xla_costs: bool = True) -> Report:
    """Compile every stage of ``cfg`` for ``topology`` (a gcloud name or libtpu topology)."""
    from w2s_jax import model as M
    from w2s_jax.tpu_specs import parse_slice, topology_devices

    sl = parse_slice(topology)
    devs = topology_devices(sl) if devices is None else list(devices)
    mesh = device_mesh(cfg.mesh, devs)
    gen_mesh = device_mesh(cfg.generation.mesh, devs) if cfg.generation.mesh else mesh
    mcfg = M.get_preset(cfg.model, **cfg.model_overrides)
    targets = build_targets(cfg, mesh, gen_mesh)
    chip = sl.chip
    costs = _layer_costs(cfg, mesh, gen_mesh) if xla_costs else {}
    stages = []
    for t in targets:
        rep = compile_target(t, chip.hbm_bytes, len(devs), chip.peak_bf16_flops, chip.hbm_bandwidth)
        if t.name in costs:  # replace the loop-counted-once figures by the per-layer extrapolation
            fl, by, f0, b0 = costs[t.name]
            rep.flops_compiled = f0 + mcfg.n_layers * fl
            rep.bytes_accessed = b0 + mcfg.n_layers * by
            rep.time_hbm = rep.bytes_accessed / chip.hbm_bandwidth
        stages.append(rep)
    return Report(
        topology=sl.topology_name, accelerator_type=sl.accelerator_type, chip=chip.name, num_chips=sl.num_chips,
        num_hosts=sl.num_hosts, hbm_per_chip=chip.hbm_bytes, peak_flops_per_chip=chip.peak_bf16_flops,
        mesh={k: int(v) for k, v in mesh.shape.items() if v > 1}, model=mcfg.name, num_params=mcfg.num_params,
        stages=stages,
    )


def main(argv: list[str] | None = None, prog: str = "w2s compile-check", command: str = "compile-check") -> int:
    ap = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    ap.add_argument("config", help="compile-check YAML (see configs/tpu/*.yaml)")
    ap.add_argument("--topology", required=True,
                    help="gcloud accelerator type (v5p-128, v5litepod-16, v6e-8, v4-32) or libtpu topology (v5p:4x4x4)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override a config key (dotted for nested keys); repeatable")
    ap.add_argument("--stages", default=None, help="comma-separated subset of " + ",".join(STAGES))
    ap.add_argument("--no-xla-costs", action="store_true",
                    help="skip the 0- and 1-layer compiles that extrapolate XLA's FLOPs/bytes to all layers")
    ap.add_argument("--json", dest="json_out", default=None, help="also write the report as JSON here")
    args = ap.parse_args(argv)

    cfg = load_check_config(args.config, args.overrides)
    if args.stages:
        cfg.stages = [s.strip() for s in args.stages.split(",") if s.strip()]
        bad = [s for s in cfg.stages if s not in STAGES]
        if bad:
            raise UserError(f"--stages: unknown stage(s) {bad}; valid: {list(STAGES)}")
    report = check(cfg, args.topology, xla_costs=not args.no_xla_costs)
    print(format_report(report))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    sys.stdout.flush()
    return 0 if report.fits else 1


__all__ = ["CheckConfig", "Report", "StageReport", "build_targets", "check", "format_report", "load_check_config",
           "main"]
