"""``w2s data``: the data sets of the weak-to-strong method, as pure functions and a CLI.

JSONL interchange (records joined by ``id``):

- generation records ``{id, prompt, response, pred, gold?, result?}`` (``pred`` normalized);
- SFT records ``{id, prompt, completion}`` (trained on as ``f"{prompt} {completion}"``);
- preference records ``{id, prompt, chosen, rejected}`` (plus ``branch``: ``weak_chosen`` /
  ``weak_rejected``).

Subcommands: ``split``, ``full-weak``, ``consistency``, ``vote``, ``pairs`` (docs/method.md, Stages I and
II). Every input is validated before anything is written (malformed line, missing field, duplicate
id, an id in one input and not another, sample files of different sizes or ids, empty input: a
``UserError`` naming the file and line or id) and every output is written atomically, so a failed
command leaves no partial file. ``--format llamafactory|trl`` also writes the set in those tools'
formats:

- LLaMA-Factory (alpaca style, JSON list): SFT ``{instruction, input: "", output}``, preference
  ``{instruction, input: "", chosen, rejected}``, plus a ``dataset_info`` entry (``ranking: true`` for
  preference) in ``<stem>.llamafactory.dataset_info.json``;
- TRL (JSONL, standard non-conversational): SFT ``{prompt, completion}``, preference
  ``{prompt, chosen, rejected}``; completions carry a leading space because TRL concatenates
  ``prompt + completion`` and the method's text is ``{prompt} {completion}``.

Majority vote: the majority prediction is the most frequent ``pred`` over the samples; ties go to the
prediction seen first in sample order (file order of ``--samples``; the same rule as
``collections.Counter.most_common``). ``confidence = count / n``.

Contrastive pairs (docs/method.md, Stage II), per question in the order of the weak file, with one
``random.Random(seed)`` (seed 42) consumed in that order:

1. ``confidence < 0.6`` -> skipped (low confidence); an empty majority -> skipped;
2. weak ``pred`` == majority: chosen = the weak response, rejected = a sample whose prediction
   differs from the majority: GSM8K ``rng.sample(negatives, 1)``; MATH/OlympicArena all negatives
   when there are at most 3 (no draw), else ``rng.sample(negatives, 3)`` -- no de-duplication of
   equal texts. No negative -> skipped (no negative);
3. else, ``confidence >= 0.8``: rejected = the weak response, chosen = ``rng.sample(positives, 1)``;
   MATH/OlympicArena then add, in sample order, positives whose response differs from that first
   pick, up to 3 pairs;
4. else skipped (weak disagrees, confidence below 0.8).
This consumes the generator exactly as the release's ``construct_paired_data_gsm8k`` /
``construct_paired_data_math`` do, so the same inputs give the same pairs (docs/method.md).
"""

from __future__ import annotations

import argparse
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from w2s_jax.core.errors import UserError
from w2s_jax.core.jsonl import check_unique_ids, read_jsonl, write_json_atomic, write_jsonl_atomic

__all__ = [
    "GEN_FIELDS",
    "full_weak_sft",
    "consistency_sets",
    "pad_sets",
    "vote",
    "contrastive_pairs",
    "to_llamafactory",
    "to_trl",
    "main",
]

GEN_FIELDS = ("id", "prompt", "response", "pred")
LOW_CONFIDENCE = 0.6
HIGH_CONFIDENCE = 0.8
PAIR_SEED = 42


# --- helpers ------------------------------------------------------------------------------------


def _pred(r: dict) -> str:
    p = r.get("pred")
    return "" if p is None else str(p)


def _same(a: str, b: str, equiv=None) -> bool:
    return a == b if equiv is None else (a == b or bool(equiv(a, b)))


def _by_id(records: Sequence[dict], path: str) -> dict:
    check_unique_ids(records, path)
    return {r["id"]: r for r in records}


def _same_ids(a: Sequence[dict], a_path: str, b: Sequence[dict], b_path: str) -> None:
    """Error naming the first id present in one input and not the other."""
    a_ids = {r["id"] for r in a}
    b_ids = {r["id"] for r in b}
    for i, r in enumerate(a):
        if r["id"] not in b_ids:
            raise UserError(f"{b_path}: no record for id {r['id']!r} (record {i + 1} of {a_path})")
    for i, r in enumerate(b):
        if r["id"] not in a_ids:
            raise UserError(f"{a_path}: no record for id {r['id']!r} (record {i + 1} of {b_path})")


