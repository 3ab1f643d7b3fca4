"""Reliability of training: the DPO reference cache is keyed by pair content and lives in out_dir."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from w2s_jax.io.tokenizer import ByteTokenizer
from w2s_jax.models.config import ModelConfig
from w2s_jax.models.params import param_shapes
from w2s_jax.train import build as TB
from w2s_jax.train import config as TC
from w2s_jax.train import loop as T

TOK = ByteTokenizer()
CFG = ModelConfig("t", vocab_size=259, d_model=32, n_layers=1, n_heads=4, n_kv_heads=2, head_dim=8, d_ff=64,
                  rope_theta=10000.0, norm_eps=1e-5)


@pytest.fixture(autouse=True)
def fast_compile(monkeypatch):
    monkeypatch.setattr(TB, "COMPILER_OPTIONS", {"xla_backend_optimization_level": 0})


def init_params(cfg, seed):
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map_with_path(
        lambda path, s: jnp.ones(s.shape, s.dtype) if "norm" in jax.tree_util.keystr(path)
        else jnp.asarray(rng.normal(0, 0.5, s.shape), s.dtype), param_shapes(cfg))


def repeated_id_pairs(questions=3, per_question=3):
    """Up to three pairs per question sharing the question's id, as `w2s data pairs` gives for MATH."""
    return [{"id": f"q{i}", "prompt": f"{i}*3=", "chosen": f"{3 * i}{'!' * k}", "rejected": f"{3 * i + k + 1}"}
            for i in range(questions) for k in range(per_question)]


def test_dpo_reference_with_repeated_ids_gives_ln2_at_step_one(tmp_path):
    """Policy == reference at step 1, so the sigmoid loss is exactly ln 2 for every pair, which only
    holds when each pair gets its own reference log-probs (ids repeat across pairs)."""
    records = repeated_id_pairs()
    cache = tmp_path / "ref.jsonl"
    c = TC.TrainConfig(lr=1e-3, batch_size=len(records), seq_len=32, max_steps=1, progress=False, tensorboard=False,
                      reference="precompute", beta=1.0)
    for run in ("a", "b"):  # "b" reads the cache "a" wrote
        r = T.run_dpo(T.TrainModel(init_params(CFG, 7), CFG, TOK), records, c, tmp_path / run, ref_cache=cache)
        assert r.history[0]["loss"] == pytest.approx(math.log(2), abs=1e-5), run
        assert r.history[0]["rewards/margins"] == pytest.approx(0.0, abs=1e-5)
    rows = [json.loads(x) for x in cache.read_text().splitlines()]
    assert len(rows) == len(records) and len({x["key"] for x in rows}) == len(records)


def test_dpo_cli_writes_the_reference_cache_in_out_dir(tmp_path, capsys):
    """Nothing is written next to the training data (which may be a read-only mount)."""
    from w2s_jax.cli.app import main
    from w2s_jax.core.jsonl import write_jsonl_atomic

    data = tmp_path / "data"
    write_jsonl_atomic(data / "prefs.jsonl", repeated_id_pairs(2, 2))
    before = sorted(p.name for p in data.iterdir())
    (tmp_path / "c.yaml").write_text(
        "model: {preset: tiny, overrides: {vocab_size: 264, n_layers: 1}}\n"
        f"data: {{train: {data / 'prefs.jsonl'}}}\n"
        "train: {batch_size: 2, seq_len: 32, max_steps: 1, progress: false, tensorboard: false}\n"
        f"mesh: {{data: 1}}\nout_dir: {tmp_path / 'dpo'}\n"
    )
    assert main(["dpo", "--config", str(tmp_path / "c.yaml"), "--log-level", "WARNING"]) == 0
    assert sorted(p.name for p in data.iterdir()) == before
    assert (tmp_path / "dpo" / "ref_logps.jsonl").is_file()


def test_training_refuses_a_model_dir_it_did_not_write_before_training(tmp_path):
    from w2s_jax.core.errors import UserError

    out = tmp_path / "run"
    (out / "hf").mkdir(parents=True)
    (out / "hf" / "config.json").write_text("{}")  # someone else's files
    c = TC.TrainConfig(batch_size=2, seq_len=32, max_steps=1, progress=False, tensorboard=False)
    records = [{"id": str(i), "prompt": f"{i}+1=", "completion": str(i + 1)} for i in range(4)]
    with pytest.raises(UserError, match=f"refusing to overwrite {out / 'hf'}"):
        T.run_sft(T.TrainModel(init_params(CFG, 1), CFG, TOK), records, c, out, export_hf=True)
    assert not (out / "checkpoints").exists() and (out / "hf" / "config.json").read_text() == "{}"
