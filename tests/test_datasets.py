import json

import pytest

from w2s_jax.core.config import load_config
from w2s_jax.core.errors import UserError
from w2s_jax.method.datasets import consistency_sets, contrastive_pairs, full_weak_sft, to_llamafactory, to_trl, vote
from w2s_jax.method.splits import DataConfig, load_splits
from w2s_jax.method.synth import make_synthetic
from w2s_jax.method.tasks import TASKS, TaskAdapter, get_task, last_boxed, load_hf, load_local, split_train

# --- samples -> votes -> pairs, every branch, expected pairs written out ------------------------


def _samples(preds_by_id: dict[str, list[str]], texts: dict | None = None) -> list[list[dict]]:
    """10 (or n) sample files; response of id q in sample j is `q s{j} -> {pred}` unless overridden."""
    texts = texts or {}
    n = len(next(iter(preds_by_id.values())))
    files = []
    for j in range(n):
        recs = []
        for q, preds in preds_by_id.items():
            resp = texts.get((q, j), f"{q} s{j} -> {preds[j]}")
            recs.append({"id": q, "prompt": f"P {q}", "response": resp, "pred": preds[j]})
        files.append(recs)
    return files


def _weak(preds: dict[str, str]) -> list[dict]:
    return [{"id": q, "prompt": f"P {q}", "response": f"weak {q} -> {p}", "pred": p} for q, p in preds.items()]


GSM8K_SAMPLES = {
    "q1": ["1", "1", "1", "1", "1", "2", "2", "2", "3", "3"],  # confidence 0.5
    "q2": ["", "", "", "", "", "", "", "4", "4", "4"],  # empty majority, confidence 0.7
    "q3": ["5"] * 10,  # weak agrees, no negative
    "q4": ["5"] * 7 + ["6", "7", "6"],  # weak agrees: rejected = one of s7, s8, s9
    "q5": ["8"] + ["9"] * 8 + ["2"],  # weak "3" disagrees, confidence 0.8: chosen = one of s1..s8
    "q6": ["4"] * 7 + ["3"] * 3,  # weak "3" disagrees, confidence 0.7 < 0.8
}
GSM8K_WEAK = {"q1": "1", "q2": "", "q3": "5", "q4": "5", "q5": "3", "q6": "3"}


def test_vote_fields_and_tie_break():
    votes = vote(_samples(GSM8K_SAMPLES))
    v = {r["id"]: r for r in votes}
    assert [r["id"] for r in votes] == list(GSM8K_SAMPLES)
    assert (v["q1"]["majority"], v["q1"]["count"], v["q1"]["n"], v["q1"]["confidence"]) == ("1", 5, 10, 0.5)
    assert (v["q2"]["majority"], v["q2"]["confidence"]) == ("", 0.7)
    assert [e["sample"] for e in v["q4"]["negatives"]] == [7, 8, 9]
    assert v["q4"]["negatives"][0] == {"sample": 7, "response": "q4 s7 -> 6", "pred": "6"}
    assert [e["sample"] for e in v["q5"]["positives"]] == list(range(1, 9))
    # ties: the prediction seen first in sample order wins
    tie = vote(_samples({"a": ["7", "8", "8", "7"], "b": ["8", "7", "7", "8"], "c": ["", "1", "", "1"]}))
    assert [(r["majority"], r["count"], r["confidence"]) for r in tie] == [("7", 2, 0.5), ("8", 2, 0.5), ("", 2, 0.5)]


