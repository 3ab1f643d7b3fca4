"""The data sets of the weak-to-strong method, as pure functions (``w2s data``: :mod:`w2s_jax.cli.data`).

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

import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from w2s_jax.core.errors import UserError
from w2s_jax.core.jsonl import check_unique_ids, write_json_atomic, write_jsonl_atomic
from w2s_jax.method.tasks import get_task

__all__ = [
    "GEN_FIELDS",
    "full_weak_sft",
    "consistency_sets",
    "pad_sets",
    "vote",
    "contrastive_pairs",
    "to_llamafactory",
    "to_trl",
    "write_set",
    "set_files",
    "path_stem",
    "stats_path",
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
    k = get_task(task).pairs_per_question if max_pairs is None else max_pairs
    if k < 1:
        raise UserError(f"max_pairs must be >= 1 (got {k})")
    _require(weak, GEN_FIELDS, weak_path)
    _require(votes, ("id", "majority", "confidence", "positives", "negatives"), votes_path)
    check_unique_ids(weak, weak_path)
    votes_by_id = _by_id(votes, votes_path)
    _same_ids(weak, weak_path, votes, votes_path)
    rng = random.Random(seed)  # one generator, consumed question by question in weak-file order
    counts: dict[str, Any] = {key: 0 for key in _COUNT_KEYS}
    chosen_results: list[bool] = []
    pairs: list[dict] = []
    for w in weak:
        counts["questions"] += 1
        outcome, picked = _question_pairs(w, votes_by_id[w["id"]], k, rng, low, high, equiv, votes_path)
        counts[outcome] += 1
        for chosen, rejected, branch, correct in picked:
            pairs.append({"id": w["id"], "prompt": w["prompt"], "chosen": chosen, "rejected": rejected,
                          "branch": branch})
            counts[f"pairs_{branch}"] += 1
            if correct is not None:
                chosen_results.append(bool(correct))
    counts["pairs"] = len(pairs)
    if chosen_results:
        counts["chosen_with_result"] = len(chosen_results)
        counts["chosen_correct"] = sum(chosen_results)
    counts.update(seed=seed, low=low, high=high, max_pairs_per_question=k)
    return pairs, counts


def _question_pairs(w: dict, v: dict, k: int, rng: random.Random, low: float, high: float, equiv,
                    votes_path: str) -> tuple[str, list[tuple[str, str, str, Any]]]:
    """The pairs of one question: ``(counter, [(chosen, rejected, branch, chosen's result or None)])``,
    ``counter`` the key of ``counts`` the question adds to (a skip reason or the branch's questions)."""
    conf = float(v["confidence"])
    majority = "" if v["majority"] is None else str(v["majority"])
    if conf < low:
        return "skipped_low_confidence", []
    if majority == "":
        return "skipped_empty_majority", []
    if _same(_pred(w), majority, equiv):
        negatives = list(v["negatives"])
        if not negatives:
            return "skipped_no_negative", []
        if k == 1:
            chosen_neg = rng.sample(negatives, 1)
        else:  # no de-duplication: equal texts may give equal pairs, as in the release
            chosen_neg = rng.sample(negatives, k) if len(negatives) > k else negatives
        return "weak_chosen_questions", [(w["response"], neg["response"], "weak_chosen", w.get("result"))
                                         for neg in chosen_neg]
    if conf < high:
        return "skipped_weak_disagrees_below_high", []
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
    return "weak_rejected_questions", [(pos["response"], w["response"], "weak_rejected", pos.get("result"))
                                       for pos in picked]


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


def path_stem(path: Path) -> Path:
    return path.with_name(path.name[: -len(path.suffix)] if path.suffix else path.name)


def write_set(path: Path, records: list[dict], formats: Sequence[str], preference: bool = False) -> list[Path]:
    """Write ``records`` to ``path`` (JSONL) and the requested tool formats next to it."""
    written = [path]
    write_jsonl_atomic(path, records)
    stem = path_stem(path)
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


def set_files(path: Path, formats: Sequence[str]) -> list[Path]:
    """The files :func:`write_set` writes for ``path``."""
    stem = path_stem(path)
    out = [path]
    for fmt in formats or ():
        if fmt == "llamafactory":
            out += [stem.with_name(stem.name + ".llamafactory.json"),
                    stem.with_name(stem.name + ".llamafactory.dataset_info.json")]
        elif fmt == "trl":
            out.append(stem.with_name(stem.name + ".trl.jsonl"))
    return out


def stats_path(path: Path) -> Path:
    """Where the counts of the pairs written to ``path`` go (``<stem>.stats.json``)."""
    stem = path_stem(path)
    return stem.with_name(stem.name + ".stats.json")
