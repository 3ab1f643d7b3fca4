"""End-to-end tests of `w2s run` at reduced size: artifacts, reports, skip/resume, changed config, bad input.

The reduced config trains byte-level models of a few thousand parameters on one-step arithmetic
problems with numbers up to 3, so that the weak model answers some questions right and every stage
(including Stage II's DPO) has data, in about a minute on 2 CPU cores.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from w2s_jax.core.errors import UserError
from w2s_jax.pipeline.config import load_run_config
from w2s_jax.pipeline.fingerprints import STAGE_NAMES
from w2s_jax.pipeline.stages import Pipeline

SMOKE = str(Path(__file__).resolve().parents[1] / "configs" / "smoke.yaml")  # byte-level models, offline
TINY = [
    "data.n_train_1=96",
    "data.n_train_2=48",
    "data.n_test=24",
    "data.synthetic={kind: arith, min_steps: 1, max_steps: 1, max_value: 4, ops: [add]}",
    "strong.pretrain.synthetic={kind: arith, min_steps: 1, max_steps: 1, max_value: 4, ops: [add]}",
    "weak.overrides={d_model: 32, n_layers: 1, n_heads: 2, n_kv_heads: 2, head_dim: 16, d_ff: 64, max_seq_len: 1024}",
    "strong.overrides={d_model: 32, n_layers: 2, n_heads: 2, n_kv_heads: 1, head_dim: 16, d_ff: 64, max_seq_len: 1024}",
    "strong.pretrain.examples=96",
    "strong.pretrain.few_shot_max=1",
    "stage1.n_demos=1",
    "strong.pretrain.train={lr: 1.0e-2, epochs: 12, batch_size: 4, seq_len: 256, log_every: 20, warmup_ratio: 0.05,"
    " save_every: 40, progress: false}",
    "weak_train={lr: 1.0e-2, epochs: 12, batch_size: 4, seq_len: 128, log_every: 20, warmup_ratio: 0.05,"
    " progress: false}",
    "strong_train={lr: 1.0e-3, epochs: 1, batch_size: 4, seq_len: 128, log_every: 10, progress: false}",
    "stage2.train={loss_type: sigmoid, beta: 0.1, lr: 1.0e-4, epochs: 1, batch_size: 4, seq_len: 128, log_every: 10,"
    " progress: false}",
    "stage2.n_samples=4",
    "stage1.rounds=2",  # round 1 trains weak-ft, icl-ft and hybrid-ft; round 2 labels with the first two
    "eval_samples=2",
    "generation.max_new_tokens=24",
    "mesh.data=1",  # one device: the same numbers under pytest's 8 simulated devices and in a subprocess
]

REPO = Path(__file__).resolve().parents[1]


def _quiet(msg: str) -> None:
    pass


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("w2s") / "run"
    cfg = load_run_config(SMOKE, TINY)
    Pipeline(cfg, out, log=_quiet).run()
    return out


def _manifest(run: Path, stage: str) -> dict:
    return json.loads((run / "stages" / f"{stage}.json").read_text())


def test_every_stage_and_artifact(run_dir: Path):
    for st in STAGE_NAMES:
        m = _manifest(run_dir, st)
        assert m["status"] == "done" and m["seconds"] >= 0, st
    for split, n in (("train_1", 96), ("train_2", 48), ("test", 24)):
        lines = (run_dir / "data" / f"{split}.jsonl").read_text().splitlines()
        assert len(lines) == n
    weak = [json.loads(x) for x in (run_dir / "weak_labels" / "train_2.jsonl").read_text().splitlines()]
    assert len(weak) == 48 and all({"id", "prompt", "response", "pred"} <= set(r) for r in weak)
    assert not any({"gold", "result"} & set(r) for r in weak)  # train_2 labels carry no gold
    scores = [json.loads(x) for x in (run_dir / "weak_labels" / "train_2.gold_scores.jsonl").read_text().splitlines()]
    assert [s["id"] for s in scores] == [r["id"] for r in weak] and all("result" in s for s in scores)
    assert len((run_dir / "strong_icl" / "demos.jsonl").read_text().splitlines()) == 1  # stage1.n_demos
    for model_dir in ("weak_model/sft/model", "strong_model/pretrain/model", "full_weak/sft/model", "gold/sft/model"):
        assert (run_dir / model_dir / "w2s_model.json").exists(), model_dir
    # Stage I / II train when the filter keeps questions / the votes give pairs; otherwise they carry the
    # previous model forward and say so (tiny models make either outcome possible)
    trained = ["weak_model/sft"]
    for st, sub in (("stage1", "stage1/round2_hybrid"), ("stage2", "stage2/train")):
        m = _manifest(run_dir, st)
        model = m["final"] if st == "stage1" else m["model"]
        assert (Path(model) / "w2s_model.json").exists(), st
        if "skipped" in m:
            assert "consistency filter" in m["skipped"] or "no contrastive pairs" in m["skipped"]
        else:
            trained.append(sub)
    for train_dir in trained:
        metrics = [json.loads(x) for x in (run_dir / train_dir / "metrics.jsonl").read_text().splitlines()]
        assert metrics and all(np.isfinite(m["loss"]) for m in metrics if "loss" in m)
        assert (run_dir / train_dir / "tensorboard").is_dir()
    samples = (run_dir / "sampling" / "samples.jsonl").read_text().splitlines()
    assert len(samples) == 48 * 4
    assert (run_dir / "sampling" / "pairs.jsonl").exists() and (run_dir / "config.yaml").exists()


def test_report_matches_graded_outputs(run_dir: Path):
    """results.json's accuracies equal an independent re-grading of the saved eval outputs."""
    from w2s_jax.method.grading import extract_pred, is_equiv, normalize

    res = json.loads((run_dir / "results.json").read_text())
    names = [r["model"] for r in res["models"]]
    assert names[0] == "weak" and "strong (ICL)" in names and "gold SFT (ceiling)" in names
    stage1 = ["Stage I round 1 (weak-ft)", "Stage I round 1 (icl-ft)", "Stage I round 1 (hybrid-ft)",
              "Stage I round 2 (hybrid-ft)"]
    assert [n for n in names if n.startswith("Stage I ")] == stage1 and any(n.startswith("Stage II") for n in names)
    for r in res["models"]:  # test-set pass@k from the sampled completions, Stage I and II models only
        assert (r["model"].startswith("Stage I")) == ("pass_at_k" in r), r["model"]
        if "pass_at_k" in r:
            outs = [json.loads(x) for x in (run_dir / r["outputs"].replace(".jsonl", ".samples.jsonl")).read_text()
                    .splitlines()]
            per_id: dict = {}
            for o in outs:
                per_id.setdefault(o["id"], []).append(bool(o["result"]))
            assert len(outs) == 48 and all(len(v) == 2 for v in per_id.values())
            assert r["pass_at_k"]["pass@1"] == pytest.approx(np.mean([np.mean(v) for v in per_id.values()]))
    assert res["demonstrations"]["source"] == "weak" and res["demonstrations"]["read_gold"] is False
    assert res["train_2_gold_read_by"] == ["gold: the ceiling baseline is trained on train_2 gold solutions"]
    test = [json.loads(x) for x in (run_dir / "data/test.jsonl").read_text().splitlines()]
    gold = {r["id"]: r["answer"] for r in test}
    acc = {}
    for r in res["models"]:
        outs = [json.loads(x) for x in (run_dir / r["outputs"]).read_text().splitlines()]
        assert len(outs) == 24
        ok = [is_equiv(extract_pred(o["response"], "gsm8k"), normalize(gold[o["id"]])) for o in outs]
        assert r["accuracy"] == pytest.approx(sum(ok) / len(ok))
        acc[r["model"]] = r["accuracy"]
    w, c = acc["weak"], acc["gold SFT (ceiling)"]
    for r in res["models"]:
        if r["model"] != "weak" and c != w:
            assert r["pgr"] == pytest.approx((r["accuracy"] - w) / (c - w))
    md = (run_dir / "results.md").read_text()
    assert "| model | accuracy (%) | PGR | n |" in md and "Stage I round1: kept / total" in md
    # what ran: models with their sizes, training, data counts, seeds, machine, time per stage
    assert "| weak model | preset tiny (random init, seed 1); " in md and "K parameters; d=32 x 1 layers" in md
    assert "| strong SFT: full weak FT, gold | 1 epoch, batch 4 x 128 tokens, lr 0.001" in md
    assert "| strong SFT: Stage I | 1 epoch, batch 4 x 128 tokens, lr 0.001" in md  # stage1.train unset
    assert "| train_2 | 48 |" in md and "| test | 24 |" in md and "data.seed=42, weak.seed=1" in md
    assert res["machine"]["cpu_cores"] >= 1 and res["machine"]["jax"] in md
    assert all(f"| {st} | " in md for st in STAGE_NAMES) and "| sum of stages |" in md and "| CPU (s) |" in md
    assert all(_manifest(run_dir, st)["cpu_seconds"] >= 0 for st in STAGE_NAMES)
    assert res["model_info"]["strong"]["params"] > res["model_info"]["weak"]["params"] > 0
    assert "Stage I round2: kept / total" in md and "ICL demonstrations (weak): ids" in md
    assert (run_dir / "results.png").stat().st_size > 1000
    kept = _manifest(run_dir, "stage1")["round1"]
    assert 0 <= kept["kept"] <= 48 and (kept["kept"] > 0) == ("skipped" not in _manifest(run_dir, "stage1"))


