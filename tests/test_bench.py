"""`w2s bench`: the suite runs end to end on a tiny model and writes well-formed JSON (no speed asserts)."""

import json
import math

import pytest

from w2s_jax.cli import bench as bench_cli
from w2s_jax.cli import main as cli_main
from w2s_jax.core.errors import UserError
from w2s_jax.tools import bench


def test_bench_quick_tiny(tmp_path, monkeypatch):
    monkeypatch.setenv("W2S_COMPILE_CACHE", str(tmp_path / "xla"))
    out = tmp_path / "bench.json"
    rc = cli_main(["bench", "--quick", "--preset", "tiny", "--only", "score,lora", "--batch", "2", "--seq", "16",
                   "--rounds", "1", "--out", str(out)])
    assert rc == 0
    res = json.loads(out.read_text())
    for k in ("device_kind", "date", "versions", "mode", "rows"):
        assert k in res
    for k in ("jax", "torch", "transformers"):
        assert res["versions"][k]
    names = [r["workload"] for r in res["rows"]]
    assert names == ["score", "sft (lora r8)", "dpo (lora r8)"]
    for r in res["rows"]:
        for k in ("jax_tok_s", "baseline_tok_s", "ratio", "jax_step_ms", "jax_compile_s"):
            assert isinstance(r[k], (int, float)) and math.isfinite(r[k]) and r[k] > 0, (r["workload"], k, r[k])
        assert "mfu" in r and "jax_peak_memory_bytes" in r
    assert res["rows"][0]["max_abs_logprob_diff"] < 1e-2  # same weights on both sides


def test_plan_and_gpu_mode_message(capsys):
    args = type("A", (), dict(mode="cpu", preset=None, quick=True, rounds=None, batch=None, seq=None, layers=None,
                              profile=None, only=list(bench.WORKLOADS)))()
    scripts = [(w, s) for w, s, _ in bench.plan(args)]
    assert scripts == [("sft", "bench_train.py"), ("dpo", "bench_lora.py"), ("score", "bench_scoring.py"),
                       ("generate", "bench_generate.py"), ("lora", "bench_lora.py")]
    with pytest.raises(UserError, match="gpu"):
        bench_cli.main(["--mode", "gpu", "--only", "score"])
    assert cli_main(["bench", "--only", "nope"]) == 2


def test_gpu_plan_and_decode_bound():
    args = type("A", (), dict(mode="gpu", preset=None, quick=False, rounds=None, batch=None, seq=None, layers=None,
                              profile=None, only=list(bench.WORKLOADS)))()
    plan = {w: (s, a) for w, s, a in bench.plan(args)}
    assert set(plan) == set(bench.WORKLOADS)
    s, a = plan["generate"]
    assert s == "bench_generate.py" and a[a.index("--device") + 1] == "cuda" and a[a.index("--dtype") + 1] == "bfloat16"
    assert a[a.index("--preset") + 1] == "llama2-7b"
    s, a = plan["sft"]  # full fine-tuning of the 7B shape cut to 8 layers, sequences of 1024
    assert s == "bench_lora.py" and a[a.index("--layers") + 1] == "8" and a[a.index("--seq") + 1] == "1024"

    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_generate", bench.benchmarks_dir() / "bench_generate.py")
    bg = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bg)
    from w2s_jax.models.config import get_preset

    cfg = get_preset("llama2-7b", dtype="bfloat16", param_dtype="bfloat16")
    nb = bg.decode_bytes_per_step(cfg, batch=1, context=100)
    # Llama-2-7B: 6,738,415,616 parameters, of which the 32000 x 4096 input embedding is not streamed
    assert nb["weights"] == (6_738_415_616 - 32000 * 4096) * 2
    assert nb["kv_cache"] == 2 * 32 * 32 * 128 * 100 * 2  # K and V, 32 layers x 32 heads x 128, 100 tokens, bf16
    tied = get_preset("smollm2-135m")  # tied embeddings: the head reads the whole table, float32
    assert bg.decode_bytes_per_step(tied, 4, 10)["weights"] == tied.num_params * 4


def test_generation_rows_and_table_with_hbm_bound(capsys):
    """A GPU generation result (the JSON bench_generate.py writes) becomes table rows with the decode
    step's share of the HBM bound."""
    res = {"rows": [{"batch": 1, "jax_ms_per_step": 4.35, "jax_tok_s": 230.0, "jax_compile_s": 32.2,
                     "hf_tok_s": 50.4, "hf_ms_per_step": 19.9, "ratio": 4.56, "jax_decode_ms_per_step": 4.32,
                     "fraction_of_bound_datasheet_bytes_s": 0.64},
                    {"batch": 16, "jax_ms_per_step": 20.0, "jax_tok_s": 800.0, "jax_compile_s": 30.0,
                     "hf_tok_s": 400.0, "hf_ms_per_step": 40.0, "ratio": 2.0}]}
    rows = bench._rows_from("generate", res, 989e12, 6_738_415_616)
    assert [r["workload"] for r in rows] == ["generate b1", "generate b16"]
    assert rows[0]["hbm_bound_fraction"] == 0.64 and rows[1]["hbm_bound_fraction"] is None
    assert rows[0]["mfu"] == pytest.approx(230.0 * 2 * 6_738_415_616 / 989e12)
    bench.print_table(rows)
    out = capsys.readouterr().out
    assert "of HBM bound" in out and "| 64%" in out


def test_gpu_suite_script_budget(tmp_path):
    """benchmarks/gpu_suite.sh (a dry run with PY=echo): stages run in order, each limited by what is
    left of the total budget, unknown stages are reported, and a stage is skipped once under 20 s are left."""
    import os
    import subprocess

    script = bench.benchmarks_dir() / "gpu_suite.sh"
    env = {**os.environ, "PY": "echo", "OUT": str(tmp_path), "BUDGET": "150", "STAGES": "gen sft nope score"}
    p = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    log = (tmp_path / "suite.log").read_text()
    starts = [ln for ln in log.splitlines() if ln.startswith("== ") and "(limit" in ln]
    assert [ln.split()[1] for ln in starts] == ["gen", "sft", "score"]
    assert "(limit 145s)" in starts[0]  # min(200, budget - 5)
    assert "--preset llama2-7b --device cuda --dtype bfloat16" in starts[1] and "--layers 8" in starts[1]
    assert "unknown stage nope" in log
    env["BUDGET"] = "10"
    p = subprocess.run(["bash", str(script)], env={**env, "STAGES": "gen"}, capture_output=True, text=True,
                       timeout=60)
    assert "== gen skipped" in (tmp_path / "suite.log").read_text()