def _require(records: Sequence[dict], fields: Sequence[str], path: str) -> None:
    for i, r in enumerate(records):
        for f in fields:
            if f not in r:
                raise UserError(f"{path}: record {i + 1} (id {r.get('id')!r}) is missing `{f}`")


# --- Stage I ------------------------------------------------------------------------------------


def full_weak_sft(weak: Sequence[dict], path: str = "weak") -> list[dict]:
    """Every weak output as an SFT record ``{id, prompt, completion}``, in input order."""
    _require(weak, ("id", "prompt", "response"), path)
    check_unique_ids(weak, path)
    return [{"id": r["id"], "prompt": r["prompt"], "completion": r["response"]} for r in weak]


def consistency_sets(
    weak: Sequence[dict],
    strong: Sequence[dict],
    weak_path: str = "weak",
    strong_path: str = "strong",
    equiv=None,
) -> tuple[dict[str, list[dict]], dict[str, Any]]:
    """The consistency filter: keep a question when the weak ``pred`` is non-empty and equals the
    strong-ICL ``pred``. Returns ``({"weak", "icl", "hybrid"}, stats)`` in weak-file order; all SFT
    records use the weak (zero-shot) prompt; ``hybrid`` has the weak then the ICL example of each
    kept question (records carry ``source``: ``weak``/``icl``). ``equiv(a, b)`` replaces string
    equality of the two predictions (OlympicArena's matching rules)."""
    _require(weak, GEN_FIELDS, weak_path)
    _require(strong, ("id", "response", "pred"), strong_path)
    strong_by_id = _by_id(strong, strong_path)
    check_unique_ids(weak, weak_path)
    _same_ids(weak, weak_path, strong, strong_path)
    sets: dict[str, list[dict]] = {"weak": [], "icl": [], "hybrid": []}
    kept_correct = 0
    known = True
    for w in weak:
        s = strong_by_id[w["id"]]
        wp = _pred(w)
        if wp == "" or not _same(wp, _pred(s), equiv):
            continue
        a = {"id": w["id"], "prompt": w["prompt"], "completion": w["response"], "source": "weak"}
        b = {"id": w["id"], "prompt": w["prompt"], "completion": s["response"], "source": "icl"}
        sets["weak"].append(a)
        sets["icl"].append(b)
        sets["hybrid"] += [a, b]
        if "result" in w:
            kept_correct += bool(w["result"])
        else:
            known = False
    n_kept = len(sets["weak"])
    stats: dict[str, Any] = {
        "total": len(weak),
        "kept": n_kept,
        "kept_fraction": n_kept / len(weak) if weak else 0.0,
        "weak_empty": sum(_pred(w) == "" for w in weak),
        "hybrid_examples": len(sets["hybrid"]),
    }
    if known and n_kept:
        stats["kept_correct"] = kept_correct
        stats["kept_accuracy"] = kept_correct / n_kept
    return sets, stats


def pad_sets(
    sets: dict[str, list[dict]], weak: Sequence[dict], strong: Sequence[dict], pad_to: int
) -> tuple[dict[str, list[dict]], int]:
    """The released MATH padding: after the agreeing questions of :func:`consistency_sets`, append the
    other questions (weak-file order) with both completions -- the weak one to ``weak``, the ICL one to
    ``icl``, both to ``hybrid`` -- until the sets hold ``pad_to`` questions. Returns ``(sets, added)``."""
    strong_by_id = {r["id"]: r for r in strong}
    kept = {r["id"] for r in sets["weak"]}
    out = {k: list(v) for k, v in sets.items()}
    added = 0
    for w in weak:
        if len(kept) + added >= pad_to:
            break
        if w["id"] in kept:
            continue
        a = {"id": w["id"], "prompt": w["prompt"], "completion": w["response"], "source": "weak", "padded": True}
        b = {**a, "completion": strong_by_id[w["id"]]["response"], "source": "icl"}
        out["weak"].append(a)
        out["icl"].append(b)
        out["hybrid"] += [a, b]
        added += 1
    return out, added


# --- Stage II -----------------------------------------------------------------------------------


