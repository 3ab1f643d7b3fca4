"""Answer extraction, normalization and grading, as the paper's released grader does them.

Everything here follows ``docs/method.md`` ("Answer extraction and grading") step by step:

1. cut the response at the first ``Question`` and strip it;
2. the prediction is the last match of ``KEY (.*)$`` (no multiline flag: only a key on the last line
   counts), where KEY is ``####`` (GSM8K) or ``The answer is:`` (MATH, OlympicArena);
3. if there is none: the last match of ``The answer is (.*)$``, commas dropped, its first number
   ``-?\\d+\\.?\\d*`` without a trailing period; else the prediction is empty;
4. a ``</s>`` in the prediction removes its last four characters (the official code does
   ``pred[:-4]`` whenever ``"</s>"`` occurs; it is always trailing in practice);
5. prediction and gold are normalized by :func:`normalize` (Minerva's normalization with the
   release's additions) and compared.

Two comparison modes:

``paper`` (the DEFAULT)
    exact string equality of the normalized strings. The official code *intends* a sympy comparison,
    but in the authors' environment ``parse_latex`` never succeeded (its bare ``except`` then falls
    back to string equality; a missing or mismatched ANTLR runtime does exactly that): all 14,000
    released GSM8K weak outputs are labelled as string equality (``0.50`` vs ``0.5`` is wrong there;
    13 of the 7,000 Llama-2-7B outputs would flip under ``symbolic``). This mode reproduces the
    released ``pred``/``result`` labels (7,000 of 7,000), i.e. how the paper's figures were graded.
``symbolic``
    the intended path: if the normalized strings are equal the answer is right (a shortcut the
    official code lacks: it would call an identical ``x<5`` wrong because relations cannot be
    subtracted); otherwise parse both with ``sympy.parsing.latex.parse_latex``; if either fails to
    parse, string equality (so: wrong); else ``sympy.simplify(gold - pred) == 0``, any exception
    wrong. Each comparison runs in a persistent worker process with a wall-clock bound per item
    (default 5 s); on timeout the worker is killed and restarted and the item is wrong.

An empty prediction is wrong unless the gold also normalizes to empty.
"""

from __future__ import annotations

import atexit
import json
import os
import re
import select
import subprocess
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from w2s_jax.core.errors import UserError
from w2s_jax.method.olympiad_grading import encode_gold, equivalent
from w2s_jax.method.olympiad_grading import extract_pred as olympic_pred
from w2s_jax.method.olympiad_grading import grade as olympic_grade
from w2s_jax.method.tasks import get_task

__all__ = [
    "MODES",
    "extract_answer",
    "normalize",
    "extract_pred",
    "gold_answer",
    "equivalence",
    "is_equiv",
    "grade_one",
    "grade_records",
    "pass_at_k",
]

MODES = ("paper", "symbolic")
DEFAULT_TIMEOUT = 5.0

# --- normalization tables (docs/method.md, step 4; order matters) ----------------------------------
SUBSTITUTIONS: tuple[tuple[str, str], ...] = (
    ("an ", ""),
    ("a ", ""),
    (".$", "$"),
    ("\\$", ""),
    ("\\ ", ""),
    ("\\%", "%"),
    (" ", ""),
    ("mbox", "text"),
    (",\\text{and}", ","),
    ("\\text{and}", ","),
    ("\\text{m}", "\\text{}"),
)
REMOVED_EXPRESSIONS: tuple[str, ...] = (
    "square",
    "ways",
    "integers",
    "dollars",
    "mph",
    "inches",
    "ft",
    "hours",
    "km",
    "units",
    "\\ldots",
    "sue",
    "points",
    "feet",
    "minutes",
    "digits",
    "cents",
    "degrees",
    "cm",
    "gm",
    "pounds",
    "meters",
    "meals",
    "edges",
    "students",
    "childrentickets",
    "multiples",
    "\\text{s}",
    "\\text{.}",
    "\\text{\ns}",  # a real newline, as in the reference list
    "\\text{}^2",
    "\\text{}^3",
    "\\text{\n}",
    "\\text{}",
    "\\mathrm{th}",
    "^\\circ",
    "^{\\circ}",
    "\\;",
    ",\\!",
    "{,}",
    '"',
    "\\dots",
)

_FALLBACK_RE = re.compile(r"The answer is (.*)$")
_NUMBER_RE = re.compile(r"-?\d+\.?\d*")
_DOLLAR_SPAN_RE = re.compile(r"(.*?)(\$)(.*?)(\$)(.*)")
_TEXT_RE = re.compile(r"(\\text\{)(.*?)(\})")
_TEXTBF_RE = re.compile(r"(\\textbf\{)(.*?)(\})")
_OVERLINE_RE = re.compile(r"(\\overline\{)(.*?)(\})")
_BOXED_RE = re.compile(r"(\\boxed\{)(.*)(\})")
_FRAC_RE = re.compile(r"(frac)([^{])(.)")
_SQRT_RE = re.compile(r"(sqrt)([^{])")
_KEY_RE_CACHE: dict[str, re.Pattern] = {}


