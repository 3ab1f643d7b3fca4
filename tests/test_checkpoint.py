"""Checkpoints: kill-and-resume equality, corrupt-checkpoint fallback, NaN stop."""

import glob
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from w2s_jax.io.orbax import Checkpointer, CheckpointWarning, tree_checksums
from w2s_jax.io.tokenizer import ByteTokenizer
from w2s_jax.models.config import ModelConfig
from w2s_jax.models.params import param_shapes
from w2s_jax.train import build as TB
from w2s_jax.train import config as TC
from w2s_jax.train import loop as T
from w2s_jax.train.batching import SFTBatcher, tokenize_sft

TOK = ByteTokenizer()
CFG = ModelConfig("t", vocab_size=259, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, d_ff=64)
RECORDS = [{"id": f"s{i}", "prompt": f"{i}+{i % 5}=", "completion": str(i + i % 5)} for i in range(12)]
# 6 batches per epoch, 2 epochs: a resumed run crosses the epoch boundary
TCFG = TC.TrainConfig(lr=3e-3, batch_size=2, seq_len=32, packing=False, epochs=2, save_every=2, keep=3,
                     log_every=4, progress=False, tensorboard=False, weight_decay=0.01)


@pytest.fixture(autouse=True)
def fast_compile(monkeypatch):
    monkeypatch.setattr(TB, "COMPILER_OPTIONS", {"xla_backend_optimization_level": 0})


def params0():
    rng = np.random.default_rng(0)
    return jax.tree_util.tree_map_with_path(
        lambda path, s: jnp.ones(s.shape, s.dtype) if "norm" in jax.tree_util.keystr(path)
        else jnp.asarray(rng.normal(0, 0.02, s.shape), s.dtype), param_shapes(CFG))


def run(out, cfg=TCFG, stop_after=None, params=None):
    def on_step(step, metrics):
        if stop_after is not None and step >= stop_after:
            raise KeyboardInterrupt(f"killed after step {step}")

    model = T.TrainModel(params0() if params is None else params, CFG, TOK)
    return T.run_sft(model, RECORDS, cfg, out, on_step=on_step)


@pytest.fixture(scope="module")
def baseline(tmp_path_factory):
    import pytest as _p

    mp = _p.MonkeyPatch()
    mp.setattr(TB, "COMPILER_OPTIONS", {"xla_backend_optimization_level": 0})
    out = tmp_path_factory.mktemp("base")
    r = run(out)
    mp.undo()
    assert r.step == 12 and [h["step"] for h in r.history] == list(range(1, 13))
    return {h["step"]: h["loss"] for h in r.history}, r


def test_kill_and_resume_gives_the_same_losses(tmp_path, baseline):
    losses, _ = baseline
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, stop_after=7)  # dies between checkpoints (last one: step 6)
    ck = Checkpointer(tmp_path / "checkpoints")
    assert ck.all_steps() == [2, 4, 6]
    ck.close()
    r = run(tmp_path)
    assert r.resumed_from == 6
    got = {h["step"]: h["loss"] for h in r.history}
    assert sorted(got) == list(range(7, 13))
    for s, v in got.items():
        assert v == losses[s], (s, v, losses[s])  # bitwise: same program, same data, same state
    # a second kill right after a checkpoint, then resume to the end
    r2 = run(tmp_path)
    assert r2.resumed_from == 12 and r2.history == []  # nothing left to do
    # the metrics log reads as one run: every step logged once
    from w2s_jax.train.metrics_log import read_metrics

    steps = [m["step"] for m in read_metrics(tmp_path / "metrics.jsonl", "train")]
    assert steps == sorted(set(steps)) and steps[-1] == 12


def test_final_params_equal_after_resume(tmp_path, baseline):
    _, full = baseline
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, stop_after=3)
    r = run(tmp_path)
    assert r.resumed_from == 2
    assert tree_checksums(r.params) == tree_checksums(full.params)


