"""``w2s grade``: extract and grade the answers of a JSONL file (:mod:`w2s_jax.method.grading`)."""

from __future__ import annotations

import argparse

from w2s_jax.core.jsonl import read_jsonl, write_jsonl_atomic
from w2s_jax.method.grading import DEFAULT_TIMEOUT, MODES, grade_records
from w2s_jax.method.tasks import TASKS


def main(argv: list[str], prog: str = "w2s grade", command: str = "grade") -> int:
    ap = argparse.ArgumentParser(
        prog=prog,
        description="Extract answers from `response` and grade them against `gold` (or `answer`).",
    )
    ap.add_argument("--task", required=True, choices=sorted(TASKS))
    ap.add_argument("--input", required=True, help="JSONL/JSON records with `response` and a gold")
    ap.add_argument("--output", required=True, help="graded JSONL (every record + `pred`, `result`)")
    ap.add_argument(
        "--mode",
        default="paper",
        choices=MODES,
        help="paper: normalized string equality, reproduces the released labels (default); "
        "symbolic: sympy equivalence with a time bound per item",
    )
    ap.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, help="seconds per symbolic check")
    args = ap.parse_args(argv)

    records = read_jsonl(args.input, required=("response",))
    graded = grade_records(records, args.task, mode=args.mode, timeout=args.timeout, path=args.input)
    write_jsonl_atomic(args.output, graded)
    n_right = sum(r["result"] for r in graded)
    n_empty = sum(r["pred"] == "" for r in graded)
    acc = n_right / len(graded)
    print(f"accuracy: {acc:.4f} ({n_right}/{len(graded)}; {n_empty} without an answer) -> {args.output}")
    return 0
