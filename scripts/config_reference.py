"""Generate the key reference of docs/configs.md from the config dataclasses.

Every key of every config the CLI reads (``w2s run``, ``w2s sft``/``w2s dpo``, ``w2s compile-check``
and the model ``overrides``) is a dataclass field; this script lists them with their types, defaults
and the comment on their line in the source. ``tests/test_config_reference.py`` checks that the block
between the markers in docs/configs.md equals this output, so the page cannot drift from the code.

    python scripts/config_reference.py            # print the generated block
    python scripts/config_reference.py --write    # rewrite it in docs/configs.md
    python scripts/config_reference.py --check    # exit 1 when docs/configs.md is out of date
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import io
import json
import sys
import tokenize
import types
import typing
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "configs.md"
BEGIN = "<!-- begin generated: python scripts/config_reference.py --write -->"
END = "<!-- end generated -->"

# What a key means where its source line has no comment (a comment in the code takes precedence).
# tests/test_config_reference.py fails when an entry here names a key that no longer exists.
DESCRIPTIONS: dict[tuple[str, str], str] = {
    ("RunConfig", "name"): "run name; the run directory defaults to `runs/<name>`",
    ("RunConfig", "data"): "the task and its `train_1` / `train_2` / `test` splits",
    ("RunConfig", "weak"): "the weak model (supervisor)",
    ("RunConfig", "strong"): "the strong model (student)",
    ("RunConfig", "stage1"): "consistency filter and Stage I rounds",
    ("RunConfig", "stage2"): "sampling, contrastive pairs and preference training",
    ("RunConfig", "baselines"): "which baselines run",
    ("RunConfig", "mesh"): "device mesh of every stage",
    ("RunConfig", "pass_k"): "k values of the pass@k reported (Stage I samples on train_2; Stage I/II models on test)",
    ("RunConfig", "eval_samples"): "samples per test question (at stage2.temperature) for the test pass@k of the "
    "Stage I and II models; 0 = off",
    ("DataConfig", "task"): "gsm8k, math or olympicarena",
    ("DataConfig", "source"): "local files, Hugging Face `datasets`, tensorflow-datasets or generated",
    ("DataConfig", "train"): "one training file, split with `seed` into `n_train_1` / `n_train_2`",
    ("DataConfig", "train_1"): "pre-split weak-model training file (gold solutions)",
    ("DataConfig", "train_2"): "pre-split file whose questions the strong model learns from",
    ("DataConfig", "test"): "test file",
    ("DataConfig", "hf_name"): "`datasets` name (source `hf`)",
    ("DataConfig", "hf_config"): "`datasets` configuration (source `hf`)",
    ("DataConfig", "hf_train_split"): "split read as `train` (source `hf`)",
    ("DataConfig", "hf_test_split"): "split read as `test` (source `hf`)",
    ("DataConfig", "n_train_1"): "size of `train_1` when `train` is split (default: half)",
    ("DataConfig", "n_train_2"): "size of `train_2` when `train` is split (default: the rest)",
    ("DataConfig", "n_test"): "keep only the first `n_test` test records",
    ("DataConfig", "seed"): "seed of the `train` split and of generated data",
    ("DataConfig", "synthetic"): "generator settings (source `synthetic`)",
    ("SyntheticConfig", "kind"): "`arith`: this project's generator; the others come from reasoning-gym",
    ("SyntheticConfig", "max_steps"): "arith: most operations per problem",
    ("ModelSpec", "path"): "checkpoint: native dir, Hugging Face dir, `.gguf` file or PEFT adapter dir",
    ("ModelSpec", "preset"): "a preset of `w2s_jax/models/config.py` initialised at random (give `path` or `preset`)",
    ("ModelSpec", "seed"): "initialisation seed of a preset",
    ("RunModelSpec", "pretrain"): "demo only: train a preset on a generated pool first",
    ("PretrainConfig", "examples"): "pool size (0 = off)",
    ("PretrainConfig", "seed"): "seed of the pool (disjoint from the run's data)",
    ("PretrainConfig", "few_shot_max"): "up to this many solved problems precede each pool example",
    ("PretrainConfig", "synthetic"): "generator of the pool",
    ("PretrainConfig", "train"): "training of the pool SFT",
    ("TrainConfig", "lr"): "peak learning rate (AdamW, decoupled weight decay; norms and 1-D parameters not decayed)",
    ("TrainConfig", "warmup_steps"): "linear warm-up steps",
    ("TrainConfig", "schedule"): "learning-rate decay after warm-up",
    ("TrainConfig", "min_lr_ratio"): "final learning rate as a fraction of `lr`",
    ("TrainConfig", "weight_decay"): "AdamW weight decay",
    ("TrainConfig", "b1"): "AdamW beta 1",
    ("TrainConfig", "b2"): "AdamW beta 2",
    ("TrainConfig", "eps"): "AdamW epsilon",
    ("TrainConfig", "epochs"): "passes over the data (unless `max_steps` is set)",
    ("TrainConfig", "max_steps"): "stop after this many optimizer steps",
    ("TrainConfig", "batch_size"): "rows (SFT) or pairs (preference) per micro-batch",
    ("TrainConfig", "grad_accum"): "micro-batches per optimizer step (same loss as one big batch)",
    ("TrainConfig", "seq_len"): "tokens per row",
    ("TrainConfig", "eval_fraction"): "held-out fraction of the training data for evaluation",
    ("TrainConfig", "log_every"): "steps between metric lines",
    ("TrainConfig", "keep"): "checkpoints kept",
    ("TrainConfig", "async_checkpointing"): "write checkpoints in the background",
    ("TrainConfig", "seed"): "data order and dropout seed",
    ("TrainConfig", "tensorboard"): "write TensorBoard logs beside `metrics.jsonl`",
    ("TrainConfig", "progress"): "show a progress bar",
    ("TrainConfig", "loss_type"): "preference loss: sigmoid (DPO), ipo, hinge, orpo (TRL's), orpo_llamafactory "
    "(the paper's), simpo",
    ("TrainConfig", "template"): "`joined`: prompt + \" \" + completion tokenized as one text; `vanilla`: "
    "LLaMA-Factory's, prompt and completion tokenized separately",
    ("TrainConfig", "beta"): "DPO/IPO/hinge beta; ORPO's lambda; SimPO's beta",
    ("TrainConfig", "label_smoothing"): "conservative DPO / SimPO label smoothing",
    ("TrainConfig", "simpo_gamma"): "SimPO target margin",
    ("TrainConfig", "reference"): "DPO reference log-probs: a scoring pass cached at start, or the base with LoRA off",
    ("TrainConfig", "logits_chunks"): "row chunks whose logits are recomputed in the backward pass (1 = off)",
    ("LoRAConfig", "rank"): "adapter rank r",
    ("LoRAConfig", "alpha"): "scale alpha / r",
    ("LoRAConfig", "dropout"): "dropout on the adapter input",
    ("LoRAConfig", "targets"): "projections that get adapters",
    ("SampleConfig", "max_new_tokens"): "most tokens generated per completion",
    ("SampleConfig", "temperature"): "0 = greedy",
    ("SampleConfig", "top_k"): "0 = off",
    ("SampleConfig", "top_p"): "1 = off",
    ("SampleConfig", "n"): "samples per prompt (seeds `seed` .. `seed + n - 1`)",
    ("SampleConfig", "seed"): "sampling seed of the first sample",
    ("SampleConfig", "stop"): "generation stops at EOS or at one of these strings",
    ("SampleConfig", "batch_size"): "rows (prompt x sample) per generation program",
    ("SampleConfig", "prompt_buckets"): "padded prompt lengths (default: powers of two)",
    ("SampleConfig", "batch_buckets"): "padded batch sizes for the last, smaller batch",
    ("SampleConfig", "max_prompt_len"): "default: `max_seq_len - max_new_tokens`",
    ("SampleConfig", "truncate_prompts"): "drop the left part of a longer prompt instead of failing",
    ("Stage1Config", "n_demos"): "demonstrations in the strong model's few-shot prompt",
    ("Stage1Config", "demo_seed"): "seed of the demonstration choice",
    ("Stage1Config", "demos"): "`weak`: the weak model's own train_2 outputs, seed-42 shuffle, first with the "
    "answer key (the paper; no gold); `correct`: gold-correct ones only (ablation, reads train_2 gold); "
    "`train_1_gold`; `file:PATH`: a `Question: ... Answer: ...` template",
    ("Stage1Config", "variants"): "round-1 sets trained side by side and evaluated (weak-ft, icl-ft, hybrid-ft); "
    "round 2 needs weak and icl",
    ("Stage1Config", "pad_to"): "MATH as released: pad the sets with disagreeing questions (both completions) up to "
    "this many questions; 0 = off",
    ("Stage2Config", "n_samples"): "samples per `train_2` question from the Stage I model",
    ("Stage2Config", "temperature"): "sampling temperature",
    ("Stage2Config", "top_p"): "nucleus sampling (1 = off)",
    ("Stage2Config", "pair_seed"): "seed of the choice among candidate pairs",
    ("Stage2Config", "train"): "preference training from the Stage I model",
    ("BaselinesConfig", "full_weak"): "strong model fine-tuned on all weak labels",
    ("BaselinesConfig", "strong_zero_shot"): "evaluate the strong base model zero-shot",
    ("MeshConfig", "data"): "data-parallel axis (-1 = the remaining devices)",
    ("MeshConfig", "fsdp"): "fully sharded data-parallel axis (parameters sharded over it)",
    ("MeshConfig", "tensor"): "tensor-parallel axis",
    ("MeshConfig", "sequence"): "sequence axis",
    ("MeshConfig", "rules"): "replacement table: logical axis name -> mesh axes",
    ("DataSection", "train"): "JSONL: `{id, prompt, completion}` (sft) or `{id, prompt, chosen, rejected}` (dpo)",
    ("DataSection", "eval"): "held-out file (else `train.eval_fraction` of `train`)",
    ("DataSection", "ref_cache"): "dpo: reference log-probs cache (default `<out_dir>/ref_logps.jsonl`)",
    ("TrainRunConfig", "out_dir"): "model, checkpoints, metrics and the resolved config",
    ("TrainRunConfig", "export_hf"): "also write a Hugging Face dir (full fine-tuning) or a PEFT adapter (LoRA)",
    ("CheckConfig", "model"): "a preset name of `w2s_jax/models/config.py`",
    ("CheckConfig", "model_overrides"): "ModelConfig fields",
    ("CheckConfig", "remat"): "rematerialisation policy of the training steps",
    ("CheckConfig", "param_dtype"): "parameter (master weight) dtype",
    ("CheckConfig", "dtype"): "compute dtype",
    ("CheckConfig", "sft"): "shape and options of the SFT step",
    ("CheckConfig", "dpo"): "shape and options of the DPO step",
    ("CheckConfig", "stages"): "what to compile",
    ("GenerationSection", "batch_size"): "prompts per generation program",
    ("GenerationSection", "prompt_len"): "prompt tokens",
    ("GenerationSection", "max_new_tokens"): "new tokens (KV cache = prompt_len + max_new_tokens)",
    ("GenerationSection", "param_dtype"): "weight dtype for generation",
    ("ModelConfig", "vocab_size"): "vocabulary size",
    ("ModelConfig", "d_model"): "hidden size",
    ("ModelConfig", "n_layers"): "decoder layers",
    ("ModelConfig", "n_heads"): "query heads",
    ("ModelConfig", "n_kv_heads"): "key/value heads (grouped-query attention when fewer)",
    ("ModelConfig", "head_dim"): "size of one head",
    ("ModelConfig", "d_ff"): "MLP hidden size",
    ("ModelConfig", "max_seq_len"): "longest sequence (prompt + completion)",
    ("ModelConfig", "rope_theta"): "RoPE base",
    ("ModelConfig", "rope_scaling"): "`llama3` rope scaling, or none",
    ("ModelConfig", "norm_eps"): "RMSNorm epsilon",
    ("ModelConfig", "tie_embeddings"): "output head shares the embedding matrix",
    ("ModelConfig", "param_dtype"): "parameter dtype",
    ("ModelConfig", "name"): "label of the shape (a preset's name)",
    ("ModelConfig", "rope_factor"): "`llama3` rope scaling: factor",
    ("ModelConfig", "rope_low_freq_factor"): "`llama3` rope scaling: low-frequency factor",
    ("ModelConfig", "rope_high_freq_factor"): "`llama3` rope scaling: high-frequency factor",
    ("ModelConfig", "rope_original_max_pos"): "`llama3` rope scaling: original context length",
    ("ModelConfig", "bos_token_id"): "beginning-of-sequence id",
    ("ModelConfig", "eos_token_id"): "end-of-sequence id",
    ("ModelConfig", "pad_token_id"): "padding id",
    ("TrainRunConfig", "model"): "the model to train",
    ("TrainRunConfig", "data"): "training data",
    ("TrainRunConfig", "train"): "training options",
    ("TrainRunConfig", "mesh"): "device mesh",
    ("CheckConfig", "mesh"): "training mesh",
    ("CheckConfig", "generation"): "shape of the generation programs",
    ("ModelConfig", "initializer_range"): "standard deviation of a preset's random initialisation",
}


def roots() -> list[tuple[str, type]]:
    from w2s_jax.models.config import ModelConfig
    from w2s_jax.pipeline.config import RunConfig
    from w2s_jax.pipeline.train_job import TrainRunConfig
    from w2s_jax.tools.compile_check import CheckConfig

    return [
        ("`w2s run CONFIG`", RunConfig),
        ("`w2s sft --config C` and `w2s dpo --config C`", TrainRunConfig),
        ("`w2s compile-check CONFIG`", CheckConfig),
        ("`overrides:` of a model (`weak.overrides`, `strong.overrides`, `model.overrides`)", ModelConfig),
    ]


def _comments(cls: type) -> tuple[dict[str, str], str]:
    """Inline ``# comment`` of each field line (fields inherited from a dataclass base: the base's), and
    the class docstring's first paragraph."""
    inherited: dict[str, str] = {}
    for base in reversed(cls.__mro__[1:]):
        if dataclasses.is_dataclass(base):
            inherited.update(_comments(base)[0])
    src = inspect.getsource(cls)
    tree = ast.parse(src)
    node = tree.body[0]
    assert isinstance(node, ast.ClassDef)
    line_comment: dict[int, str] = {}
    for tok in tokenize.generate_tokens(io.StringIO(src).readline):
        if tok.type == tokenize.COMMENT:
            line_comment[tok.start[0]] = tok.string.lstrip("#").strip()
    out: dict[str, str] = {}
    for stmt in node.body:
        if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
            out[stmt.target.id] = line_comment.get(stmt.end_lineno, "")
    doc = ast.get_docstring(node) or ""
    return {**inherited, **out}, " ".join(doc.split("\n\n")[0].split())