def test_pairs_gsm8k_every_branch():
    votes = vote(_samples(GSM8K_SAMPLES))
    pairs, counts = contrastive_pairs("gsm8k", _weak(GSM8K_WEAK), votes)
    # random.Random(42): sample(3 negatives, 1) -> index 2 (s9); then sample(8 positives, 1) -> index 1 (s2)
    assert pairs == [
        {"id": "q4", "prompt": "P q4", "chosen": "weak q4 -> 5", "rejected": "q4 s9 -> 6", "branch": "weak_chosen"},
        {"id": "q5", "prompt": "P q5", "chosen": "q5 s2 -> 9", "rejected": "weak q5 -> 3", "branch": "weak_rejected"},
    ]
    assert {k: counts[k] for k in counts if k not in ("seed", "low", "high", "max_pairs_per_question")} == {
        "questions": 6,
        "skipped_low_confidence": 1,
        "skipped_empty_majority": 1,
        "skipped_no_negative": 1,
        "skipped_weak_disagrees_below_high": 1,
        "weak_chosen_questions": 1,
        "weak_rejected_questions": 1,
        "pairs_weak_chosen": 1,
        "pairs_weak_rejected": 1,
        "pairs": 2,
    }
    # deterministic; another seed draws differently
    assert contrastive_pairs("gsm8k", _weak(GSM8K_WEAK), votes)[0] == pairs
    other = contrastive_pairs("gsm8k", _weak(GSM8K_WEAK), votes, seed=1)[0]
    assert [p["rejected"] for p in other] != [p["rejected"] for p in pairs] or [p["chosen"] for p in other] != [
        p["chosen"] for p in pairs
    ]


def test_pairs_thresholds_are_inclusive():
    votes = vote(_samples({"a": ["1"] * 6 + ["2"] * 4, "b": ["9"] * 8 + ["3", "4"]}))
    pairs, counts = contrastive_pairs("gsm8k", _weak({"a": "1", "b": "5"}), votes)
    assert [p["branch"] for p in pairs] == ["weak_chosen", "weak_rejected"]  # 0.6 and 0.8 are in


MATH_SAMPLES = {
    "m1": ["a"] * 6 + ["b", "c", "d", "e"],  # weak agrees; 4 negatives -> 3 drawn
    "m2": ["a"] * 6 + ["b", "c", "b", "d"],  # weak agrees; s6 and s8 same text, still 4 negatives -> 3 drawn
    "m3": ["x"] * 9 + ["y"],  # weak "z" disagrees, confidence 0.9: up to 3 positives
    "m4": ["a"] * 7 + ["b", "b", "c"],  # weak agrees; 3 negatives, s7 and s8 same text: all 3, no draw
}
MATH_TEXTS = {("m2", 8): "m2 s6 -> b", ("m3", 0): "m3 s3 -> x", ("m3", 2): "m3 s1 -> x", ("m4", 8): "m4 s7 -> b"}


def test_pairs_math_exactly_as_released():
    votes = vote(_samples(MATH_SAMPLES, MATH_TEXTS))
    weak = _weak({"m1": "a", "m2": "a", "m3": "z", "m4": "a"})
    pairs, counts = contrastive_pairs("math", weak, votes)
    got = [(p["id"], p["chosen"], p["rejected"]) for p in pairs]
    # random.seed(42): m1 sample(4 negatives, 3) -> indices [0, 3, 1]; m2 sample(4 negatives, 3) ->
    # [1, 0, 2] (s8 has s6's text: not de-duplicated, so s6's text appears twice); m3 sample(9
    # positives, 1) -> s1, then in sample order every positive whose text differs from s1's: s0 and s3
    # (both with the text "m3 s3 -> x": compared with the first pick only; s2 has s1's text); m4 all 3
    # negatives (no draw; the two equal texts give two equal pairs)
    rng = __import__("random").Random(42)
    i1, i2, i3 = rng.sample(range(4), 3), rng.sample(range(4), 3), rng.sample(range(9), 1)[0]
    assert (i1, i2, i3) == ([0, 3, 1], [1, 0, 2], 1)
    assert got == [
        ("m1", "weak m1 -> a", "m1 s6 -> b"),
        ("m1", "weak m1 -> a", "m1 s9 -> e"),
        ("m1", "weak m1 -> a", "m1 s7 -> c"),
        ("m2", "weak m2 -> a", "m2 s7 -> c"),
        ("m2", "weak m2 -> a", "m2 s6 -> b"),
        ("m2", "weak m2 -> a", "m2 s6 -> b"),
        ("m3", "m3 s1 -> x", "weak m3 -> z"),
        ("m3", "m3 s3 -> x", "weak m3 -> z"),
        ("m3", "m3 s3 -> x", "weak m3 -> z"),
        ("m4", "weak m4 -> a", "m4 s7 -> b"),
        ("m4", "weak m4 -> a", "m4 s7 -> b"),
        ("m4", "weak m4 -> a", "m4 s9 -> c"),
    ]
    assert (counts["weak_chosen_questions"], counts["pairs_weak_chosen"]) == (3, 9)
    assert (counts["weak_rejected_questions"], counts["pairs_weak_rejected"]) == (1, 3)
    # OlympicArena uses the same rule; gsm8k would give one pair per question
    assert contrastive_pairs("olympicarena", weak, votes)[0] == pairs
    assert len(contrastive_pairs("gsm8k", weak, votes)[0]) == 4


