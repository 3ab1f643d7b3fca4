"""Training-step speed on CPU: w2s-jax vs PyTorch ``transformers`` (same machine, same run).

SmolLM2-135M shape (``get_preset("smollm2-135m")``), random weights, float32 on both sides, batch
4 x 256 tokens:

- SFT step (forward + backward + AdamW with clipping and weight decay): JAX ``sft_step`` vs
  ``LlamaForCausalLM`` + ``torch.optim.AdamW`` (+ ``clip_grad_norm_``), torch threads = cores.
- DPO step on the same number of pairs (4 pairs = 8 sequences, precomputed reference log-probs):
  its cost relative to the SFT step (target <= 2.2x).
- JAX compile time and ``memory_analysis()``; peak RSS growth during each framework's step.

The frameworks' steps are interleaved round by round (medians reported), so load from other
processes on the machine affects both alike.

    python benchmarks/bench_train.py [--quick] [--steps N] [--out bench_train.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from _common import HOST_MALLOC, PeakRSS, minor_faults, openmp_passive, preference_rows, timed  # noqa: E402

OMP_WAIT_POLICY = openmp_passive()  # before torch is imported (see _common.openmp_passive)


def random_params(cfg, seed=0):
    import jax

    from w2s_jax.models.params import param_shapes

    rng = np.random.default_rng(seed)

    def f(path, s):
        if "norm" in jax.tree_util.keystr(path):
            return np.ones(s.shape, np.float32)
        return (rng.standard_normal(s.shape, np.float32) * 0.02).astype(np.float32)

    return jax.tree_util.tree_map_with_path(f, param_shapes(cfg))


def make_torch(cfg, params, threads):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from w2s_jax.io.hf import params_to_state_dict

    torch.set_num_threads(threads)
    hc = LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.d_ff,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads,
        head_dim=cfg.head_dim, rms_norm_eps=cfg.norm_eps, rope_theta=cfg.rope_theta,
        max_position_embeddings=cfg.max_seq_len, tie_word_embeddings=cfg.tie_embeddings,
        attention_bias=False, mlp_bias=False,
    )
    model = LlamaForCausalLM(hc).float()
    sd = {k: torch.from_numpy(v) for k, v in params_to_state_dict(params, cfg).items()}
    model.load_state_dict(sd, strict=False)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
    return model, opt


def torch_step(model, opt, tokens, labels):
    import torch

    out = model(input_ids=tokens, labels=labels)
    out.loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return out.loss.item()


def _stepper(fn, box, batch):
    """A closure running one (donating) step on the state in ``box[0]`` and returning the loss. The
    SFT and DPO steps of full fine-tuning have the same state layout, so they share one state (one
    copy of parameters and AdamW moments in memory)."""

    def run():
        box[0], m = fn(box[0], batch, None)
        return float(m["loss"])

    return run


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="4 layers, 2 timed rounds (smoke test)")
    ap.add_argument("--steps", type=int, default=None, help="timed rounds (default 5; --quick 2)")
    ap.add_argument("--warmup", type=int, default=3,
                    help="untimed steps per step kind after compile (3: the heap reaches steady state, see hostmem.py)")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--no-torch", action="store_true")
    ap.add_argument("--no-dpo", action="store_true")
    ap.add_argument("--dpo-accum", action="store_true",
                    help="also time the DPO step as 2 micro-batches of B/2 pairs (SFT-sized activations)")
    ap.add_argument("--wait-quiet", type=float, default=0.0, metavar="S",
                    help="before each timed step wait up to S seconds for the machine to be quiet")
    ap.add_argument("--logits-chunks", type=int, default=1)
    ap.add_argument("--remat", default="dots", choices=["none", "dots", "dots_no_batch", "full"],
                    help="JAX rematerialisation policy (dots: keep matmul outputs, recompute the cheap "
                         "elementwise ops; measured fastest on the 2-core CPU)")
    ap.add_argument("--out", default="bench_train.json")
    args = ap.parse_args(argv)
    steps = args.steps or (2 if args.quick else 5)
    threads = os.cpu_count() or 1

    import jax

    from w2s_jax.models.config import get_preset
    from w2s_jax.train import build as TB
    from w2s_jax.train import config as TC

    over = dict(dtype="float32", param_dtype="float32", remat=args.remat)
    if args.quick:
        over["n_layers"] = 4
    cfg = get_preset("smollm2-135m", **over)
    B, S = args.batch, args.seq
    mesh = TB.single_mesh()
    params_host = random_params(cfg)
    params = jax.device_put(params_host)
    rng = np.random.default_rng(1)
    tokens = rng.integers(3, cfg.vocab_size, (B, S)).astype(np.int32)
    res: dict = {
        "machine": {"cpus": threads, "load_avg_start": os.getloadavg(), "jax": jax.__version__,
                    "backend": jax.default_backend(), "host_malloc": HOST_MALLOC,
                    "omp_wait_policy": OMP_WAIT_POLICY},
        "model": {"preset": cfg.name, "n_layers": cfg.n_layers, "params": cfg.num_params, "dtype": "float32",
                  "remat": cfg.remat},
        "batch": [B, S], "rounds": steps,
    }

    # ---------------------------------------------------------------- JAX SFT
    tc = TC.TrainConfig(lr=1e-4, weight_decay=0.01, max_grad_norm=1.0, batch_size=B, seq_len=S, packing=False,
                       max_steps=1000, logits_chunks=args.logits_chunks)
    sft = TB.build_steps("sft", cfg, tc, 1000, mesh)
    info = TB.compile_steps(sft, "sft", tc, [S])[S]
    res["jax_sft_compile_s"] = info["compile_seconds"]
    res["jax_sft_memory"] = info["memory"]
    box = [TB.init_state(sft, params, 0)]  # shared by the SFT and DPO steps (same layout)
    targets = np.zeros_like(tokens)
    targets[:, :-1] = tokens[:, 1:]
    mask = np.ones((B, S), np.float32)
    mask[:, -1] = 0
    sft_batch = {"tokens": tokens[None], "targets": targets[None], "loss_mask": mask[None],
                 "segment_ids": np.ones((1, B, S), np.int32),
                 "positions": np.broadcast_to(np.arange(S, dtype=np.int32), (1, B, S)).copy()}
    sft_batch = jax.device_put(sft_batch, TB.batch_shardings(sft_batch, mesh))
    jax_sft = _stepper(sft.compiled[S], box, sft_batch)

    # ---------------------------------------------------------------- JAX DPO (same number of pairs)
    # "jax_dpo": the B pairs in one micro-batch (2B rows); "jax_dpo_accum": B/2 pairs x 2 micro-batches
    # (2 x B rows: the same activation memory as the SFT step), both with precomputed references
    dpo_fns = {}
    if not args.no_dpo:
        variants = [("jax_dpo", B, 1)] + ([("jax_dpo_accum", B // 2, 2)] if B % 2 == 0 and args.dpo_accum else [])
        for name, P, A in variants:
            tcd = TC.TrainConfig(lr=1e-4, weight_decay=0.01, max_grad_norm=1.0, batch_size=P, grad_accum=A, seq_len=S,
                                max_steps=1000, loss_type="sigmoid", beta=0.1, reference="precompute",
                                logits_chunks=args.logits_chunks)
            dpo = TB.build_steps("dpo", cfg, tcd, 1000, mesh)
            dinfo = TB.compile_steps(dpo, "dpo", tcd, [S])[S]
            res[f"{name}_compile_s"] = dinfo["compile_seconds"]
            res[f"{name}_memory"] = dinfo["memory"]
            rej = rng.integers(3, cfg.vocab_size, (B, S)).astype(np.int32)
            prompt = S // 4
            rej[:, :prompt] = tokens[:, :prompt]  # shared prompt, different completions
            # [A, 2P] rows per micro-batch: P chosen then P rejected
            ch_m, rj_m = tokens.reshape(A, P, S), rej.reshape(A, P, S)
            dpo_batch = {**preference_rows(np.concatenate([ch_m, rj_m], axis=1), prompt),
                         "ref_logps": rng.uniform(-2000, -1500, (A, 2 * P)).astype(np.float32),
                         "pair_mask": np.ones((A, P), np.float32)}
            dpo_batch = jax.device_put(dpo_batch, TB.batch_shardings(dpo_batch, mesh))

            dpo_fns[name] = _stepper(dpo.compiled[S], box, dpo_batch)

    # ---------------------------------------------------------------- torch
    if not args.no_torch:
        import torch

        tmodel, topt = make_torch(cfg, params_host, threads)
        t_tokens = torch.from_numpy(tokens.astype(np.int64))
        t_labels = t_tokens.clone()  # HF shifts inside; all positions but the last carry loss (as JAX)

        def torch_sft():
            return torch_step(tmodel, topt, t_tokens, t_labels)

    del params_host
    kinds = {"jax_sft": jax_sft}
    if not args.no_torch:
        kinds["torch_sft"] = torch_sft
    kinds.update(dpo_fns)
    times = {k: [] for k in kinds}
    peaks = {}
    losses = {k: [] for k in kinds}
    for k, fn in kinds.items():  # warm-up (also the first-step peak memory)
        for _ in range(args.warmup):
            with PeakRSS() as pr:
                losses[k].append(fn())
            peaks[k] = max(peaks.get(k, 0), pr.growth)
    others = {k: [] for k in kinds}
    faults = {k: [] for k in kinds}  # minor page faults per timed step (a freshly mapped heap block shows here)
    for r in range(steps):
        for k, fn in kinds.items():
            box_loss = []
            f0 = minor_faults()
            wall, other = timed(lambda fn=fn, box_loss=box_loss: box_loss.append(fn()), args.wait_quiet)
            faults[k].append(minor_faults() - f0)
            losses[k].append(box_loss[0])
            times[k].append(wall)
            others[k].append(other)
        print(f"round {r + 1}/{steps}: " + ", ".join(
            f"{k} {times[k][-1]:.2f}s (others {others[k][-1]:.0%}, {faults[k][-1]:,} faults)" for k in kinds),
            flush=True)

    med = {k: statistics.median(v) for k, v in times.items()}
    best = {k: min(v) for k, v in times.items()}
    tok_per_step = B * S
    res["step_seconds"] = {k: {"median": med[k], "min": best[k], "all": times[k]} for k in kinds}
    res["other_processes_cpu_share"] = {k: statistics.median(v) for k, v in others.items()}
    res["minor_page_faults"] = faults
    res["tokens_per_second"] = {k: tok_per_step / med[k] for k in kinds if k.endswith("sft")}
    res["peak_rss_growth_bytes"] = peaks
    res["losses"] = losses
    if "torch_sft" in med:
        res["jax_vs_torch_sft_speed"] = med["torch_sft"] / med["jax_sft"]
        res["jax_vs_torch_sft_speed_min"] = best["torch_sft"] / best["jax_sft"]
    for k in dpo_fns:
        res[f"{k}_over_sft_cost"] = med[k] / med["jax_sft"]
        res[f"{k}_over_sft_cost_min"] = best[k] / best["jax_sft"]
    res["machine"]["load_avg_end"] = os.getloadavg()

    mb = lambda x: f"{x / 2**20:,.0f} MiB"
    rows = [("", "median", "min", "")]
    rows.append(("JAX SFT step", f"{med['jax_sft']:.2f} s", f"{best['jax_sft']:.2f} s",
                 f"{tok_per_step / med['jax_sft']:,.0f} tok/s (median)"))
    if "torch_sft" in med:
        rows.append(("PyTorch SFT step", f"{med['torch_sft']:.2f} s", f"{best['torch_sft']:.2f} s",
                     f"{tok_per_step / med['torch_sft']:,.0f} tok/s (median)"))
        rows.append(("JAX / PyTorch tokens/s", f"{res['jax_vs_torch_sft_speed']:.2f}x",
                     f"{res['jax_vs_torch_sft_speed_min']:.2f}x", "target >= 1.0x"))
    for k in dpo_fns:
        label = f"JAX DPO step, {B} pairs" + (" (2 micro-batches)" if k.endswith("accum") else "")
        rows.append((label, f"{med[k]:.2f} s", f"{best[k]:.2f} s", ""))
        rows.append(("  cost / SFT step", f"{res[k + '_over_sft_cost']:.2f}x", f"{res[k + '_over_sft_cost_min']:.2f}x",
                     "target <= 2.2x"))
    for k in ["jax_sft", *dpo_fns]:
        m = res.get(f"{k}_memory") or {}
        rows.append((f"{k} compile / memory_analysis", f"{res[k + '_compile_s']:.1f} s",
                     f"args {mb(m.get('argument_size_in_bytes', 0))}", f"temp {mb(m.get('temp_size_in_bytes', 0))}"))
    for k, v in peaks.items():
        rows.append((f"peak RSS growth, first {k} step", mb(v), "", ""))
    la = res["machine"]
    rows.append(("load average (1 min) start/end", f"{la['load_avg_start'][0]:.1f}",
                 f"{la['load_avg_end'][0]:.1f}", ""))
    oth = res["other_processes_cpu_share"]
    rows.append(("other processes' CPU share", "", "", ", ".join(f"{k} {v:.0%}" for k, v in oth.items())))
    w = max(len(r[0]) for r in rows)
    print(f"\n{cfg.name} ({cfg.n_layers} layers), batch {B}x{S}, float32, remat={cfg.remat}, {threads} CPU threads, "
          f"{steps} rounds, host malloc {HOST_MALLOC}, OMP_WAIT_POLICY {OMP_WAIT_POLICY}")
    for a, b, c, d in rows:
        print(f"  {a.ljust(w)}  {b:>14}  {c:>14}  {d}")
    Path(args.out).write_text(json.dumps(res, indent=1, default=float))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
