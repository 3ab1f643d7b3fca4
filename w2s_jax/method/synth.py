"""Offline generated GSM8K-style data for the embedded demo and tests.

Every item has the GSM8K raw shape ``{id, question, answer}`` where ``answer`` is a worked solution
ending in ``#### N`` (so it trains and grades like GSM8K; :mod:`w2s_jax.method.tasks` turns it into the
canonical record). Kinds:

``arith`` (the project's own generator, the default)
    short word problems a tiny byte-level model can learn in minutes: a starting amount and
    ``min_steps..max_steps`` operations (add, subtract, double/triple; or a first "bags of"
    multiplication) on numbers ``1..max_value``; one solution line per operation, e.g.
    ``Tom has 3 apples. He buys 4 more. How many apples does Tom have now?`` ->
    ``3 + 4 = 7\\n#### 7``. Results never go negative. Deterministic from ``seed``; questions unique.
``gsm_symbolic``
    reasoning-gym's ``gsm_symbolic`` (GSM8K-symbolic templates): its ``answer_cot`` is the worked
    solution, the final line rewritten to ``#### {answer}`` (some end in ``#### 16.0``), and the
    generator's instruction suffix dropped from the question.
``basic_arithmetic``
    reasoning-gym's ``basic_arithmetic`` expressions with a one-line solution ``{expr} = {answer}``.
"""

from __future__ import annotations

import random
from typing import Any

from w2s_jax.core.errors import UserError

__all__ = ["KINDS", "make_arith", "make_gsm_symbolic", "make_basic_arithmetic", "make_synthetic"]

KINDS = ("arith", "gsm_symbolic", "basic_arithmetic")

_NAMES = (
    ("Tom", "He"),
    ("Ann", "She"),
    ("Sam", "He"),
    ("Mia", "She"),
    ("Ben", "He"),
    ("Eva", "She"),
    ("Max", "He"),
    ("Zoe", "She"),
    ("Leo", "He"),
    ("Ivy", "She"),
)
_ITEMS = ("apples", "pens", "cards", "books", "eggs", "coins", "shells", "marbles", "cookies", "stamps")
_ADD = ("buys {b} more", "finds {b} more", "gets {b} more")
_SUB = ("gives away {b}", "loses {b}", "sells {b}")
_MUL = {2: "doubles them", 3: "triples them"}


def _arith_item(rng: random.Random, steps: int, max_value: int, ops: tuple[str, ...]) -> tuple[str, str]:
    name, pron = rng.choice(_NAMES)
    items = rng.choice(_ITEMS)
    lines: list[str] = []
    if "mul" in ops and rng.random() < 0.25:
        a, b = rng.randint(2, max(2, min(9, max_value))), rng.randint(2, max(2, min(9, max_value)))
        value = a * b
        sentences = [f"{name} has {a} bags with {b} {items} in each bag."]
        lines.append(f"{a} * {b} = {value}")
        steps -= 1
    else:
        value = rng.randint(1, max_value)
        sentences = [f"{name} has {value} {items}."]
    for _ in range(steps):
        choices = [o for o in ops if not (o == "sub" and value < 1)]
        op = rng.choice(choices)
        if op == "add":
            b = rng.randint(1, max_value)
            sentences.append(f"{pron} {rng.choice(_ADD).format(b=b)}.")
            lines.append(f"{value} + {b} = {value + b}")
            value += b
        elif op == "sub":
            b = rng.randint(1, min(value, max_value))
            sentences.append(f"{pron} {rng.choice(_SUB).format(b=b)}.")
            lines.append(f"{value} - {b} = {value - b}")
            value -= b
        else:  # mul
            k = rng.choice(sorted(_MUL))
            sentences.append(f"{pron} {_MUL[k]}.")
            lines.append(f"{value} * {k} = {value * k}")
            value *= k
    sentences.append(f"How many {items} does {name} have now?")
    lines.append(f"#### {value}")
    return " ".join(sentences), "\n".join(lines)