def _answer_key(task: Any) -> str:
    return get_task(task).answer_key


def _key_re(key: str) -> re.Pattern:
    pat = _KEY_RE_CACHE.get(key)
    if pat is None:
        pat = _KEY_RE_CACHE[key] = re.compile(re.escape(key) + r" (.*)$")
    return pat


def _fallback_number(text: str) -> str:
    matches = _FALLBACK_RE.findall(text)
    pred = matches[-1] if matches else ""
    pred = pred.replace(",", "")
    nums = _NUMBER_RE.findall(pred)
    if not nums:
        return ""
    pred = nums[0]
    if pred.endswith("."):
        pred = pred[:-1]
    return pred


def extract_answer(response: str, task: Any) -> str:
    """The raw (not yet normalized) prediction of ``response`` for ``task`` (steps 1-4), "" if none."""
    text = response
    if "Question" in text:
        text = text.split("Question")[0]
    text = text.strip()
    matches = _key_re(_answer_key(task)).findall(text)
    pred = matches[-1] if matches else ""
    if pred == "":
        pred = _fallback_number(text)
    if "</s>" in pred:
        pred = pred[:-4]
    return pred


def normalize(ans: str) -> str:
    """Normalize a final answer (docs/method.md step 4; Minerva's normalization plus the release's additions)."""
    s = str(ans).split("=")[-1]
    for before, after in SUBSTITUTIONS:
        s = s.replace(before, after)
    for expr in REMOVED_EXPRESSIONS:
        s = s.replace(expr, "")
    s = _DOLLAR_SPAN_RE.sub("$\\3$", s)
    s = _TEXT_RE.sub("\\2", s)
    s = _TEXTBF_RE.sub("\\2", s)
    s = _OVERLINE_RE.sub("\\2", s)
    s = _BOXED_RE.sub("\\2", s)
    s = _FRAC_RE.sub("frac{\\2}{\\3}", s)
    s = _SQRT_RE.sub("sqrt{\\2}", s)
    s = s.replace("$", "")
    if s.replace(",", "").isdigit():
        s = s.replace(",", "")
    if s.endswith(".0") and s[:-2].isdigit():
        s = s[:-2]
    if s.endswith(".00") and s[:-3].isdigit():
        s = s[:-3]
    if s.endswith("%") and s[:-1].isdigit():
        s = s[:-1]
    if s.lower() in ("a", "b", "c", "d", "e", "f", "g"):
        s = s.lower()
    return s


def _olympic(task: Any) -> bool:
    return get_task(task).style == "olympic"


def extract_pred(response: str, task: Any) -> str:
    """Normalized extracted prediction ("" when none): the ``pred`` field of graded records.
    OlympicArena: the normalized first ``\\boxed{}`` (:mod:`w2s_jax.method.olympiad_grading`)."""
    if _olympic(task):
        return olympic_pred(response)
    return normalize(extract_answer(response, task))


def equivalence(task: Any):
    """How two stored predictions of ``task`` are compared by the consistency filter, the votes and
    the pairs: None = string equality (GSM8K, MATH: the paper's), else a function (OlympicArena's rules)."""
    if _olympic(task):
        return equivalent
    return None


def gold_answer(record: dict, task: Any) -> str:
    """The raw gold of a record: ``gold`` if present, else ``answer``; for a task whose answer key is
    ``####`` (GSM8K), a worked solution is reduced to the text after its last ``####``."""
    if _olympic(task) and record.get("gold") is None:  # the answer list and type sequence, as one string
        enc = encode_gold(record)
        if enc is None:
            raise KeyError("gold")
        return enc
    if "gold" in record and record["gold"] is not None:
        gold = record["gold"]
    elif "answer" in record and record["answer"] is not None:
        gold = record["answer"]
    else:
        raise KeyError("gold")
    gold = str(gold)
    t = get_task(task)
    if t.answer_key == "####" and "####" in gold:
        gold = gold.split("####")[-1].strip()
    return gold


# --- symbolic comparison in a time-bounded worker process --------------------------------------------


def _sympy_equiv(gold: str, pred: str) -> bool:
    """The official ``check_sympy_equivalence`` on normalized strings (runs inside the worker)."""
    import sympy
    from sympy.parsing.latex import parse_latex

    failed = False
    try:
        gold_expr = parse_latex(gold)
    except Exception:
        failed = True
    try:
        pred_expr = parse_latex(pred)
    except Exception:
        failed = True
    if failed:
        return gold == pred
    try:
        return bool(sympy.simplify(gold_expr - pred_expr) == 0)
    except Exception:
        return False


def _stdio_worker() -> None:  # pragma: no cover - runs in the child process
    """Child loop: one JSON ``[gold, pred]`` per stdin line -> ``true``/``false`` per stdout line."""
    warnings.filterwarnings("ignore")
    out = sys.stdout.buffer
    for line in sys.stdin.buffer:
        gold, pred = json.loads(line)
        try:
            ok = _sympy_equiv(gold, pred)
        except BaseException:  # noqa: BLE001 - anything in sympy is "wrong", never a crash
            ok = False
        out.write(b"true\n" if ok else b"false\n")
        out.flush()


