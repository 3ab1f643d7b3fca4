"""`w2s bench`: the benchmark suite against the PyTorch baselines, one table and one JSON.

Runs the scripts of the source checkout's ``benchmarks/`` directory, each in its own process (so
neither side's threads, caches or device memory leak into the next workload), and collects their
JSON output:

    sft       benchmarks/bench_train.py   JAX sft_step vs transformers + torch AdamW
                                          (cpu mode with the default shape; otherwise bench_lora.py --rank 0)
    dpo       benchmarks/bench_lora.py --rank 0 --only dpo
                                          JAX dpo_step (cached reference log-probs) vs torch + TRL sigmoid loss
    score     benchmarks/bench_scoring.py completion log-probs vs transformers forward under no_grad
    generate  benchmarks/bench_generate.py Sampler vs transformers generate, batch 1 and 16
    lora      benchmarks/bench_lora.py    LoRA r8 SFT and DPO steps vs peft

Modes: ``cpu`` (SmolLM2-135M shape, random weights, float32 both sides) and ``gpu`` (Llama-2-7B
shape in bfloat16, torch on cuda: full fine-tuning with the layers cut to 8 so that it fits one
80 GB GPU, LoRA, scoring and generation on the full 32 layers; generation also reports the decode
step's time against the memory-bandwidth bound). MFU is reported where the device's peak FLOP/s is known
(``tpu_specs.chip_for_device``).

JAX is imported only once the mode has set ``JAX_PLATFORMS`` (JAX reads it when first imported), so
this module imports nothing that imports JAX at its top. The command line is ``cli/bench.py``.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from w2s_jax.core.errors import UserError
from w2s_jax.models.config import get_preset  # (model shapes only: no JAX)
from w2s_jax.tools.tpu_specs import chip_for_device

__all__ = ["WORKLOADS", "BenchOptions", "benchmarks_dir", "cpu_name", "plan", "print_table", "run_suite"]

WORKLOADS = ("sft", "dpo", "score", "generate", "lora")
DEFAULT_PRESET = {"cpu": "smollm2-135m", "gpu": "llama2-7b"}
GPU_FULL_LAYERS = 8  # full fine-tuning of the 7B shape on one 80 GB GPU (params+grads+Adam, both sides)

# a traced run of a whole script (the scripts without their own --profile option)
_TRACED = ("import runpy, sys, jax; d, s = sys.argv[1], sys.argv[2]; sys.argv = sys.argv[2:];\n"
           "with jax.profiler.trace(d):\n    runpy.run_path(s, run_name='__main__')")


@dataclass
class BenchOptions:
    """What to run: the options of `w2s bench` (see ``cli/bench.py``)."""

    mode: str = "cpu"  # cpu | gpu
    quick: bool = False
    only: list[str] = field(default_factory=lambda: list(WORKLOADS))
    out: str | None = "bench.json"
    profile: str | None = None
    preset: str | None = None
    layers: int | None = None
    batch: int | None = None
    seq: int | None = None
    rounds: int | None = None

    def __post_init__(self):
        bad = [w for w in self.only if w not in WORKLOADS]
        if bad:
            raise UserError(f"--only: unknown workload(s) {bad}; valid: {','.join(WORKLOADS)}")


def benchmarks_dir() -> Path:
    d = Path(__file__).resolve().parents[2] / "benchmarks"
    if not (d / "bench_train.py").is_file():
        raise UserError(f"no benchmarks/ directory next to the package (looked in {d}): `w2s bench` needs a "
                        "source checkout of w2s-jax (git clone, then `pip install -e .`)")
    return d


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _check_gpu() -> str:
    """The GPU's device kind; UserError unless JAX and torch both see a CUDA GPU."""
    import jax  # (after the mode set JAX_PLATFORMS)

    try:
        devs = jax.devices("gpu")
    except RuntimeError:
        devs = []
    try:
        import torch

        torch_ok = torch.cuda.is_available()
    except ImportError:
        torch_ok = False
    if not devs or not torch_ok:
        raise UserError(
            "--mode gpu needs a CUDA GPU visible to both JAX (install jax[cuda12]) and torch (a CUDA build); "
            f"found JAX devices {[d.device_kind for d in jax.devices()]}, torch.cuda.is_available()={torch_ok}. "
            "Use --mode cpu on this machine.")
    return devs[0].device_kind