def test_rerun_skips_everything(run_dir: Path):
    before = {st: _manifest(run_dir, st)["started"] for st in STAGE_NAMES}
    logs: list[str] = []
    res = Pipeline(load_run_config(SMOKE, TINY), run_dir, log=logs.append).run()
    assert res is not None and len(res["models"]) == 10
    assert sum("skipping" in x for x in logs) == len(STAGE_NAMES)
    assert {st: _manifest(run_dir, st)["started"] for st in STAGE_NAMES} == before


def test_changed_config_reruns_only_affected_stages(run_dir: Path, tmp_path: Path):
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    before = {st: _manifest(run, st)["started"] for st in STAGE_NAMES}
    Pipeline(load_run_config(SMOKE, [*TINY, "stage2.train.beta=0.2"]), run, log=_quiet).run()
    after = {st: _manifest(run, st)["started"] for st in STAGE_NAMES}
    changed = {st for st in STAGE_NAMES if after[st] != before[st]}
    assert changed == {"stage2", "eval"}


def test_kill_and_resume(run_dir: Path, tmp_path: Path):
    """Kill a run while the strong model trains (after its first checkpoint); the rerun resumes from
    that checkpoint and ends with exactly the weights of the uninterrupted run."""
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "w2s_jax.cli", "run", "smoke", "--out", str(run), "--until", "strong_model"]
    for o in TINY:
        cmd += ["--set", o]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    ckpts = run / "strong_model" / "pretrain" / "checkpoints"
    deadline = time.time() + 240
    try:
        while time.time() < deadline and proc.poll() is None:
            if ckpts.is_dir() and any(p.name.isdigit() for p in ckpts.iterdir()):
                break
            time.sleep(0.05)
        assert proc.poll() is None, "the run finished before it could be killed"
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert _manifest(run, "strong_model")["status"] == "running"
    assert not (run / "strong_model" / "pretrain" / "model" / "w2s_model.json").exists()
    logs: list[str] = []
    Pipeline(load_run_config(SMOKE, TINY), run, log=logs.append).run(until="strong_model")
    m = _manifest(run, "strong_model")
    assert m["status"] == "done" and m["resumed_from"] is not None and m["resumed_from"] > 0
    assert any("strong_model: resuming" in x for x in logs)
    from safetensors.numpy import load_file

    a = load_file(run / "strong_model/pretrain/model/params.safetensors")
    b = load_file(run_dir / "strong_model/pretrain/model/params.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=0, atol=1e-6, err_msg=k)


def test_bad_input_fails_before_work(tmp_path: Path):
    cfg = load_run_config(SMOKE, TINY)
    with pytest.raises(UserError, match="unknown stage `stage3`"):
        Pipeline(cfg, tmp_path / "a", log=_quiet).run(from_stage="stage3")
    assert not (tmp_path / "a").exists()
    with pytest.raises(UserError, match="strong.path.*does not exist"):
        load_run_config(SMOKE, [*TINY, "strong.preset=null", "strong.path=/nonexistent/model"])
    with pytest.raises(UserError, match="weak_trian"):
        load_run_config(SMOKE, [*TINY, "weak_trian.lr=1"])
    with pytest.raises(UserError, match="data.test"):
        load_run_config(SMOKE, ["data.source=local", "data.test=/nonexistent.jsonl"])
    # a run directory made by another experiment
    other = tmp_path / "b"
    other.mkdir()
    (other / "config.yaml").write_text("name: other\ndata: {task: gsm8k}\n")
    with pytest.raises(UserError, match="different config"):
        Pipeline(cfg, other, log=_quiet).run()
    # a data file of the wrong shape names the file and line
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": 1, "question": "q", "answer": "x\\n#### 1"}\n{"id": 2, "text": "no question"}\n')
    cfg2 = load_run_config(SMOKE, [*TINY, "data.source=local", f"data.train={bad}", f"data.test={bad}"])
    with pytest.raises(UserError, match=r"bad.jsonl"):
        Pipeline(cfg2, tmp_path / "c", log=_quiet).run()


def test_notebook_runs_the_demo_api(run_dir: Path, tmp_path: Path):
    """The notebook drives the pipeline through the Python API (on a copy of the finished reduced run,
    so its stages are verified and skipped rather than recomputed)."""
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    run = tmp_path / "nbrun"
    shutil.copytree(run_dir, run)
    nb = nbformat.read(REPO / "notebooks" / "demo.ipynb", as_version=4)
    os.environ["W2S_NOTEBOOK_OVERRIDES"] = ";".join(TINY)
    os.environ["W2S_NOTEBOOK_OUT"] = str(run)
    os.environ["W2S_NOTEBOOK_CONFIG"] = SMOKE
    try:
        client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                         resources={"metadata": {"path": str(REPO)}})
        client.execute()
    finally:
        os.environ.pop("W2S_NOTEBOOK_OVERRIDES")
        os.environ.pop("W2S_NOTEBOOK_OUT")
        os.environ.pop("W2S_NOTEBOOK_CONFIG")
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "weak" in text and "Stage II" in text