class _SymbolicWorker:
    """One persistent child process (``python -c``, no fork of the caller) doing sympy comparisons;
    killed and restarted when an item runs past its time bound."""

    STARTUP_TIMEOUT = 120.0  # the first item also pays for importing sympy and the LaTeX parser

    def __init__(self) -> None:
        self._proc: subprocess.Popen | None = None
        self._buf = b""
        self._warm = False

    def _start(self) -> None:
        pkg_parent = str(Path(__file__).resolve().parents[2])
        env = dict(os.environ)
        env["PYTHONPATH"] = pkg_parent + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        self._proc = subprocess.Popen(
            [sys.executable, "-c", "from w2s_jax.method.grading import _stdio_worker; _stdio_worker()"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env=env,
        )
        self._buf = b""
        self._warm = False

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        try:
            proc.stdin.close()
            proc.wait(timeout=1)
        except (OSError, subprocess.TimeoutExpired):
            proc.kill()
            proc.wait()
        proc.stdout.close()

    def _kill(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None:
            proc.kill()
            proc.wait()
            proc.stdout.close()
            proc.stdin.close()

    def compare(self, gold: str, pred: str, timeout: float) -> bool:
        if self._proc is None or self._proc.poll() is not None:
            self._kill()
            self._start()
        proc = self._proc
        try:
            proc.stdin.write(json.dumps([gold, pred]).encode() + b"\n")
            proc.stdin.flush()
        except OSError:
            self._kill()
            return False
        deadline = time.monotonic() + (timeout if self._warm else max(timeout, self.STARTUP_TIMEOUT))
        fd = proc.stdout.fileno()
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                self._kill()  # past the time bound: wrong, and a fresh worker next time
                return False
            chunk = os.read(fd, 4096)
            if not chunk:  # the worker died on this item
                self._kill()
                return False
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        self._warm = True
        return line.strip() == b"true"


_WORKER = _SymbolicWorker()
atexit.register(_WORKER.stop)
_SYMBOLIC_CACHE: dict[tuple[str, str], bool] = {}


def is_equiv(pred: str, gold: str, mode: str = "paper", timeout: float = DEFAULT_TIMEOUT) -> bool:
    """Whether normalized ``pred`` matches normalized ``gold`` (both already normalized).

    ``paper``: string equality (reproduces the released labels). ``symbolic``: sympy equivalence,
    bounded by ``timeout`` seconds per item (a timeout counts as wrong).
    """
    if mode not in MODES:
        raise UserError(f"unknown grading mode `{mode}` (choose from {', '.join(MODES)})")
    if pred == gold:
        return True
    if mode == "paper" or pred == "":
        return False
    key = (gold, pred)
    if key not in _SYMBOLIC_CACHE:
        _SYMBOLIC_CACHE[key] = _WORKER.compare(gold, pred, timeout)
    return _SYMBOLIC_CACHE[key]


def grade_one(response: str, gold: str, task: Any, mode: str = "paper", timeout: float = DEFAULT_TIMEOUT):
    """``(pred, gold_normalized, result)`` for one response and raw gold answer (OlympicArena: the
    encoded answer list, matched by OlympicArena's rules whatever ``mode``)."""
    if _olympic(task):
        pred, result = olympic_grade(response, gold, timeout)
        return pred, gold, result
    pred = extract_pred(response, task)
    g = normalize(gold)
    return pred, g, is_equiv(pred, g, mode=mode, timeout=timeout)


def grade_records(
    records: Sequence[dict],
    task: Any,
    mode: str = "paper",
    timeout: float = DEFAULT_TIMEOUT,
    path: str = "<records>",
) -> list[dict]:
    """Copies of ``records`` with ``pred`` (normalized extracted answer, "" when none) and ``result``.

    Each record needs ``response`` and a gold (``gold`` or ``answer``; see :func:`gold_answer`).
    """
    out = []
    for i, r in enumerate(records):
        if "response" not in r:
            raise UserError(f"{path}: record {i + 1} (id {r.get('id')!r}) has no `response`")
        try:
            gold = gold_answer(r, task)
        except KeyError:
            raise UserError(
                f"{path}: record {i + 1} (id {r.get('id')!r}) has no gold answer (`gold` or `answer`)"
            ) from None
        pred, _, result = grade_one(str(r["response"]), gold, task, mode=mode, timeout=timeout)
        out.append({**r, "pred": pred, "result": bool(result)})
    return out


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k estimator (Chen et al. 2021): ``1 - C(n-c, k) / C(n, k)``."""
    if not (0 <= c <= n) or k < 1 or k > n:
        raise ValueError(f"pass_at_k needs 0 <= c <= n and 1 <= k <= n (got n={n}, c={c}, k={k})")
    if n - c < k:
        return 1.0
    prod = 1.0
    for i in range(n - c + 1, n + 1):
        prod *= 1.0 - k / i
    return 1.0 - prod


# --- CLI -----------------------------------------------------------------------------------------
