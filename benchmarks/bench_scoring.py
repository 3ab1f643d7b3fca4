"""Scoring pass (summed completion log-probs, i.e. the DPO reference pass): w2s-jax vs PyTorch.

JAX ``scoring.completion_logprobs`` (jitted forward + log-softmax + masked sum) against
``LlamaForCausalLM`` under ``torch.no_grad()`` computing the same summed log-probs from its logits,
same weights (our random parameters copied into the HF model), same batch (B rows x S tokens, the
last 3/4 of each row being the "completion"). Rounds interleave the two sides; medians reported.
Also holds the helpers shared with ``bench_lora.py`` (model copy, timing, memory, row format).

    python benchmarks/bench_scoring.py [--quick] [--preset smollm2-135m] [--layers N]
        [--batch 8] [--seq 256] [--device cpu|cuda] [--dtype float32|bfloat16] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from _common import PeakRSS, openmp_passive, torch_model  # noqa: E402,F401  (H.PeakRSS, H.torch_model: bench_lora)

openmp_passive()  # before torch is imported (see _common.openmp_passive)

# ----------------------------------------------------------------------------- shared helpers


def common_args(ap: argparse.ArgumentParser, batch: int, seq: int) -> None:
    ap.add_argument("--quick", action="store_true", help="few layers, 2 timed rounds (smoke test)")
    ap.add_argument("--preset", default="smollm2-135m")
    ap.add_argument("--layers", type=int, default=None, help="override the preset's layer count")
    ap.add_argument("--batch", type=int, default=batch)
    ap.add_argument("--seq", type=int, default=seq)
    ap.add_argument("--rounds", type=int, default=None, help="timed rounds (default 5; --quick 2)")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="torch device (JAX uses its default)")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    ap.add_argument("--no-torch", action="store_true")
    ap.add_argument("--profile", default=None, metavar="DIR", help="jax.profiler trace of the JAX timed rounds")
    ap.add_argument("--remat", default="dots", choices=["none", "dots", "dots_no_batch", "full"],
                    help="JAX rematerialisation policy for the training steps (dots: measured fastest on CPU)")
    ap.add_argument("--attention", default="auto", choices=["auto", "xla", "cudnn"],
                    help="JAX attention implementation (auto: cuDNN's fused kernel on GPUs in bfloat16, else XLA)")


def setup(args):
    """(model cfg, numpy-free JAX params, torch module factory inputs)."""
    if args.device == "cuda":
        os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # share the GPU with torch
        import torch

        if not torch.cuda.is_available():
            from w2s_jax.core.errors import UserError

            raise UserError("--device cuda: torch sees no CUDA GPU")
    from w2s_jax.models.config import get_preset

    over = dict(dtype=args.dtype, param_dtype=args.dtype, remat=getattr(args, "remat", "none"),
                attention_impl=getattr(args, "attention", "auto"))
    layers = args.layers or (min(4, get_preset(args.preset).n_layers) if args.quick else None)
    if layers:
        over["n_layers"] = layers
    return get_preset(args.preset, **over)


def random_params(cfg, seed: int = 0):
    """Random parameters in cfg.param_dtype, made on the JAX default device."""
    import jax

    from w2s_jax.models.params import init_params

    return jax.block_until_ready(init_params(cfg, jax.random.PRNGKey(seed)))


def sync(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def jax_peak_memory(compiled=None) -> tuple[int | None, str]:
    """(bytes, source): device ``memory_stats()`` peak, else ``memory_analysis()`` estimate, else None."""
    import jax

    try:
        st = jax.devices()[0].memory_stats()
    except Exception:  # noqa: BLE001
        st = None
    if st and st.get("peak_bytes_in_use"):
        return int(st["peak_bytes_in_use"]), "device memory_stats"
    if compiled is not None:
        from w2s_jax.train.build import memory_stats

        m = memory_stats(compiled)
        if m.get("peak_estimate_bytes"):
            return m["peak_estimate_bytes"], "memory_analysis"
    return None, ""


def torch_peak_memory(device: str, rss_peak: int) -> tuple[int, str]:
    if device == "cuda":
        import torch

        return int(torch.cuda.max_memory_allocated()), "torch.cuda.max_memory_allocated"
    return rss_peak, "process RSS peak"


def interleave(kinds: dict, rounds: int, warmup: int = 3, profile: str | None = None) -> dict:
    """Warm up then time each callable ``rounds`` times, alternating; {name: [seconds]}.
    ``profile``: wrap the timed calls of names starting with ``jax`` in ``jax.profiler.trace``."""
    for fn in kinds.values():
        for _ in range(warmup):
            fn()
    times = {k: [] for k in kinds}
    for r in range(rounds):
        for k, fn in kinds.items():
            if profile and k.startswith("jax"):
                import jax

                with jax.profiler.trace(os.path.join(profile, f"{k}_{r}")):
                    t0 = time.perf_counter()
                    fn()
                    times[k].append(time.perf_counter() - t0)
            else:
                t0 = time.perf_counter()
                fn()
                times[k].append(time.perf_counter() - t0)
        print(f"round {r + 1}/{rounds}: " + ", ".join(f"{k} {v[-1] * 1e3:.0f} ms" for k, v in times.items()),
              flush=True)
    return times


def make_row(workload: str, tokens: int, times: dict, jax_key: str, base_key: str | None, *, compile_s,
             jax_mem, base_mem, flops_per_token: float | None, baseline: str) -> dict:
    j = statistics.median(times[jax_key])
    row = {"workload": workload, "tokens_per_step": tokens, "jax_step_ms": j * 1e3, "jax_tok_s": tokens / j,
           "jax_step_ms_all": [t * 1e3 for t in times[jax_key]], "jax_compile_s": compile_s,
           "jax_peak_memory_bytes": jax_mem[0], "jax_memory_source": jax_mem[1], "baseline": baseline,
           "flops_per_token": flops_per_token}
    if base_key and base_key in times:
        b = statistics.median(times[base_key])
        row.update(baseline_step_ms=b * 1e3, baseline_tok_s=tokens / b, ratio=b / j,
                   baseline_step_ms_all=[t * 1e3 for t in times[base_key]],
                   baseline_peak_memory_bytes=base_mem[0], baseline_memory_source=base_mem[1])
    return row


def versions() -> dict:
    import jax

    out = {"jax": jax.__version__}
    for mod in ("torch", "transformers", "peft", "trl"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001
            out[mod] = None
    return out


def write(out: str | None, result: dict) -> None:
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(result, indent=1, default=float) + "\n")
        print(f"wrote {out}")


def print_rows(rows: list[dict]) -> None:
    for r in rows:
        base = (f"baseline {r['baseline_tok_s']:,.0f} tok/s ({r['baseline_step_ms']:.0f} ms), ratio {r['ratio']:.2f}x"
                if "ratio" in r else "no baseline")
        print(f"{r['workload']}: JAX {r['jax_tok_s']:,.0f} tok/s ({r['jax_step_ms']:.0f} ms/step, compile"
              f" {r['jax_compile_s']:.1f} s) | {base}")


def batch_tokens(cfg, B: int, S: int, seed: int = 1):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(3, cfg.vocab_size, (B, S)).astype(np.int32)
    mask = np.zeros((B, S), np.int32)
    mask[:, S // 4:] = 1  # completion = last 3/4 (log p(tokens[t] | < t), t >= S/4)
    return tokens, mask


# ----------------------------------------------------------------------------- scoring


def torch_completion_logprobs(model, tokens, mask):
    """Summed log p(tokens[t] | < t) over mask[t] (t >= 1), as ``scoring.completion_logprobs``."""
    import torch

    logits = model(input_ids=tokens).logits.float()
    lp = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, tokens[:, 1:, None])[..., 0]
    return (lp * mask[:, 1:]).sum(-1)


def run(args) -> dict:
    import jax
    import jax.numpy as jnp

    from w2s_jax.infer.scoring import Scorer

    cfg = setup(args)
    rounds = args.rounds or (2 if args.quick else 5)
    B, S = args.batch, args.seq
    params = random_params(cfg)
    tokens, mask = batch_tokens(cfg, B, S)
    jt, jm = jax.device_put(jnp.asarray(tokens)), jax.device_put(jnp.asarray(mask))
    seg = jnp.ones(tokens.shape, jnp.int32)
    scorer = Scorer(cfg)
    t0 = time.perf_counter()
    compiled = scorer.program("completion").lower(params, jt, jm, seg, None, None, jnp.float32(1.0)).compile()
    compile_s = time.perf_counter() - t0
    jax_lp = scorer.completion_logprobs(params, jt, jm)[0].block_until_ready()  # also fills the jit cache

    def jax_score():
        scorer.completion_logprobs(params, jt, jm)[0].block_until_ready()

    kinds = {"jax_score": jax_score}
    base_mem = (None, "")
    max_diff = None
    if not args.no_torch:
        import torch

        model = torch_model(cfg, params, args.device, args.dtype).eval()
        tt = torch.from_numpy(tokens.astype(np.int64)).to(args.device)
        tm = torch.from_numpy(mask.astype(np.float32)).to(args.device)

        def torch_score():
            with torch.no_grad():
                out = torch_completion_logprobs(model, tt, tm)
            sync(args.device)
            return out

        with PeakRSS() as pr:
            ref = torch_score()
        max_diff = float(np.max(np.abs(ref.float().cpu().numpy() - np.asarray(jax_lp, np.float32))))
        kinds["torch_score"] = torch_score
    times = interleave(kinds, rounds, profile=args.profile)
    if not args.no_torch:
        base_mem = torch_peak_memory(args.device, pr.peak)
    fwd_flops = cfg.flops_per_token(S) / 3.0  # forward only: 1/3 of the training FLOPs
    row = make_row("score", B * S, times, "jax_score", "torch_score", compile_s=compile_s,
                   jax_mem=jax_peak_memory(compiled), base_mem=base_mem, flops_per_token=fwd_flops,
                   baseline=f"transformers forward, torch.no_grad, {args.device} {args.dtype}")
    row["max_abs_logprob_diff"] = max_diff
    return {"benchmark": "scoring", "model": cfg.name, "n_layers": cfg.n_layers, "dtype": args.dtype,
            "batch": [B, S], "rounds": rounds, "versions": versions(), "rows": [row]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common_args(ap, batch=8, seq=256)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    res = run(args)
    print_rows(res["rows"])
    print(f"max |JAX - torch| summed log-prob: {res['rows'][0]['max_abs_logprob_diff']}")
    write(args.out, res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
