"""`w2s compile-check CONFIG --topology v5p-128`: will this config fit on that TPU slice, and how fast?

Compiles the config's SFT step, DPO step and the generation engine's programs (prefill, insert into
the decode slots, and the decode loop: the programs ``w2s generate`` and the pipeline run) ahead of
time for a TPU topology on a CPU-only machine: libtpu describes the slice's devices, the config's
mesh is laid over them, and each program -- the training loop's own jitted steps and the engine's
own programs, with their shardings and donation, traced for the mesh's platform -- is
``.lower(abstract arguments with NamedShardings).compile()``d. Nothing is allocated. For each
stage it prints per-chip memory (``compiled.memory_analysis()``: arguments, outputs, temporaries,
total) against the chip's HBM, FLOPs per step (XLA's ``cost_analysis()`` extrapolated over the
layers, and the analytic model FLOPs) and the step time at 50% of peak bf16 FLOP/s (and the time
to stream the bytes the step touches at HBM bandwidth, the bound that matters when decoding).
Exit status 1 when a stage does not fit.

Config (YAML, see ``configs/tpu/*.yaml``)::

    model: llama2-70b            # preset name (model.py PRESETS)
    model_overrides: {}          # ModelConfig fields, e.g. {n_layers: 2}
    remat: full                  # none | full | dots | dots_no_batch
    param_dtype: float32         # stored parameters (and so Adam moments); LoRA: the frozen base
    dtype: bfloat16              # compute dtype
    mesh: {data: 1, fsdp: -1, tensor: 1, sequence: 1}   # MeshConfig (rules: optional table)
    sft: {batch_size: 64, seq_len: 1024, grad_accum: 1, lora: null}          # train.TrainConfig
    dpo: {batch_size: 32, seq_len: 1024, reference: precompute, lora: null}  # (batch_size = pairs)
    generation: {batch_size: 256, prompt_len: 512, max_new_tokens: 1024, param_dtype: bfloat16,
                 mesh: null}     # generation mesh (MeshConfig); null = the training mesh
    stages: [sft, dpo, prefill, insert, decode]

``--set key=value`` overrides any key (dotted for nested ones: ``--set sft.batch_size=128``).

A ``w2s run`` config (``pipeline.RunConfig``) is accepted too: its strong model (``strong.preset``
plus ``overrides``, or a local Hugging Face directory's config.json), ``strong_train`` as the SFT
step, ``stage2.train`` as the DPO step, ``generation`` (batch size, max new tokens; prompts of
``max_prompt_len`` or 1024 tokens) and ``mesh``; ``--set`` then addresses the run config's keys.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from w2s_jax.core.errors import UserError
from w2s_jax.parallel.sharding import MeshConfig
from w2s_jax.train.loop import TrainConfig

GENERATION_STAGES = ("prefill", "insert", "decode")
STAGES = ("sft", "dpo", *GENERATION_STAGES)


# ----------------------------------------------------------------------------- config


@dataclass
class GenerationSection:
    batch_size: int = 256
    prompt_len: int = 512
    max_new_tokens: int = 1024
    param_dtype: str = "bfloat16"
    cache_dtype: str | None = None  # default: the compute dtype
    mesh: MeshConfig | None = None  # None: the training mesh


@dataclass
class CheckConfig:
    model: str = "tiny"
    model_overrides: dict[str, Any] = field(default_factory=dict)
    remat: str = "full"
    param_dtype: str = "float32"
    dtype: str = "bfloat16"
    mesh: MeshConfig = field(default_factory=lambda: MeshConfig(data=1, fsdp=-1))
    sft: TrainConfig = field(default_factory=lambda: TrainConfig(batch_size=64, seq_len=1024))
    dpo: TrainConfig = field(default_factory=lambda: TrainConfig(batch_size=32, seq_len=1024, loss_type="sigmoid"))
    generation: GenerationSection = field(default_factory=GenerationSection)
    stages: list[str] = field(default_factory=lambda: list(STAGES))

    def model_config(self, **extra):
        from w2s_jax.models.config import get_preset

        return get_preset(self.model, **{"remat": self.remat, "param_dtype": self.param_dtype, "dtype": self.dtype,
                                         **self.model_overrides, **extra})


RUN_CONFIG_KEYS = {"strong", "weak", "strong_train", "weak_train", "stage1", "stage2", "data", "baselines",
                   "grading", "pass_k", "name"}


def load_check_config(path: str | Path, overrides: list[str] = ()) -> CheckConfig:
    """A compile-check YAML, or a `w2s run` config (``RunConfig``: its strong model, ``strong_train``
    for SFT, ``stage2.train`` for DPO, ``generation`` and ``mesh``); ``overrides`` address the file's
    own keys (``strong_train.batch_size=64`` for a run config)."""
    from w2s_jax.core.config import load_config, load_yaml_file

    if not Path(path).is_file():
        raise UserError(f"config file {path} does not exist")
    raw = load_yaml_file(path)
    if RUN_CONFIG_KEYS & set(raw):
        cfg = _from_run_config(path, overrides)
    else:
        cfg = load_config(CheckConfig, str(path), list(overrides))
    bad = [s for s in cfg.stages if s not in STAGES]
    if bad:
        raise UserError(f"config key `stages`: unknown stage(s) {bad}; valid: {list(STAGES)}")
    cfg.model_config()  # unknown preset / bad override -> UserError now
    return cfg


def _strong_model(spec) -> tuple[str, dict]:
    """(preset name, ModelConfig overrides) of a run config's strong model."""
    if spec.preset is not None:
        return spec.preset, dict(spec.overrides)
    p = Path(spec.path or "")
    cfg_json = p / "config.json"
    if spec.path and cfg_json.is_file():
        from w2s_jax.io.convert import hf_config_to_model
        from w2s_jax.models.config import PRESETS

        mc = hf_config_to_model(json.loads(cfg_json.read_text()), where=str(cfg_json))
        base = PRESETS["tiny"]
        fields = {f.name: getattr(mc, f.name) for f in dataclasses.fields(mc)
                  if f.name != "name" and getattr(mc, f.name) != getattr(base, f.name)}
        return "tiny", {**fields, "name": mc.name, **spec.overrides}
    raise UserError(
        f"compile-check needs the strong model's shape: `strong.preset` (e.g. llama2-70b) or a local Hugging Face "
        f"checkpoint directory with config.json (got strong.path={spec.path!r}); "
        "add `--set strong.preset=llama2-70b --set strong.path=null`"
    )