def _reference_pairs_math(weak, majority_voting, confidence=0.8):
    """The release's construct_paired_data_math, re-written here from its description (docs/method.md):
    one global random.seed(42); per question in order; `pos_responses`/`neg_responses` in sample order."""
    import random

    random.seed(42)
    out = []
    for w, mv in zip(weak, majority_voting):
        if mv["confidence"] < 0.6 or mv["pos_responses"][0]["pred"] == "":
            continue
        if w["pred"] == mv["pos_responses"][0]["pred"]:
            if not mv["neg_responses"]:
                continue
            negs = random.sample(mv["neg_responses"], 3) if len(mv["neg_responses"]) > 3 else mv["neg_responses"]
            out += [(w["id"], w["response"], n["response"]) for n in negs]
        elif mv["confidence"] >= confidence:
            first = random.sample(mv["pos_responses"], 1)[0]["response"]
            out.append((w["id"], first, w["response"]))
            num = 1
            for pos in mv["pos_responses"]:
                if pos["response"] != first:
                    out.append((w["id"], pos["response"], w["response"]))
                    num += 1
                    if num >= 3:
                        break
    return out


def test_pairs_math_match_reference_on_random_inputs():
    """Several hundred random questions with few distinct answers and texts (so ties, duplicates,
    empty majorities and every branch occur): w2s and the reference give the same pair list."""
    import random
    from collections import Counter

    gen = random.Random(7)
    preds_by_id, texts, weak_preds = {}, {}, {}
    for q in range(600):
        qid = f"q{q}"
        alphabet = gen.choice(["a", "ab", "abc", "abcd", "a" + " " * 1])
        preds = [gen.choice(alphabet).strip() for _ in range(10)]
        preds_by_id[qid] = preds
        for j in range(10):
            if gen.random() < 0.4:  # a repeated text among samples of the same prediction
                texts[(qid, j)] = f"{qid} text {preds[j]} {gen.randint(0, 1)}"
        weak_preds[qid] = gen.choice(["a", "b", "c", "", "e"])
    files = _samples(preds_by_id, texts)
    weak = _weak(weak_preds)
    mv = []
    for q in preds_by_id:
        recs = [f[int(q[1:])] for f in files]
        top, cnt = Counter(r["pred"] for r in recs).most_common(1)[0]
        mv.append({"confidence": cnt / 10,
                   "pos_responses": [{"response": r["response"], "pred": r["pred"]} for r in recs if r["pred"] == top],
                   "neg_responses": [{"response": r["response"], "pred": r["pred"]} for r in recs if r["pred"] != top]})
    expected = _reference_pairs_math(weak, mv)
    pairs, counts = contrastive_pairs("math", weak, vote(files))
    assert [(p["id"], p["chosen"], p["rejected"]) for p in pairs] == expected
    assert len(expected) > 300 and counts["weak_chosen_questions"] > 20 and counts["weak_rejected_questions"] > 20
    assert any(a == b for a, b in zip(expected, expected[1:]))  # equal pairs do occur (no de-duplication)


def test_pairs_chosen_correct_counts():
    files = _samples({"a": ["1"] * 10, "b": ["2"] * 9 + ["1"]})
    for f in files:
        for r in f:
            r["result"] = r["pred"] == "2"
    weak = _weak({"a": "2", "b": "2"})
    weak[1]["result"] = True
    weak[0]["result"] = False
    _, counts = contrastive_pairs("gsm8k", weak, vote(files))
    assert (counts["chosen_with_result"], counts["chosen_correct"]) == (2, 1)


# --- Stage I sets -------------------------------------------------------------------------------


