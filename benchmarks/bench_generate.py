"""Generation speed: w2s-jax ``Sampler`` against ``transformers`` ``generate`` on the same machine.

SmolLM2-135M shape (``get_preset("smollm2-135m")``) with random weights, float32 on both sides (the
same weights copied into ``LlamaForCausalLM``), greedy, prompts of 32 tokens, 128 new tokens (EOS
disabled on both sides so every row generates exactly that many), batch 1 and 16, both in this one
process. Each side gets a warm-up run; JAX compile time is excluded from its throughput and reported
separately. Throughput = generated tokens / wall time of ``generate`` (prefill included), best of
``--repeats`` runs per side, runs of the two sides interleaved. Where the Sampler uses the native CPU
decode kernel (``w2s_jax/cpu_kernels.py``), a second Sampler with XLA's dot is timed in the same rounds
(``native_kernel_speedup`` in the JSON). The share of the machine's CPU that
other processes used during each timed run is recorded: on a shared machine the figures are only
meaningful when it is near 0 (``--wait-quiet S`` waits for that before each run); PyTorch's OpenMP
threads slow down far more than XLA's under oversubscription, which inflates the ratio.

    python benchmarks/bench_generate.py [--quick] [--out results.json]

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

from _common import timed  # noqa: E402

from w2s_jax.bench import _cpu_name as cpu_name  # noqa: E402


def to_hf_state_dict(params, cfg):
    """Our params tree -> LlamaForCausalLM state dict (torch float32 tensors; layout from ``w2s_jax.convert``)."""
    import torch

    from w2s_jax.convert import params_to_state_dict

    t = lambda a: torch.from_numpy(np.array(a, dtype=np.float32, order="C", copy=True))
    sd = {k: t(v) for k, v in params_to_state_dict(params, cfg).items()}
    if cfg.tie_embeddings:
        sd["lm_head.weight"] = sd["model.embed_tokens.weight"]
    return sd


def hf_model(params, cfg):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    hc = LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads, head_dim=cfg.head_dim,
        intermediate_size=cfg.d_ff, max_position_embeddings=cfg.max_seq_len, rope_theta=cfg.rope_theta,
        rms_norm_eps=cfg.norm_eps, tie_word_embeddings=cfg.tie_embeddings, bos_token_id=cfg.bos_token_id,
        eos_token_id=cfg.eos_token_id, pad_token_id=cfg.pad_token_id, torch_dtype="float32",
    )
    with torch.device("meta"):
        m = LlamaForCausalLM(hc)
    m.load_state_dict(to_hf_state_dict(params, cfg), assign=True, strict=False)
    if cfg.tie_embeddings:
        m.tie_weights()
    m.model.rotary_emb.__init__(hc)  # rebuild the non-persistent inv_freq buffer off the meta device
    return m.float().eval()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="32 new tokens, 1 repeat")
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=None, help="default 128 (32 with --quick)")
    ap.add_argument("--repeats", type=int, default=None, help="timed runs per side (best is reported); default 2")
    ap.add_argument("--preset", default="smollm2-135m")
    ap.add_argument("--out", default=str(Path(__file__).with_suffix(".json")))
    ap.add_argument("--wait-quiet", type=float, default=0.0, metavar="S",
                    help="before each timed run wait up to S seconds for other processes to go idle "
                         "(shared machines); the CPU share other processes used during each run is recorded")
    args = ap.parse_args(argv)
    new = args.new_tokens or (32 if args.quick else 128)
    repeats = args.repeats or (1 if args.quick else 2)
    batches = [int(b) for b in args.batches.split(",")]

    import jax
    import torch

    from w2s_jax.model import get_preset, init_params
    from w2s_jax.sampler import SampleConfig, Sampler

    ncpu = os.cpu_count() or 1
    torch.set_num_threads(ncpu)
    cfg = get_preset(args.preset)
    t0 = time.perf_counter()
    params = init_params(cfg, jax.random.PRNGKey(0))
    params = jax.block_until_ready(params)
    m = hf_model(params, cfg)
    print(f"model {cfg.name}: {cfg.num_params / 1e6:.1f}M params float32, built in {time.perf_counter() - t0:.1f}s;"
          f" {ncpu} CPUs ({cpu_name()}), torch threads {torch.get_num_threads()}, jax {jax.__version__},"
          f" torch {torch.__version__}", flush=True)
    sampler = Sampler(params, cfg, tokenizer=None, eos_ids=[])
    # the same Sampler with XLA's dot instead of the native matrix-vector kernel (w2s_jax/cpu_kernels.py)
    sampler_xla = Sampler(params, cfg, tokenizer=None, eos_ids=[], cpu_kernels=False) if sampler.cpu_kernels else None
    print(f"native CPU kernels: {'on' if sampler.cpu_kernels else 'off'}", flush=True)
    del params
    rng = np.random.default_rng(0)
    rows = []
    for B in batches:
        prompts = rng.integers(3, cfg.vocab_size, size=(B, args.prompt_len)).tolist()
        sc = SampleConfig(max_new_tokens=new, batch_size=B, prompt_buckets=(args.prompt_len,))
        ids = torch.tensor(prompts)
        attn = torch.ones_like(ids)

        def run_hf(ids=ids, attn=attn):
            with torch.inference_mode():
                out = m.generate(ids, attention_mask=attn, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                                 num_beams=1, pad_token_id=cfg.pad_token_id)
            return out[:, args.prompt_len:].tolist()

        def run_jax(prompts=prompts, sc=sc, sampler=sampler):
            return [c[0].token_ids for c in sampler.generate(prompts, sc, progress=False)]

        run_xla = None if sampler_xla is None else partial(run_jax, sampler=sampler_xla)

        c0 = sampler.compile_seconds
        t = time.perf_counter()
        jax_tokens = run_jax()  # warm-up (includes compilation)
        jax_first = time.perf_counter() - t
        compile_s = sampler.compile_seconds - c0
        hf_tokens = run_hf()  # warm-up
        xla_tokens = run_xla() if run_xla else None
        hf_times, jax_times, hf_other, jax_other, xla_times = [], [], [], [], []
        for _ in range(repeats):
            if run_xla:
                xla_times.append(timed(run_xla, args.wait_quiet)[0])
            w, o = timed(run_hf, args.wait_quiet)
            hf_times.append(w)
            hf_other.append(o)
            w, o = timed(run_jax, args.wait_quiet)
            jax_times.append(w)
            jax_other.append(o)
        n_tok = B * new
        agree = float(np.mean([a == b for a, b in zip(jax_tokens, hf_tokens)]))
        row = {
            "batch": B, "prompt_len": args.prompt_len, "new_tokens": new,
            "hf_tok_s": n_tok / min(hf_times), "jax_tok_s": n_tok / min(jax_times),
            "ratio": min(hf_times) / min(jax_times),
            "hf_seconds": hf_times, "jax_seconds": jax_times,
            "other_cpu_share_hf": hf_other, "other_cpu_share_jax": jax_other,
            "jax_compile_s": compile_s, "jax_first_call_s": jax_first,
            "jax_ms_per_step": min(jax_times) / new * 1e3, "hf_ms_per_step": min(hf_times) / new * 1e3,
            "greedy_rows_identical": agree,
        }
        if xla_times:  # the native kernel's share of the speed-up
            row.update(jax_xla_dot_tok_s=n_tok / min(xla_times), jax_xla_dot_seconds=xla_times,
                       native_kernel_speedup=min(xla_times) / min(jax_times),
                       xla_dot_rows_identical=float(np.mean([a == b for a, b in zip(xla_tokens, jax_tokens)])))
        rows.append(row)
        print(f"batch {B:3d}: transformers {row['hf_tok_s']:8.1f} tok/s | w2s-jax {row['jax_tok_s']:8.1f} tok/s |"
              f" ratio {row['ratio']:.2f}x | jax compile {compile_s:.1f}s | rows identical {agree:.2f} |"
              f" other processes' CPU share hf {max(hf_other):.0%} jax {max(jax_other):.0%}", flush=True)
        if xla_times:
            print(f"           w2s-jax with XLA's dot instead of the native kernel"
                  f" {row['jax_xla_dot_tok_s']:8.1f} tok/s"
                  f" (kernel speed-up {row['native_kernel_speedup']:.2f}x, rows identical"
                  f" {row['xla_dot_rows_identical']:.2f})", flush=True)

    print()
    print("| batch | transformers tok/s | w2s-jax tok/s | ratio | jax ms/step | jax compile s |")
    print("|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['batch']} | {r['hf_tok_s']:.1f} | {r['jax_tok_s']:.1f} | {r['ratio']:.2f}x |"
              f" {r['jax_ms_per_step']:.1f} | {r['jax_compile_s']:.1f} |")
    result = {
        "benchmark": "generate", "model": cfg.name, "dtype": "float32", "greedy": True, "quick": args.quick,
        "machine": {"cpu": cpu_name(), "cpus": ncpu, "platform": platform.platform(),
                    "load_avg_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None},
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
