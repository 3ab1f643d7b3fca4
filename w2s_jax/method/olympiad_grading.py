"""OlympicArena answer matching, following the rules of OlympicArena's ``judge.py`` (docs/method.md).

A response is matched against the gold answer list of a record as OlympicArena's ``auto_judge`` does:

1. **Extraction**: the content of the *first* ``\\boxed{...}`` (braces matched), normalized; without a
   boxed answer (or with an empty one) the whole response stands for the prediction.
2. **Normalization** (:func:`normalize`): drop ``\\left``/``\\right``, ``$``, ``%``, ``^\\circ``; map
   full-width ``∶``/``，`` to ``:``/``,``, ``\\approx``/``\\simeq``/``\\sim`` to ``=``, ``^\\prime`` to
   ``'``; unwrap ``\\mathrm{}``/``\\mathbf{}``/``\\text{}``/``\\textbf{}``; ``\\fracab`` ->
   ``\\frac{a}{b}``, ``\\sqrta`` -> ``\\sqrt{a}``; strip spaces and ``$``.
3. **Gold**: one answer is compared as a string, several as a list.
4. **Types**. With a ``type_sequence`` (several answers) the prediction is split at top-level commas and
   matched position by position (``MPV``) or in any order (``MA``), each item with its own type's rule.
   Without one, the prediction is right when *any* of the single-answer rules accepts it, tried in
   the order ``SC, MC, TF, NV, SET, IN, EX, EQ, TUP`` -- each bounded in time (5 s; in the main
   thread), an exception counts as "no":

   - ``SC`` single choice: equal, or ``X: ...`` / ``[X: ...]`` whose letter equals the gold;
   - ``MC`` multiple choice: the comma-separated letters (or the first capital of each item) equal
     the gold list as a set, same count;
   - ``TF``: ``True``/``False`` equal;
   - ``NV`` numerical value: equal strings; or both parse as floats within ``1e-5 * 1.01``; or both
     parse as LaTeX with numeric values within that tolerance; two numbers in scientific notation
     match when the exponents agree and the mantissas are within ``0.1 * 1.01``;
   - ``SET``: same number of items, each gold item matched (``NV``) by a distinct predicted item;
   - ``IN`` interval: unions (``\\cup``) of intervals with the same open/closed ends and bounds equal
     as expressions, in any order;
   - ``EX`` expression: the right-hand sides (after ``=``) parsed as LaTeX are equal, or numerically
     equal (no symbols), or their simplified difference is below ``1e-5`` (with symbols);
   - ``EQ`` equation: ``lhs - rhs`` of both simplify to the same expression or to integer multiples;
   - ``TUP`` tuple: same length, each item ``NV``-equal in order.

The *prediction* stored with a generation record (``pred``) is the normalized boxed content, "" when
there is none: the consistency filter, the votes and the pairs group answers with :func:`equivalent`
(``auto_judge`` with one prediction as the gold), so two differently written equal answers agree.
"""

from __future__ import annotations

import json
import re
import signal
import threading
from collections.abc import Callable, Sequence
from typing import Any

__all__ = ["extract_boxed", "normalize", "split_by_comma", "auto_judge", "equivalent", "extract_pred",
           "grade", "encode_gold", "decode_gold", "SINGLE_TYPES"]

SINGLE_TYPES = ("SC", "MC", "TF", "NV", "SET", "IN", "EX", "EQ", "TUP")
TIME_LIMIT = 5.0
_LETTERS = [chr(i) for i in range(65, 91)]
_MAP = (("\\left", ""), ("\\right", ""), ("∶", ":"), ("，", ","), ("$", ""), ("\\approx", "="),
        ("\\simeq", "="), ("\\sim", "="), ("^\\prime", "'"), ("^{\\prime}", "'"), ("^\\circ", ""), ("%", ""))
_MATHRM = re.compile(r"\\(?:mathrm|mathbf)\{~?([^}]*)\}")
_TEXT = re.compile(r"(\\text\{)(.*?)(\})")
_TEXTBF = re.compile(r"(\\textbf\{)(.*?)(\})")
_FRAC = re.compile(r"(frac)([^{])(.)")
_SQRT = re.compile(r"(sqrt)([^{])")


def normalize(ans: str) -> str:
    s = str(ans)
    for a, b in _MAP:
        s = s.replace(a, b)
    s = _MATHRM.sub(r"\1", s)
    s = _TEXT.sub(r"\2", s)
    s = _TEXTBF.sub(r"\2", s)
    s = _FRAC.sub(r"frac{\2}{\3}", s)
    s = _SQRT.sub(r"sqrt{\2}", s)
    return s.strip().strip("$").strip()


def _first_boxed(text: str) -> str | None:
    m = re.search(r"\\boxed{", text)
    if not m:
        return None
    i, depth = m.end(), 1
    j = i
    while depth > 0 and j < len(text):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
        j += 1
    if depth != 0:
        return None
    return text[i : j - 1]