def test_full_weak_and_consistency():
    weak = _weak({"a": "1", "b": "", "c": "3", "d": "4"})
    for r, res in zip(weak, [True, False, False, True]):
        r["result"] = res
    assert full_weak_sft(weak) == [{"id": r["id"], "prompt": r["prompt"], "completion": r["response"]} for r in weak]
    strong = [
        {"id": "d", "prompt": "few-shot d", "response": "icl d", "pred": "4"},
        {"id": "c", "prompt": "few-shot c", "response": "icl c", "pred": "30"},
        {"id": "b", "prompt": "few-shot b", "response": "icl b", "pred": ""},  # both empty: not kept
        {"id": "a", "prompt": "few-shot a", "response": "icl a", "pred": "1"},
    ]
    sets, stats = consistency_sets(weak, strong)
    assert sets["weak"] == [
        {"id": "a", "prompt": "P a", "completion": "weak a -> 1", "source": "weak"},
        {"id": "d", "prompt": "P d", "completion": "weak d -> 4", "source": "weak"},
    ]
    assert sets["icl"] == [
        {"id": "a", "prompt": "P a", "completion": "icl a", "source": "icl"},
        {"id": "d", "prompt": "P d", "completion": "icl d", "source": "icl"},
    ]
    assert sets["hybrid"] == [sets["weak"][0], sets["icl"][0], sets["weak"][1], sets["icl"][1]]
    assert stats == {
        "total": 4,
        "kept": 2,
        "kept_fraction": 0.5,
        "weak_empty": 1,
        "hybrid_examples": 4,
        "kept_correct": 2,
        "kept_accuracy": 1.0,
    }


def test_tool_formats():
    sft = [{"id": 1, "prompt": "Question: q\nAnswer:", "completion": "c"}]
    assert to_llamafactory(sft) == [{"instruction": "Question: q\nAnswer:", "input": "", "output": "c"}]
    assert to_trl(sft) == [{"prompt": "Question: q\nAnswer:", "completion": " c"}]
    pref = [{"id": 1, "prompt": "p", "chosen": "a", "rejected": "b", "branch": "weak_chosen"}]
    assert to_llamafactory(pref) == [{"instruction": "p", "input": "", "chosen": "a", "rejected": "b"}]
    assert to_trl(pref) == [{"prompt": "p", "chosen": " a", "rejected": " b"}]


# --- bad input ----------------------------------------------------------------------------------


def test_bad_inputs_name_the_id():
    weak = _weak({"a": "1", "b": "2"})
    with pytest.raises(UserError, match=r"strong: no record for id 'b'"):
        consistency_sets(weak, [{"id": "a", "response": "x", "pred": "1"}])
    with pytest.raises(UserError, match=r"weak: no record for id 'z'"):
        consistency_sets(weak, [{"id": i, "response": "x", "pred": "1"} for i in ("a", "b", "z")])
    with pytest.raises(UserError, match=r"weak: duplicate id 'a'"):
        full_weak_sft(weak + [weak[0]])
    with pytest.raises(UserError, match=r"missing `pred`"):
        consistency_sets([{"id": "a", "prompt": "p", "response": "r"}], weak)
    files = _samples({"a": ["1"] * 3, "b": ["2"] * 3})
    with pytest.raises(UserError, match=r"s2\.jsonl: has 1 records but s0\.jsonl has 2"):
        vote([files[0], files[1], files[2][:1]], ["s0.jsonl", "s1.jsonl", "s2.jsonl"])
    files[2][1] = dict(files[2][1], id="c")
    with pytest.raises(UserError, match=r"s2\.jsonl: no record for id 'b'"):
        vote(files, ["s0.jsonl", "s1.jsonl", "s2.jsonl"])
    with pytest.raises(UserError, match="no records"):
        vote([[], []], ["s0.jsonl", "s1.jsonl"])
    votes = vote(_samples({"a": ["1"] * 3}))
    with pytest.raises(UserError, match=r"votes: no record for id 'b'"):
        contrastive_pairs("gsm8k", weak, votes)


# --- tasks, loaders, split, synthetic -----------------------------------------------------------


