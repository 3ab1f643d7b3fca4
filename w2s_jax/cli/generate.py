"""``w2s generate``: batched generation over a JSONL file, streamed to the output, resumable.

Record shapes, resuming and the checks: :mod:`w2s_jax.pipeline.generation`.
"""

from __future__ import annotations

import argparse

from w2s_jax.infer.sampler import SampleConfig
from w2s_jax.method.prompts import STOP_STRINGS
from w2s_jax.parallel import distributed
from w2s_jax.pipeline.generation import GenerateJob, run_generate_job


def _parser(prog: str) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog=prog, description="batched generation over a JSONL file, streamed to the output, resumable",
        epilog="Output format and resuming: see "
        "`python -c 'import w2s_jax.pipeline.generation as m; print(m.__doc__)'`.",
    )
    ap.add_argument("--model", required=True, help="native dir, Hugging Face dir, .gguf file or PEFT adapter dir")
    ap.add_argument("--input", required=True, help="input .jsonl: id + prompt | question [+ gold | answer]")
    ap.add_argument("--output", required=True, help="output .jsonl (streamed; rerun to resume)")
    ap.add_argument("--n", type=int, default=1, help="samples per record (seeds seed..seed+n-1)")
    ap.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    ap.add_argument("--top-k", type=int, default=0, help="0 = off")
    ap.add_argument("--top-p", type=float, default=1.0, help="1 = off")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-new-tokens", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=16, help="rows (record x sample) per compiled batch")
    ap.add_argument("--stop", action="append", default=None,
                    help="stop string (repeatable; default: Question, Answer)")
    ap.add_argument("--no-stop", action="store_true", help="no stop strings (EOS and --max-new-tokens only)")
    ap.add_argument("--few-shot", default=None, help="demonstrations .jsonl (prompt|question + response|completion)")
    ap.add_argument("--grade", default=None, metavar="TASK", help="add pred/result graded for TASK (e.g. gsm8k)")
    ap.add_argument("--grade-mode", default="paper", choices=["paper", "symbolic"])
    ap.add_argument("--truncate-prompts", action="store_true", help="left-truncate prompts that do not fit")
    ap.add_argument("--mesh", default=None, help="device mesh, e.g. data=-1,tensor=1 (default: one device)")
    ap.add_argument("--base", default=None, help="base model of a PEFT adapter directory")
    ap.add_argument("--tokenizer", default=None, help="tokenizer path/spec overriding the model's ('byte')")
    ap.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"], help="parameter dtype")
    ap.add_argument("--merge-lora", action="store_true", help="fold LoRA adapters into the weights first")
    ap.add_argument("--no-lora", action="store_true", help="ignore the model's LoRA adapters")
    ap.add_argument("--no-progress", action="store_true")
    return ap


def main(argv: list[str] | None = None, prog: str = "w2s generate", command: str = "generate") -> int:
    args = _parser(prog).parse_args(argv)
    stop = () if args.no_stop else tuple(args.stop) if args.stop else STOP_STRINGS
    sc = SampleConfig(
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
        n=args.n, seed=args.seed, stop=stop, batch_size=args.batch_size, truncate_prompts=args.truncate_prompts,
    )
    job = GenerateJob(
        model=args.model, input=args.input, output=args.output, sample=sc, few_shot=args.few_shot, grade=args.grade,
        grade_mode=args.grade_mode, mesh=args.mesh, base=args.base, tokenizer=args.tokenizer, dtype=args.dtype,
        lora="off" if args.no_lora else "merged" if args.merge_lora else "on", progress=not args.no_progress,
    )
    summary = run_generate_job(job)
    if distributed.is_main_process():
        print(summary)
    return 0
