"""``w2s convert``: checkpoints between Hugging Face, GGUF, PEFT and w2s-jax.

    w2s convert --from hf|gguf|native|peft --input PATH --output DIR [--to native|hf|peft]
                [--base BASE] [--dtype D] [--merge-lora] [--max-shard-size 5GB]
"""

from __future__ import annotations

import argparse

from w2s_jax.io.convert import convert_checkpoint

__all__ = ["main"]


def main(argv: list[str] | None = None, prog: str = "w2s convert", command: str = "convert") -> int:
    ap = argparse.ArgumentParser(
        prog=prog, description="Convert checkpoints between Hugging Face, GGUF, PEFT and w2s-jax."
    )
    ap.add_argument("--from", dest="src", required=True, choices=["hf", "gguf", "native", "peft"])
    ap.add_argument("--input", required=True, help="model directory, .gguf file or PEFT adapter directory")
    ap.add_argument("--output", required=True, help="output directory (new, empty, or one w2s-jax wrote; written "
                    "under a temporary name and renamed into place)")
    ap.add_argument("--overwrite", action="store_true",
                    help="replace --output even when it holds files w2s-jax did not write")
    ap.add_argument("--to", choices=["native", "hf", "peft"], default=None,
                    help="output format (default: hf when --from native, else native)")
    ap.add_argument("--base", default=None, help="base model of a PEFT adapter (default: its base_model_name_or_path); "
                    "with --to peft, the base path recorded in adapter_config.json")
    ap.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"], help="parameter dtype")
    ap.add_argument("--merge-lora", action="store_true", help="fold LoRA adapters into the weights (--to native)")
    ap.add_argument("--max-shard-size", default="5GB", help="--to hf: split model.safetensors above this size")
    ap.add_argument("--tokenizer", default=None, help="tokenizer spec/path overriding the model's own ('byte')")
    args = ap.parse_args(argv)
    for line in convert_checkpoint(
        args.src, args.input, args.output, to=args.to, base=args.base, dtype=args.dtype, merge=args.merge_lora,
        max_shard_size=args.max_shard_size, tokenizer=args.tokenizer, overwrite=args.overwrite,
    ):
        print(line)
    return 0
