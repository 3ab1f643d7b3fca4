"""``w2s data``: build the data sets of the method (split, full-weak, consistency, vote, pairs).

The sets and their rules are in :mod:`w2s_jax.method.datasets` (and :mod:`w2s_jax.method.splits` for
``split``); this module parses the arguments, checks the outputs before any work and writes the files.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from w2s_jax.core.config import load_config
from w2s_jax.core.jsonl import read_jsonl, write_json_atomic, write_jsonl_atomic
from w2s_jax.core.paths import check_output_file, check_output_not_input
from w2s_jax.method.datasets import (
    GEN_FIELDS,
    HIGH_CONFIDENCE,
    LOW_CONFIDENCE,
    PAIR_SEED,
    consistency_sets,
    contrastive_pairs,
    full_weak_sft,
    set_files,
    stats_path,
    vote,
    write_set,
)
from w2s_jax.method.grading import equivalence
from w2s_jax.method.splits import SPLIT_FILES, DataConfig, write_splits
from w2s_jax.method.tasks import TASKS


def _add_format(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--format",
        action="append",
        choices=("llamafactory", "trl"),
        default=[],
        help="also write the set in this tool's format (repeatable)",
    )


def _equiv(task: str | None):
    """How a task's predictions are compared (OlympicArena: its matching rules; else string equality)."""
    if task is None:
        return None
    return equivalence(task)


def _cmd_split(args: argparse.Namespace) -> int:
    over: list[str] = []
    mapping = {
        "task": args.task,
        "source": args.source,
        "train": args.train,
        "train_1": args.train_1,
        "train_2": args.train_2,
        "test": args.test,
        "hf_name": args.hf_name,
        "hf_config": args.hf_config,
        "n_train_1": args.n_train_1,
        "n_train_2": args.n_train_2,
        "n_test": args.n_test,
        "seed": args.seed,
        "synthetic.kind": args.synthetic_kind,
        "synthetic.max_value": args.max_value,
        "synthetic.max_steps": args.max_steps,
    }
    for k, v in mapping.items():
        if v is not None:
            over.append(f"{k}={json.dumps(v)}")  # JSON is valid YAML: strings stay strings
    cfg = load_config(DataConfig, args.config, over + list(args.set))
    out = Path(args.output_dir)
    splits = write_splits(cfg, out)
    sizes = ", ".join(f"{k} {len(v)}" for k, v in splits.items())
    print(f"{cfg.task} ({cfg.source}): {sizes} -> {out}")
    return 0


def _cmd_full_weak(args: argparse.Namespace) -> int:
    weak = read_jsonl(args.weak, required=("id", "prompt", "response"))
    sft = full_weak_sft(weak, args.weak)
    write_set(Path(args.output), sft, args.format)
    print(f"full-weak: {len(sft)} SFT records -> {args.output}")
    return 0


def _cmd_consistency(args: argparse.Namespace) -> int:
    weak = read_jsonl(args.weak, required=GEN_FIELDS)
    strong = read_jsonl(args.strong, required=("id", "response", "pred"))
    sets, stats = consistency_sets(weak, strong, args.weak, args.strong, equiv=_equiv(args.task))
    out = Path(args.output_dir)
    for name in ("weak", "icl", "hybrid"):
        write_set(out / f"{name}.jsonl", sets[name], args.format)
    write_json_atomic(out / "stats.json", stats)
    acc = f", kept accuracy {stats['kept_accuracy']:.4f}" if "kept_accuracy" in stats else ""
    print(
        f"consistency: kept {stats['kept']} / {stats['total']} ({stats['kept_fraction']:.4f}){acc}; "
        f"hybrid {stats['hybrid_examples']} examples -> {out}"
    )
    return 0


def _cmd_vote(args: argparse.Namespace) -> int:
    lists = [read_jsonl(p, required=("id", "response", "pred")) for p in args.samples]
    votes = vote(lists, args.samples, equiv=_equiv(args.task))
    write_jsonl_atomic(args.output, votes)
    hist: dict[float, int] = {}
    for v in votes:
        hist[v["confidence"]] = hist.get(v["confidence"], 0) + 1
    summary = ", ".join(f"{c:g}: {hist[c]}" for c in sorted(hist))
    print(f"vote: {len(votes)} questions over {len(lists)} samples; confidence histogram {summary} -> {args.output}")
    return 0


def _cmd_pairs(args: argparse.Namespace) -> int:
    weak = read_jsonl(args.weak, required=GEN_FIELDS)
    votes = read_jsonl(args.votes, required=("id", "majority", "confidence", "positives", "negatives"))
    pairs, counts = contrastive_pairs(
        args.task,
        weak,
        votes,
        seed=args.seed,
        low=args.low,
        high=args.high,
        max_pairs=args.max_pairs,
        weak_path=args.weak,
        votes_path=args.votes,
        equiv=_equiv(args.task),
    )
    out = Path(args.output)
    write_set(out, pairs, args.format, preference=True)
    counts_path = stats_path(out)
    write_json_atomic(counts_path, counts)
    for key, value in counts.items():
        print(f"  {key}: {value}")
    print(f"pairs: {len(pairs)} -> {out} (counts in {counts_path})")
    return 0