def _tree(root: Path, skip) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and not skip(p.relative_to(root))}


def test_train_2_gold_never_reaches_the_strong_model(run_dir: Path, tmp_path: Path):
    """The same config with every train_2 gold answer replaced by a wrong one: every artifact up to and
    including the Stage II pairs and trained models is byte-identical; only the gold scores differ."""
    run = tmp_path / "run"
    cfg = load_run_config(SMOKE, TINY)
    Pipeline(cfg, run, log=_quiet).run(until="data")
    path = run / "data" / "train_2.jsonl"
    recs = [json.loads(x) for x in path.read_text().splitlines()]
    for r in recs:
        wrong = str(int(r["answer"]) + 1000)
        assert r["solution"].rstrip().endswith(f"#### {r['answer']}")
        r["solution"] = r["solution"].rstrip()[: -len(r["answer"])] + wrong
        r["answer"] = wrong
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    Pipeline(cfg, run, log=_quiet).run(until="stage2")

    stages = ("weak_model", "strong_model", "weak_labels", "strong_icl", "stage1", "full_weak", "sampling", "stage2")
    # run-time logs, compile timings and checkpoint bookkeeping are not artifacts; gold scores are meant to differ
    noise = ("metrics.jsonl", "tensorboard", "checkpoints", "compile.json")

    def skip(rel: Path) -> bool:
        return rel.parts[0] not in stages or any(n in rel.parts for n in noise) or rel.name.endswith(
            ".gold_scores.jsonl")

    a, b = _tree(run_dir, skip), _tree(run, skip)
    assert a.keys() == b.keys()
    assert any(k.endswith("params.safetensors") and k.startswith("stage2") for k in a) or not (
        run_dir / "stage2" / "train").exists()
    assert any(k == "sampling/pairs.jsonl" for k in a) and any(k.startswith("stage1/round2_hybrid") for k in a)
    assert [k for k in a if a[k] != b[k]] == []
    # the scores did see the changed gold: no weak label is right against the wrong answers
    scores = [json.loads(x) for x in (run / "weak_labels" / "train_2.gold_scores.jsonl").read_text().splitlines()]
    assert len(scores) == 48 and not any(s["result"] for s in scores)
    ref = [json.loads(x) for x in (run_dir / "weak_labels" / "train_2.gold_scores.jsonl").read_text().splitlines()]
    assert any(s["result"] for s in ref)