def test_task_adapters():
    gsm = get_task("gsm8k")
    assert (gsm.answer_key, gsm.pairs_per_question) == ("####", 1)
    assert (TASKS["math"].answer_key, TASKS["math"].pairs_per_question) == ("The answer is:", 3)
    assert TASKS["olympicarena"].pairs_per_question == 3
    raw = {"question": "Q?", "answer": "She has 2*3=<<2*3=6>>6 apples\n#### 6"}
    rec = gsm.to_record(raw, 5)
    assert rec == {"id": "gsm8k_5", "question": "Q?", "solution": "She has 2*3=6 apples\n#### 6", "answer": "6"}
    assert gsm.gold_completion(rec) == "She has 2*3=6 apples\n#### 6"
    shared_test_shape = {"source": "GSM8K", "question": "Q?", "solution": "x\n#### 1,000", "answer": "1,000"}
    assert gsm.to_record(shared_test_shape, 0)["answer"] == "1,000"
    m = TASKS["math"].to_record({"problem": "P", "solution": "so $\\boxed{\\frac{1}{2}}$.", "unique_id": "u"}, 0)
    assert (m["id"], m["question"], m["answer"], m["unique_id"]) == ("math_0", "P", "\\frac{1}{2}", "u")
    assert TASKS["math"].gold_completion(m) == "so $\\boxed{\\frac{1}{2}}$. The answer is: \\frac{1}{2}"
    assert last_boxed("\\boxed{a} then \\boxed{\\frac{1}{2}}") == "\\frac{1}{2}"
    with pytest.raises(UserError, match="no `#### N`"):
        gsm.to_record({"question": "Q", "answer": "no final"}, 0)
    with pytest.raises(UserError, match=r"unknown task `mth` \(did you mean `math`\?\)"):
        get_task("mth")


def test_register_task():
    t = TaskAdapter("toy_boxed", "The answer is:", 2, "math")
    try:
        from w2s_jax.method.tasks import register_task

        register_task(t)
        assert get_task("toy_boxed") is t
        with pytest.raises(ValueError):
            register_task(t)
    finally:
        TASKS.pop("toy_boxed", None)


def test_split_train_deterministic():
    recs = [{"id": i} for i in range(100)]
    a1, a2 = split_train(recs, 30, 50, seed=42)
    b1, b2 = split_train(recs, 30, 50, seed=42)
    assert (a1, a2) == (b1, b2)
    assert len(a1) == 30 and len(a2) == 50
    ids1, ids2 = [r["id"] for r in a1], [r["id"] for r in a2]
    assert ids1 == sorted(ids1) and ids2 == sorted(ids2) and not set(ids1) & set(ids2)
    import numpy as np

    perm = np.random.default_rng(42).permutation(100)
    assert set(ids1) == set(perm[:30].tolist())
    assert split_train(recs, 30, 50, seed=1)[0] != a1
    with pytest.raises(UserError, match="cannot split"):
        split_train(recs, 60, 50, seed=0)


def test_local_and_hf_json_loaders(tmp_path):
    rows = [{"question": f"q{i}", "answer": f"w\n#### {i}"} for i in range(6)]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "train.json").write_text(json.dumps(rows))
    local = load_local(tmp_path / "train.jsonl", "gsm8k")
    assert local == load_local(tmp_path / "train.json", "gsm8k")
    assert [r["id"] for r in local] == [f"gsm8k_{i}" for i in range(6)]
    hf = load_hf("gsm8k", str(tmp_path / "train.jsonl"))
    assert hf == local
    (tmp_path / "dup.jsonl").write_text(json.dumps({"id": 1, **rows[0]}) + "\n" + json.dumps({"id": 1, **rows[1]}))
    with pytest.raises(UserError, match="duplicate id 1"):
        load_local(tmp_path / "dup.jsonl", "gsm8k")


def test_load_splits_local_full_train(tmp_path):
    rows = [{"id": f"g{i}", "question": f"q{i}", "answer": f"w\n#### {i}"} for i in range(20)]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:5]))
    cfg = load_config(
        DataConfig, None, [f"train={tmp_path / 'train.jsonl'}", f"test={tmp_path / 'test.jsonl'}", "n_train_1=8"]
    )
    s = load_splits(cfg)
    assert (len(s["train_1"]), len(s["train_2"]), len(s["test"])) == (8, 12, 5)
    assert s == load_splits(cfg)
    cfg_tfds = load_config(DataConfig, None, ["source=tfds"])
    try:
        import tensorflow_datasets  # noqa: F401
    except ImportError:
        with pytest.raises(UserError, match="tensorflow-datasets"):
            load_splits(cfg_tfds)


