"""Task registry, loaders and the paper's train split.

A task adapter says how a task's answers are marked (``####`` for GSM8K, ``The answer is:`` for
MATH and OlympicArena), how a raw record of any supported shape becomes the canonical record
``{id, question, solution, answer}`` (``answer`` = the final answer only), how a gold completion for
SFT on ``train_1`` is written, and how many contrastive pairs a question may give (1 for GSM8K, 3
otherwise). New tasks: ``register_task(TaskAdapter(...))``.

Loaders: local JSONL/JSON (:func:`load_local`), Hugging Face ``datasets`` (:func:`load_hf`; local
files via the ``json`` builder, or a hub name), tensorflow-datasets ``gsm8k`` (:func:`load_tfds`,
optional) and generated data (:mod:`w2s_jax.method.synth`). :func:`w2s_jax.method.splits.load_splits` builds
``train_1`` / ``train_2`` / ``test`` from a :class:`~w2s_jax.method.splits.DataConfig`.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from w2s_jax.core.errors import UserError
from w2s_jax.core.jsonl import check_unique_ids, read_jsonl
from w2s_jax.method.prompts import demo_text, few_shot_prompt, zero_shot_prompt

__all__ = [
    "TaskAdapter",
    "TASKS",
    "register_task",
    "get_task",
    "last_boxed",
    "to_records",
    "load_local",
    "load_hf",
    "load_olympicarena",
    "load_tfds",
    "split_train",
]

_CALC_RE = re.compile(r"<<.*?>>")


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (or ``\\fbox{...}``) in ``text``, braces matched; None if absent."""
    idx = max(text.rfind("\\boxed{"), text.rfind("\\fbox{"))
    if idx < 0:
        return None
    start = text.index("{", idx) + 1
    depth = 1
    i = start
    while i < len(text):
        c = text[i]
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return text[start:i]
        i += 1
    return None


def _text(v: Any) -> str:
    if isinstance(v, bytes):
        return v.decode("utf-8")
    if isinstance(v, (list, tuple)):
        return ", ".join(_text(x) for x in v)
    return str(v)


@dataclass(frozen=True)
class TaskAdapter:
    """How one task's data and answers look.

    ``style="gsm8k"``: solutions end with ``#### N``; a raw ``answer`` holding a worked solution is
    split into ``solution`` and the number after its last ``####``; GSM8K calculator annotations
    ``<<...>>`` are removed from solutions (as the paper's data conversion does).
    ``style="math"``: ``problem``/``question``, ``solution`` and ``answer`` (or ``final_answer``, or
    the last ``\\boxed{}`` of the solution); the gold completion is ``{solution} The answer is: {answer}``.
    """

    name: str
    answer_key: str
    pairs_per_question: int
    style: str = "gsm8k"  # "gsm8k" | "math" | "olympic"
    question_fields: tuple[str, ...] = ("question", "problem", "Question")

    def keep(self, raw: dict) -> bool:
        """Whether a raw record belongs to the task's data (OlympicArena: English, not CODE/OT answers)."""
        if self.style != "olympic":
            return True
        return raw.get("language", "EN") == "EN" and raw.get("answer_type") not in ("CODE", "OT")

    def prompt(self, rec: dict, demos=None) -> str:
        """The prompt of a canonical record: zero-shot, or few-shot with ``demos`` (docs/method.md)."""
        if self.style == "olympic":  # the demonstrations, then the record's own instruction prompt
            return "\n\n".join([*(demo_text(d) for d in (demos or [])), rec["prompt"]])
        return few_shot_prompt(rec["question"], demos) if demos else zero_shot_prompt(rec["question"])

    def to_record(self, raw: dict, index: int, where: str = "") -> dict:
        """Canonical ``{id, question, solution, answer}`` (other raw fields kept) from a raw record."""
        where = where or f"{self.name} record {index + 1}"
        if not isinstance(raw, dict):
            raise UserError(f"{where}: expected an object, got {type(raw).__name__}")
        q = next((raw[f] for f in self.question_fields if f in raw and raw[f] is not None), None)
        if q is None:
            raise UserError(f"{where}: record has none of the question fields {list(self.question_fields)}")
        if self.style == "gsm8k":
            solution, answer = self._gsm8k_fields(raw, where)
        elif self.style == "olympic":
            solution, answer = self._olympic_fields(raw, where)
        else:
            solution, answer = self._math_fields(raw, where)
        rid = raw.get("id")
        if rid is None:
            rid = f"{self.name}_{index}"
        elif isinstance(rid, bytes):
            rid = rid.decode("utf-8")
        rec = {"id": rid, "question": _text(q), "solution": solution, "answer": answer}
        if self.style == "olympic":
            rec["prompt"] = olympic_prompt(raw, _text(q))
        for k, v in raw.items():  # keep extra fields (subject, level, ...)
            if k not in rec and k not in self.question_fields and k != "final_answer":
                rec[k] = v
        return rec

    def _gsm8k_fields(self, raw: dict, where: str) -> tuple[str, str]:
        sol = raw.get("solution")
        ans = raw.get("answer")
        if sol is None and ans is None:
            raise UserError(f"{where}: GSM8K record needs `answer` (worked solution) or `solution`")
        if sol is None:  # GSM8K's own shape: `answer` is the worked solution ending in `#### N`
            sol = _text(ans)
            ans = None
        sol = _CALC_RE.sub("", _text(sol))
        if ans is None or "####" in _text(ans):
            src = sol if ans is None else _text(ans)
            if "####" not in src:
                raise UserError(f"{where}: GSM8K solution has no `#### N` final answer")
            ans = src.split("####")[-1].strip()
        return sol, _text(ans).strip()

    def _math_fields(self, raw: dict, where: str) -> tuple[str, str]:
        sol = _text(raw.get("solution") or "")
        ans = raw.get("answer")
        if ans is None:
            ans = raw.get("final_answer")
        if ans is None:
            ans = last_boxed(sol)
        if ans is None:
            raise UserError(f"{where}: record needs `answer`, `final_answer` or a `\\boxed{{}}` solution")
        return sol, _text(ans).strip()

    def _olympic_fields(self, raw: dict, where: str) -> tuple[str, Any]:
        ans = raw.get("answer")
        if isinstance(ans, str):
            ans = [ans]
        if ans is not None and not (isinstance(ans, list) and all(isinstance(a, str) for a in ans)):
            raise UserError(f"{where}: OlympicArena `answer` must be a list of strings (or absent)")
        return _text(raw.get("solution") or ""), (ans or None)  # the test split has no released answers

    def gold_completion(self, rec: dict) -> str:
        """The completion used for gold SFT (weak model on ``train_1``; strong ceiling)."""
        if self.style == "gsm8k":
            sol = rec["solution"].rstrip()
            return sol if f"{self.answer_key} " in sol else f"{sol}\n{self.answer_key} {rec['answer']}"
        if self.style == "olympic":
            if not rec.get("answer"):
                raise UserError(f"record {rec['id']!r} has no answer to write a gold completion with")
            return f"{rec['solution']}\n\nThe final answer is $\\boxed{{{', '.join(rec['answer'])}}}$"
        return f"{rec['solution']} {self.answer_key} {rec['answer']}"