def _from_run_config(path, overrides) -> CheckConfig:
    from w2s_jax.core.config import load_config
    from w2s_jax.pipeline.run import RunConfig

    rc = load_config(RunConfig, str(path), list(overrides))
    preset, ov = _strong_model(rc.strong)
    from w2s_jax.models.config import get_preset

    base = get_preset(preset)
    ov = dict(ov)
    remat = ov.pop("remat", base.remat)
    param_dtype = ov.pop("param_dtype", base.param_dtype)
    dtype = ov.pop("dtype", base.dtype)
    g = rc.generation
    new = max(g.max_new_tokens, rc.stage2.max_new_tokens or 0)
    prompt = g.max_prompt_len or min(1024, max(1, base.replace(**ov).max_seq_len - new))
    return CheckConfig(
        model=preset, model_overrides=ov, remat=remat, param_dtype=param_dtype, dtype=dtype, mesh=rc.mesh,
        sft=rc.strong_train, dpo=rc.stage2.train,
        generation=GenerationSection(batch_size=g.batch_size, prompt_len=prompt, max_new_tokens=new,
                                     param_dtype=param_dtype),
    )


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
    hbm_bytes: float | None = None  # analytic bytes that must cross HBM per step (global), when known
    compiler_options: dict | None = None  # as the program is compiled when it runs