def _shape_args(args) -> tuple[list[str], list[str], list[str], list[str]]:
    """``(common, shape, layers, full_layers)`` argument lists shared by the scripts."""
    gpu = args.mode == "gpu"
    common = ["--preset", args.preset or DEFAULT_PRESET[args.mode]]
    if args.quick:
        common.append("--quick")
    if args.rounds:
        common += ["--rounds", str(args.rounds)]
    shape = []
    if args.batch:
        shape += ["--batch", str(args.batch)]
    if args.seq:
        shape += ["--seq", str(args.seq)]
    elif gpu:
        shape += ["--seq", "256" if args.quick else "1024"]
    if gpu:
        common += ["--device", "cuda", "--dtype", "bfloat16"]
    layers = ["--layers", str(args.layers)] if args.layers else []
    full_layers = layers or (["--layers", str(GPU_FULL_LAYERS)] if gpu and not args.quick else [])
    return common, shape, layers, full_layers


def _generate_args(args, layers: list[str]) -> list[str]:
    a = ["--preset", args.preset or DEFAULT_PRESET[args.mode]] + (["--quick"] if args.quick else []) + layers
    if args.mode == "gpu":
        a += ["--device", "cuda", "--dtype", "bfloat16"]
    if args.rounds:
        a += ["--repeats", str(args.rounds)]
    return a


def plan(args) -> list[tuple[str, str, list[str]]]:
    """[(workload, script, argv)] for the selected workloads."""
    gpu = args.mode == "gpu"
    common, shape, layers, full_layers = _shape_args(args)
    prof = ["--profile", os.path.join(args.profile, "{w}")] if args.profile else []
    out = []
    for w in args.only:
        if w == "sft" and not gpu and args.preset in (None, DEFAULT_PRESET["cpu"]) and not args.layers:
            a = (["--quick"] if args.quick else []) + (["--steps", str(args.rounds)] if args.rounds else []) + \
                shape + ["--no-dpo"]
            out.append((w, "bench_train.py", a))
        elif w in ("sft", "dpo"):  # gpu: 8 sequences per step for SFT, 4 pairs (8 rows) for DPO
            b = ["--batch", "8" if w == "sft" else "4"] if gpu and not args.batch and not args.quick else []
            out.append((w, "bench_lora.py", common + full_layers + shape + b + ["--rank", "0", "--only", w] + prof))
        elif w == "score":
            out.append((w, "bench_scoring.py", common + layers + shape + prof))
        elif w == "lora":  # gpu: the full 7B twice (JAX + torch copies) plus activations -> batch 2
            lshape = shape + (["--batch", "2"] if gpu and not args.batch else [])
            out.append((w, "bench_lora.py", common + layers + lshape + ["--rank", "8"] + prof))
        elif w == "generate":
            out.append((w, "bench_generate.py", _generate_args(args, layers)))
    return out


def _sft_row(res: dict) -> dict:
    """The row of bench_train.py's JSON."""
    st = res["step_seconds"]
    B, S = res["batch"]
    j = st["jax_sft"]["median"]
    mem = res.get("jax_sft_memory") or {}
    row = {"workload": "sft (full)", "tokens_per_step": B * S, "jax_step_ms": j * 1e3, "jax_tok_s": B * S / j,
           "jax_compile_s": res.get("jax_sft_compile_s"),
           "jax_peak_memory_bytes": mem.get("peak_estimate_bytes"), "jax_memory_source": "memory_analysis",
           "baseline": "transformers + torch AdamW (bench_train.py)", "flops_per_token": None}
    if "torch_sft" in st:
        b = st["torch_sft"]["median"]
        row.update(baseline_step_ms=b * 1e3, baseline_tok_s=B * S / b, ratio=b / j,
                   baseline_peak_memory_bytes=(res.get("peak_rss_growth_bytes") or {}).get("torch_sft"),
                   baseline_memory_source="process RSS growth")
    try:
        cfg = get_preset(res["model"]["preset"], n_layers=res["model"]["n_layers"])
        row["flops_per_token"] = cfg.flops_per_token(S)
    except Exception:  # noqa: BLE001
        pass
    return row


