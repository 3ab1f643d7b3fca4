"""Generation workloads of the method: the continuous-batching Sampler against the static one.

Three workloads on SmolLM2-135M-Instruct (the Q4_1 GGUF, dequantized to float32, with its own
tokenizer; ``--random`` uses random weights of the same shape with EOS disabled instead), on GSM8K
questions from ``$W2S_SHARED/data/gsm8k`` (``test.jsonl``), the paper's prompt format and stop strings:

- ``sampling``: Stage II sampling, ``--samples`` samples per question at T = 1.0 (zero-shot prompts),
  lengths as they come (EOS, stop string or ``--new-tokens``);
- ``icl``: ICL labelling, 4 demonstrations (from ``train_1.jsonl``) + the question, greedy;
- ``eval``: greedy zero-shot evaluation at batch ``--eval-batch``.

Both engines (``Sampler(engine="static")``, today's static batches, and ``engine="continuous"``) run
in this one process, each workload once to compile and then ``--repeats`` times with the two engines
interleaved; reported: generated tokens / wall time (compilation excluded), the ratio of the medians,
decode-slot occupancy (tokens produced by decode steps over slots x decode steps), the programs each
engine compiled, and whether the greedy outputs agree token for token.

    python benchmarks/bench_batching.py [--questions 16] [--samples 10] [--new-tokens 128] [--out F.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from w2s_jax.tools.bench import cpu_name  # noqa: E402

GGUF = Path.home() / ".cache" / "w2s" / "SmolLM2-135M-Instruct.Q4_1.gguf"


def load(args):
    import jax

    from w2s_jax.io.native import load_model
    from w2s_jax.models.config import get_preset
    from w2s_jax.models.params import init_params

    if args.random:
        cfg = get_preset("smollm2-135m")
        return init_params(cfg, jax.random.PRNGKey(0)), cfg, None, []
    m = load_model(args.model)
    return m.params, m.cfg, m.tokenizer, None


def workloads(args, tok):
    from w2s_jax.core.jsonl import read_jsonl
    from w2s_jax.infer.sampler import SampleConfig
    from w2s_jax.method.prompts import few_shot_prompt, zero_shot_prompt

    data = Path(os.environ.get("W2S_SHARED", Path(__file__).resolve().parents[2] / "shared")) / "data" / "gsm8k"
    test = read_jsonl(data / "test.jsonl")
    demos = [{"question": r["question"], "response": r["answer"].replace("####", "The answer is")}
             for r in read_jsonl(data / "train_1.jsonl")[:4]]
    qs = [r["question"] for r in test]
    stop = () if tok is None else ("Question", "Answer")
    base = dict(max_new_tokens=args.new_tokens, stop=stop, batch_size=args.batch_size)
    out = {}
    if "sampling" in args.workloads:
        out["sampling"] = ([zero_shot_prompt(q) for q in qs[: args.questions]],
                           SampleConfig(n=args.samples, temperature=1.0, seed=0, **base))
    if "icl" in args.workloads:
        out["icl"] = ([few_shot_prompt(q, demos) for q in qs[args.questions: args.questions + args.icl_questions]],
                      SampleConfig(**base))
    if "eval" in args.workloads:
        out["eval"] = ([zero_shot_prompt(q) for q in qs[: args.eval_questions]],
                       SampleConfig(**{**base, "batch_size": args.eval_batch}))
    if tok is None:  # random weights: one token id per character
        out = {k: ([[3 + (ord(c) % 250) for c in p] for p in ps], sc) for k, (ps, sc) in out.items()}
    return out


def run_once(sampler, prompts, sc):
    s0 = dict(sampler.stats)
    c0 = sampler.compile_seconds
    t0 = time.perf_counter()
    outs = sampler.generate(prompts, sc, progress=False)
    wall = time.perf_counter() - t0 - (sampler.compile_seconds - c0)
    d = {k: sampler.stats[k] - s0[k] for k in ("tokens", "slot_steps", "live_slot_steps")}
    return {"seconds": wall, "tokens": d["tokens"], "tok_s": d["tokens"] / wall,
            "occupancy": d["live_slot_steps"] / max(d["slot_steps"], 1),
            "ids": [[c.token_ids for c in o] for o in outs]}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=str(GGUF))
    ap.add_argument("--random", action="store_true", help="random SmolLM2-135M-shaped weights, EOS off")
    ap.add_argument("--workloads", default="sampling,icl,eval")
    ap.add_argument("--questions", type=int, default=16, help="questions of the sampling workload")
    ap.add_argument("--samples", type=int, default=10)
    ap.add_argument("--icl-questions", type=int, default=32)
    ap.add_argument("--eval-questions", type=int, default=64)
    ap.add_argument("--eval-batch", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=16, help="rows per batch (static) = decode slots (continuous)")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    args.workloads = args.workloads.split(",")

    import jax

    from w2s_jax.infer.sampler import Sampler

    params, cfg, tok, eos = load(args)
    engines = {e: Sampler(params, cfg, tok, eos_ids=eos, engine=e) for e in ("static", "continuous")}
    print(f"{cfg.name}: {cfg.num_params / 1e6:.0f}M params, {'random' if args.random else args.model}; "
          f"{os.cpu_count()} CPUs ({cpu_name()}), jax {jax.__version__}", flush=True)
    results = {}
    for name, (prompts, sc) in workloads(args, tok).items():
        runs = {e: [] for e in engines}
        compiled = {}
        for e, s in engines.items():  # compile (and warm up)
            k0 = s.num_compiled
            c0 = s.compile_seconds
            runs[e].append(run_once(s, prompts, sc))
            print(f"  {name} {e} (first run): {runs[e][-1]['tok_s']:.1f} tok/s", flush=True)
            compiled[e] = {"programs": s.num_compiled - k0, "seconds": round(s.compile_seconds - c0, 1)}
        for _ in range(args.repeats):
            for e, s in engines.items():
                runs[e].append(run_once(s, prompts, sc))
                print(f"  {name} {e}: {runs[e][-1]['tok_s']:.1f} tok/s", flush=True)
        timed = {e: r[1:] or r for e, r in runs.items()}
        med = {e: statistics.median(x["tok_s"] for x in r) for e, r in timed.items()}
        same = runs["static"][0]["ids"] == runs["continuous"][0]["ids"]
        res = {
            "rows": len(prompts) * sc.n, "tokens": runs["continuous"][-1]["tokens"],
            "tok_s": {e: round(v, 1) for e, v in med.items()},
            "runs_tok_s": {e: [round(x["tok_s"], 1) for x in r] for e, r in timed.items()},
            "ratio": round(med["continuous"] / med["static"], 2),
            "occupancy": {e: round(r[-1]["occupancy"], 3) for e, r in runs.items()},
            "compiled": compiled, "identical_outputs": same,
        }
        results[name] = res
        print(f"{name}: {res['rows']} rows; tok/s static {med['static']:.1f}, continuous {med['continuous']:.1f} "
              f"-> {res['ratio']:.2f}x; occupancy {res['occupancy']}; compiled {compiled}; "
              f"identical outputs: {same}", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), "cpu": cpu_name(), "results": results}, indent=1))
    return results


if __name__ == "__main__":
    main()
