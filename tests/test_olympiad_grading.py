"""OlympicArena answer matching (w2s_jax.method.olympiad_grading) and the task's loader and prompt, on a
fixture of records in the data set's own format (GAIR/OlympicArena's fields and instruction layout;
the problems are written for the test). Every expected verdict below is derived by hand from
OlympicArena's judge.py rules, quirks included (each noted)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from w2s_jax.method.olympiad_grading import auto_judge, encode_gold, equivalent, extract_pred, normalize
from w2s_jax.method.tasks import get_task, load_local

FIXTURE = Path(__file__).resolve().parent / "data" / "olympicarena_sample.jsonl"
F = "Step by step ... The final answer is $\\boxed{%s}$."

CASES = [
    # SC: equal letter, or "X: ..." whose letter is the gold
    (F % "B", ["B"], None, True),
    (F % "B: Chloroplast", ["B"], None, True),
    (F % "C", ["B"], None, False),
    # MC: the comma-separated letters as a set, same count as the gold letters
    (F % "A, C", ["AC"], None, True),
    (F % "C, A", ["AC"], None, True),
    (F % "A", ["AC"], None, False),
    # TF: \text{} is unwrapped by the normalization
    (F % "\\text{True}", ["True"], None, True),
    (F % "False", ["True"], None, False),
    # NV: float or LaTeX value within 1e-5 * 1.01; \frac14 becomes \frac{1}{4}
    (F % "0.25", ["$\\frac{1}{4}$"], None, True),
    (F % "\\frac14", ["$\\frac{1}{4}$"], None, True),
    (F % "3.000001", ["3"], None, True),
    (F % "3.1", ["3"], None, False),
    # units: ^\circ and a bare % are dropped; a unit left in the answer makes it unparseable (wrong),
    # and "\%" loses only its "%", leaving a backslash (wrong: an official quirk)
    (F % "60^\\circ", ["60"], None, True),
    (F % "45%", ["45"], None, True),
    (F % "45\\%", ["45"], None, False),
    (F % "3 \\mathrm{~m/s}", ["3"], None, False),
    # scientific notation: same exponent, mantissas within 0.1 * 1.01
    (F % "3.01 \\times 10^{8}", ["$3.00 \\times 10^{8}$"], None, True),
    (F % "3.2 \\times 10^{8}", ["$3.00 \\times 10^{8}$"], None, False),
    # SET: any order, same size
    (F % "3, 1, 2", ["1", "2", "3"], None, True),
    (F % "1, 2", ["1", "2", "3"], None, False),
    # IN: unions in any order, same open/closed ends
    (F % "[3, \\infty) \\cup (-\\infty, 1]", ["$(-\\infty, 1] \\cup [3, \\infty)$"], None, True),
    (F % "(1, 3)", ["$[1, 3]$"], None, False),
    # EX: the right-hand sides; structurally equal after parsing is right. A symbolic difference that
    # simplifies to 0 is still wrong: the official check needs a Python bool and sympy gives its own
    # boolean (quirk)
    (F % "d = \\frac{g t^2}{2}", ["$d=\\frac{1}{2} g t^{2}$"], None, True),
    (F % "(x+1)^2", ["$x^2+2x+1$"], None, False),
    (F % "x^2+1", ["$x^2+2x+1$"], None, False),
    # EQ: lhs - rhs equal up to an integer factor; EX is tried first and compares right-hand sides only,
    # so x-y=1 "equals" x+y=1 (quirk)
    (F % "2x+2y=2", ["$x+y=1$"], None, True),
    (F % "x-y=1", ["$x+y=1$"], None, True),
    (F % "x-y=2", ["$x+y=1$"], None, False),
    # TUP: in order
    (F % "(2, 1)", ["$(2,1)$"], None, True),
    (F % "(1, 2)", ["$(2,1)$"], None, False),
    # several answers with a type sequence: in order (MPV) or in any order (MA)
    (F % "2, 3", ["2", "3"], ["NV", "NV"], True),
    (F % "3, 2", ["2", "3"], ["NV", "NV"], True),
    (F % "2", ["2", "3"], ["NV", "NV"], False),
    (F % "-3, 3", ["3", "-3"], ["NV", "NV"], True),
    # no boxed answer: the whole response stands for the prediction (quirk); an empty box is no answer
    ("so the answer is 5", ["5"], None, False),
    ("5", ["5"], None, True),
    (F % "", ["5"], None, False),
]


@pytest.mark.parametrize("response,gold,types,want", CASES)
def test_auto_judge_hand_derived(response, gold, types, want):
    assert auto_judge(response, gold, types) is want


def test_prediction_and_equivalence():
    assert extract_pred(F % "\\text{True}") == "True" and extract_pred("no box here") == ""
    assert extract_pred("first $\\boxed{1}$ then $\\boxed{2}$") == "1"  # the first box, as judge.py
    assert normalize("\\left( 1, 2 \\right)") == "( 1, 2 )"
    assert equivalent("0.25", "\\frac{1}{4}") and equivalent("A", "A") and not equivalent("A", "B")
    assert equivalent("", "")  # equal strings short-circuit (the filter rejects empty predictions itself)


def test_loader_filters_and_prompt():
    raw = [json.loads(x) for x in FIXTURE.read_text().splitlines()]
    assert {r["answer_type"] for r in raw} >= {"SC", "MC", "TF", "NV", "SET", "IN", "EX", "EQ", "TUP", "MPV", "MA"}
    recs = load_local(FIXTURE, "olympicarena")
    ids = {r["id"] for r in recs}
    # English only, no CODE / OT answers
    assert ids == {r["id"] for r in raw if r["language"] == "EN" and r["answer_type"] not in ("CODE", "OT")}
    assert len(recs) == 21
    task = get_task("olympicarena")
    r = next(x for x in recs if x["id"] == "Math_5")
    src = next(x for x in raw if x["id"] == "Math_5")
    assert task.prompt(r) == src["prompt"].replace("\n\nproblem:\n", "\n\nQuestion: ") + "\n\nAnswer:"
    assert task.prompt(r).startswith("You are participating in an international Math competition")
    assert "\n\nQuestion: Is every prime number greater than 2 odd?" in task.prompt(r)
    demo = {"id": "d", "prompt": "P1\n\nAnswer:", "completion": "x. The final answer is $\\boxed{1}$"}
    assert task.prompt(r, [demo]) == "P1\n\nAnswer: x. The final answer is $\\boxed{1}$\n\n" + task.prompt(r)
    # golds: the answer list and type sequence; none for a record without released answers
    mpv = next(x for x in recs if x["id"] == "Physics_17")
    assert json.loads(encode_gold(mpv)) == {"answer": ["2", "3"], "type_sequence": ["NV", "NV"]}
    assert encode_gold(next(x for x in recs if x["id"] == "Astronomy_24")) is None


def test_grading_dispatch_uses_olympic_rules():
    from w2s_jax.method.grading import equivalence, gold_answer, grade_records
    from w2s_jax.method.grading import extract_pred as task_pred

    recs = {r["id"]: r for r in load_local(FIXTURE, "olympicarena")}
    responses = {"Math_7": F % "0.25", "Math_11": F % "2, 3, 1", "Physics_17": F % "3, 2", "Biology_1": F % "C",
                 "Math_12": "The answer is: 3"}
    graded = grade_records([{"id": i, "response": t, "gold": gold_answer(recs[i], "olympicarena")}
                            for i, t in responses.items()], "olympicarena")
    assert [g["result"] for g in graded] == [True, True, True, False, False]
    assert task_pred(F % "0.25", "olympicarena") == "0.25" and task_pred("The answer is: 3", "olympicarena") == ""
    assert equivalence("olympicarena") is equivalent and equivalence("gsm8k") is None


def test_votes_and_consistency_group_equivalent_answers():
    from w2s_jax.method.datasets import consistency_sets, vote

    preds = ["0.25", "\\frac{1}{4}", "\\frac14", "0.5", "\\frac{1}{4}", "0.5", "0.5", "0.25", "1", "0.25"]
    files = [[{"id": "q", "prompt": "P", "response": f"r{j}", "pred": p}] for j, p in enumerate(preds)]
    v = vote(files, equiv=equivalent)[0]
    assert v["majority"] == "0.25" and v["count"] == 6 and [n["sample"] for n in v["negatives"]] == [3, 5, 6, 8]
    assert vote(files)[0]["count"] == 3  # string equality: "0.25" three times
    weak = [{"id": "q", "prompt": "P", "response": "w", "pred": "\\frac{1}{4}"}]
    icl = [{"id": "q", "prompt": "P", "response": "s", "pred": "0.25"}]
    assert consistency_sets(weak, icl, equiv=equivalent)[1]["kept"] == 1
    assert consistency_sets(weak, icl)[1]["kept"] == 0


def test_splits_have_no_train_1():
    from w2s_jax.method.splits import DataConfig, load_splits

    s = load_splits(DataConfig(task="olympicarena", source="local", train=str(FIXTURE), test=str(FIXTURE)))
    assert s["train_1"] == [] and len(s["train_2"]) == 21 and len(s["test"]) == 21


def test_pipeline_data_stage(tmp_path: Path):
    """`w2s run` on OlympicArena JSONL: no train_1 (the weak model is used as given), prompts kept."""
    from w2s_jax.core.jsonl import read_jsonl
    from w2s_jax.pipeline.config import load_run_config
    from w2s_jax.pipeline.stages import Pipeline

    weak_dir = tmp_path / "weak"
    weak_dir.mkdir()
    cfg = load_run_config(None, ["data.task=olympicarena", "data.source=local", f"data.train={FIXTURE}",
                                 f"data.test={FIXTURE}", "data.n_test=20", "weak.preset=null", f"weak.path={weak_dir}",
                                 "weak.trained=true", "generation.stop=['<|eot_id|>']"])
    Pipeline(cfg, tmp_path / "run", log=lambda m: None).run(until="data")
    t2 = read_jsonl(tmp_path / "run" / "data" / "train_2.jsonl")
    assert len(t2) == 21 and (tmp_path / "run" / "data" / "train_1.jsonl").read_text() == ""
    assert all(r["prompt"].endswith("\n\nAnswer:") and "\n\nQuestion: " in r["prompt"] for r in t2)
    assert any(r["answer"] is None for r in t2)  # train_2 may lack answers (OlympicArena's test split)
    # the test set needs gold: a record without an answer is refused before any work
    cfg2 = load_run_config(None, ["data.task=olympicarena", "data.source=local", f"data.train={FIXTURE}",
                                  f"data.test={FIXTURE}", "weak.preset=null", f"weak.path={weak_dir}",
                                  "weak.trained=true"])
    from w2s_jax.core.errors import UserError

    with pytest.raises(UserError, match="Astronomy_24"):
        Pipeline(cfg2, tmp_path / "run2", log=lambda m: None).run(until="data")


def test_hf_loader_reads_every_subject_and_filters(monkeypatch):
    """`datasets.load_dataset(name, subject, split=...)` per subject (no CS), concatenated in subject
    order, then English only and no CODE/OT (the hub is replaced by the fixture's rows here)."""
    import datasets

    from w2s_jax.method.tasks import OLYMPIC_SUBJECTS, load_hf

    raw = [json.loads(x) for x in FIXTURE.read_text().splitlines()]
    calls = []

    def fake_load(name, subject, split):
        calls.append((name, subject, split))
        return [r for r in raw if r["subject"] == subject]

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    recs = load_hf("olympicarena", "GAIR/OlympicArena", None, "val")
    assert calls == [("GAIR/OlympicArena", s, "val") for s in OLYMPIC_SUBJECTS] and "CS" not in OLYMPIC_SUBJECTS
    want = [r["id"] for s in OLYMPIC_SUBJECTS for r in raw
            if r["subject"] == s and r["language"] == "EN" and r["answer_type"] not in ("CODE", "OT")]
    assert [r["id"] for r in recs] == want
