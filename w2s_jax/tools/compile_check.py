"""`w2s compile-check CONFIG --topology v5p-128`: will this config fit on that TPU slice, and how fast?

Compiles the config's SFT step, DPO step and the generation engine's programs (prefill, insert into
the decode slots, and the decode loop: the programs ``w2s generate`` and the pipeline run) ahead of
time for a TPU topology on a CPU-only machine: libtpu describes the slice's devices, the config's
mesh is laid over them, and each program -- the training loop's own jitted steps and the engine's
own programs, with their shardings and donation, traced for the mesh's platform -- is
``.lower(abstract arguments with NamedShardings).compile()``d. Nothing is allocated. For each
stage it reports per-chip memory (``compiled.memory_analysis()``: arguments, outputs, temporaries,
total) against the chip's HBM, FLOPs per step (XLA's ``cost_analysis()`` extrapolated over the
layers, and the analytic model FLOPs) and the step time at 50% of peak bf16 FLOP/s (and the time
to stream the bytes the step touches at HBM bandwidth, the bound that matters when decoding).

The config is read by ``tools/check_config.py``, the programs are built by ``tools/check_targets.py``
and the report is laid out by ``tools/check_report.py``; ``cli/compile_check.py`` parses the command
line (exit status 1 when a stage does not fit).
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
from pathlib import Path

import jax
import numpy as np
from jax.experimental import mesh_utils

from w2s_jax.parallel.sharding import MESH_AXES, make_mesh
from w2s_jax.tools.check_config import GENERATION_STAGES, STAGES, CheckConfig, GenerationSection, load_check_config
from w2s_jax.tools.check_report import Report, StageReport, format_report
from w2s_jax.tools.check_targets import Target, build_targets
from w2s_jax.tools.tpu_specs import GiB, parse_slice, topology_devices


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
    probe = make_mesh(mesh_shape, devices)  # resolves -1 and validates
    sizes = [probe.shape[a] for a in MESH_AXES]
    try:
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


def run_check(config: str | Path, topology: str, overrides: list[str] = (), stages: list[str] | None = None,
              xla_costs: bool = True, json_out: str | Path | None = None) -> Report:
    """Load ``config`` (with ``overrides``; ``stages`` a subset of STAGES), compile it for ``topology``, print the
    table on stdout and, with ``json_out``, write the report as JSON there."""
    overrides = list(overrides)
    if stages:
        overrides.append(f"stages=[{', '.join(stages)}]")
    cfg = load_check_config(config, overrides)
    report = check(cfg, topology, xla_costs=xla_costs)
    print(format_report(report))
    if json_out:
        Path(json_out).write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    sys.stdout.flush()
    return report


__all__ = ["STAGES", "CheckConfig", "GenerationSection", "Report", "StageReport", "Target", "build_targets", "check",
           "compile_target", "device_mesh", "format_report", "load_check_config", "run_check"]
