"""LoRA (or full) fine-tuning steps: w2s-jax vs ``peft`` + ``transformers`` + torch AdamW.

- SFT step: forward + backward + AdamW (grad-norm clipping 1.0). LoRA rank 8 (alpha 16) on q, k, v,
  o, gate, up, down: JAX ``sft_step`` with ``TrainConfig.lora`` vs ``peft.get_peft_model`` on
  ``LlamaForCausalLM`` with ``torch.optim.AdamW`` over the adapter parameters.
- DPO step with cached reference log-probs (B pairs = 2B rows): JAX ``dpo_step`` (sigmoid loss,
  ``reference="precompute"``) vs the same torch model computing summed completion log-probs of the
  chosen and rejected rows in one forward and TRL's sigmoid DPO loss
  (``-logsigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r)))``, as ``DPOTrainer`` computes it).

``--rank 0`` benchmarks full fine-tuning of the same steps instead (used by ``w2s bench`` for the
DPO baseline and for the GPU mode). Same weights on both sides; rounds interleaved; medians.

    python benchmarks/bench_lora.py [--quick] [--rank 8] [--only sft,dpo] [--preset smollm2-135m]
        [--layers N] [--batch 4] [--seq 256] [--device cpu|cuda] [--dtype float32|bfloat16] [--out FILE]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_scoring as H  # noqa: E402  (helpers shared by the suite)
from _common import openmp_passive, preference_rows  # noqa: E402

openmp_passive()  # before torch is imported (see _common.openmp_passive)

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
BETA = 0.1


def jax_batches(tokens, rejected, prompt: int, ref_logps):
    """(SFT batch [1, B, S], DPO batch [1, 2B, S]) in ``train.abstract_batch`` layout."""
    B, S = tokens.shape
    tg = np.zeros_like(tokens)
    tg[:, :-1] = tokens[:, 1:]
    m = np.ones((B, S), np.float32)
    m[:, -1] = 0
    pos = np.broadcast_to(np.arange(S, dtype=np.int32), (B, S))
    sft = {"tokens": tokens[None], "targets": tg[None], "loss_mask": m[None],
           "segment_ids": np.ones((1, B, S), np.int32), "positions": pos[None].copy()}
    dpo = {**preference_rows(np.concatenate([tokens, rejected])[None], prompt),
           "ref_logps": ref_logps[None].astype(np.float32), "pair_mask": np.ones((1, B), np.float32)}
    return sft, dpo


def trl_sigmoid_loss(pi_c, pi_r, ref_c, ref_r, beta=BETA, label_smoothing=0.0):
    """TRL ``DPOTrainer`` sigmoid loss (trl/trainer/dpo_trainer.py, loss_type="sigmoid")."""
    import torch.nn.functional as F

    delta = (pi_c - ref_c) - (pi_r - ref_r)
    return (-F.logsigmoid(beta * delta) * (1 - label_smoothing) - F.logsigmoid(-beta * delta) * label_smoothing).mean()


def run(args) -> dict:
    import jax

    from w2s_jax.models.lora import LoRAConfig, init_lora
    from w2s_jax.train import build as TB
    from w2s_jax.train import config as TC

    cfg = H.setup(args)
    rounds = args.rounds or (2 if args.quick else 5)
    only = [w.strip() for w in args.only.split(",") if w.strip()]
    B, S = args.batch, args.seq
    prompt = S // 4
    mesh = TB.single_mesh()
    params = H.random_params(cfg)
    tokens, _ = H.batch_tokens(cfg, B, S)
    rng = np.random.default_rng(2)
    rejected = rng.integers(3, cfg.vocab_size, (B, S)).astype(np.int32)
    rejected[:, :prompt] = tokens[:, :prompt]
    ref = rng.uniform(-2.0, -1.0, 2 * B).astype(np.float32) * (S - prompt) * np.log(cfg.vocab_size)
    sft_b, dpo_b = jax_batches(tokens, rejected, prompt, ref)
    lcfg = LoRAConfig(rank=args.rank, alpha=2.0 * args.rank) if args.rank > 0 else None
    tag = f"lora r{args.rank}" if lcfg else "full"
    frozen = params if lcfg else None

    torch_parts = None
    if not args.no_torch:
        import torch

        tmodel = H.torch_model(cfg, params, args.device, args.dtype)
        if lcfg:
            from peft import LoraConfig, get_peft_model

            tmodel = get_peft_model(tmodel, LoraConfig(r=args.rank, lora_alpha=lcfg.alpha, lora_dropout=0.0,
                                                       target_modules=LORA_TARGETS, bias="none"))
        tmodel.train()
        trainable = [p for p in tmodel.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(trainable, lr=1e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
        dev = args.device
        t_tok = torch.from_numpy(tokens.astype(np.int64)).to(dev)
        t_pair = torch.from_numpy(np.concatenate([tokens, rejected]).astype(np.int64)).to(dev)
        t_mask = torch.from_numpy(dpo_b["loss_mask"][0, :, :-1].copy()).to(dev)
        t_ref = torch.from_numpy(ref).to(dev)
        torch_parts = (torch, tmodel, trainable, opt, t_tok, t_pair, t_mask, t_ref)

    def torch_update(loss):
        torch, tmodel, trainable, opt = torch_parts[:4]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        H.sync(args.device)
        return float(loss.detach())

    def torch_sft():
        tmodel, t_tok = torch_parts[1], torch_parts[4]
        return torch_update(tmodel(input_ids=t_tok, labels=t_tok).loss)

    def torch_dpo():
        torch, tmodel, t_pair, t_mask, t_ref = torch_parts[0], torch_parts[1], *torch_parts[5:]
        logits = tmodel(input_ids=t_pair).logits[:, :-1].float()
        lp = torch.log_softmax(logits, -1).gather(-1, t_pair[:, 1:, None])[..., 0]
        lp = (lp * t_mask).sum(-1)
        return torch_update(trl_sigmoid_loss(lp[:B], lp[B:], t_ref[:B], t_ref[B:]))

    rows = []
    for kind in only:
        if kind not in ("sft", "dpo"):
            raise SystemExit(f"--only: unknown workload {kind!r} (sft, dpo)")
        tc = TC.TrainConfig(lr=1e-4, weight_decay=0.0, max_grad_norm=1.0, batch_size=B, seq_len=S, packing=False,
                           max_steps=1000, lora=lcfg, loss_type="sigmoid", beta=BETA, reference="precompute")
        bundle = TB.build_steps(kind, cfg, tc, 1000, mesh)
        info = TB.compile_steps(bundle, kind, tc, [S])[S]
        trainable = init_lora(cfg, lcfg, jax.random.PRNGKey(3)) if lcfg else jax.tree.map(lambda a: a.copy(), params)
        box = [TB.init_state(bundle, trainable, 0)]
        b = sft_b if kind == "sft" else dpo_b
        b = jax.device_put(b, TB.batch_shardings(b, mesh))
        fn = bundle.compiled[S]

        def jax_step(fn=fn, b=b, box=box):
            box[0], m = fn(box[0], b, frozen)
            return float(m["loss"])

        kinds = {f"jax_{kind}": jax_step}
        base_mem = (None, "")
        if torch_parts:
            if args.device == "cuda":
                torch_parts[0].cuda.reset_peak_memory_stats()
            tfn = torch_sft if kind == "sft" else torch_dpo
            with H.PeakRSS() as pr:
                tfn()
            kinds[f"torch_{kind}"] = tfn
        times = H.interleave(kinds, rounds, profile=args.profile)
        if torch_parts:
            base_mem = H.torch_peak_memory(args.device, pr.peak)
        rows_tok = B * S if kind == "sft" else 2 * B * S
        flops = cfg.flops_per_token(S)
        if lcfg:  # frozen weights: no weight-gradient matmuls (4N instead of 6N, adapters ignored)
            flops = flops - 2.0 * cfg.num_params
        base = (f"peft LoRA r{args.rank} + " if lcfg else "") + "transformers + torch AdamW" + (
            ", TRL sigmoid DPO loss" if kind == "dpo" else "") + f", {args.device} {args.dtype}"
        mem = H.jax_peak_memory(fn)
        rows.append(H.make_row(f"{kind} ({tag})", rows_tok, times, f"jax_{kind}", f"torch_{kind}",
                               compile_s=info["compile_seconds"], jax_mem=mem, base_mem=base_mem,
                               flops_per_token=flops, baseline=base))
        del box
    return {"benchmark": "lora" if lcfg else "full", "model": cfg.name, "n_layers": cfg.n_layers, "dtype": args.dtype,
            "batch": [B, S], "rounds": rounds, "rank": args.rank, "versions": H.versions(), "rows": rows,
            "time": time.time()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    H.common_args(ap, batch=4, seq=256)
    ap.add_argument("--rank", type=int, default=8, help="LoRA rank; 0 = full fine-tuning")
    ap.add_argument("--only", default="sft,dpo")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    res = run(args)
    H.print_rows(res["rows"])
    H.write(args.out, res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