def vote(samples_lists: Sequence[Sequence[dict]], paths: Sequence[str] | None = None, equiv=None) -> list[dict]:
    """Majority vote over ``n`` sample files (same ids, any order; output in the first file's order).

    Per id: ``{id, prompt, gold?, majority, count, n, confidence, positives, negatives}`` where
    ``positives``/``negatives`` are ``{sample, response, pred, result?}`` (``sample`` = index of the
    file) agreeing / disagreeing with the majority. Ties: first-seen prediction in sample order.
    With ``equiv(a, b)`` (OlympicArena) a prediction counts for the first earlier one it is equivalent
    to (in sample order), and the majority is that first one's text.
    """
    if not samples_lists:
        raise UserError("vote needs at least one samples file")
    paths = list(paths) if paths is not None else [f"samples[{i}]" for i in range(len(samples_lists))]
    n0 = len(samples_lists[0])
    for recs, p in zip(samples_lists, paths):
        if not recs:
            raise UserError(f"{p}: file has no records")
        _require(recs, ("id", "response", "pred"), p)
        if len(recs) != n0:
            raise UserError(f"{p}: has {len(recs)} records but {paths[0]} has {n0}; sample files must match")
    indexed = [_by_id(recs, p) for recs, p in zip(samples_lists, paths)]
    for recs, p in zip(samples_lists[1:], paths[1:]):
        _same_ids(samples_lists[0], paths[0], recs, p)
    out = []
    for first in samples_lists[0]:
        rid = first["id"]
        samples = [idx[rid] for idx in indexed]
        counts: dict[str, int] = {}
        label: list[str] = []  # the class (first-seen representative) of each sample's prediction
        for s in samples:
            p = _pred(s)
            rep = p if (equiv is None or p in counts) else next((c for c in counts if _same(p, c, equiv)), p)
            label.append(rep)
            counts[rep] = counts.get(rep, 0) + 1
        majority, count = max(counts.items(), key=lambda kv: kv[1])  # first max = first seen
        rec: dict[str, Any] = {"id": rid}
        if "prompt" in first:
            rec["prompt"] = first["prompt"]
        if "gold" in first:
            rec["gold"] = first["gold"]
        pos, neg = [], []
        for j, s in enumerate(samples):
            entry = {"sample": j, "response": s["response"], "pred": _pred(s)}
            if "result" in s:
                entry["result"] = s["result"]
            (pos if label[j] == majority else neg).append(entry)
        rec.update(
            majority=majority,
            count=count,
            n=len(samples),
            confidence=count / len(samples),
            positives=pos,
            negatives=neg,
        )
        out.append(rec)
    return out


_COUNT_KEYS = (
    "questions",
    "skipped_low_confidence",
    "skipped_empty_majority",
    "skipped_no_negative",
    "skipped_weak_disagrees_below_high",
    "weak_chosen_questions",
    "weak_rejected_questions",
    "pairs_weak_chosen",
    "pairs_weak_rejected",
    "pairs",
)


