"""Prompt formats of the paper (docs/method.md, "Prompts and demonstrations").

- Zero-shot: ``Question: {question}\\nAnswer:``; the completion follows after one space, so the text a
  model is trained on is ``f"{prompt} {completion}"`` (:func:`join_prompt_completion`).
- Few-shot (strong ICL): 4 demonstrations ``{prompt} {completion}`` joined by blank lines, then the
  zero-shot prompt of the question. The demonstrations are chosen without gold
  (:func:`choose_demonstrations`), or read from a plain-text template file (:func:`load_demo_file`).
- Generation stops at EOS or at :data:`STOP_STRINGS`; a saved response is cut there, stripped of
  surrounding whitespace and trailing periods (:func:`clean_response`).
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from w2s_jax.core.errors import UserError

__all__ = [
    "STOP_STRINGS",
    "N_DEMOS",
    "DEMO_SEED",
    "zero_shot_prompt",
    "join_prompt_completion",
    "few_shot_prompt",
    "DEMO_MODES",
    "choose_demonstrations",
    "load_demo_file",
    "clean_response",
]

STOP_STRINGS: tuple[str, ...] = ("Question", "Answer")
N_DEMOS = 4
DEMO_SEED = 42
# where demonstrations come from (``stage1.demos``; also ``file:PATH``): ``weak`` (the paper; no gold),
# ``correct`` (ablation: gold-correct weak outputs, reads train_2 gold), ``train_1_gold`` (train_1 gold)
DEMO_MODES = ("weak", "correct", "train_1_gold")


def zero_shot_prompt(question: str) -> str:
    """``Question: {question}\\nAnswer:``."""
    return f"Question: {question}\nAnswer:"


def join_prompt_completion(prompt: str, completion: str) -> str:
    """The training/demonstration text: prompt, one space, completion."""
    return f"{prompt} {completion}"


def _demo_pair(demo: Any) -> tuple[str, str]:
    if isinstance(demo, dict):
        prompt = demo.get("prompt")
        if prompt is None and "question" in demo:
            prompt = zero_shot_prompt(demo["question"])
        completion = demo.get("completion", demo.get("response"))
        if prompt is None or completion is None:
            raise UserError(
                f"demonstration {demo.get('id')!r} needs `prompt` (or `question`) and `completion` (or `response`)"
            )
        return str(prompt), str(completion)
    prompt, completion = demo
    return str(prompt), str(completion)


def demo_text(demo: Any) -> str:
    """One demonstration as prompt text: ``{prompt} {completion}``, or a template block verbatim."""
    if isinstance(demo, dict) and "text" in demo and "completion" not in demo and "response" not in demo:
        return str(demo["text"])  # a block of a template file, used verbatim
    return join_prompt_completion(*_demo_pair(demo))


def few_shot_prompt(question: str, demos: Sequence[Any]) -> str:
    """Demonstrations (dicts with ``prompt``/``question`` and ``completion``/``response``, dicts with a
    verbatim ``text`` block, or ``(prompt, completion)`` pairs) as ``{prompt} {completion}``, joined by
    blank lines, then the zero-shot prompt of ``question``."""
    parts = [demo_text(d) for d in demos]
    parts.append(zero_shot_prompt(question))
    return "\n\n".join(parts)


def choose_demonstrations(
    weak_records: Sequence[dict],
    k: int = N_DEMOS,
    seed: int = DEMO_SEED,
    answer_key: str = "####",
    use_gold: bool = False,
) -> list[dict]:
    """The ICL demonstrations, as the paper's release chose them: shuffle the full list of weak
    outputs (file order) with ``random.seed(seed); random.shuffle(list)`` and keep, in shuffled
    order, the first ``k`` whose ``response`` contains ``answer_key``. No gold is read, so a
    demonstration may be wrong.

    ``use_gold=True`` is the ablation ("randomly selected correct demonstrations"): the same shuffle,
    keeping the first ``k`` with ``result: true`` -- it reads gold and must be reported as such.
    Returned as ``{id, prompt, completion}`` (the weak ``response`` is the completion)."""
    for r in weak_records:
        if "prompt" not in r or "response" not in r:
            raise UserError(f"weak output {r.get('id')!r} needs `prompt` and `response` to be a demonstration")
    pool = list(weak_records)
    random.Random(seed).shuffle(pool)  # the same draws as random.seed(seed); random.shuffle(pool)
    if use_gold:
        ok = [r for r in pool if r.get("result") is True]
        what = "correct weak outputs (with `result: true`)"
    else:
        ok = [r for r in pool if answer_key in str(r["response"])]
        what = f"weak outputs whose response contains the answer key `{answer_key}`"
    if len(ok) < k:
        raise UserError(f"need {k} {what} for demonstrations, found {len(ok)}")
    return [{"id": r.get("id"), "prompt": r["prompt"], "completion": r["response"]} for r in ok[:k]]


# a demonstration starts at a paragraph beginning with `Question:` or with OlympicArena's instruction
_BLOCK_RE = re.compile(r"\n\n(?=Question:|You are participating)")


def load_demo_file(path: str | Path) -> list[dict]:
    """Demonstrations from a plain-text template (the format of the paper's released templates):
    ``Question: ... Answer: ...`` blocks separated by blank lines (OlympicArena's: its instruction
    paragraph, then ``Question: ...`` and ``Answer: ...``). A block starts at a paragraph beginning
    with ``Question:`` (or OlympicArena's ``You are participating``) and runs until the next one
    after its ``Answer:``, so answers may contain blank lines. Returns ``[{id: "file:N", text}]``;
    :func:`few_shot_prompt` joins the blocks verbatim with blank lines, which gives back the file's
    text."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"demonstration file {p} does not exist")
    text = p.read_text(encoding="utf-8").strip()
    if not text:
        raise UserError(f"demonstration file {p} is empty")
    blocks: list[str] = []
    pending = ""
    for part in _BLOCK_RE.split(text):
        cur = f"{pending}\n\n{part}" if pending else part
        if "Answer:" in cur:
            blocks.append(cur)
            pending = ""
        else:
            pending = cur
    if pending:
        blocks.append(pending)
    start = 0
    for i, b in enumerate(blocks):
        if "Question:" not in b or "Answer:" not in b:
            line = text[:start].count("\n") + 1
            raise UserError(f"{p}:{line}: demonstration {i + 1} is not a `Question: ... Answer: ...` block")
        start += len(b) + 2
    return [{"id": f"file:{i + 1}", "text": b} for i, b in enumerate(blocks)]


def clean_response(text: str, stop_strings: Sequence[str] = STOP_STRINGS) -> str:
    """A response as the paper saves it: cut at the first stop string (which is dropped, as the
    generation engine does), then stripped of surrounding whitespace and trailing periods."""
    cut = len(text)
    for s in stop_strings:
        i = text.find(s)
        if 0 <= i < cut:
            cut = i
    return text[:cut].strip().rstrip(".")
