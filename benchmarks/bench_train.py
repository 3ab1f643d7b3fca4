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
import threading
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


class PeakRSS:
    """Peak resident memory above the level at entry, sampled every 5 ms."""

    def __enter__(self):
        self.base = rss_bytes()
        self.peak = self.base
        self._stop = False
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _run(self):
        while not self._stop:
            self.peak = max(self.peak, rss_bytes())
            time.sleep(0.005)

    def __exit__(self, *exc):
        self._stop = True
        self._t.join()
        self.peak = max(self.peak, rss_bytes())

    @property
    def growth(self) -> int:
        return self.peak - self.base


def random_params(cfg, seed=0):
    import jax

    from w2s_jax.model import param_shapes

    rng = np.random.default_rng(seed)

    def f(path, s):
        if "norm" in jax.tree_util.keystr(path):
            return np.ones(s.shape, np.float32)
        return (rng.standard_normal(s.shape, np.float32) * 0.02).astype(np.float32)

    return jax.tree_util.tree_map_with_path(f, param_shapes(cfg))


def make_torch(cfg, params, threads):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.set_num_threads(threads)
    hc = LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.d_ff,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads,
        head_dim=cfg.head_dim, rms_norm_eps=cfg.norm_eps, rope_theta=cfg.rope_theta,
        max_position_embeddings=cfg.max_seq_len, tie_word_embeddings=cfg.tie_embeddings,
        attention_bias=False, mlp_bias=False,
    )
    model = LlamaForCausalLM(hc).float()
    D, H, K, Dh = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    t = lambda a: torch.from_numpy(np.ascontiguousarray(a))
    sd = {"model.embed_tokens.weight": t(params["embed"]), "model.norm.weight": t(params["final_norm"])}
    ly = params["layers"]
    for i in range(cfg.n_layers):
        pre = f"model.layers.{i}."
        sd[pre + "input_layernorm.weight"] = t(ly["attn_norm"][i])
        sd[pre + "post_attention_layernorm.weight"] = t(ly["mlp_norm"][i])
        sd[pre + "self_attn.q_proj.weight"] = t(ly["wq"][i].reshape(D, H * Dh).T)
        sd[pre + "self_attn.k_proj.weight"] = t(ly["wk"][i].reshape(D, K * Dh).T)
        sd[pre + "self_attn.v_proj.weight"] = t(ly["wv"][i].reshape(D, K * Dh).T)
        sd[pre + "self_attn.o_proj.weight"] = t(ly["wo"][i].reshape(H * Dh, D).T)
        sd[pre + "mlp.gate_proj.weight"] = t(ly["w_gate"][i].T)
        sd[pre + "mlp.up_proj.weight"] = t(ly["w_up"][i].T)
        sd[pre + "mlp.down_proj.weight"] = t(ly["w_down"][i].T)
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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="4 layers, 2 timed rounds (smoke test)")
    ap.add_argument("--steps", type=int, default=None, help="timed rounds (default 5; --quick 2)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps per step kind after compile")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--no-torch", action="store_true")
    ap.add_argument("--no-dpo", action="store_true")
    ap.add_argument("--logits-chunks", type=int, default=1)
    ap.add_argument("--out", default="bench_train.json")
    args = ap.parse_args(argv)
    steps = args.steps or (2 if args.quick else 5)
    threads = os.cpu_count() or 1

    import jax

    from w2s_jax import train as T
    from w2s_jax.model import get_preset

    over = dict(dtype="float32", param_dtype="float32", remat="none")
    if args.quick:
        over["n_layers"] = 4
    cfg = get_preset("smollm2-135m", **over)
    B, S = args.batch, args.seq
    mesh = T._single_mesh()
    params = random_params(cfg)
    rng = np.random.default_rng(1)
    tokens = rng.integers(3, cfg.vocab_size, (B, S)).astype(np.int32)
    res: dict = {
        "machine": {"cpus": threads, "load_avg_start": os.getloadavg(), "jax": jax.__version__,
                    "backend": jax.default_backend()},
        "model": {"preset": cfg.name, "n_layers": cfg.n_layers, "params": cfg.num_params, "dtype": "float32"},
        "batch": [B, S], "rounds": steps,
    }

    # ---------------------------------------------------------------- JAX SFT
    tc = T.TrainConfig(lr=1e-4, weight_decay=0.01, max_grad_norm=1.0, batch_size=B, seq_len=S, packing=False,
                       max_steps=1000, logits_chunks=args.logits_chunks)
    sft = T.build_steps("sft", cfg, tc, 1000, mesh)
    info = T.compile_steps(sft, "sft", tc, [S])[S]
    res["jax_sft_compile_s"] = info["compile_seconds"]
    res["jax_sft_memory"] = info["memory"]
    sft_state = T.init_state(sft, jax.tree.map(np.copy, params), 0)
    targets = np.zeros_like(tokens)
    targets[:, :-1] = tokens[:, 1:]
    mask = np.ones((B, S), np.float32)
    mask[:, -1] = 0
    sft_batch = {"tokens": tokens[None], "targets": targets[None], "loss_mask": mask[None],
                 "segment_ids": np.ones((1, B, S), np.int32),
                 "positions": np.broadcast_to(np.arange(S, dtype=np.int32), (1, B, S)).copy()}
    sft_batch = jax.device_put(sft_batch, T.batch_shardings(sft_batch, mesh))
    sft_fn = sft.compiled[S]

    def jax_sft():
        nonlocal sft_state
        sft_state, m = sft_fn(sft_state, sft_batch, None)
        return float(m["loss"])

    # ---------------------------------------------------------------- JAX DPO (same number of pairs)
    if not args.no_dpo:
        tcd = T.TrainConfig(lr=1e-4, weight_decay=0.01, max_grad_norm=1.0, batch_size=B, seq_len=S, max_steps=1000,
                            loss_type="sigmoid", beta=0.1, reference="precompute",
                            logits_chunks=args.logits_chunks)
        dpo = T.build_steps("dpo", cfg, tcd, 1000, mesh)
        dinfo = T.compile_steps(dpo, "dpo", tcd, [S])[S]
        res["jax_dpo_compile_s"] = dinfo["compile_seconds"]
        res["jax_dpo_memory"] = dinfo["memory"]
        dpo_state = T.init_state(dpo, jax.tree.map(np.copy, params), 0)
        rej = rng.integers(3, cfg.vocab_size, (B, S)).astype(np.int32)
        prompt = S // 4
        rej[:, :prompt] = tokens[:, :prompt]  # shared prompt, different completions
        toks2 = np.concatenate([tokens, rej])
        tg2 = np.zeros_like(toks2)
        tg2[:, :-1] = toks2[:, 1:]
        lm2 = np.zeros((2 * B, S), np.float32)
        lm2[:, prompt - 1 : S - 1] = 1.0
        nll2 = np.ones((2 * B, S), np.float32)
        nll2[:, -1] = 0
        dpo_batch = {"tokens": toks2[None], "targets": tg2[None], "loss_mask": lm2[None],
                     "segment_ids": np.ones((1, 2 * B, S), np.int32),
                     "positions": np.broadcast_to(np.arange(S, dtype=np.int32), (1, 2 * B, S)).copy(),
                     "nll_mask": nll2[None], "ref_logps": rng.uniform(-2000, -1500, (1, 2 * B)).astype(np.float32),
                     "pair_mask": np.ones((1, B), np.float32)}
        dpo_batch = jax.device_put(dpo_batch, T.batch_shardings(dpo_batch, mesh))
        dpo_fn = dpo.compiled[S]

        def jax_dpo():
            nonlocal dpo_state
            dpo_state, m = dpo_fn(dpo_state, dpo_batch, None)
            return float(m["loss"])

    # ---------------------------------------------------------------- torch
    if not args.no_torch:
        import torch

        tmodel, topt = make_torch(cfg, params, threads)
        t_tokens = torch.from_numpy(tokens.astype(np.int64))
        t_labels = t_tokens.clone()  # HF shifts inside; all positions but the last carry loss (as JAX)

        def torch_sft():
            return torch_step(tmodel, topt, t_tokens, t_labels)

    kinds = {"jax_sft": jax_sft}
    if not args.no_torch:
        kinds["torch_sft"] = torch_sft
    if not args.no_dpo:
        kinds["jax_dpo"] = jax_dpo
    times = {k: [] for k in kinds}
    peaks = {}
    losses = {k: [] for k in kinds}
    for k, fn in kinds.items():  # warm-up (also the first-step peak memory)
        for _ in range(args.warmup):
            with PeakRSS() as pr:
                losses[k].append(fn())
            peaks[k] = max(peaks.get(k, 0), pr.growth)
    for r in range(steps):
        for k, fn in kinds.items():
            t0 = time.perf_counter()
            losses[k].append(fn())
            times[k].append(time.perf_counter() - t0)
        print(f"round {r + 1}/{steps}: " + ", ".join(f"{k} {times[k][-1]:.2f}s" for k in kinds), flush=True)

    med = {k: statistics.median(v) for k, v in times.items()}
    tok_per_step = B * S
    res["step_seconds"] = {k: {"median": med[k], "all": times[k]} for k in kinds}
    res["tokens_per_second"] = {k: tok_per_step / med[k] for k in kinds if k.endswith("sft")}
    res["peak_rss_growth_bytes"] = peaks
    res["losses"] = losses
    if "torch_sft" in med:
        res["jax_vs_torch_sft_speed"] = med["torch_sft"] / med["jax_sft"]
    if "jax_dpo" in med:
        res["dpo_over_sft_cost"] = med["jax_dpo"] / med["jax_sft"]
    res["machine"]["load_avg_end"] = os.getloadavg()

    mb = lambda x: f"{x / 2**20:,.0f} MiB"
    rows = [("JAX SFT step", f"{med['jax_sft']:.2f} s", f"{tok_per_step / med['jax_sft']:,.0f} tok/s")]
    if "torch_sft" in med:
        rows.append(("PyTorch SFT step", f"{med['torch_sft']:.2f} s", f"{tok_per_step / med['torch_sft']:,.0f} tok/s"))
        rows.append(("JAX / PyTorch speed", f"{res['jax_vs_torch_sft_speed']:.2f}x", "target >= 1.0x"))
    if "jax_dpo" in med:
        rows.append(("JAX DPO step (B pairs)", f"{med['jax_dpo']:.2f} s", f"{res['dpo_over_sft_cost']:.2f}x SFT"))
    rows.append(("JAX SFT compile", f"{res['jax_sft_compile_s']:.1f} s", ""))
    m = res["jax_sft_memory"]
    if m:
        rows.append(("JAX SFT memory_analysis", f"args {mb(m['argument_size_in_bytes'])}",
                     f"temp {mb(m['temp_size_in_bytes'])}"))
    if "jax_dpo_compile_s" in res:
        rows.append(("JAX DPO compile", f"{res['jax_dpo_compile_s']:.1f} s",
                     f"temp {mb(res['jax_dpo_memory'].get('temp_size_in_bytes', 0))}"))
    for k, v in peaks.items():
        rows.append((f"peak RSS growth, {k} step", mb(v), ""))
    la = res["machine"]
    rows.append(("load average start/end", f"{la['load_avg_start'][0]:.1f}", f"{la['load_avg_end'][0]:.1f}"))
    w = max(len(r[0]) for r in rows)
    print(f"\n{cfg.name} ({cfg.n_layers} layers), batch {B}x{S}, float32, {threads} CPU threads, {steps} rounds")
    for a, b, c in rows:
        print(f"  {a.ljust(w)}  {b:>16}  {c}")
    Path(args.out).write_text(json.dumps(res, indent=1, default=float))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
