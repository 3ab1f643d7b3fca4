import random

import pytest

from w2s_jax.core.errors import UserError
from w2s_jax.method.prompts import (
    STOP_STRINGS,
    choose_demonstrations,
    clean_response,
    few_shot_prompt,
    join_prompt_completion,
    load_demo_file,
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


def test_choose_demonstrations_is_gold_free_shuffle_then_first_with_key():
    weak = _weak()
    for i in (2, 5, 11):
        weak[i]["response"] = f"r{i} without a final answer line"
    ref = [dict(r) for r in weak]
    random.seed(42)  # the release's own calls, on the global generator
    random.shuffle(ref)
    expected = [r["id"] for r in ref if "####" in r["response"]][:4]
    demos = choose_demonstrations(weak)
    assert [d["id"] for d in demos] == expected
    assert demos == choose_demonstrations(weak)
    assert demos[0]["completion"] == f"r{demos[0]['id']}\n#### {demos[0]['id']}"
    # no gold is read: flipping every `result` changes nothing
    assert choose_demonstrations([{**r, "result": not r["result"]} for r in weak]) == demos
    assert [d["id"] for d in choose_demonstrations(weak, seed=0)] != [d["id"] for d in demos]
    assert [d["id"] for d in choose_demonstrations(weak, answer_key="r1")] == [
        r["id"] for r in ref if "r1" in r["response"]][:4]
    with pytest.raises(UserError, match="need 4 weak outputs whose response contains"):
        choose_demonstrations(_weak(3))


def test_choose_demonstrations_correct_ablation_reads_gold():
    weak = _weak()
    ref = list(weak)
    random.Random(42).shuffle(ref)
    demos = choose_demonstrations(weak, use_gold=True)
    assert [d["id"] for d in demos] == [r["id"] for r in ref if r["result"]][:4]
    assert all(d["id"] % 3 == 0 for d in demos)
    with pytest.raises(UserError, match="need 4 correct"):
        choose_demonstrations(_weak(6), use_gold=True)  # only ids 0 and 3 are correct


def test_choose_demonstrations_reproduces_the_released_gemma_2b_set(shared_dir):
    """The released GSM8K Gemma-2B demonstrations are the 3rd to 6th records of the seed-42 shuffle of
    train_2's weak outputs (the first two, ids 434 and 2772, gave no `####` line for Gemma-2B)."""
    from w2s_jax.core.jsonl import read_jsonl

    weak = read_jsonl(shared_dir / "data/weak_outputs/gsm8k_train_2/llama2_7b.jsonl")
    released = ("Sara sent letters to her friend in China", "Berry wants to make sure he reads",
                "Two white socks cost 25 cents more", "Sally bought three cupcakes for $6")
    gemma_like = [{**r, "response": "no final line"} if r["id"] in (434, 2772) else r for r in weak]
    demos = choose_demonstrations(gemma_like)
    assert [d["prompt"][len("Question: "):][: len(q)] for d, q in zip(demos, released)] == list(released)


def test_demo_file_blocks_and_prompt(tmp_path):
    text = ("Question: A?\nAnswer: a\n\nstill a\n#### 1\n\n"
            "Question: B?\nAnswer: b\n#### 2\n\n")
    f = tmp_path / "demos.txt"
    f.write_text(text)
    demos = load_demo_file(f)
    assert [d["id"] for d in demos] == ["file:1", "file:2"]
    assert demos[0]["text"] == "Question: A?\nAnswer: a\n\nstill a\n#### 1"
    # the template followed by the zero-shot prompt, as the release builds its few-shot prompts
    assert few_shot_prompt("C?", demos) == text + "Question: C?\nAnswer:"
    bad = tmp_path / "bad.txt"
    bad.write_text("Question: A?\nAnswer: a\n\nQuestion: no answer here\n")
    with pytest.raises(UserError, match=r"bad.txt:4: demonstration 2"):
        load_demo_file(bad)
    with pytest.raises(UserError, match="does not exist"):
        load_demo_file(tmp_path / "missing.txt")
    # OlympicArena's templates: an instruction paragraph before each `Question:`, blank lines inside
    olympic = ("You are participating in an international Math competition.\nThis is a True or False question."
               "\n\nQuestion: Q1?\n\nYou can solve it step by step.\n\nAnswer: a1\n\nThe final answer is "
               "$\\boxed{True}$\n\nYou are participating in an international Physics competition.\n\n"
               "Question: Q2?\n\nAnswer: a2. The final answer is $\\boxed{3}$\n\n")
    f2 = tmp_path / "olympic.txt"
    f2.write_text(olympic)
    demos = load_demo_file(f2)
    assert len(demos) == 2 and demos[1]["text"].startswith("You are participating in an international Physics")
    assert "\n\n".join(d["text"] for d in demos) + "\n\n" == olympic


def test_clean_response():
    assert STOP_STRINGS == ("Question", "Answer")
    assert clean_response("  2 + 3 = 5\n#### 5.\n\nQuestion: next") == "2 + 3 = 5\n#### 5"
    assert clean_response(" x\n#### 5\nAnswer: y") == "x\n#### 5"
    assert clean_response("#### 5...  ") == "#### 5"
    assert clean_response("The answer is: 3.5") == "The answer is: 3.5"  # no stop string before it
    assert clean_response("So the answer is 4.") == "So the answer is 4"