def _sds(tree, shardings):
    import jax

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
    from w2s_jax.models import params as MP
    from w2s_jax.train import loop as train

    mcfg = cfg.model_config()
    N = mcfg.num_params
    tc: TrainConfig = getattr(cfg, kind)
    T = tc.seq_len
    if T > mcfg.max_seq_len:
        raise UserError(f"{kind}.seq_len {T} exceeds the model's max_seq_len {mcfg.max_seq_len}")
    bundle = train.build_steps(kind, mcfg, tc, 1000, mesh, rules)
    ab = train.abstract_batch(kind, tc, T)
    ab = _sds(ab, train.batch_shardings(ab, mesh, rules))
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
    import jax
    from jax.sharding import NamedSharding, PartitionSpec

    from w2s_jax.models import params as MP
    from w2s_jax.models import prepare
    from w2s_jax.parallel.sharding import tree_shardings

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
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec

    from w2s_jax.infer import engine as E
    from w2s_jax.infer.sampler import CPU_COMPILER_OPTIONS, default_layer_loop
    from w2s_jax.models.decoder import platform_of
    from w2s_jax.parallel.sharding import named_sharding

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
    if t.hbm_bytes is not None and bandwidth:
        rep.time_hbm = t.hbm_bytes / chips / bandwidth
    t0 = time.time()
    try:
        compiled = t.fn.lower(*t.args).compile(compiler_options=t.compiler_options or None)
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
        if t.hbm_bytes is None:
            rep.time_hbm = rep.bytes_accessed / bandwidth if bandwidth else None
    return rep


def device_mesh(mesh_shape: dict, devices: list):
    """The config's mesh over ``devices``, in an ICI-friendly device order when the platform knows one."""
    import numpy as np

    from w2s_jax.parallel.sharding import MESH_AXES, make_mesh

    probe = make_mesh(mesh_shape, devices)  # resolves -1 and validates
    sizes = [probe.shape[a] for a in MESH_AXES]
    try:
        from jax.experimental import mesh_utils

        ordered = mesh_utils.create_device_mesh(sizes, devices[: math.prod(sizes)]).reshape(-1)
        return make_mesh(mesh_shape, list(np.asarray(ordered)))
    except Exception:
        return probe


def _layer_costs(cfg: CheckConfig, mesh, gen_mesh) -> dict[str, tuple[float, float, float, float]]:
    """XLA's cost of each stage extrapolated to all layers -> {stage: (flops/layer, bytes/layer, flops@0, bytes@0)}.

    XLA's cost analysis counts a loop body once, whatever its trip count, so the full (scanned) model's
    figures miss L-1 layers. Compiling the same step with 0 layers (the cost outside the layer loops)
    and with 2 layers (still a loop, counted once: one layer's cost, rematerialisation and collectives
    included; a 1-layer scan is inlined and loses its recomputation to CSE) gives f0 + L * (f2 - f0).
    """
    out: dict = {}
    per: dict = {}
    for n in (0, 2):
        c = dataclasses.replace(cfg, model_overrides={**cfg.model_overrides, "n_layers": n})
        for t in build_targets(c, mesh, gen_mesh):
            try:
                cost = _cost(t.fn.lower(*t.args).compile(compiler_options=t.compiler_options or None))
            except Exception:
                continue
            per.setdefault(t.name, {})[n] = (float(cost.get("flops", 0.0)), float(cost.get("bytes accessed", 0.0)))
    for name, d in per.items():
        if 0 in d and 2 in d:
            out[name] = (d[2][0] - d[0][0], d[2][1] - d[0][1], d[0][0], d[0][1])
    return out


def _generation_estimate(stages: list[StageReport], new_tokens: int) -> None:
    """Note on the decode row the expected wall time of one batch: prefill and insert at the slower of
    50% of peak and HBM bandwidth, then ``new_tokens`` decode steps likewise (the decode row's figures
    are one step's: XLA counts the loop body once)."""
    by = {s.stage: s for s in stages if s.ok}
    if not all(k in by for k in GENERATION_STAGES):
        return
    step = lambda s: max(s.time_50, s.time_hbm or 0.0)  # noqa: E731
    est = step(by["prefill"]) + step(by["insert"]) + new_tokens * step(by["decode"])
    tokens = by["decode"].tokens * new_tokens
    by["decode"].detail += f"; est. {est:.1f} s per batch ({tokens / est:.0f} new tokens/s)"