def _parser(prog: str) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=prog, description="Build the weak-to-strong data sets.")
    sub = ap.add_subparsers(dest="sub", metavar="SUBCOMMAND")
    sub.required = True

    p = sub.add_parser("split", help="load a task and write train_1/train_2/test JSONL")
    p.add_argument("--config", help="YAML file with the data section's keys (DataConfig)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    p.add_argument("--task", choices=sorted(TASKS))
    p.add_argument("--source", choices=("local", "hf", "tfds", "synthetic"))
    p.add_argument("--train", help="full train set to split (file, or HF local file/hub name)")
    p.add_argument("--train-1", dest="train_1", help="already split train_1 (used as is)")
    p.add_argument("--train-2", dest="train_2", help="already split train_2 (used as is)")
    p.add_argument("--test")
    p.add_argument("--hf-name", dest="hf_name", help="Hugging Face dataset name (e.g. openai/gsm8k)")
    p.add_argument("--hf-config", dest="hf_config", help="Hugging Face dataset config (e.g. main)")
    p.add_argument("--n-train-1", dest="n_train_1", type=int)
    p.add_argument("--n-train-2", dest="n_train_2", type=int)
    p.add_argument("--n-test", dest="n_test", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--synthetic-kind", dest="synthetic_kind", choices=("arith", "gsm_symbolic", "basic_arithmetic"))
    p.add_argument("--max-value", dest="max_value", type=int, help="synthetic arith: largest operand")
    p.add_argument("--max-steps", dest="max_steps", type=int, help="synthetic arith: most operations")
    p.add_argument("--output-dir", required=True)
    p.set_defaults(fn=_cmd_split)

    p = sub.add_parser("full-weak", help="every weak output as an SFT record (baseline)")
    p.add_argument("--weak", required=True)
    p.add_argument("--output", required=True)
    _add_format(p)
    p.set_defaults(fn=_cmd_full_weak)

    p = sub.add_parser("consistency", help="consistency filter: weak.jsonl, icl.jsonl, hybrid.jsonl, stats.json")
    p.add_argument("--weak", required=True, help="weak-model generation records")
    p.add_argument("--strong", required=True, help="strong-ICL generation records")
    p.add_argument("--task", choices=sorted(TASKS), help="compare predictions by this task's rules (olympicarena)")
    p.add_argument("--output-dir", required=True)
    _add_format(p)
    p.set_defaults(fn=_cmd_consistency)

    p = sub.add_parser("vote", help="majority vote over sample files")
    p.add_argument("--samples", nargs="+", required=True)
    p.add_argument("--task", choices=sorted(TASKS), help="compare predictions by this task's rules (olympicarena)")
    p.add_argument("--output", required=True)
    p.set_defaults(fn=_cmd_vote)

    p = sub.add_parser("pairs", help="contrastive preference pairs")
    p.add_argument("--task", required=True, choices=sorted(TASKS))
    p.add_argument("--weak", required=True)
    p.add_argument("--votes", required=True)
    p.add_argument("--output", required=True)
    p.add_argument("--seed", type=int, default=PAIR_SEED)
    p.add_argument("--low", type=float, default=LOW_CONFIDENCE, help="skip below this confidence")
    p.add_argument("--high", type=float, default=HIGH_CONFIDENCE, help="weak-rejected pairs need this")
    p.add_argument("--max-pairs", dest="max_pairs", type=int, help="pairs per question (task default)")
    _add_format(p)
    p.set_defaults(fn=_cmd_pairs)
    return ap


def _planned_outputs(args: argparse.Namespace) -> list[Path]:
    fmt = getattr(args, "format", ())
    if args.sub == "split":
        d = Path(args.output_dir)
        return [d / f for f in SPLIT_FILES]
    if args.sub == "consistency":
        d = Path(args.output_dir)
        return [f for n in ("weak", "icl", "hybrid") for f in set_files(d / f"{n}.jsonl", fmt)] + [d / "stats.json"]
    out = Path(args.output)
    files = set_files(out, fmt) if args.sub in ("full-weak", "pairs") else [out]
    if args.sub == "pairs":
        files.append(stats_path(out))
    return files


def _check_outputs(args: argparse.Namespace) -> None:
    """Before any work: no output may be one of the inputs, and every output must be writable as a file."""
    inputs = {f"--{k.replace('_', '-')}": getattr(args, k, None)
              for k in ("weak", "strong", "samples", "votes", "train", "train_1", "train_2", "test", "config")}
    inputs = {k: v for k, v in inputs.items() if v}
    outputs = _planned_outputs(args)
    flag = "--output" if getattr(args, "output", None) else "--output-dir"
    for o in outputs:
        check_output_file(o, flag)
    check_output_not_input({flag: outputs}, inputs)


def main(argv: list[str], prog: str = "w2s data", command: str = "data") -> int:
    args = _parser(prog).parse_args(argv)
    _check_outputs(args)
    return int(args.fn(args) or 0)