def test_demonstration_sources_and_gold_use(tmp_path: Path):
    """stage1.demos: `weak` reads no gold, `correct` (ablation) reads train_2 gold and says so, `file:`
    reads a template; the report names the source, the ids and every stage that read gold."""
    import random

    from w2s_jax.core.jsonl import write_jsonl_atomic
    from w2s_jax.pipeline.report import gold_use

    run = tmp_path / "run"
    weak = [{"id": f"q{i}", "prompt": f"Question: {i}?\nAnswer:", "response": f"{i}\n#### {i}" if i % 4 else "no key",
             "pred": str(i)} for i in range(12)]
    write_jsonl_atomic(run / "weak_labels" / "train_2.jsonl", weak)
    write_jsonl_atomic(run / "weak_labels" / "train_2.gold_scores.jsonl",
                       [{"id": r["id"], "sample": 0, "gold": "1", "pred": r["pred"], "result": i % 3 == 0}
                        for i, r in enumerate(weak)])
    shuffled = list(weak)
    random.Random(42).shuffle(shuffled)
    p = Pipeline(load_run_config(SMOKE, [*TINY, "stage1.n_demos=2"]), run, log=_quiet)
    demos, read_gold = p._demos()
    assert [d["id"] for d in demos] == [r["id"] for r in shuffled if "####" in r["response"]][:2] and not read_gold
    p = Pipeline(load_run_config(SMOKE, [*TINY, "stage1.n_demos=2", "stage1.demos=correct"]), run, log=_quiet)
    demos, read_gold = p._demos()
    assert [d["id"] for d in demos] == [r["id"] for r in shuffled if int(r["id"][1:]) % 3 == 0][:2] and read_gold
    (run / "stages").mkdir(parents=True)
    (run / "stages" / "strong_icl.json").write_text(json.dumps(
        {"demos": [d["id"] for d in demos], "demos_source": "correct", "demos_read_gold": True}))
    use = gold_use(p)
    assert use["demonstrations"] == {"source": "correct", "ids": [d["id"] for d in demos], "read_gold": True}
    assert any("stage1.demos=correct" in x for x in use["train_2_gold_read_by"])
    f = tmp_path / "demos.txt"
    f.write_text("Question: A?\nAnswer: a\n#### 1\n\nQuestion: B?\nAnswer: b\n#### 2\n")
    p = Pipeline(load_run_config(SMOKE, [*TINY, f"stage1.demos=file:{f}"]), run, log=_quiet)
    demos, read_gold = p._demos()
    assert [d["id"] for d in demos] == ["file:1", "file:2"] and not read_gold
    with pytest.raises(UserError, match="stage1.demos"):
        load_run_config(SMOKE, [*TINY, "stage1.demos=gold"])
    with pytest.raises(UserError, match="must include weak and icl"):
        load_run_config(SMOKE, [*TINY, "stage1.variants=[hybrid]"])  # TINY has rounds 2
    with pytest.raises(UserError, match="must include stage1.train_set"):
        load_run_config(SMOKE, [*TINY, "stage1.rounds=1", "stage1.variants=[weak]"])