def _generate_rows(res: dict, num_params: int | None) -> list[dict]:
    """The rows of bench_generate.py's JSON, one per batch size."""
    rows = []
    for r in res.get("rows", []):
        rows.append({"workload": f"generate b{r['batch']}", "tokens_per_step": r["batch"],
                     "jax_step_ms": r["jax_ms_per_step"], "jax_tok_s": r["jax_tok_s"],
                     "jax_compile_s": r.get("jax_compile_s"), "jax_peak_memory_bytes": None,
                     "jax_memory_source": "", "baseline": "transformers generate (bench_generate.py)",
                     "baseline_tok_s": r["hf_tok_s"], "baseline_step_ms": r.get("hf_ms_per_step"),
                     "ratio": r["ratio"], "flops_per_token": 2.0 * num_params if num_params else None,
                     # GPU: the decode step against weights-and-cache bytes / datasheet HBM bandwidth
                     "hbm_bound_fraction": r.get("fraction_of_bound_datasheet_bytes_s"),
                     "decode_ms_per_step": r.get("jax_decode_ms_per_step")})
    return rows


def _rows_from(workload: str, res: dict, device_kind_peak: float | None, num_params: int | None) -> list[dict]:
    """Normalise one script's JSON into table rows."""
    if workload == "sft" and "step_seconds" in res:  # bench_train.py
        rows = [_sft_row(res)]
    elif workload == "generate":  # bench_generate.py
        rows = _generate_rows(res, num_params)
    else:
        rows = [dict(r) for r in res.get("rows", [])]
    for r in rows:
        f = r.get("flops_per_token")
        r["mfu"] = (r["jax_tok_s"] * f / device_kind_peak) if (f and device_kind_peak) else None
        if r.get("ratio") is not None and not (isinstance(r["ratio"], (int, float)) and math.isfinite(r["ratio"])):
            r["ratio"] = None
    return rows


def _fmt_bytes(n) -> str:
    return "-" if not n else f"{n / 2**20:,.0f} MiB"


def print_table(rows: list[dict]) -> None:
    head = ["workload", "JAX tok/s", "baseline tok/s", "ratio", "JAX compile s", "JAX step ms",
            "JAX peak mem", "baseline peak mem", "MFU"]
    bound = any(r.get("hbm_bound_fraction") for r in rows)
    if bound:
        head.append("of HBM bound")
    body = []
    for r in rows:
        body.append([
            r["workload"], f"{r['jax_tok_s']:,.0f}",
            f"{r['baseline_tok_s']:,.0f}" if r.get("baseline_tok_s") else "-",
            f"{r['ratio']:.2f}x" if r.get("ratio") else "-",
            f"{r['jax_compile_s']:.1f}" if r.get("jax_compile_s") is not None else "-",
            f"{r['jax_step_ms']:.1f}",
            _fmt_bytes(r.get("jax_peak_memory_bytes")) + (f" ({r['jax_memory_source']})" if r.get(
                "jax_peak_memory_bytes") else ""),
            _fmt_bytes(r.get("baseline_peak_memory_bytes")) + (f" ({r['baseline_memory_source']})" if r.get(
                "baseline_peak_memory_bytes") else ""),
            f"{r['mfu']:.1%}" if r.get("mfu") else "-",
        ] + ([f"{r['hbm_bound_fraction']:.0%}" if r.get("hbm_bound_fraction") else "-"] if bound else []))
    w = [max(len(x[i]) for x in [head] + body) for i in range(len(head))]
    print("| " + " | ".join(h.ljust(w[i]) for i, h in enumerate(head)) + " |")
    print("|" + "|".join("-" * (n + 2) for n in w) + "|")
    for b in body:
        print("| " + " | ".join(x.ljust(w[i]) for i, x in enumerate(b)) + " |")