def contrastive_pairs(
    task: Any,
    weak: Sequence[dict],
    votes: Sequence[dict],
    seed: int = PAIR_SEED,
    low: float = LOW_CONFIDENCE,
    high: float = HIGH_CONFIDENCE,
    max_pairs: int | None = None,
    weak_path: str = "weak",
    votes_path: str = "votes",
    equiv=None,
) -> tuple[list[dict], dict[str, Any]]:
    """Preference pairs from the weak outputs and the votes (rules in the module docstring).

    ``max_pairs`` defaults to the task's ``pairs_per_question`` (1 for GSM8K, 3 otherwise). Returns
    ``(pairs, counts)``; ``counts`` has every branch, and ``chosen_correct``/``chosen_with_result``
    when the inputs carry ``result``.
    """
    from w2s_jax.method.tasks import get_task

    k = get_task(task).pairs_per_question if max_pairs is None else max_pairs
    if k < 1:
        raise UserError(f"max_pairs must be >= 1 (got {k})")
    _require(weak, GEN_FIELDS, weak_path)
    _require(votes, ("id", "majority", "confidence", "positives", "negatives"), votes_path)
    check_unique_ids(weak, weak_path)
    votes_by_id = _by_id(votes, votes_path)
    _same_ids(weak, weak_path, votes, votes_path)
    rng = random.Random(seed)
    counts: dict[str, Any] = {key: 0 for key in _COUNT_KEYS}
    chosen_correct = chosen_known = 0
    pairs: list[dict] = []

    def add(w: dict, chosen: str, rejected: str, branch: str, correct: Any) -> None:
        nonlocal chosen_correct, chosen_known
        pairs.append({"id": w["id"], "prompt": w["prompt"], "chosen": chosen, "rejected": rejected, "branch": branch})
        counts[f"pairs_{branch}"] += 1
        if correct is not None:
            chosen_known += 1
            chosen_correct += bool(correct)

    for w in weak:
        v = votes_by_id[w["id"]]
        counts["questions"] += 1
        conf = float(v["confidence"])
        majority = "" if v["majority"] is None else str(v["majority"])
        if conf < low:
            counts["skipped_low_confidence"] += 1
            continue
        if majority == "":
            counts["skipped_empty_majority"] += 1
            continue
        if _same(_pred(w), majority, equiv):
            negatives = list(v["negatives"])
            if not negatives:
                counts["skipped_no_negative"] += 1
                continue
            if k == 1:
                chosen_neg = rng.sample(negatives, 1)
            else:  # no de-duplication: equal texts may give equal pairs, as in the release
                chosen_neg = rng.sample(negatives, k) if len(negatives) > k else negatives
            counts["weak_chosen_questions"] += 1
            for neg in chosen_neg:
                add(w, w["response"], neg["response"], "weak_chosen", w.get("result"))
        elif conf >= high:
            positives = list(v["positives"])
            if not positives:  # inconsistent votes file: a majority needs samples
                raise UserError(f"{votes_path}: id {w['id']!r} has confidence {conf} but no positives")
            picked = rng.sample(positives, 1)
            if k > 1:  # then positives in sample order whose text differs from the first pick (only)
                first = picked[0]["response"]
                for p in positives:
                    if len(picked) >= k:
                        break
                    if p["response"] != first:
                        picked.append(p)
            counts["weak_rejected_questions"] += 1
            for pos in picked:
                add(w, pos["response"], w["response"], "weak_rejected", pos.get("result"))
        else:
            counts["skipped_weak_disagrees_below_high"] += 1
    counts["pairs"] = len(pairs)
    if chosen_known:
        counts["chosen_with_result"] = chosen_known
        counts["chosen_correct"] = chosen_correct
    counts.update(seed=seed, low=low, high=high, max_pairs_per_question=k)
    return pairs, counts


# --- other tools' formats -----------------------------------------------------------------------


def _is_preference(records: Sequence[dict]) -> bool:
    return bool(records) and "chosen" in records[0]


def to_llamafactory(records: Sequence[dict]) -> list[dict]:
    """LLaMA-Factory alpaca-style records (SFT ``instruction/input/output``; preference
    ``instruction/input/chosen/rejected``)."""
    if _is_preference(records):
        return [
            {"instruction": r["prompt"], "input": "", "chosen": r["chosen"], "rejected": r["rejected"]} for r in records
        ]
    return [{"instruction": r["prompt"], "input": "", "output": r["completion"]} for r in records]


def _llamafactory_info(name: str, file_name: str, preference: bool) -> dict:
    if preference:
        cols = {"prompt": "instruction", "query": "input", "chosen": "chosen", "rejected": "rejected"}
        return {name: {"file_name": file_name, "ranking": True, "columns": cols}}
    cols = {"prompt": "instruction", "query": "input", "response": "output"}
    return {name: {"file_name": file_name, "columns": cols}}


def to_trl(records: Sequence[dict]) -> list[dict]:
    """TRL standard (non-conversational) records: ``prompt/completion`` or ``prompt/chosen/rejected``;
    completions get a leading space so that ``prompt + completion`` is the method's text."""
    if _is_preference(records):
        return [{"prompt": r["prompt"], "chosen": " " + r["chosen"], "rejected": " " + r["rejected"]} for r in records]
    return [{"prompt": r["prompt"], "completion": " " + r["completion"]} for r in records]


def _stem(path: Path) -> Path:
    return path.with_name(path.name[: -len(path.suffix)] if path.suffix else path.name)


