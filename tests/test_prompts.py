import random

import pytest

from w2s_jax.errors import UserError
from w2s_jax.prompts import (
    STOP_STRINGS,
    choose_demonstrations,
    clean_response,
    few_shot_prompt,
    join_prompt_completion,
    zero_shot_prompt,
)


def test_zero_shot_and_join():
    p = zero_shot_prompt("What is 2 + 3?")
    assert p == "Question: What is 2 + 3?\nAnswer:"
    assert join_prompt_completion(p, "2 + 3 = 5\n#### 5") == "Question: What is 2 + 3?\nAnswer: 2 + 3 = 5\n#### 5"


def test_few_shot_layout():
    demos = [
        {"prompt": "Question: A?\nAnswer:", "completion": "a\n#### 1"},
        {"question": "B?", "response": "b\n#### 2"},
        ("Question: C?\nAnswer:", "c\n#### 3"),
    ]
    assert few_shot_prompt("D?", demos) == (
        "Question: A?\nAnswer: a\n#### 1\n\n"
        "Question: B?\nAnswer: b\n#### 2\n\n"
        "Question: C?\nAnswer: c\n#### 3\n\n"
        "Question: D?\nAnswer:"
    )
    assert few_shot_prompt("D?", []) == zero_shot_prompt("D?")


def _weak(n=20):
    return [
        {"id": i, "prompt": f"Question: q{i}?\nAnswer:", "response": f"r{i}\n#### {i}", "result": i % 3 == 0}
        for i in range(n)
    ]


def test_choose_demonstrations_procedure_and_determinism():
    weak = _weak()
    demos = choose_demonstrations(weak)
    correct = [r for r in weak if r["result"]]  # ids 0, 3, ..., 18 in file order
    expected = random.Random(42).sample(correct, 4)
    assert [d["id"] for d in demos] == [r["id"] for r in expected]
    assert demos == choose_demonstrations(weak)
    assert all(d["id"] % 3 == 0 for d in demos)
    assert demos[0]["completion"] == f"r{demos[0]['id']}\n#### {demos[0]['id']}"
    assert [d["id"] for d in choose_demonstrations(weak, seed=0)] != [d["id"] for d in demos]
    with pytest.raises(UserError, match="need 4 correct"):
        choose_demonstrations(_weak(6))  # only ids 0 and 3 are correct


def test_clean_response():
    assert STOP_STRINGS == ("Question", "Answer")
    assert clean_response("  2 + 3 = 5\n#### 5.\n\nQuestion: next") == "2 + 3 = 5\n#### 5"
    assert clean_response(" x\n#### 5\nAnswer: y") == "x\n#### 5"
    assert clean_response("#### 5...  ") == "#### 5"
    assert clean_response("The answer is: 3.5") == "The answer is: 3.5"  # no stop string before it
    assert clean_response("So the answer is 4.") == "So the answer is 4"
