"""``w2s logprobs``: add summed completion log-probabilities to JSONL records (``infer/scoring.py``)."""

from __future__ import annotations

import argparse

from w2s_jax.infer.scoring import score_file
from w2s_jax.parallel.sharding import parse_mesh_arg

__all__ = ["main"]


def main(argv: list[str] | None = None, prog: str = "w2s logprobs", command: str = "logprobs") -> int:
    ap = argparse.ArgumentParser(
        prog=prog,
        description="Add summed completion log-probabilities (and token counts) to JSONL records with "
        "prompt+completion or prompt+chosen+rejected.",
    )
    ap.add_argument("--model", required=True, help="native dir, Hugging Face dir, .gguf file or PEFT adapter dir")
    ap.add_argument("--input", required=True, help="input .jsonl")
    ap.add_argument("--output", required=True, help="output .jsonl (written atomically)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=None, help="default: the model's max_seq_len")
    ap.add_argument("--truncate", action="store_true", help="truncate over-long sequences instead of failing")
    ap.add_argument("--base", default=None, help="base model of a PEFT adapter directory")
    ap.add_argument("--tokenizer", default=None, help="tokenizer path/spec overriding the model's ('byte')")
    ap.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"], help="parameter dtype")
    ap.add_argument("--no-lora", action="store_true", help="ignore the model's LoRA adapters")
    ap.add_argument("--mesh", default=None, help="device mesh, e.g. data=-1,fsdp=1,tensor=1 (default: one device)")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)

    n_records, stats = score_file(
        args.model, args.input, args.output, mesh=parse_mesh_arg(args.mesh), dtype=args.dtype, base=args.base,
        tokenizer=args.tokenizer, batch_size=args.batch_size, max_length=args.max_length, truncate=args.truncate,
        use_lora=not args.no_lora, progress=not args.no_progress,
    )
    if stats["truncated"]:
        print(f"truncated {stats['truncated']} of {stats['sequences']} sequences to fit the maximum length")
    print(f"scored {stats['sequences']} sequences from {n_records} records -> {args.output}")
    return 0
