"""`w2s bench`: the suite runs end to end on a tiny model and writes well-formed JSON (no speed asserts)."""

import json
import math

import pytest

from w2s_jax import bench
from w2s_jax.cli import main as cli_main
from w2s_jax.errors import UserError


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
        bench.main(["--mode", "gpu", "--only", "score"])
    assert cli_main(["bench", "--only", "nope"]) == 2