def _device(mode: str, env: dict) -> str:
    """Set up the environment (this process and the scripts') for the mode; returns the device kind."""
    if mode == "gpu":
        os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
        env["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
        env.pop("JAX_PLATFORMS", None)
        return _check_gpu()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    env["JAX_PLATFORMS"] = "cpu"
    import jax  # (after JAX_PLATFORMS is set)

    return jax.devices()[0].device_kind


def _run_scripts(opts: BenchOptions, bdir: Path, env: dict, peak, num_params) -> tuple[list, dict, dict]:
    """Run each planned script in its own process; ``(rows, raw JSON by workload, failures)``."""
    rows, raw, failures = [], {}, {}
    with tempfile.TemporaryDirectory(prefix="w2s-bench-") as tmp:
        for i, (w, script, a) in enumerate(plan(opts)):
            out = os.path.join(tmp, f"{i}_{w}.json")
            a = [x.replace("{w}", w) for x in a] + ["--out", out]
            cmd = [sys.executable, str(bdir / script), *a]
            if opts.profile and script in ("bench_train.py", "bench_generate.py"):
                cmd = [sys.executable, "-c", _TRACED, os.path.join(opts.profile, w), str(bdir / script), *a]
            print(f"== {w}: {script} {' '.join(a[:-2])}", flush=True)
            p = subprocess.run(cmd, env=env, cwd=tmp)
            if p.returncode != 0 or not os.path.exists(out):
                failures[w] = f"{script} exited with {p.returncode}"
                print(f"== {w}: FAILED ({failures[w]})", file=sys.stderr, flush=True)
                continue
            res = json.loads(Path(out).read_text())
            raw[w] = res
            rows += _rows_from(w, res, peak, num_params)
    return rows, raw, failures


def _versions() -> dict:
    import jax
    import torch
    import transformers

    out = {"jax": jax.__version__, "torch": torch.__version__, "transformers": transformers.__version__,
           "python": platform.python_version()}
    for mod in ("peft", "trl"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001
            out[mod] = None
    return out


def run_suite(opts: BenchOptions) -> int:
    """Run the suite, print the table, write ``opts.out``; returns 1 when a script failed, else 0."""
    bdir = benchmarks_dir()
    env = dict(os.environ)
    device_kind = _device(opts.mode, env)
    spec = chip_for_device(device_kind)
    peak = spec.peak_bf16_flops if spec else None
    preset = opts.preset or DEFAULT_PRESET[opts.mode]
    num_params = get_preset(preset).num_params
    env["PYTHONPATH"] = os.pathsep.join([str(bdir.parent)] + [p for p in [env.get("PYTHONPATH")] if p])
    rows, raw, failures = _run_scripts(opts, bdir, env, peak, num_params)
    versions = _versions()
    result = {
        "mode": opts.mode, "quick": opts.quick, "preset": preset, "device_kind": device_kind,
        "peak_flops": peak, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "versions": versions,
        "machine": {"cpu": cpu_name(), "cpus": os.cpu_count(), "platform": platform.platform(),
                    "load_avg_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None},
        "rows": rows, "failures": failures, "raw": raw,
    }
    print(f"\n{preset} ({opts.mode} mode, {device_kind}), jax {versions['jax']}, torch {versions['torch']}, "
          f"transformers {versions['transformers']}")
    print_table(rows)
    if opts.out:
        Path(opts.out).parent.mkdir(parents=True, exist_ok=True)
        Path(opts.out).write_text(json.dumps(result, indent=1, default=float) + "\n")
        print(f"wrote {opts.out}")
    if failures:
        print(f"failed: {failures}", file=sys.stderr)
        return 1
    return 0