def _description(cls: type, key: str) -> str:
    """The DESCRIPTIONS entry of ``key`` for ``cls`` or the dataclass it inherits the key from."""
    for c in cls.__mro__:
        if (c.__name__, key) in DESCRIPTIONS:
            return DESCRIPTIONS[(c.__name__, key)]
    return ""


def _dataclasses_in(tp: typing.Any) -> list[type]:
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        return [tp]
    origin = typing.get_origin(tp)
    if origin is typing.Union or origin is types.UnionType:
        return [c for a in typing.get_args(tp) for c in _dataclasses_in(a)]
    return []


def _value(v: typing.Any) -> str:
    from w2s_jax.core.config import to_dict

    if dataclasses.is_dataclass(v) and not isinstance(v, type):
        v = to_dict(v)
    if isinstance(v, tuple):
        v = list(v)
    if isinstance(v, Path):
        v = str(v)
    return json.dumps(v)


def _default(f: dataclasses.Field) -> typing.Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _table(cls: type) -> tuple[list[str], list[type]]:
    hints = typing.get_type_hints(cls)
    comments, doc = _comments(cls)
    lines = [f"### {cls.__name__}", "", f"`{cls.__module__}.{cls.__qualname__}`" + (f": {doc}" if doc else ""), "",
             "| key | type | default | meaning |", "| --- | --- | --- | --- |"]
    nested: list[type] = []
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        subs = _dataclasses_in(hints[f.name])
        nested += [s for s in subs if s not in nested]
        d = _default(f)
        raw_type = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
        meaning = comments.get(f.name) or _description(cls, f.name)
        if d is dataclasses.MISSING:
            default = "required"
        elif dataclasses.is_dataclass(d) and not isinstance(d, type):
            base = type(d)()
            changed = {k.name: getattr(d, k.name) for k in dataclasses.fields(d)
                       if getattr(d, k.name) != getattr(base, k.name)}
            default = f"[{type(d).__name__}](#{type(d).__name__.lower()})"
            if changed:
                default += " with " + ", ".join(f"`{k}: {_value(v)}`" for k, v in changed.items())
        else:
            default = f"`{_value(d)}`"
            if subs:
                link = ", ".join(f"[{s.__name__}](#{s.__name__.lower()})" for s in subs)
                meaning = f"a {link} section when set" + (f"; {meaning}" if meaning else "")
        lines.append(f"| `{f.name}` | `{_cell(raw_type)}` | {_cell(default)} | {_cell(meaning)} |")
    return lines, nested


