"""`w2s grade` and `w2s data ...` end to end through the dispatcher, on temporary files."""

import json

import pytest

from w2s_jax.cli.app import main


def _write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def _read(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def _files(d):
    return sorted(p.name for p in d.iterdir())


def test_grade_cli(tmp_path, capsys):
    inp = _write(
        tmp_path / "in.jsonl",
        [
            {"id": 0, "response": "2 + 3 = 5\n#### 5", "answer": "so 5\n#### 5", "extra": 1},
            {"id": 1, "response": "#### 0.50", "gold": "0.5"},
            {"id": 2, "response": "no idea", "gold": "7"},
        ],
    )
    out = tmp_path / "out.jsonl"
    assert main(["grade", "--task", "gsm8k", "--input", inp, "--output", str(out)]) == 0
    got = _read(out)
    assert [(r["pred"], r["result"]) for r in got] == [("5", True), ("0.50", False), ("", False)]
    assert got[0]["extra"] == 1
    assert "accuracy: 0.3333 (1/3" in capsys.readouterr().out
    assert main(["grade", "--task", "gsm8k", "--input", inp, "--output", str(out), "--mode", "symbolic"]) == 0
    assert [r["result"] for r in _read(out)] == [True, True, False]


def test_grade_cli_on_shared_weak_outputs(shared_dir, tmp_path, capsys):
    src = shared_dir / "data/weak_outputs/gsm8k_train_2/llama2_7b.jsonl"
    out = tmp_path / "g.jsonl"
    assert main(["grade", "--task", "gsm8k", "--input", str(src), "--output", str(out)]) == 0
    assert "accuracy: 0.4137 (2896/7000" in capsys.readouterr().out
    official = _read(src)
    ours = _read(out)
    assert [(r["pred"], r["result"]) for r in ours] == [(r["pred"], r["result"]) for r in official]


def test_grade_cli_bad_input(tmp_path, capsys):
    inp = tmp_path / "in.jsonl"
    inp.write_text('{"id": 0, "response": "#### 1", "gold": "1"}\n{"id": 1, "response": \n')
    out = tmp_path / "out.jsonl"
    assert main(["grade", "--task", "math", "--input", str(inp), "--output", str(out)]) == 2
    assert "in.jsonl:2: malformed" in capsys.readouterr().err
    _write(inp, [{"id": 0, "response": "#### 1"}])
    assert main(["grade", "--task", "gsm8k", "--input", str(inp), "--output", str(out)]) == 2
    assert "no gold answer" in capsys.readouterr().err
    assert not out.exists()


def _gen(ids_preds, who="weak", result=None):
    recs = []
    for i, p in ids_preds:
        r = {"id": i, "prompt": f"Question: q{i}\nAnswer:", "response": f"{who} {i}\n#### {p}", "pred": p}
        if result is not None:
            r["result"] = p == result
        recs.append(r)
    return recs


def test_data_full_weak_and_consistency(tmp_path, capsys):
    weak = _write(tmp_path / "weak.jsonl", _gen([(0, "1"), (1, ""), (2, "3")], result="1"))
    strong = _write(tmp_path / "strong.jsonl", _gen([(2, "4"), (1, ""), (0, "1")], who="icl"))
    out = tmp_path / "sft" / "full.jsonl"
    assert main(["data", "full-weak", "--weak", weak, "--output", str(out), "--format", "trl"]) == 0
    assert [r["completion"] for r in _read(out)] == ["weak 0\n#### 1", "weak 1\n#### ", "weak 2\n#### 3"]
    assert _read(tmp_path / "sft" / "full.trl.jsonl")[0] == {
        "prompt": "Question: q0\nAnswer:",
        "completion": " weak 0\n#### 1",
    }
    d = tmp_path / "cons"
    args = ["data", "consistency", "--weak", weak, "--strong", strong, "--output-dir", str(d)]
    assert main(args + ["--format", "llamafactory"]) == 0
    assert _files(d) == sorted(
        [
            f"{n}{s}"
            for n in ("weak", "icl", "hybrid")
            for s in (".jsonl", ".llamafactory.json", ".llamafactory.dataset_info.json")
        ]
        + ["stats.json"]
    )
    assert [r["completion"] for r in _read(d / "hybrid.jsonl")] == ["weak 0\n#### 1", "icl 0\n#### 1"]
    stats = json.loads((d / "stats.json").read_text())
    assert (stats["kept"], stats["total"], stats["kept_accuracy"]) == (1, 3, 1.0)
    lf = json.loads((d / "icl.llamafactory.json").read_text())
    assert lf == [{"instruction": "Question: q0\nAnswer:", "input": "", "output": "icl 0\n#### 1"}]
    info = json.loads((d / "icl.llamafactory.dataset_info.json").read_text())
    assert info == {
        "icl": {
            "file_name": "icl.llamafactory.json",
            "columns": {"prompt": "instruction", "query": "input", "response": "output"},
        }
    }
    assert "kept 1 / 3" in capsys.readouterr().out


def test_data_vote_and_pairs(tmp_path, capsys):
    samples = []
    preds = {0: ["1", "1", "1", "2", "1"], 1: ["5", "5", "5", "5", "5"], 2: ["7", "7", "7", "7", "8"]}
    for j in range(5):
        samples.append(_write(tmp_path / f"s{j}.jsonl", _gen([(i, preds[i][j]) for i in (2, 1, 0)], who=f"s{j}")))
    votes = tmp_path / "votes.jsonl"
    assert main(["data", "vote", "--samples", *samples, "--output", str(votes)]) == 0
    v = _read(votes)
    assert [(r["id"], r["majority"], r["count"], r["n"], r["confidence"]) for r in v] == [
        (2, "7", 4, 5, 0.8),
        (1, "5", 5, 5, 1.0),
        (0, "1", 4, 5, 0.8),
    ]
    weak = _write(tmp_path / "weak.jsonl", _gen([(0, "1"), (1, "5"), (2, "3")]))
    out = tmp_path / "p" / "pairs.jsonl"
    args = ["data", "pairs", "--task", "gsm8k", "--weak", weak, "--votes", str(votes), "--output", str(out)]
    assert main(args + ["--format", "trl", "--format", "llamafactory"]) == 0
    pairs = _read(out)
    # id 0: weak agrees, only negative is s3; id 1: no negative; id 2: weak disagrees at 0.8 -> chosen
    # = Random(42).sample(4 positives, 1) after one draw for id 0
    import random

    rng = random.Random(42)
    rng.sample([0], 1)
    pick = rng.sample([0, 1, 2, 3], 1)[0]
    assert pairs == [
        {
            "id": 0,
            "prompt": "Question: q0\nAnswer:",
            "chosen": "weak 0\n#### 1",
            "rejected": "s3 0\n#### 2",
            "branch": "weak_chosen",
        },
        {
            "id": 2,
            "prompt": "Question: q2\nAnswer:",
            "chosen": f"s{pick} 2\n#### 7",
            "rejected": "weak 2\n#### 3",
            "branch": "weak_rejected",
        },
    ]
    stats = json.loads((tmp_path / "p" / "pairs.stats.json").read_text())
    assert (stats["pairs"], stats["skipped_no_negative"], stats["weak_chosen_questions"]) == (2, 1, 1)
    printed = capsys.readouterr().out
    assert "skipped_low_confidence: 0" in printed and "pairs_weak_rejected: 1" in printed
    assert _read(tmp_path / "p" / "pairs.trl.jsonl")[0]["rejected"] == " s3 0\n#### 2"
    lf = json.loads((tmp_path / "p" / "pairs.llamafactory.json").read_text())
    assert set(lf[0]) == {"instruction", "input", "chosen", "rejected"}
    info = json.loads((tmp_path / "p" / "pairs.llamafactory.dataset_info.json").read_text())
    assert info["pairs"]["ranking"] is True


@pytest.mark.parametrize(
    "case, message",
    [
        ("malformed", "weak.jsonl:2: malformed"),
        ("missing_field", "weak.jsonl:1: record is missing required field `pred`"),
        ("unknown_id", "votes.jsonl: no record for id 9"),
        ("duplicate", "weak.jsonl: duplicate id 0"),
        ("empty", "weak.jsonl: file has no records"),
    ],
)
def test_data_pairs_bad_input_leaves_no_output(tmp_path, capsys, case, message):
    weak = _gen([(0, "1"), (1, "2")])
    votes_path = tmp_path / "votes.jsonl"
    s = [_write(tmp_path / f"s{j}.jsonl", _gen([(0, "1"), (1, "2")])) for j in range(2)]
    assert main(["data", "vote", "--samples", *s, "--output", str(votes_path)]) == 0
    weak_path = tmp_path / "weak.jsonl"
    if case == "malformed":
        weak_path.write_text(json.dumps(weak[0]) + "\n{oops\n")
    elif case == "missing_field":
        del weak[0]["pred"]
        _write(weak_path, weak)
    elif case == "unknown_id":
        weak.append(_gen([(9, "1")])[0])
        _write(weak_path, weak)
    elif case == "duplicate":
        _write(weak_path, weak + [weak[0]])
    else:
        weak_path.write_text("")
    out = tmp_path / "out" / "pairs.jsonl"
    capsys.readouterr()
    rc = main(
        ["data", "pairs", "--task", "gsm8k", "--weak", str(weak_path), "--votes", str(votes_path), "--output", str(out)]
    )
    assert rc == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_data_vote_bad_samples(tmp_path, capsys):
    a = _write(tmp_path / "s0.jsonl", _gen([(0, "1"), (1, "2")]))
    b = _write(tmp_path / "s1.jsonl", _gen([(0, "1")]))
    c = _write(tmp_path / "s2.jsonl", _gen([(0, "1"), (5, "2")]))
    out = tmp_path / "v.jsonl"
    assert main(["data", "vote", "--samples", a, b, "--output", str(out)]) == 2
    assert "s1.jsonl: has 1 records but" in capsys.readouterr().err
    assert main(["data", "vote", "--samples", a, c, "--output", str(out)]) == 2
    assert "s2.jsonl: no record for id 1" in capsys.readouterr().err
    assert not out.exists()


def test_data_consistency_id_mismatch(tmp_path, capsys):
    weak = _write(tmp_path / "weak.jsonl", _gen([(0, "1"), (1, "2")]))
    strong = _write(tmp_path / "strong.jsonl", _gen([(0, "1"), (2, "2")]))
    d = tmp_path / "cons"
    assert main(["data", "consistency", "--weak", weak, "--strong", strong, "--output-dir", str(d)]) == 2
    assert "strong.jsonl: no record for id 1" in capsys.readouterr().err
    assert not d.exists()


def test_data_split_synthetic_and_local(tmp_path, capsys):
    d = tmp_path / "syn"
    args = ["data", "split", "--source", "synthetic", "--n-train-1", "20", "--n-train-2", "30", "--n-test", "5"]
    assert main(args + ["--output-dir", str(d), "--seed", "7"]) == 0
    assert _files(d) == ["data_config.yaml", "test.jsonl", "train_1.jsonl", "train_2.jsonl"]
    t1 = _read(d / "train_1.jsonl")
    assert len(t1) == 20 and set(t1[0]) == {"id", "question", "solution", "answer"}
    d2 = tmp_path / "syn2"
    assert main(args + ["--output-dir", str(d2), "--seed", "7"]) == 0
    assert (d / "train_2.jsonl").read_text() == (d2 / "train_2.jsonl").read_text()

    full = _write(tmp_path / "full.jsonl", [{"question": f"q{i}", "answer": f"w\n#### {i}"} for i in range(10)])
    test = _write(tmp_path / "test.jsonl", [{"question": "t", "solution": "w\n#### 1", "answer": "1"}])
    d3 = tmp_path / "loc"
    assert main(["data", "split", "--train", full, "--test", test, "--n-train-1", "4", "--output-dir", str(d3)]) == 0
    assert (len(_read(d3 / "train_1.jsonl")), len(_read(d3 / "train_2.jsonl"))) == (4, 6)
    assert "data_config.yaml" in _files(d3)
    capsys.readouterr()
    assert main(["data", "split", "--set", "data.seed=1", "--output-dir", str(tmp_path / "x")]) == 2
    assert "unknown key `data`" in capsys.readouterr().err
    assert main(["data", "split", "--train", full, "--output-dir", str(tmp_path / "y")]) == 2
    assert "needs a test set" in capsys.readouterr().err
    assert not (tmp_path / "y").exists()
