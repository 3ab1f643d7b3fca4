"""`w2s generate`: record shape, streaming + resume after a kill (no duplicates, no loss), grading,
few-shot prompts, over-long prompts."""

from __future__ import annotations

import json

import jax
import pytest

from w2s_jax.cli.generate import main
from w2s_jax.core.errors import UserError
from w2s_jax.core.jsonl import read_jsonl, write_jsonl_atomic
from w2s_jax.io.native import save_model
from w2s_jax.io.tokenizer import ByteTokenizer
from w2s_jax.models.config import get_preset
from w2s_jax.models.params import init_params

BASE_FIELDS = {"id", "sample", "seed", "prompt", "response", "num_tokens", "finish_reason"}


@pytest.fixture(autouse=True)
def fast_compile(monkeypatch):
    import w2s_jax.infer.sampler as sampler_mod

    opts = {**sampler_mod.CPU_COMPILER_OPTIONS, "xla_backend_optimization_level": 0}
    monkeypatch.setattr(sampler_mod, "CPU_COMPILER_OPTIONS", opts)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    cfg = get_preset("tiny", vocab_size=259, bos_token_id=257, eos_token_id=258, pad_token_id=256, max_seq_len=160)
    params = init_params(cfg, jax.random.PRNGKey(0))
    params = jax.tree.map(lambda a: a * 4 if a.ndim > 1 else a, params)
    d = tmp_path_factory.mktemp("gen") / "model"
    save_model(d, params, cfg, ByteTokenizer())
    return d


INPUTS = [
    {"id": "a", "question": "What is 2+3?", "gold": "5"},
    {"id": 2, "prompt": "Question: hi\nAnswer:"},
    {"id": "c", "question": "How many legs do 2 cats have?", "answer": "Each has 4.\n#### 8"},
    {"id": "d", "question": "Say x."},
    {"id": "e", "question": "A much longer question that makes this prompt land in another length bucket?"},
]


def run(model_dir, tmp_path, *extra, inputs=INPUTS, out="out.jsonl"):
    inp = tmp_path / "in.jsonl"
    write_jsonl_atomic(inp, inputs)
    rc = main(["--model", str(model_dir), "--input", str(inp), "--output", str(tmp_path / out),
               "--max-new-tokens", "8", "--batch-size", "4", "--no-progress", *extra])
    assert rc == 0
    return read_jsonl(tmp_path / out)


def test_generate_records_and_resume(model_dir, tmp_path, capsys):
    args = ("--n", "2", "--temperature", "1.0", "--seed", "3")
    full = run(model_dir, tmp_path, *args)
    assert [(r["id"], r["sample"]) for r in full] == [(r["id"], j) for r in INPUTS for j in (0, 1)]
    for r in full:
        want = BASE_FIELDS | ({"gold"} if r["id"] == "a" else set())
        assert set(r) == want, r
        assert r["seed"] == 3 + r["sample"]
        assert r["finish_reason"] in ("eos", "stop", "length") and 1 <= r["num_tokens"] <= 8
        assert r["response"] == r["response"].strip().rstrip(".")
        assert "Question" not in r["response"] and "Answer" not in r["response"]
    assert full[0]["prompt"] == "Question: What is 2+3?\nAnswer:" and full[0]["gold"] == "5"
    assert full[2]["prompt"] == "Question: hi\nAnswer:"
    assert "generate" in capsys.readouterr().out

    # a killed run: 5 complete records (in stream order) and half of the sixth
    out = tmp_path / "out.jsonl"
    lines = [json.dumps(r) for r in reversed(full)]
    out.write_text("\n".join(lines[:5]) + "\n" + lines[5][: len(lines[5]) // 2])
    kept = [json.loads(x) for x in lines[:5]]
    resumed = run(model_dir, tmp_path, *args)
    pairs = [(r["id"], r["sample"]) for r in resumed]
    assert pairs == [(r["id"], r["sample"]) for r in full]  # no loss, no duplicates, input order
    for k in kept:
        assert k in resumed  # records written before the kill are kept as they were
    assert "resuming" in capsys.readouterr().out

    # all done: nothing regenerated; another seed is refused rather than mixed in
    again = run(model_dir, tmp_path, *args)
    assert again == resumed
    with pytest.raises(UserError, match="seed"):
        run(model_dir, tmp_path, "--n", "2", "--temperature", "1.0", "--seed", "4")


def test_grade_few_shot_and_long_prompts(model_dir, tmp_path, capsys):
    demos = tmp_path / "demos.jsonl"
    write_jsonl_atomic(demos, [{"prompt": "Question: 1+1?\nAnswer:", "response": "2\n#### 2"},
                               {"question": "3+3?", "completion": "#### 6"}])
    inputs = [r for r in INPUTS if r["id"] in ("a", "c")]
    recs = run(model_dir, tmp_path, "--grade", "gsm8k", "--few-shot", str(demos), inputs=inputs)
    assert [r["id"] for r in recs] == ["a", "c"]
    for r in recs:
        assert set(r) == BASE_FIELDS | {"gold", "pred", "result"}
        assert r["prompt"].startswith("Question: 1+1?\nAnswer: 2\n#### 2\n\nQuestion: 3+3?\nAnswer: #### 6\n\n")
        assert isinstance(r["result"], bool)
    assert recs[1]["gold"] == "8"
    assert "accuracy" in capsys.readouterr().out

    with pytest.raises(UserError, match="gold"):
        run(model_dir, tmp_path, "--grade", "gsm8k", inputs=[{"id": "q", "question": "no gold"}], out="g.jsonl")

    long = [{"id": "long-one", "question": "x" * 200}, {"id": "ok", "question": "short"}]
    with pytest.raises(UserError, match="long-one"):
        run(model_dir, tmp_path, inputs=long, out="long.jsonl")
    recs = run(model_dir, tmp_path, "--truncate-prompts", inputs=long, out="long.jsonl")
    assert [r["id"] for r in recs] == ["long-one", "ok"]
    assert "left-truncated 1 of 2" in capsys.readouterr().out
