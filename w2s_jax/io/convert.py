"""Converting a checkpoint between formats (``w2s convert``): Hugging Face, GGUF, PEFT and native."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from w2s_jax.core.errors import UserError
from w2s_jax.core.paths import same_file
from w2s_jax.io.hf import params_to_hf
from w2s_jax.io.modeldir import check_output_dir
from w2s_jax.io.native import META_FILE, detect_format, load_model, save_model
from w2s_jax.io.peft import lora_to_peft, peft_config
from w2s_jax.io.tensor_files import flatten_tree
from w2s_jax.models.lora import merge_lora

__all__ = ["convert_checkpoint"]


def convert_checkpoint(src: str, inp: str | os.PathLike, output: str | os.PathLike, *, to: str | None = None,
                       base: str | None = None, dtype: str | None = None, merge: bool = False,
                       max_shard_size: str | int | None = "5GB", tokenizer: str | None = None,
                       overwrite: bool = False) -> list[str]:
    """Read the ``src`` checkpoint at ``inp`` (``hf|gguf|native|peft``) and write it to ``output`` as
    ``to`` (``native|hf|peft``; default: hf from native, else native). ``merge`` folds LoRA adapters
    into the weights (always for ``to="hf"``). Returns what was done, as lines for the user."""
    lines: list[str] = []
    to = to or ("hf" if src == "native" else "native")
    inp = Path(inp)
    found = detect_format(inp)
    if found != src:
        raise UserError(f"--from {src}, but {inp} looks like a {found} checkpoint")
    out = Path(output)
    if same_file(out, inp) or inp.resolve() in out.resolve().parents or out.resolve() in inp.resolve().parents:
        raise UserError(f"--output {out} overlaps --input {inp}; choose another output directory")
    # before loading: refuse a directory w2s-jax did not write
    check_output_dir(out, (META_FILE,) if to == "native" else (), overwrite)
    m = load_model(inp, dtype=dtype, base=base, tokenizer=tokenizer)
    params, lora, lcfg = m.params, m.lora, m.lora_cfg
    if to == "peft":
        if lora is None:
            raise UserError(f"{inp} has no LoRA adapters to write as PEFT")
        if base is None and src == "peft":
            base = peft_config(inp).get("base_model_name_or_path")
        lora_to_peft(output, lora, lcfg, m.cfg, base_model_name_or_path=base, tokenizer=None, overwrite=overwrite)
        lines.append(f"wrote PEFT adapter ({lcfg.rank=}, targets {list(lcfg.targets)}) to {output}")
        return lines
    if lora is not None and (to == "hf" or merge):
        if to == "hf" and not merge:
            lines.append("merging LoRA adapters into the base weights (use --to peft to export the adapter alone)")
        params = merge_lora(params, lora, m.cfg, lcfg.scale)
        lora = lcfg = None
    if to == "hf":
        params_to_hf(output, params, m.cfg, m.tokenizer, max_shard_size=max_shard_size, overwrite=overwrite)
    else:
        save_model(output, params, m.cfg, m.tokenizer, lora=lora, lora_cfg=lcfg, overwrite=overwrite)
    n = sum(int(np.prod(x.shape)) for x in flatten_tree(params).values())
    lines.append(f"wrote {to} model ({m.cfg.n_layers} layers, {n:,} parameters, {m.cfg.param_dtype}) to {output}")
    return lines