def _write_set(path: Path, records: list[dict], formats: Sequence[str], preference: bool = False) -> list[Path]:
    """Write ``records`` to ``path`` (JSONL) and the requested tool formats next to it."""
    written = [path]
    write_jsonl_atomic(path, records)
    stem = _stem(path)
    for fmt in formats:
        if fmt == "llamafactory":
            data = to_llamafactory(records)
            f = stem.with_name(stem.name + ".llamafactory.json")
            write_json_atomic(f, data)
            info = stem.with_name(stem.name + ".llamafactory.dataset_info.json")
            write_json_atomic(info, _llamafactory_info(stem.name, f.name, preference))
            written += [f, info]
        elif fmt == "trl":
            f = stem.with_name(stem.name + ".trl.jsonl")
            write_jsonl_atomic(f, to_trl(records))
            written.append(f)
    return written


# --- CLI ----------------------------------------------------------------------------------------


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
    from w2s_jax.method.grading import equivalence

    return equivalence(task)


def _cmd_split(args: argparse.Namespace) -> int:
    from w2s_jax.core.config import DataConfig, dump_yaml, load_config
    from w2s_jax.method.tasks import load_splits

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
    import json

    for k, v in mapping.items():
        if v is not None:
            over.append(f"{k}={json.dumps(v)}")  # JSON is valid YAML: strings stay strings
    cfg = load_config(DataConfig, args.config, over + list(args.set))
    splits = load_splits(cfg)
    out = Path(args.output_dir)
    for name in ("train_1", "train_2", "test"):
        write_jsonl_atomic(out / f"{name}.jsonl", splits[name])
    dump_yaml(cfg, out / "data_config.yaml")
    sizes = ", ".join(f"{k} {len(v)}" for k, v in splits.items())
    print(f"{cfg.task} ({cfg.source}): {sizes} -> {out}")
    return 0


def _cmd_full_weak(args: argparse.Namespace) -> int:
    weak = read_jsonl(args.weak, required=("id", "prompt", "response"))
    sft = full_weak_sft(weak, args.weak)
    _write_set(Path(args.output), sft, args.format)
    print(f"full-weak: {len(sft)} SFT records -> {args.output}")
    return 0


def _cmd_consistency(args: argparse.Namespace) -> int:
    weak = read_jsonl(args.weak, required=GEN_FIELDS)
    strong = read_jsonl(args.strong, required=("id", "response", "pred"))
    sets, stats = consistency_sets(weak, strong, args.weak, args.strong, equiv=_equiv(args.task))
    out = Path(args.output_dir)
    for name in ("weak", "icl", "hybrid"):
        _write_set(out / f"{name}.jsonl", sets[name], args.format)
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
    _write_set(out, pairs, args.format, preference=True)
    stats_path = _stem(out).with_name(_stem(out).name + ".stats.json")
    write_json_atomic(stats_path, counts)
    for key, value in counts.items():
        print(f"  {key}: {value}")
    print(f"pairs: {len(pairs)} -> {out} (counts in {stats_path})")
    return 0


def _parser(prog: str) -> argparse.ArgumentParser:
    from w2s_jax.method.tasks import TASKS

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


def _set_files(path: Path, formats: Sequence[str]) -> list[Path]:
    """The files :func:`_write_set` writes for ``path``."""
    stem = _stem(path)
    out = [path]
    for fmt in formats or ():
        if fmt == "llamafactory":
            out += [stem.with_name(stem.name + ".llamafactory.json"),
                    stem.with_name(stem.name + ".llamafactory.dataset_info.json")]
        elif fmt == "trl":
            out.append(stem.with_name(stem.name + ".trl.jsonl"))
    return out


def _planned_outputs(args: argparse.Namespace) -> list[Path]:
    fmt = getattr(args, "format", ())
    if args.sub == "split":
        d = Path(args.output_dir)
        return [d / f"{n}.jsonl" for n in ("train_1", "train_2", "test")] + [d / "data_config.yaml"]
    if args.sub == "consistency":
        d = Path(args.output_dir)
        return [f for n in ("weak", "icl", "hybrid") for f in _set_files(d / f"{n}.jsonl", fmt)] + [d / "stats.json"]
    out = Path(args.output)
    files = _set_files(out, fmt) if args.sub in ("full-weak", "pairs") else [out]
    if args.sub == "pairs":
        files.append(_stem(out).with_name(_stem(out).name + ".stats.json"))
    return files


def _check_outputs(args: argparse.Namespace) -> None:
    """Before any work: no output may be one of the inputs, and every output must be writable as a file."""
    from w2s_jax.core.paths import check_output_file, check_output_not_input

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
