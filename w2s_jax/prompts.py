"""Prompt formats of the paper (docs/method.md, "Prompt and answer format").

- Zero-shot: ``Question: {question}\\nAnswer:``; the completion follows after one space, so the text a
  model is trained on is ``f"{prompt} {completion}"`` (:func:`join_prompt_completion`).
- Few-shot (strong ICL): 4 demonstrations ``{prompt} {completion}`` joined by blank lines, then the
  zero-shot prompt of the question.
- Generation stops at EOS or at :data:`STOP_STRINGS`; a saved response is cut there, stripped of
  surrounding whitespace and trailing periods (:func:`clean_response`).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

from w2s_jax.errors import UserError

__all__ = [
    "STOP_STRINGS",
    "N_DEMOS",
    "DEMO_SEED",
    "zero_shot_prompt",
    "join_prompt_completion",
    "few_shot_prompt",
    "choose_demonstrations",
    "clean_response",
]

STOP_STRINGS: tuple[str, ...] = ("Question", "Answer")
N_DEMOS = 4
DEMO_SEED = 42


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


def few_shot_prompt(question: str, demos: Sequence[Any]) -> str:
    """Demonstrations (dicts with ``prompt``/``question`` and ``completion``/``response``, or
    ``(prompt, completion)`` pairs) as ``{prompt} {completion}``, joined by blank lines, then the
    zero-shot prompt of ``question``."""
    parts = [join_prompt_completion(*_demo_pair(d)) for d in demos]
    parts.append(zero_shot_prompt(question))
    return "\n\n".join(parts)


def choose_demonstrations(weak_records: Sequence[dict], k: int = N_DEMOS, seed: int = DEMO_SEED) -> list[dict]:
    """The ICL demonstrations: ``random.Random(seed).sample(correct, k)`` where ``correct`` is the
    list of weak outputs whose ``result`` is true, in file order. Returned in sample order, as
    ``{id, prompt, completion}`` (the weak ``response`` is the completion)."""
    correct = [r for r in weak_records if r.get("result") is True]
    if len(correct) < k:
        raise UserError(f"need {k} correct weak outputs (with `result: true`) for demonstrations, found {len(correct)}")
    for r in correct:
        if "prompt" not in r or "response" not in r:
            raise UserError(f"weak output {r.get('id')!r} needs `prompt` and `response` to be a demonstration")
    chosen = random.Random(seed).sample(correct, k)
    return [{"id": r.get("id"), "prompt": r["prompt"], "completion": r["response"]} for r in chosen]


def clean_response(text: str, stop_strings: Sequence[str] = STOP_STRINGS) -> str:
    """A response as the paper saves it: cut at the first stop string (which is dropped, as the
    generation engine does), then stripped of surrounding whitespace and trailing periods."""
    cut = len(text)
    for s in stop_strings:
        i = text.find(s)
        if 0 <= i < cut:
            cut = i
    return text[:cut].strip().rstrip(".")