def olympic_prompt(raw: dict, problem: str) -> str:
    """OlympicArena's zero-shot prompt as the paper builds it: the data set's own instruction prompt with
    ``\n\nproblem:\n`` replaced by ``\n\nQuestion: `` and ``\n\nAnswer:`` appended (the problem
    alone, as ``Question: ...``, when the record has no instruction prompt)."""
    p = raw.get("prompt")
    if not p:
        return f"Question: {problem}\n\nAnswer:"
    return str(p).replace("\n\nproblem:\n", "\n\nQuestion: ") + "\n\nAnswer:"


TASKS: dict[str, TaskAdapter] = {}


def register_task(adapter: TaskAdapter, overwrite: bool = False) -> TaskAdapter:
    """Add a task adapter to :data:`TASKS` (error if the name exists and not ``overwrite``)."""
    if adapter.name in TASKS and not overwrite:
        raise ValueError(f"task `{adapter.name}` is already registered")
    if adapter.style not in ("gsm8k", "math", "olympic"):
        raise ValueError(f"task style must be 'gsm8k', 'math' or 'olympic', got {adapter.style!r}")
    TASKS[adapter.name] = adapter
    return adapter


register_task(TaskAdapter("gsm8k", "####", 1, "gsm8k"))
register_task(TaskAdapter("math", "The answer is:", 3, "math"))
# OlympicArena answers end "The final answer is $\\boxed{...}$" and are matched with OlympicArena's own
# rules (w2s_jax.method.olympiad_grading); the answer key marks a finished answer (demonstration choice)
register_task(TaskAdapter("olympicarena", "The final answer is", 3, "olympic", ("problem", "question")))


def get_task(task: str | TaskAdapter) -> TaskAdapter:
    if isinstance(task, TaskAdapter):
        return task
    try:
        return TASKS[task]
    except KeyError:
        close = difflib.get_close_matches(str(task), TASKS, n=1)
        hint = f" (did you mean `{close[0]}`?)" if close else ""
        raise UserError(f"unknown task `{task}`{hint}; known: {', '.join(sorted(TASKS))}") from None


def to_records(task: str | TaskAdapter, raws: Sequence[dict], where: str = "") -> list[dict]:
    """Canonical records of ``raws`` (ids: the raw ``id`` when present, else ``{task}_{index}``)."""
    t = get_task(task)
    recs = [t.to_record(r, i, f"{where}:{i + 1}" if where else "") for i, r in enumerate(raws) if t.keep(r)]
    check_unique_ids(recs, where or t.name)
    return recs