def extract_boxed(text: str) -> str:
    """The normalized content of the first ``\\boxed{}``; the text itself when there is none (or it is empty)."""
    content = _first_boxed(text)
    if not content:
        return text
    return normalize(content)


def extract_pred(response: str) -> str:
    """The stored prediction: normalized first boxed content, "" when there is none."""
    content = _first_boxed(response)
    return normalize(content) if content else ""


def split_by_comma(expr: str) -> list[str]:
    """Split at commas outside ``()``/``[]``; items stripped of spaces and ``$``."""
    depth, out, start = 0, [], 0
    for i, c in enumerate(expr):
        if c in "([":
            depth += 1
        elif c in ")]":
            depth -= 1
        elif c == "," and depth == 0:
            out.append(expr[start:i].strip())
            start = i + 1
    if start < len(expr):
        out.append(expr[start:].strip())
    return [x.strip("$").strip() for x in out]


def _latex(s: str):
    from sympy.parsing.latex import parse_latex

    return parse_latex(s)


def _single_choice(pred: str, gold: str) -> bool:
    if pred == gold:
        return True
    if pred.startswith("[") and pred.endswith("]"):
        pred = pred.strip("[]")
    if pred[0] in _LETTERS and len(pred) > 1 and pred[1] == ":":
        return pred[0] == gold
    return False


def _multi_choice(pred: str, gold) -> bool:
    if pred.startswith("[") and pred.endswith("]"):
        pred = pred.strip("[]")
    items = split_by_comma(pred)
    if len(items) != len(gold):
        return False
    if all(x in _LETTERS for x in items):
        return set(items) == set(gold)
    letters = [next(c for c in x if c in _LETTERS) for x in items if any(c in _LETTERS for c in x)]
    return set(letters) == set(gold)


def _true_false(pred: str, gold: str) -> bool:
    if gold not in ("True", "False"):
        raise ValueError("TF gold must be True or False")
    return pred in ("True", "False") and pred == gold


def _is_sci(expr) -> bool:
    from sympy import Mul, Pow

    return isinstance(expr, Mul) and isinstance(expr.args[1], Pow) and expr.args[1].args[0] == 10


def _sci_latex(x: float) -> str:
    base, exp = f"{x:.2e}".split("e")
    return f"{base}\\times 10^{{{int(exp)}}}"


def _numerical(pred, gold) -> bool:
    from sympy import N

    if pred == gold:
        return True
    try:
        if abs(float(pred) - float(gold)) <= 1e-5 * 1.01:
            return True
    except Exception:  # noqa: BLE001 - not plain numbers
        pass
    try:
        ep, eg = _latex(pred), _latex(gold)
        if abs(N(ep) - N(eg)) <= 1e-5 * 1.01:
            return True
        if _is_sci(ep) != _is_sci(eg):
            if _is_sci(ep):
                eg = _latex(_sci_latex(float(gold)))
            else:
                ep = _latex(_sci_latex(float(pred)))
        if _is_sci(ep) and _is_sci(eg):
            bp, xp = N(ep.args[0]), N(ep.args[1].args[1])
            bg, xg = N(eg.args[0]), N(eg.args[1].args[1])
            if xp == xg and abs(bp - bg) <= 0.1 * 1.01:
                return True
        elif N(ep) == N(eg):
            return True
    except Exception:  # noqa: BLE001 - the official rule: anything that fails is "no"
        pass
    return False


def _set(pred: str, gold) -> bool:
    items = split_by_comma(pred)
    if not isinstance(gold, list):
        raise ValueError("SET gold must be a list")
    if len(items) != len(gold):
        return False
    for g in gold:
        hit = next((p for p in items if _numerical(p, g)), None)
        if hit is None:
            return False
        items.remove(hit)
    return True


def _interval(pred: str, gold: str) -> bool:
    def parse(s: str):
        out = []
        for part in s.split("\\cup"):
            b = part.strip()
            kind = ("open_left" if b.startswith("(") else "closed_left") + (
                "_open_right" if b.endswith(")") else "_closed_right")
            out.append((tuple(b.strip("()[]").split(",")), kind))
        return out

    a, b = parse(pred), parse(gold)
    if len(a) != len(b):
        return False
    for nums, kind in a:
        hit = None
        for other in b:
            if other[1] == kind and _expression(nums[0], other[0][0]) and _expression(nums[1], other[0][1]):
                hit = other
                break
        if hit is None:
            return False
        b.remove(hit)
    return True


def _expression(pred, gold) -> bool:
    import sympy as sp

    def rhs(e: str) -> str:
        return (e.split("=")[1] if "=" in e else e).strip()

    a, b = sp.sympify(_latex(rhs(pred))), sp.sympify(_latex(rhs(gold)))
    if a == b:
        return True
    if a.has(sp.Symbol) != b.has(sp.Symbol):
        return False
    if not a.has(sp.Symbol):
        try:
            return _numerical(a, b)
        except Exception:  # noqa: BLE001
            return False
    try:
        flag = abs(sp.simplify(a - b).evalf()) < 1e-5
        if not isinstance(flag, bool):
            return False
        return flag
    except Exception:  # noqa: BLE001
        return False