def test_shared_presplit_files(shared_dir):
    d = shared_dir / "data/gsm8k"
    cfg = load_config(
        DataConfig,
        None,
        [f"train_1={d / 'train_1.jsonl'}", f"train_2={d / 'train_2.jsonl'}", f"test={d / 'test.jsonl'}"],
    )
    s = load_splits(cfg)
    assert (len(s["train_1"]), len(s["train_2"]), len(s["test"])) == (7000, 7000, 1319)
    assert s["train_1"][0]["id"] == "gsm8k_2" and s["test"][0]["id"] == "gsm8k_0"
    assert s["test"][0]["answer"] == "18" and "<<" not in s["train_1"][0]["solution"]
    assert all(r["solution"].rstrip().endswith(f"#### {r['answer']}") for r in s["train_1"])
    math = load_local(shared_dir / "data/math/test.jsonl", "math")
    assert len(math) == 500 and math[0]["answer"] == "\\left( 3, \\frac{\\pi}{2} \\right)"


def test_synthetic_arith():
    a = make_synthetic("arith", 300, seed=3)
    assert a == make_synthetic("arith", 300, seed=3)
    assert a != make_synthetic("arith", 300, seed=4)
    assert len({r["question"] for r in a}) == 300
    gsm = get_task("gsm8k")
    for i, raw in enumerate(a):
        rec = gsm.to_record(raw, i)
        # the worked solution's arithmetic is right and ends in the answer
        lines = rec["solution"].split("\n")
        value = None
        for line in lines[:-1]:
            lhs, rhs = line.split(" = ")
            assert eval(lhs) == int(rhs)  # noqa: S307 - generated "a op b"
            value = int(rhs)
        assert lines[-1] == f"#### {value}" and rec["answer"] == str(value) and value >= 0
        assert len(raw["question"]) < 120
    hard = make_synthetic("arith", 50, seed=0, min_steps=3, max_steps=3, max_value=9)
    assert all(r["answer"].count("\n") >= 2 for r in hard)
    with pytest.raises(UserError, match="could not generate"):
        make_synthetic("arith", 500, seed=0, max_steps=1, max_value=1, ops=("add",))


def test_synthetic_reasoning_gym_and_splits():
    g = make_synthetic("gsm_symbolic", 5, seed=1)
    gsm = get_task("gsm8k")
    for i, raw in enumerate(g):
        rec = gsm.to_record(raw, i)
        assert raw["answer"].endswith(f"#### {rec['answer']}") and "Give the result" not in rec["question"]
    b = make_synthetic("basic_arithmetic", 3, seed=1)
    assert all("####" in r["answer"] for r in b)
    cfg = load_config(DataConfig, None, ["source=synthetic", "n_train_1=10", "n_train_2=12", "n_test=4"])
    s = load_splits(cfg)
    assert [len(s[k]) for k in ("train_1", "train_2", "test")] == [10, 12, 4]
    qs = [r["question"] for k in s for r in s[k]]
    assert len(set(qs)) == len(qs)


def test_pad_sets_appends_disagreeing_questions_with_both_completions():
    from w2s_jax.method.datasets import pad_sets

    weak = _weak({"a": "1", "b": "2", "c": "", "d": "4", "e": "5"})
    icl = [{"id": q, "prompt": f"P {q}", "response": f"icl {q}", "pred": p}
           for q, p in {"a": "9", "b": "2", "c": "3", "d": "4", "e": "0"}.items()]
    sets, stats = consistency_sets(weak, icl)
    assert [r["id"] for r in sets["weak"]] == ["b", "d"]
    padded, added = pad_sets(sets, weak, icl, 4)
    assert added == 2 and [r["id"] for r in padded["weak"]] == ["b", "d", "a", "c"]
    assert [r["completion"] for r in padded["icl"][2:]] == ["icl a", "icl c"]
    assert [(r["id"], r["source"]) for r in padded["hybrid"][4:]] == [("a", "weak"), ("a", "icl"), ("c", "weak"),
                                                                     ("c", "icl")]
    assert pad_sets(sets, weak, icl, 2)[1] == 0 and pad_sets(sets, weak, icl, 99)[1] == 3