def check(cfg: CheckConfig, topology: str, devices: list | None = None, xla_costs: bool = True) -> Report:
    """Compile every stage of ``cfg`` for ``topology`` (a gcloud name or libtpu topology)."""
    import jax

    from w2s_jax.tools.tpu_specs import GiB, parse_slice, topology_devices

    # executables for a compile-only topology can be neither loaded from nor usefully stored in the
    # persistent compilation cache (which `w2s` turns on by default)
    jax.config.update("jax_enable_compilation_cache", False)
    sl = parse_slice(topology)
    devs = topology_devices(sl) if devices is None else list(devices)
    mesh = device_mesh(cfg.mesh.shape(), devs)
    gen_mesh = device_mesh(cfg.generation.mesh.shape(), devs) if cfg.generation.mesh else mesh
    mcfg = cfg.model_config()
    targets = build_targets(cfg, mesh, gen_mesh)
    chip = sl.chip
    costs = _layer_costs(cfg, mesh, gen_mesh) if xla_costs else {}
    stages = []
    for t in targets:
        rep = compile_target(t, chip.hbm_bytes, len(devs), chip.peak_bf16_flops, chip.hbm_bandwidth)
        print(f"[compile-check] {t.name}: {'%.2f GiB' % (rep.total / GiB) if rep.ok else 'error'} "
              f"(compiled in {rep.compile_s:.0f} s)", file=sys.stderr, flush=True)
        if t.name in costs:  # replace the loop-counted-once figures by the per-layer extrapolation
            fl, by, f0, b0 = costs[t.name]
            rep.flops_compiled = f0 + mcfg.n_layers * fl
            rep.bytes_accessed = b0 + mcfg.n_layers * by
            if t.hbm_bytes is None:
                rep.time_hbm = rep.bytes_accessed / chip.hbm_bandwidth
        stages.append(rep)
    _generation_estimate(stages, cfg.generation.max_new_tokens)
    return Report(
        topology=sl.topology_name, accelerator_type=sl.accelerator_type, chip=chip.name, num_chips=sl.num_chips,
        num_hosts=sl.num_hosts, hbm_per_chip=chip.hbm_bytes, peak_flops_per_chip=chip.peak_bf16_flops,
        mesh={k: int(v) for k, v in mesh.shape.items() if v > 1}, model=mcfg.name, num_params=mcfg.num_params,
        stages=stages,
    )


def main(argv: list[str] | None = None, prog: str = "w2s compile-check", command: str = "compile-check") -> int:
    ap = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    ap.add_argument("config", help="compile-check YAML (configs/tpu/*.yaml) or a `w2s run` config")
    ap.add_argument("--topology", required=True,
                    help="gcloud accelerator type (v5p-128, v5litepod-16, v6e-8, v4-32) or libtpu topology (v5p:4x4x4)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override a config key (dotted for nested keys); repeatable")
    ap.add_argument("--stages", default=None, help="comma-separated subset of " + ",".join(STAGES))
    ap.add_argument("--no-xla-costs", action="store_true",
                    help="skip the 0- and 2-layer compiles that extrapolate XLA's FLOPs/bytes to all layers")
    ap.add_argument("--json", dest="json_out", default=None, help="also write the report as JSON here")
    args = ap.parse_args(argv)

    overrides = list(args.overrides)
    if args.stages:
        overrides.append(f"stages=[{args.stages}]")
    cfg = load_check_config(args.config, overrides)
    report = check(cfg, args.topology, xla_costs=not args.no_xla_costs)
    print(format_report(report))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    sys.stdout.flush()
    return 0 if report.fits else 1


__all__ = ["CheckConfig", "Report", "StageReport", "build_targets", "check", "format_report", "load_check_config",
           "main"]