def _equation(pred: str, gold: str) -> bool:
    import sympy as sp

    def lhs_minus_rhs(e: str):
        left, right = e.split("=")
        return sp.simplify(_latex(left) - _latex(right))

    try:
        a, b = lhs_minus_rhs(pred), lhs_minus_rhs(gold)
        if sp.simplify(a - b) == 0:
            return True
        r1, r2 = sp.simplify(a / b), sp.simplify(b / a)
        return bool((r1.is_Integer and r1 != 0) or (r2.is_Integer and r2 != 0))
    except Exception:  # noqa: BLE001
        return False


def _tuple(pred: str, gold: str) -> bool:
    a, b = split_by_comma(pred.strip("()")), split_by_comma(gold.strip("()"))
    return len(a) == len(b) and all(_numerical(x, y) for x, y in zip(a, b))


_RULES: dict[str, Callable[[Any, Any], bool]] = {
    "SC": _single_choice, "MC": _multi_choice, "TF": _true_false, "NV": _numerical, "SET": _set,
    "IN": _interval, "EX": _expression, "EQ": _equation, "TUP": _tuple,
}


def _in_order(pred: str, gold: list, types: Sequence[str]) -> bool:  # MPV
    items = [normalize(x) for x in split_by_comma(pred)]
    golds = [normalize(x) for x in gold]
    if len(items) != len(golds):
        return False
    return all(_RULES[types[i]](items[i], golds[i]) for i in range(len(items)))


def _any_order(pred: str, gold: list, types: Sequence[str]) -> bool:  # MA
    items = [normalize(x) for x in split_by_comma(pred)]
    golds = [normalize(x) for x in gold]
    if len(items) != len(golds):
        return False
    used = [False] * len(items)
    for i, g in enumerate(golds):
        hit = False
        for j, p in enumerate(items):
            if used[j]:
                continue
            try:
                ok = _RULES[types[i]](p, g)
            except Exception:  # noqa: BLE001
                ok = False
            if ok:
                used[j] = hit = True
                break
        if not hit:
            return False
    return True


class _Timeout(Exception):
    pass


def _bounded(fn: Callable[[], bool], seconds: float) -> bool:
    """``fn()`` with a wall-clock bound (SIGALRM, main thread only); timeout or exception -> False."""
    use_alarm = seconds > 0 and threading.current_thread() is threading.main_thread() and hasattr(signal, "setitimer")
    if not use_alarm:
        try:
            return bool(fn())
        except Exception:  # noqa: BLE001
            return False

    def handler(signum, frame):
        raise _Timeout()

    old = signal.signal(signal.SIGALRM, handler)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        return bool(fn())
    except Exception:  # noqa: BLE001 - includes _Timeout
        return False
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def auto_judge(response: str, gold, type_sequence: Sequence[str] | None = None,
               time_limit: float = TIME_LIMIT) -> bool:
    """OlympicArena's ``auto_judge``: ``gold`` is the answer (one string) or the list of answers."""
    if isinstance(gold, list) and len(gold) == 1:
        gold = gold[0]
    pred = normalize(extract_boxed(response))
    gold = normalize(gold) if isinstance(gold, str) else gold
    if not pred:
        return False
    if type_sequence:
        return (_bounded(lambda: _in_order(pred, gold, type_sequence), time_limit)
                or _bounded(lambda: _any_order(pred, gold, type_sequence), time_limit))
    for t in SINGLE_TYPES:  # every rule in turn, each checking its own shape
        if _bounded(lambda t=t: _RULES[t](pred, gold), time_limit):
            return True
    return False


def equivalent(a: str, b: str, time_limit: float = TIME_LIMIT) -> bool:
    """Do two stored predictions agree? Equal strings, else ``auto_judge`` of ``a`` against ``b`` as gold."""
    if a == b:
        return True
    if not a or not b:
        return False
    return auto_judge("\\boxed{" + a + "}", b, None, time_limit)


def encode_gold(record: dict) -> str | None:
    """The gold of an OlympicArena record as one string (answer list and type sequence), None if absent."""
    ans = record.get("answer")
    if ans is None or ans == [] or ans == "":
        return None
    return json.dumps({"answer": ans if isinstance(ans, list) else [ans],
                       "type_sequence": record.get("type_sequence")}, ensure_ascii=False)


def decode_gold(gold: str) -> tuple[Any, list[str] | None]:
    try:
        d = json.loads(gold)
        if isinstance(d, dict) and "answer" in d:
            return d["answer"], d.get("type_sequence")
    except (json.JSONDecodeError, TypeError):
        pass
    return [gold], None


def grade(response: str, gold: str, time_limit: float = TIME_LIMIT) -> tuple[str, bool]:
    """``(pred, result)`` of a response against an encoded gold (:func:`encode_gold`)."""
    answer, types = decode_gold(gold)
    return extract_pred(response), auto_judge(response, answer, types or None, time_limit)