def make_arith(
    n: int,
    seed: int = 0,
    min_steps: int = 1,
    max_steps: int = 2,
    max_value: int = 20,
    ops: tuple[str, ...] = ("add", "sub", "mul"),
    id_prefix: str = "arith",
) -> list[dict]:
    """``n`` unique arithmetic word problems (GSM8K raw shape), deterministic from ``seed``."""
    if not 1 <= min_steps <= max_steps:
        raise UserError(f"arith: need 1 <= min_steps <= max_steps (got {min_steps}, {max_steps})")
    if max_value < 1:
        raise UserError(f"arith: max_value must be >= 1 (got {max_value})")
    bad = [o for o in ops if o not in ("add", "sub", "mul")] or ([] if ops else ["<none>"])
    if bad:
        raise UserError(f"arith: unknown ops {bad} (choose from add, sub, mul)")
    rng = random.Random(seed)
    seen: set[str] = set()
    out: list[dict] = []
    attempts = 0
    while len(out) < n:
        attempts += 1
        if attempts > 50 * n + 1000:
            raise UserError(
                f"arith: could not generate {n} distinct problems (got {len(out)}); raise max_value or max_steps"
            )
        q, sol = _arith_item(rng, rng.randint(min_steps, max_steps), max_value, tuple(ops))
        if q in seen:
            continue
        seen.add(q)
        out.append({"id": f"{id_prefix}_{len(out)}", "question": q, "answer": sol})
    return out


_RG_SUFFIX = " Give the result as your final answer. Do not include units."


def _rg_dataset(name: str, n: int, seed: int, **kw: Any):
    try:
        import reasoning_gym
    except ImportError:
        raise UserError(f"the `{name}` generator needs reasoning-gym (pip install reasoning-gym)") from None
    return reasoning_gym.create_dataset(name, size=n, seed=seed, **kw)


def make_gsm_symbolic(n: int, seed: int = 0, difficulty: float = 1.0, id_prefix: str = "gsm_symbolic"):
    """``n`` reasoning-gym ``gsm_symbolic`` items with worked solutions ending in ``#### N``."""
    out = []
    for i, x in enumerate(_rg_dataset("gsm_symbolic", n, seed, difficulty=difficulty)):
        answer = str(x["answer"]).strip()
        q = x["question"]
        if q.endswith(_RG_SUFFIX):
            q = q[: -len(_RG_SUFFIX)]
        cot = str((x.get("metadata") or {}).get("answer_cot") or "")
        body = cot.rsplit("####", 1)[0].rstrip() if cot else ""
        sol = f"{body}\n#### {answer}" if body else f"The answer is {answer}.\n#### {answer}"
        out.append({"id": f"{id_prefix}_{i}", "question": q, "answer": sol})
    return out


def make_basic_arithmetic(n: int, seed: int = 0, id_prefix: str = "basic_arithmetic", **kw: Any):
    """``n`` reasoning-gym ``basic_arithmetic`` items with a one-line worked solution."""
    out = []
    for i, x in enumerate(_rg_dataset("basic_arithmetic", n, seed, **kw)):
        answer = str(x["answer"]).strip()
        expr = (x.get("metadata") or {}).get("expression")
        sol = f"{expr} = {answer}\n#### {answer}" if expr else f"#### {answer}"
        out.append({"id": f"{id_prefix}_{i}", "question": x["question"], "answer": sol})
    return out


def make_synthetic(kind: str = "arith", n: int = 100, seed: int = 0, **kw: Any) -> list[dict]:
    """``n`` generated GSM8K-shaped items of ``kind`` (``arith`` | ``gsm_symbolic`` | ``basic_arithmetic``)."""
    if n < 0:
        raise UserError(f"synthetic: n must be >= 0 (got {n})")
    if kind == "arith":
        return make_arith(n, seed, **kw)
    if kind == "gsm_symbolic":
        return make_gsm_symbolic(n, seed, **kw)
    if kind == "basic_arithmetic":
        return make_basic_arithmetic(n, seed, **kw)
    raise UserError(f"unknown synthetic kind `{kind}` (choose from {', '.join(KINDS)})")