def load_local(path: str | Path, task: str | TaskAdapter) -> list[dict]:
    """Canonical records from a local ``.jsonl`` / ``.json`` file of any supported raw shape."""
    return to_records(task, read_jsonl(path), str(path))


def load_hf(
    task: str | TaskAdapter,
    name_or_path: str,
    config: str | None = None,
    split: str = "train",
) -> list[dict]:
    """Canonical records via Hugging Face ``datasets``.

    A local file (``.json``/``.jsonl``) is read with the ``json`` builder (no network); anything else
    is a hub name (``openai/gsm8k`` with config ``main``, ...), which needs network or a local cache.
    """
    try:
        import datasets
    except ImportError:  # pragma: no cover - datasets is a runtime dependency
        raise UserError("the `hf` source needs the `datasets` package (pip install datasets)") from None
    p = Path(name_or_path)
    if get_task(task).style == "olympic" and not p.exists() and config is None:
        return load_olympicarena(task, name_or_path, split)
    try:
        if p.exists():
            files = [str(f) for f in sorted(p.glob("*.json*"))] if p.is_dir() else str(p)
            ds = datasets.load_dataset("json", data_files=files, split="train")
        else:
            ds = datasets.load_dataset(name_or_path, config, split=split)
    except Exception as e:  # noqa: BLE001 - datasets raises many types; surface them as user errors
        raise UserError(f"datasets could not load `{name_or_path}` (config {config}, split {split}): {e}") from e
    return to_records(task, [dict(r) for r in ds], f"{name_or_path}[{split}]")


OLYMPIC_SUBJECTS = ("Math", "Physics", "Chemistry", "Biology", "Geography", "Astronomy")


def load_olympicarena(task: str | TaskAdapter, name: str = "GAIR/OlympicArena", split: str = "val") -> list[dict]:
    """OlympicArena through ``datasets``: every subject but CS (its configs), English only, no CODE/OT
    answers, concatenated in subject order. The paper uses the ``test`` split as train_2 and ``val`` as
    the test set (only ``val`` has released answers)."""
    try:
        import datasets
    except ImportError:  # pragma: no cover
        raise UserError("the `hf` source needs the `datasets` package (pip install datasets)") from None
    rows: list[dict] = []
    for subject in OLYMPIC_SUBJECTS:
        try:
            ds = datasets.load_dataset(name, subject, split=split)
        except Exception as e:  # noqa: BLE001
            raise UserError(f"datasets could not load `{name}` subject {subject} split {split}: {e}") from e
        rows += [dict(r) for r in ds]
    return to_records(task, rows, f"{name}[{split}]")


def load_tfds(task: str | TaskAdapter, split: str = "train", name: str = "gsm8k") -> list[dict]:
    """Canonical records from tensorflow-datasets (``gsm8k``; install the ``tfds`` extra)."""
    try:
        import tensorflow_datasets as tfds  # type: ignore[import-not-found]
    except ImportError:
        raise UserError(
            "the `tfds` source needs tensorflow-datasets: pip install 'w2s-jax[tfds]' "
            "(or use --source local/hf/synthetic)"
        ) from None
    try:
        ds = tfds.load(name, split=split)
        rows = [{k: _text(v) for k, v in ex.items()} for ex in tfds.as_numpy(ds)]
    except Exception as e:  # noqa: BLE001
        raise UserError(f"tensorflow-datasets could not load `{name}` split `{split}`: {e}") from e
    return to_records(task, rows, f"tfds:{name}[{split}]")


def split_train(records: Sequence[dict], n_train_1: int, n_train_2: int, seed: int) -> tuple[list[dict], list[dict]]:
    """The paper's split of a full train set: ``perm = numpy.random.default_rng(seed).permutation(n)``;
    ``train_1`` = records at ``perm[:n_train_1]``, ``train_2`` = at ``perm[n_train_1:n_train_1+n_train_2]``,
    each kept in file order (as the paper's released splits are)."""
    import numpy as np

    n = len(records)
    if n_train_1 < 0 or n_train_2 < 0:
        raise UserError(f"split sizes must be >= 0 (got {n_train_1}, {n_train_2})")
    if n_train_1 + n_train_2 > n:
        raise UserError(f"cannot split {n} records into train_1={n_train_1} + train_2={n_train_2}")
    perm = np.random.default_rng(seed).permutation(n)
    i1 = sorted(int(i) for i in perm[:n_train_1])
    i2 = sorted(int(i) for i in perm[n_train_1 : n_train_1 + n_train_2])
    return [records[i] for i in i1], [records[i] for i in i2]