def _garble_latest(ckdir):
    steps = sorted(int(d) for d in os.listdir(ckdir) if d.isdigit())
    latest = steps[-1]
    files = [f for f in glob.glob(f"{ckdir}/{latest}/state/**/d/*", recursive=True) if os.path.isfile(f)]
    assert files
    for f in files:
        data = bytearray(open(f, "rb").read())
        for i in range(len(data) // 2, len(data)):
            data[i] ^= 0x5A
        open(f, "wb").write(data)
    return steps


def test_corrupt_checkpoint_falls_back_to_previous(tmp_path, baseline):
    losses, _ = baseline
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, stop_after=9)  # checkpoints 4, 6, 8
    steps = _garble_latest(tmp_path / "checkpoints")
    assert steps == [4, 6, 8]
    with pytest.warns(CheckpointWarning, match="step 8"):
        r = run(tmp_path)
    assert r.resumed_from == 6
    got = {h["step"]: h["loss"] for h in r.history}
    assert sorted(got) == list(range(7, 13)) and all(got[s] == losses[s] for s in got)
    assert (tmp_path / "checkpoints.corrupt").is_dir()  # the broken step was moved aside, not lost


def test_truncated_file_is_detected(tmp_path):
    ck = Checkpointer(tmp_path / "c", keep=5, async_save=False)
    state = {"w": jnp.arange(64.0).reshape(8, 8), "n": jnp.int32(1)}
    ck.save(1, state, {})
    ck.save(2, jax.tree.map(lambda x: x + 1, state), {})
    ck.wait()
    for f in glob.glob(str(tmp_path / "c" / "2" / "state" / "**" / "d" / "*"), recursive=True):
        with open(f, "r+b") as fh:
            fh.truncate(max(os.path.getsize(f) // 3, 1))
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
    ck2 = Checkpointer(tmp_path / "c")
    with pytest.warns(CheckpointWarning):
        r = ck2.restore_latest(abstract)
    assert r.step == 1 and float(r.state["w"][1, 1]) == 9.0
    ck.close()
    ck2.close()


def test_partial_checkpoints_are_skipped(tmp_path):
    """A save killed before finalising leaves a tmp dir (ignored); a step dir with an item missing
    is skipped with a warning."""
    import shutil

    ck = Checkpointer(tmp_path / "c", keep=5, async_save=False)
    state = {"w": jnp.ones((4, 4)), "n": jnp.int32(1)}
    ck.save(1, state, {"data_pos": [0, 1]})
    ck.save(2, state, {"data_pos": [0, 2]})
    ck.close()
    (tmp_path / "c" / "3.orbax-checkpoint-tmp").mkdir()
    (tmp_path / "c" / "3.orbax-checkpoint-tmp" / "junk").write_text("x")
    shutil.rmtree(tmp_path / "c" / "2" / "state")
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
    ck2 = Checkpointer(tmp_path / "c")
    assert ck2.all_steps() == [1, 2]  # the unfinished step 3 is not a checkpoint (orbax removes it)
    with pytest.warns(CheckpointWarning, match="step 2"):
        r = ck2.restore_latest(abstract)
    assert r.step == 1 and r.meta["data_pos"] == [0, 1]
    ck2.save(2, state, {"data_pos": [0, 2]})  # the broken step number can be written again
    ck2.close()
    ck3 = Checkpointer(tmp_path / "c")
    assert ck3.restore_latest(abstract).step == 2
    ck3.close()


def test_nan_loss_stops_with_the_step_and_keeps_last_checkpoint(tmp_path):
    """A poisoned input: the embedding of one byte is inf, and only one record contains it, so the
    loss turns NaN exactly at the step that batch is used."""
    bad = "\x7f"
    records = list(RECORDS)
    records[7] = dict(records[7], completion=records[7]["completion"] + bad)
    params = params0()
    params["embed"] = params["embed"].at[ord(bad)].set(jnp.inf)
    ex, _ = tokenize_sft(records, TOK, TCFG.seq_len)
    plan = SFTBatcher(ex, TCFG.batch_size, TCFG.seq_len, packing=False, seed=TCFG.seed).plan(0)
    bad_step = 1 + next(i for i, (_, rows) in enumerate(plan) if any(7 in r for r in rows))
    model = T.TrainModel(params, CFG, TOK)
    with pytest.raises(T.TrainingDiverged, match=rf"at step {bad_step}\b") as ei:
        T.run_sft(model, records, TCFG, tmp_path)
    last_good = (bad_step - 1) // 2 * 2
    ck = Checkpointer(tmp_path / "checkpoints")
    steps = ck.all_steps()
    assert all(s < bad_step for s in steps)
    if last_good:
        assert steps[-1] == last_good and f"step {last_good}" in str(ei.value)
        b = TB.build_steps("sft", CFG, TCFG, 12, TB.single_mesh())
        r = ck.restore_latest(b.abstract_state)  # verifies every leaf's checksum
        assert r.step == last_good and np.isfinite(np.asarray(r.state.params["layers"]["wq"])).all()
    ck.close()