def render() -> str:
    out = [BEGIN, ""]
    seen: list[type] = []
    for title, root in roots():
        out += [f"## {title}", ""]
        queue = [root]
        while queue:
            cls = queue.pop(0)
            if cls in seen:
                continue
            seen.append(cls)
            lines, nested = _table(cls)
            out += lines + [""]
            queue += [n for n in nested if n not in seen and n not in queue]
    out.append(END)
    return "\n".join(out) + "\n"


def split_doc(text: str) -> tuple[str, str, str]:
    if BEGIN not in text or END not in text:
        raise SystemExit(f"{DOC}: the markers {BEGIN!r} and {END!r} are missing")
    head, rest = text.split(BEGIN, 1)
    block, tail = rest.split(END, 1)
    return head, BEGIN + block + END + "\n", tail.lstrip("\n")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--write", action="store_true", help="rewrite the generated block of docs/configs.md")
    ap.add_argument("--check", action="store_true", help="exit 1 when docs/configs.md is out of date")
    args = ap.parse_args(argv)
    new = render()
    if not (args.write or args.check):
        sys.stdout.write(new)
        return 0
    head, block, tail = split_doc(DOC.read_text(encoding="utf-8"))
    if args.check:
        if block != new:
            print(f"{DOC} is out of date: run python scripts/config_reference.py --write", file=sys.stderr)
            return 1
        return 0
    DOC.write_text(head + new + ("\n" + tail if tail else ""), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    raise SystemExit(main())
