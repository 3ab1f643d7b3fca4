"""Generation speed: w2s-jax ``Sampler`` against ``transformers`` ``generate`` on the same machine.

SmolLM2-135M shape (``get_preset("smollm2-135m")``) with random weights, float32 on both sides (the
same weights copied into ``LlamaForCausalLM``), greedy, prompts of 32 tokens, 128 new tokens (EOS
disabled on both sides so every row generates exactly that many), batch 1 and 16, both in this one
process. Each side gets a warm-up run; JAX compile time is excluded from its throughput and reported
separately. Throughput = generated tokens / wall time of ``generate`` (prefill included), best of
``--repeats`` runs per side, runs of the two sides interleaved. Where the Sampler uses the native CPU
decode kernel (``w2s_jax/infer/kernels.py``), a second Sampler with XLA's dot is timed in the same rounds
(``native_kernel_speedup`` in the JSON). The share of the machine's CPU that
other processes used during each timed run is recorded: on a shared machine the figures are only
meaningful when it is near 0 (``--wait-quiet S`` waits for that before each run); PyTorch's OpenMP
threads slow down far more than XLA's under oversubscription, which inflates the ratio.

    python benchmarks/bench_generate.py [--quick] [--out results.json]
    python benchmarks/bench_generate.py --device cuda --dtype bfloat16 --preset llama2-7b

GPU (``--device cuda``): JAX on its default GPU and ``LlamaForCausalLM`` on cuda, same weights (copied
device to device), same dtype; ``--layer-loops scan,unroll`` times one JAX Sampler per layer loop (default:
the Sampler's own choice). At batch 1 (``--short-batches``) each side is also run with ``--short-tokens``
new tokens, so that the decode step's own time ``(t_long - t_short) / (new - short)`` is reported
without the prefill (each such run compiles one more JAX program); that is compared with
the memory-bandwidth bound of one decode step: the bytes of every weight a step reads (all but the
embedding table, of which it reads one row per sequence) and of the KV cache, over the device's
bandwidth (the datasheet figure from ``w2s_jax/tools/tpu_specs.py`` and a copy measured in this run).

``--quick``: 32 new tokens, one repeat (a smoke test of the script, not the reported figure).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from functools import partial
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import timed, torch_model  # noqa: E402

from w2s_jax.tools.bench import cpu_name  # noqa: E402


def measure_copy_bandwidth(nbytes: int = 2 << 30, reps: int = 10) -> float:
    """Device memory bandwidth (bytes read + written per second) of a jitted ``2 * x`` over ``nbytes``
    of random bfloat16 (median of ``reps`` after a warm-up)."""
    import statistics

    import jax
    import jax.numpy as jnp

    x = jax.random.uniform(jax.random.PRNGKey(0), (nbytes // 2,), jnp.bfloat16)
    f = jax.jit(lambda a: a * 2)
    f(x).block_until_ready()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        f(x).block_until_ready()
        ts.append(time.perf_counter() - t)
    del x
    return 2 * nbytes / statistics.median(ts)


def decode_bytes_per_step(cfg, batch: int, context: int) -> dict:
    """Fewest bytes one decode step must read from device memory: every weight except the input
    embedding table (one row per sequence; with tied embeddings the output head reads it anyway) and
    the valid part of the KV cache at ``context`` tokens."""
    item = 2 if cfg.param_dtype == "bfloat16" else 4
    weights = cfg.num_params - (0 if cfg.tie_embeddings else cfg.vocab_size * cfg.d_model)
    kv = 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * context * batch * item
    return {"weights": weights * item, "kv_cache": kv, "total": weights * item + kv}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="32 new tokens, 1 repeat")
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=None, help="default 128 (32 with --quick)")
    ap.add_argument("--repeats", type=int, default=None, help="timed runs per side (best is reported); default 2")
    ap.add_argument("--preset", default="smollm2-135m")
    ap.add_argument("--layers", type=int, default=None, help="override the preset's layer count")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                    help="torch device; JAX uses its default backend (a GPU when --device cuda)")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                    help="weights and compute, both sides")
    ap.add_argument("--layer-loops", default=None,
                    help="Sampler layer loops to time, comma-separated (default: the Sampler's own choice); "
                         "the fastest is the reported JAX figure")
    ap.add_argument("--short-tokens", type=int, default=None,
                    help="also time runs of this many new tokens, to get the decode step's time without the "
                         "prefill (default 16 with --device cuda, off on cpu)")
    ap.add_argument("--short-batches", default="1", help="the batch sizes that get the --short-tokens runs")
    ap.add_argument("--hf-static", action="store_true",
                    help="also time transformers generate with cache_implementation='static' (torch.compile)")
    ap.add_argument("--out", default=str(Path(__file__).with_suffix(".json")))
    ap.add_argument("--wait-quiet", type=float, default=0.0, metavar="S",
                    help="before each timed run wait up to S seconds for other processes to go idle "
                         "(shared machines); the CPU share other processes used during each run is recorded")
    args = ap.parse_args(argv)
    new = args.new_tokens or (32 if args.quick else 128)
    repeats = args.repeats or (1 if args.quick else 2)
    batches = [int(b) for b in args.batches.split(",")]
    gpu = args.device == "cuda"
    short = args.short_tokens if args.short_tokens is not None else (16 if gpu else 0)
    if short >= new:
        raise SystemExit(f"--short-tokens ({short}) must be below the number of new tokens ({new})")
    if gpu:
        os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # share the GPU with torch

    import jax
    import torch

    from w2s_jax.infer.sampler import SampleConfig, Sampler
    from w2s_jax.models.config import get_preset
    from w2s_jax.models.params import init_params
    from w2s_jax.tools.tpu_specs import chip_for_device

    ncpu = os.cpu_count() or 1
    torch.set_num_threads(ncpu)
    over = {"n_layers": args.layers} if args.layers else {}
    if args.dtype != "float32":
        over.update(dtype=args.dtype, param_dtype=args.dtype)
    cfg = get_preset(args.preset, **over)
    t0 = time.perf_counter()
    params = init_params(cfg, jax.random.PRNGKey(0))
    params = jax.block_until_ready(params)
    if gpu and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA GPU")
    m = torch_model(cfg, params, args.device, args.dtype).eval()
    dev = jax.devices()[0]
    print(f"model {cfg.name} ({cfg.n_layers} layers): {cfg.num_params / 1e6:.1f}M params {args.dtype}, built in"
          f" {time.perf_counter() - t0:.1f}s; JAX on {dev.device_kind}, torch on {args.device};"
          f" {ncpu} CPUs ({cpu_name()}), torch threads {torch.get_num_threads()}, jax {jax.__version__},"
          f" torch {torch.__version__}", flush=True)
    variants = {}  # name -> Sampler; "jax" is the reported one, or the fastest when several loops are timed
    loops = args.layer_loops.split(",") if args.layer_loops else ["auto"]
    short_batches = {int(b) for b in args.short_batches.split(",") if b.strip()}
    for loop in loops:
        s = Sampler(params, cfg, tokenizer=None, eos_ids=[], layer_loop=loop)
        variants["jax" if len(loops) == 1 else f"jax_{s.layer_loop}"] = s
    first = next(iter(variants.values()))
    if len(loops) == 1 and first.cpu_kernels:
        # the same Sampler with XLA's dot instead of the native matrix-vector kernel (w2s_jax/infer/kernels.py)
        variants["jax_xla_dot"] = Sampler(params, cfg, tokenizer=None, eos_ids=[], layer_loop=loops[0],
                                          cpu_kernels=False)
    print(f"native CPU kernels: {'on' if first.cpu_kernels else 'off'}; JAX variants: {', '.join(variants)}",
          flush=True)
    del params
    machine = {"cpu": cpu_name(), "cpus": ncpu, "platform": platform.platform(),
               "load_avg_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
               "jax_device": dev.device_kind, "torch_device": torch.cuda.get_device_name() if gpu else "cpu"}
    spec = chip_for_device(dev.device_kind) if gpu else None
    bandwidth = {}
    if gpu:
        bandwidth["measured_copy_bytes_s"] = measure_copy_bandwidth()
        if spec:
            bandwidth["datasheet_bytes_s"] = spec.hbm_bandwidth
        print("memory bandwidth: " + ", ".join(f"{k} {v / 1e12:.2f} TB/s" for k, v in bandwidth.items()), flush=True)
    rng = np.random.default_rng(0)
    rows = []
    for B in batches:
        prompts = rng.integers(3, cfg.vocab_size, size=(B, args.prompt_len)).tolist()
        ids = torch.tensor(prompts, device=args.device)
        attn = torch.ones_like(ids)

        def run_hf(k, ids=ids, attn=attn, **kw):
            with torch.inference_mode():
                out = m.generate(ids, attention_mask=attn, max_new_tokens=k, min_new_tokens=k, do_sample=False,
                                 num_beams=1, pad_token_id=cfg.pad_token_id, **kw)
            return out[:, args.prompt_len:].tolist()

        def run_jax(k, sampler, prompts=prompts, B=B):
            sc = SampleConfig(max_new_tokens=k, batch_size=B, prompt_buckets=(args.prompt_len,))
            return [c[0].token_ids for c in sampler.generate(prompts, sc, progress=False)]

        sides = {"hf": partial(run_hf, new)}
        if args.hf_static:
            sides["hf_static"] = partial(run_hf, new, cache_implementation="static")
        sides.update({name: partial(run_jax, new, sampler=s) for name, s in variants.items()})
        shorts = {}
        if short and B in short_batches:
            shorts = {"hf": partial(run_hf, short)}
            if args.hf_static:
                shorts["hf_static"] = partial(run_hf, short, cache_implementation="static")
            shorts.update({name: partial(run_jax, short, sampler=s) for name, s in variants.items()})
        tokens, compile_s, first_s, errors = {}, {}, {}, {}
        for name, fn in list(sides.items()):  # warm-up (JAX: includes compilation)
            c0 = variants[name].compile_seconds if name in variants else 0.0
            t = time.perf_counter()
            try:
                tokens[name] = fn()
                if name in shorts:
                    shorts[name]()
            except Exception as e:  # noqa: BLE001  (an optional baseline that fails is recorded, not fatal)
                if name in ("hf", "jax") or not name.startswith(("hf_", "jax_")):
                    raise
                errors[name] = f"{type(e).__name__}: {e}"[:500]
                print(f"{name}: failed ({errors[name]})", flush=True)
                sides.pop(name)
                shorts.pop(name, None)
                continue
            first_s[name] = time.perf_counter() - t
            if name in variants:
                compile_s[name] = variants[name].compile_seconds - c0
        times = {k: [] for k in sides}
        short_times = {k: [] for k in shorts}
        other = {k: [] for k in sides}
        for _ in range(repeats):
            for name in reversed(list(sides)):  # JAX variants (last: the reported one), then transformers
                w, o = timed(sides[name], args.wait_quiet)
                times[name].append(w)
                other[name].append(o)
                if name in shorts:
                    short_times[name].append(timed(shorts[name], args.wait_quiet)[0])
        n_tok = B * new
        jax_names = [n for n in times if n in variants]
        best = "jax" if "jax" in times else min(jax_names, key=lambda n: min(times[n]))
        hf_t, jax_t = min(times["hf"]), min(times[best])
        agree = float(np.mean([a == b for a, b in zip(tokens[best], tokens["hf"])]))
        row = {
            "batch": B, "prompt_len": args.prompt_len, "new_tokens": new, "jax_variant": best,
            "hf_tok_s": n_tok / hf_t, "jax_tok_s": n_tok / jax_t, "ratio": hf_t / jax_t,
            "hf_seconds": times["hf"], "jax_seconds": times[best],
            "other_cpu_share_hf": other["hf"], "other_cpu_share_jax": other[best],
            "jax_compile_s": compile_s[best], "jax_first_call_s": first_s[best],
            "jax_ms_per_step": jax_t / new * 1e3, "hf_ms_per_step": hf_t / new * 1e3,
            "greedy_rows_identical": agree,
            "variants": {n: {"tok_s": n_tok / min(times[n]), "seconds": times[n], "compile_s": compile_s.get(n),
                             "rows_identical_to_hf": float(np.mean([a == b for a, b in zip(tokens[n], tokens["hf"])]))}
                         for n in times},
        }
        if errors:
            row["errors"] = errors
        if shorts:
            for n, st in short_times.items():
                row["variants"][n]["decode_ms_per_step"] = (min(times[n]) - min(st)) / (new - short) * 1e3
            row["jax_decode_ms_per_step"] = row["variants"][best]["decode_ms_per_step"]
            row["hf_decode_ms_per_step"] = row["variants"]["hf"]["decode_ms_per_step"]
        if "hf_static" in times:
            row["hf_static_tok_s"] = n_tok / min(times["hf_static"])
            row["ratio_vs_hf_static"] = min(times["hf_static"]) / jax_t
        if bandwidth:
            nb = decode_bytes_per_step(cfg, B, args.prompt_len + (new + short) // 2)
            row["decode_bytes_per_step"] = nb
            d = row.get("jax_decode_ms_per_step") or row["jax_ms_per_step"]
            row["bound_basis"] = "decode step" if "jax_decode_ms_per_step" in row else "whole run, prefill included"
            for k, bw in bandwidth.items():
                bound_ms = nb["total"] / bw * 1e3
                row[f"bound_ms_{k}"] = bound_ms
                row[f"fraction_of_bound_{k}"] = bound_ms / d
        if "jax_xla_dot" in times and best == "jax":  # the native kernel's share of the speed-up
            xla_times = times["jax_xla_dot"]
            row.update(jax_xla_dot_tok_s=n_tok / min(xla_times), jax_xla_dot_seconds=xla_times,
                       native_kernel_speedup=min(xla_times) / jax_t,
                       xla_dot_rows_identical=float(np.mean([a == b for a, b in zip(tokens["jax_xla_dot"],
                                                                                     tokens["jax"])])))
        rows.append(row)
        print(f"batch {B:3d}: transformers {row['hf_tok_s']:8.1f} tok/s | w2s-jax ({best}) {row['jax_tok_s']:8.1f}"
              f" tok/s | ratio {row['ratio']:.2f}x | jax compile {row['jax_compile_s']:.1f}s | rows identical"
              f" {agree:.2f} | other processes' CPU share hf {max(other['hf']):.0%} jax {max(other[best]):.0%}",
              flush=True)
        for n, v in row["variants"].items():
            extra = f", decode {v['decode_ms_per_step']:.2f} ms/step" if "decode_ms_per_step" in v else ""
            print(f"           {n:12s} {v['tok_s']:8.1f} tok/s{extra}, rows identical to transformers"
                  f" {v['rows_identical_to_hf']:.2f}", flush=True)
        if "native_kernel_speedup" in row:
            print(f"           native kernel speed-up over XLA's dot {row['native_kernel_speedup']:.2f}x", flush=True)
        for k in bandwidth:
            print(f"           decode bound ({k}) {row[f'bound_ms_{k}']:.2f} ms/step: w2s-jax reaches"
                  f" {row[f'fraction_of_bound_{k}']:.0%} of it ({row['bound_basis']})", flush=True)

    print()
    print("| batch | transformers tok/s | w2s-jax tok/s | ratio | jax ms/step | jax compile s |")
    print("|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['batch']} | {r['hf_tok_s']:.1f} | {r['jax_tok_s']:.1f} | {r['ratio']:.2f}x |"
              f" {r['jax_ms_per_step']:.1f} | {r['jax_compile_s']:.1f} |")
    result = {
        "benchmark": "generate", "model": cfg.name, "n_layers": cfg.n_layers, "dtype": args.dtype, "greedy": True,
        "quick": args.quick, "device": args.device, "machine": machine, "bandwidth": bandwidth,
        "versions": {"jax": jax.__version__, "torch": torch.__version__,
                     "transformers": __import__("transformers").__version__},
        "rows": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
