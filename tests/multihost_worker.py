"""One process of the multi-host test (tests/test_multihost.py); also runs alone as the 1-process reference.

    python tests/multihost_worker.py OUT.json --sft-out DIR --ckpt-dir DIR --gen-out FILE
        [--coordinator 127.0.0.1:PORT --num-processes 2 --process-id I]

Joins the JAX distributed runtime (``w2s_jax.parallel.distributed.initialize``), lays one mesh over
all devices of all processes, runs a few SFT steps of a tiny model with ``train/build.py``'s compiled step
(each process feeding only its part of every global batch), greedily generates continuations of a
batch of prompts (full forward passes without a cache, and the package's Sampler), splits and
gathers records, runs the package's SFT driver (``train.run_sft``: metrics, TensorBoard, Orbax
checkpoints in ``--ckpt-dir``, shared by the processes, and the final model; ``--sft-out`` is per
process, so the test sees who wrote what) and ``generate_cli.generate_records`` into ``--gen-out``
(shared), and writes what it saw to OUT.json (one file per process). The device count per process
comes from XLA_FLAGS, set by the parent.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

STEPS = 3
ROWS, SEQ = 8, 32
GEN_ROWS, PROMPT, NEW = 8, 8, 12


def global_batch(step: int):
    """The same global SFT batch on every host ([grad_accum=1, rows, seq]), from a seeded generator."""
    import numpy as np

    rng = np.random.default_rng(1000 + step)
    tokens = rng.integers(3, 256, size=(1, ROWS, SEQ + 1), dtype=np.int32)
    loss_mask = np.ones((1, ROWS, SEQ), np.float32)
    loss_mask[:, :, : SEQ // 4] = 0.0  # prompt tokens
    return {
        "tokens": tokens[:, :, :-1],
        "targets": tokens[:, :, 1:],
        "loss_mask": loss_mask,
        "segment_ids": np.ones((1, ROWS, SEQ), np.int32),
        "positions": np.broadcast_to(np.arange(SEQ, dtype=np.int32), (1, ROWS, SEQ)).copy(),
    }


def greedy_generate(params, cfg, prompts_global, mesh):
    """Greedy continuation without a KV cache: each new token is the argmax of a full forward pass
    over the sequence so far (the reference the package's cached Sampler must reproduce)."""
    import jax
    import jax.numpy as jnp

    from w2s_jax.models import decoder as M

    B, P = prompts_global.shape

    @jax.jit
    def run(params, prompts):
        buf = jnp.concatenate([prompts, jnp.zeros((B, NEW), jnp.int32)], axis=1)

        def body(i, buf):
            logits = M.forward(params, buf, cfg, mesh=mesh)
            tok = jnp.argmax(jax.lax.dynamic_index_in_dim(logits, P + i - 1, 1, keepdims=False), -1)
            return jax.lax.dynamic_update_slice_in_dim(buf, tok.astype(jnp.int32)[:, None], P + i, 1)

        return jax.lax.fori_loop(0, NEW, body, buf)[:, P:]

    return run(params, prompts_global)


def sft_driver(mesh, out_dir: str, ckpt_dir: str, gen_out: str):
    """``train.run_sft`` on a tiny byte-level model, then ``generate_records`` with the trained model;
    returns (per-step losses, eval losses, files written under out_dir, generated records)."""
    import jax

    from w2s_jax.infer import sampler as S
    from w2s_jax.io.native import LoadedModel
    from w2s_jax.io.tokenizer import ByteTokenizer
    from w2s_jax.models import config as MC
    from w2s_jax.models import params as MP
    from w2s_jax.pipeline.generation import generate_records
    from w2s_jax.train import build
    from w2s_jax.train import loop as train
    from w2s_jax.train.config import TrainConfig

    build.COMPILER_OPTIONS = {"xla_backend_optimization_level": 0}  # tiny model: compile fast
    S.CPU_COMPILER_OPTIONS = {**S.CPU_COMPILER_OPTIONS, "xla_backend_optimization_level": 0}
    tok = ByteTokenizer()
    cfg = MC.get_preset("tiny", vocab_size=tok.vocab_size)
    params = MP.init_params(cfg, jax.random.PRNGKey(1), mesh)
    records = [{"id": f"s{i}", "prompt": f"{i}+{i % 5}=", "completion": str(i + i % 5)} for i in range(32)]
    tc = TrainConfig(batch_size=ROWS, seq_len=SEQ, lr=1e-2, max_steps=STEPS, schedule="constant",
                     packing=False, eval_fraction=0.25, log_every=1, async_checkpointing=False,
                     tensorboard=True, progress=False)
    res = train.run_sft(train.TrainModel(params, cfg, tok), records, tc, out_dir, mesh=mesh,
                        checkpoint_dir=ckpt_dir)
    out = Path(out_dir)
    files = sorted(str(f.relative_to(out)) for f in out.rglob("*") if f.is_file()) if out.exists() else []
    model = LoadedModel(res.params, cfg, tok, source=str(res.model_dir))
    inputs = [{"id": f"q{i}", "prompt": f"{i}+{i % 3}="} for i in range(GEN_ROWS)]
    sc = S.SampleConfig(max_new_tokens=NEW, temperature=0.0, stop=(), batch_size=GEN_ROWS)
    gen = generate_records(model, inputs, sc, gen_out, mesh=mesh, progress=False)
    return ([h["loss"] for h in res.history], [e["loss"] for e in res.eval_history], files,
            [{k: g[k] for k in ("id", "response", "num_tokens")} for g in gen])


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--sft-out", required=True)
    ap.add_argument("--ckpt-dir", required=True)
    ap.add_argument("--gen-out", required=True)
    ap.add_argument("--coordinator")
    ap.add_argument("--num-processes", type=int)
    ap.add_argument("--process-id", type=int)
    args = ap.parse_args()

    from w2s_jax.core.errors import UserError
    from w2s_jax.parallel import distributed as D

    multi = D.initialize(args.coordinator, args.num_processes, args.process_id)

    import jax
    import numpy as np
    from jax.sharding import NamedSharding

    from w2s_jax.models import config as MC
    from w2s_jax.models import params as MP
    from w2s_jax.parallel.sharding import MeshConfig, logical_to_spec
    from w2s_jax.train import build as train
    from w2s_jax.train.config import TrainConfig

    mesh = MeshConfig(data=2, fsdp=2, tensor=2).build()
    cfg = MC.get_preset("tiny")
    params = MP.init_params(cfg, jax.random.PRNGKey(0), mesh)
    tc = TrainConfig(batch_size=ROWS, seq_len=SEQ, lr=1e-2, max_steps=STEPS, schedule="constant",
                     max_grad_norm=1.0, tensorboard=False, progress=False)
    bundle = train.build_steps("sft", cfg, tc, STEPS, mesh)
    state = train.init_state(bundle, params, seed=0)
    bsh = train.batch_shardings(train.abstract_batch("sft", tc, SEQ), mesh)

    losses = []
    local_rows = []
    for step in range(STEPS):
        gb = global_batch(step)
        batch = D.process_local_batch(gb, bsh)  # only this process's rows go to its devices
        local_rows.append([int(s.index[1].start or 0) for s in batch["tokens"].addressable_shards])
        state, metrics = bundle.step_fn(state, batch, None)
        losses.append(float(np.asarray(metrics["loss"])))

    # generation: every host holds the records; each feeds its block of the prompt batch
    records = [{"id": i, "prompt": [int(t) for t in np.random.default_rng(7 + i).integers(3, 256, PROMPT)]}
               for i in range(GEN_ROWS)]
    prompts = np.asarray([r["prompt"] for r in records], np.int32)
    psh = NamedSharding(mesh, logical_to_spec(("batch", "length"), prompts.shape, mesh))
    tokens = D.to_host(greedy_generate(state.params, cfg, D.process_local_batch(prompts, psh), mesh))
    # the same with the package's Sampler (one compiled prefill + while_loop program)
    try:
        from w2s_jax.infer.sampler import SampleConfig, Sampler

        sampler = Sampler(state.params, cfg, None, mesh=mesh, layer_loop="scan", eos_ids=())
        outs = sampler.generate([r["prompt"] for r in records],
                                SampleConfig(max_new_tokens=NEW, temperature=0.0, stop=(), batch_size=GEN_ROWS),
                                progress=False)
        sampler_texts = [bytes(o[0].token_ids).decode("latin-1") for o in outs]
        sampler_error = None
    except Exception as e:  # reported to the test, which decides
        sampler_texts, sampler_error = None, f"{type(e).__name__}: {e}"
    texts = [bytes(int(t) for t in row).decode("latin-1") for row in tokens]
    # scoring (`w2s logprobs`) on the mesh spanning both processes; every host gets every score
    try:
        from types import SimpleNamespace

        from w2s_jax.infer.scoring import score_records
        from w2s_jax.io.tokenizer import ByteTokenizer

        class SmallByteTokenizer(ByteTokenizer):  # ids inside the tiny model's 256-token vocab
            add_bos = False
            eos_id = 255

        srecs = [{"id": i, "prompt": f"q{i} " * (i + 1), "completion": f"a{i}!"} for i in range(6)]
        held = SimpleNamespace(cfg=cfg, params=state.params, lora=None, lora_cfg=None, tokenizer=None)
        scored, _ = score_records(held, srecs, batch_size=4, mesh=mesh, tokenizer=SmallByteTokenizer())
        scores, score_error = [[r["logprob"], r["num_tokens"]] for r in scored], None
    except Exception as e:  # reported to the test, which decides
        scores, score_error = None, f"{type(e).__name__}: {e}"

    # records split across hosts (as evaluation does) and gathered back in order
    mine = D.shard_records(records)
    graded = [{"id": r["id"], "text": texts[r["id"]], "by": D.process_index()} for r in mine]
    gathered = D.gather_records(graded)
    sft_losses, sft_eval, sft_files, gen = sft_driver(mesh, args.sft_out, args.ckpt_dir, args.gen_out)
    try:  # a directory that differs per process stands in for a run directory on each host's own disk
        D.check_shared_dir(Path(args.sft_out) / "own")
        shared_error = None
    except UserError as e:
        shared_error = str(e)
    # the run-directory lock: taken once, by process 0, in the shared directory
    from w2s_jax.parallel.locking import hold

    lock = Path(args.ckpt_dir) / ".w2s.lock"
    with hold(lock, "the shared run directory"):
        D.sync("locked")
        lock_holder = json.loads(lock.read_text())["pid"]
        D.sync("lock read")
    D.sync("worker-done")

    result = {
        "pid": os.getpid(),
        "lock_holder": lock_holder,
        "process_index": D.process_index(),
        "process_count": D.process_count(),
        "multi": multi,
        "device_count": jax.device_count(),
        "local_device_count": jax.local_device_count(),
        "main": D.is_main_process(),
        "losses": losses,
        "texts": texts,
        "sampler_texts": sampler_texts,
        "sampler_error": sampler_error,
        "scores": scores,
        "score_error": score_error,
        "local_rows": local_rows,
        "mine": [r["id"] for r in mine],
        "gathered": gathered,
        "sft_losses": sft_losses,
        "sft_eval": sft_eval,
        "sft_files": sft_files,
        "generated": gen,
        "shared_error": shared_error,
    }
    Path(args.out).write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
