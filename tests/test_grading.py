import json
import math
import time

import pytest

from w2s_jax.method.grading import (
    extract_answer,
    extract_pred,
    gold_answer,
    grade_records,
    is_equiv,
    normalize,
    pass_at_k,
)

WEAK = "data/weak_outputs/gsm8k_train_2/llama2_7b.jsonl"

# Records of the shared weak outputs whose official `pred`/`result` this grader does not reproduce,
# with the reason. Empty: all 7,000 agree (checked below); a new entry must say why.
EXPLAINED_MISMATCHES: dict[int, str] = {}


def _load(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


_CACHE: dict = {}


@pytest.fixture
def weak_outputs(shared_dir):
    if "weak" not in _CACHE:
        _CACHE["weak"] = _load(shared_dir / WEAK)
    return _CACHE["weak"]


def test_reproduces_official_pred_and_result(weak_outputs):
    assert len(weak_outputs) == 7000
    graded = grade_records(weak_outputs, "gsm8k")  # default mode: paper
    mismatches = {
        o["id"]: (o["pred"], g["pred"], o["result"], g["result"])
        for o, g in zip(weak_outputs, graded)
        if (o["pred"], o["result"]) != (g["pred"], g["result"])
    }
    agreement = 1 - len(mismatches) / len(weak_outputs)
    assert agreement >= 0.995, f"agreement {agreement:.4f}; mismatches: {list(mismatches.items())[:20]}"
    unexplained = {k: v for k, v in mismatches.items() if k not in EXPLAINED_MISMATCHES}
    assert unexplained == {}, f"unexplained mismatches (id: official pred, ours, official result, ours): {unexplained}"
    # the official labels: 2,896 right, 94 without any answer
    assert sum(g["result"] for g in graded) == 2896
    assert sum(g["pred"] == "" for g in graded) == 94


def test_gsm8k_gold_from_worked_solution(shared_dir, weak_outputs):
    """The official gold of each weak output equals normalize(number after #### of train_2's solution)."""
    by_prompt = {f"Question: {r['question']}\nAnswer:": r for r in _load(shared_dir / "data/gsm8k/train_2.jsonl")}
    bad = []
    for o in weak_outputs:
        raw = by_prompt[o["prompt"]]
        if normalize(gold_answer({"answer": raw["answer"]}, "gsm8k")) != o["gold"]:
            bad.append(o["id"])
    assert bad == []


def test_symbolic_mode_differs_only_on_trailing_zero_decimals(weak_outputs):
    """docs/method.md: symbolic comparison would call 13 of the 7,000 records right that the release calls
    wrong, all of them `0.50` vs `0.5`-style decimals."""
    wrong = [o for o in weak_outputs if not o["result"] and o["pred"] != ""]

    def same_number(a, b):
        try:
            return float(a) == float(b)
        except ValueError:
            return False

    decimals = [o for o in wrong if same_number(o["pred"], o["gold"])]
    assert len(decimals) == 13
    assert all(o["pred"] != o["gold"] and ("." in o["pred"] or "." in o["gold"]) for o in decimals)
    others = wrong[::40][:60]
    graded = grade_records(decimals + others, "gsm8k", mode="symbolic")
    assert [g["result"] for g in graded[: len(decimals)]] == [True] * 13
    assert [g["result"] for g in graded[len(decimals) :]] == [False] * len(others)


@pytest.mark.parametrize(
    "response, task, raw, pred",
    [
        ("He has 3 + 4 = 7 apples.\n#### 7", "gsm8k", "7", "7"),
        ("#### 7\nso the end", "gsm8k", "", ""),  # the key counts only on the last line
        ("a\n#### 3 #### 4", "gsm8k", "3 #### 4", "3####4"),  # one match from the first key
        ("x\nThe answer is 1,234.5.", "gsm8k", "1234.5", "1234.5"),  # fallback: commas out, number
        ("The answer is 42.", "gsm8k", "42", "42"),  # fallback: trailing period dropped
        ("The answer is forty", "gsm8k", "", ""),
        ("#### 7</s>", "gsm8k", "7", "7"),
        ("5 + 2 = 7\n#### 7\n\nQuestion: next one\n#### 9", "gsm8k", "7", "7"),  # cut at Question
        ("#### $1,000", "gsm8k", "$1,000", "1000"),
        ("#### 12.00", "gsm8k", "12.00", "12"),
        ("#### 25%", "gsm8k", "25%", "25"),
        ("so $x=2$. The answer is: $\\boxed{5}$", "math", "$\\boxed{5}$", "5"),
        ("The answer is: \\frac12\n", "math", "\\frac12", "\\frac{1}{2}"),
        ("The answer is: x = 5", "math", "x = 5", "5"),  # (OlympicArena: tests/test_olympiad_grading.py)
        ("#### 5", "math", "", ""),  # wrong key for the task, no fallback phrase
    ],
)
def test_extraction(response, task, raw, pred):
    assert extract_answer(response, task) == raw
    assert extract_pred(response, task) == pred


# (a, b, equal under `paper`, equal under `symbolic`); each checked in both orders.
MATH_CASES = [
    ("\\frac12", "\\frac{1}{2}", True, True),  # shorthand \fracab expanded
    ("\\dfrac{1}{2}", "\\frac{1}{2}", False, True),  # no \dfrac rule in the normalization
    ("0.5", "\\frac{1}{2}", False, True),
    ("1.5", "\\frac{3}{2}", False, True),
    ("3", "3.0", True, True),  # trailing .0 after digits dropped
    ("-3", "-3.0", False, True),  # ... but only when all digits: not for negatives
    ("-\\frac{1}{2}", "-0.5", False, True),
    ("-7", "7", False, False),
    ("\\left( 3, \\frac{\\pi}{2} \\right)", "\\left( 3, \\frac{\\pi}{2} \\right)", True, True),
    ("\\left( 3, \\frac{\\pi}{2} \\right)", "(3,\\frac{\\pi}{2})", False, False),  # `\left` loses `ft`
    ("(-\\infty, 3]", "(-\\infty,3]", True, True),  # `\infty` also loses `ft`, on both sides
    ("[1, 2)", "[1,2)", True, True),  # intervals: spaces removed
    ("(1,2)", "[1,2]", False, False),
    ("5 \\text{ cm}", "5", True, True),  # units removed
    ("\\$18.00", "18", True, True),
    ("\\$1,000", "1000", True, True),
    ("10\\%", "10", True, True),
    ("90^\\circ", "90", True, True),  # degrees
    ("90 degrees", "90", True, True),
    ("x=5", "5", True, True),  # text after the last `=`
    ("x = -5", "-5", True, True),
    ("\\boxed{7}", "7", True, True),
    ("\\text{(B)}", "(B)", True, True),
    ("A", "a", True, True),  # a single letter a-g lower-cased
    ("\\sqrt2", "\\sqrt{2}", True, True),
    ("x^2+1", "1+x^2", False, True),
    ("2", "3", False, False),
]


@pytest.mark.parametrize("a, b, paper, symbolic", MATH_CASES)
def test_math_equivalence_table(a, b, paper, symbolic):
    na, nb = normalize(a), normalize(b)
    assert is_equiv(na, nb, mode="paper") is paper
    assert is_equiv(nb, na, mode="paper") is paper
    assert is_equiv(na, nb, mode="symbolic") is symbolic
    assert is_equiv(nb, na, mode="symbolic") is symbolic


@pytest.mark.parametrize(
    "raw, norm",
    [
        ("an apple", "apple"),
        ("banana split", "banansplit"),  # plain substring deletion of `a `
        ("5 feet", "5"),
        ("\\text{m}", ""),
        ("\\mbox{cats}", "cats"),
        ("x,y,\\text{and}z", "x,y,z"),
        ("1,2,\\text{and}3", "123"),  # then all digits: commas dropped
        ("$5$ and $6$", "5"),  # the first $...$ span
        ("\\overline{12}", "12"),
        ("\\textbf{C}", "c"),
        ("2\\sqrt3", "2\\sqrt{3}"),
        ("1{,}000", "1000"),
        ("12\\text{.}", "12"),
        ("5^{\\circ}", "5"),
    ],
)
def test_normalize(raw, norm):
    assert normalize(raw) == norm


def test_empty_prediction():
    assert not is_equiv("", "5")
    assert not is_equiv("", "5", mode="symbolic")
    assert is_equiv("", "")


def test_symbolic_time_bound():
    t = time.monotonic()
    assert is_equiv("1", "(x+1)^{300}-x", mode="symbolic", timeout=0.2) is False
    assert time.monotonic() - t < 5
    # the worker is restarted for the next item
    assert is_equiv("0.25", "\\frac{1}{4}", mode="symbolic", timeout=30) is True


def test_grade_records_gold_sources():
    recs = [
        {"id": 1, "response": "#### 18", "answer": "She makes 9 * 2 = $18\n#### 18"},
        {"id": 2, "response": "#### 5", "gold": "6"},
        {"id": 3, "response": "no answer", "answer": "#### 1,000"},
    ]
    out = grade_records(recs, "gsm8k")
    assert [(r["pred"], r["result"]) for r in out] == [("18", True), ("5", False), ("", False)]
    assert "pred" not in recs[0]  # inputs are not modified


def test_pass_at_k():
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)
    assert pass_at_k(10, 3, 2) == pytest.approx(1 - 21 / 45)
    assert pass_at_k(10, 0, 5) == 0.0
    assert pass_at_k(10, 8, 3) == 1.0
    assert pass_at_k(5, 2, 5) == 1.0
    assert pass_at_k(100, 1, 10) == pytest.approx(1 - math.comb(99, 10) / math.comb(100, 10))
    with pytest.raises(ValueError):
        pass_at_k(5, 6, 1)
