"""Multi-host execution: 2 processes x 4 CPU devices (coordinator on 127.0.0.1) equal 1 process x 8 devices.

The processes run tests/multihost_worker.py: a few SFT steps of a tiny model with train.py's step,
each process feeding its half of every global batch, then a greedy generation batch (full forward
passes without a cache, and the Sampler), a split/gather of records, the SFT driver (run_sft: only
process 0 writes metrics, logs and the model) and generate_records. Plus in-process unit tests of the helpers in
w2s_jax/parallel/distributed.py.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from w2s_jax.core.errors import UserError
from w2s_jax.parallel import distributed as D
from w2s_jax.parallel.sharding import make_mesh

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "multihost_worker.py"
TIMEOUT = 300


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(n_devices: int) -> dict:
    env = dict(os.environ)
    for k in ("W2S_COORDINATOR", "W2S_NUM_PROCESSES", "W2S_PROCESS_ID", "W2S_DISTRIBUTED"):
        env.pop(k, None)
    env.update(XLA_FLAGS=f"--xla_force_host_platform_device_count={n_devices}", JAX_PLATFORMS="cpu",
               PYTHONPATH=str(ROOT) + os.pathsep + env.get("PYTHONPATH", ""), TF_CPP_MIN_LOG_LEVEL="2")
    return env


def _noise(line: str) -> bool:
    return "[Gloo]" in line or "spmd_partitioner" in line or "Involuntary full rematerialization" in line


def _wait_all(procs: dict, timeout: float) -> None:
    deadline = time.time() + timeout
    for p, _ in procs.values():
        try:
            p.wait(timeout=max(1.0, deadline - time.time()))
        except subprocess.TimeoutExpired:
            for q, _ in procs.values():
                if q.poll() is None:
                    q.kill()
            for q, _ in procs.values():
                q.wait()
            break
    if any(p.returncode != 0 for p, _ in procs.values()):
        msg = []
        for n, (p, log) in procs.items():
            lines = [ln for ln in Path(log).read_text(errors="replace").splitlines() if not _noise(ln)]
            msg.append(f"--- {n}: exit {p.returncode}; stderr (last 40 lines):\n" + "\n".join(lines[-40:]))
        pytest.fail("worker process failed\n" + "\n".join(msg))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Run the 2-process job and the 1-process reference (concurrently); returns (single, [p0, p1])."""
    tmp_path = tmp_path_factory.mktemp("multihost")
    port = _free_port()
    procs = {}
    for pid in range(2):  # own --sft-out each (to see who wrote what), one checkpoint dir and output file
        log = tmp_path / f"p{pid}.err"
        cmd = [sys.executable, str(WORKER), str(tmp_path / f"p{pid}.json"), "--coordinator", f"127.0.0.1:{port}",
               "--num-processes", "2", "--process-id", str(pid), "--sft-out", str(tmp_path / f"p{pid}_sft"),
               "--ckpt-dir", str(tmp_path / "multi_ckpt"), "--gen-out", str(tmp_path / "multi_gen.jsonl")]
        procs[f"process {pid}"] = (subprocess.Popen(cmd, env=_env(4), stdout=subprocess.DEVNULL,
                                                    stderr=open(log, "w"), cwd=tmp_path), log)
    log = tmp_path / "single.err"
    cmd = [sys.executable, str(WORKER), str(tmp_path / "single.json"), "--sft-out", str(tmp_path / "single_sft"),
           "--ckpt-dir", str(tmp_path / "single_ckpt"), "--gen-out", str(tmp_path / "single_gen.jsonl")]
    procs["single"] = (subprocess.Popen(cmd, env=_env(8), stdout=subprocess.DEVNULL, stderr=open(log, "w"),
                                        cwd=tmp_path), log)
    _wait_all(procs, TIMEOUT)
    single = json.loads((tmp_path / "single.json").read_text())
    parts = [json.loads((tmp_path / f"p{i}.json").read_text()) for i in range(2)]
    return single, parts, tmp_path


def test_two_processes_equal_one(runs):
    single, parts, _ = runs
    assert single["process_count"] == 1 and not single["multi"] and single["device_count"] == 8
    for i, r in enumerate(parts):
        assert r["process_index"] == i and r["process_count"] == 2 and r["multi"]
        assert r["device_count"] == 8 and r["local_device_count"] == 4
        assert r["main"] == (i == 0)
    # each process fed only its half of the rows of every global batch
    assert all(set(rows) == {0, 2} for rows in parts[0]["local_rows"])
    assert all(set(rows) == {4, 6} for rows in parts[1]["local_rows"])
    # same losses (the cross-process all-reduces may sum in another order) and the same greedy texts
    for r in parts:
        np.testing.assert_allclose(r["losses"], single["losses"], rtol=2e-5)
        assert r["texts"] == single["texts"]
    assert single["losses"][0] != single["losses"][-1]  # the steps did update the model
    # records split across processes and gathered back in order, on every process
    assert parts[0]["mine"] == [0, 1, 2, 3] and parts[1]["mine"] == [4, 5, 6, 7]
    for r in parts:
        assert [g["id"] for g in r["gathered"]] == list(range(8))
        assert [g["text"] for g in r["gathered"]] == single["texts"]
        assert [g["by"] for g in r["gathered"]] == [0] * 4 + [1] * 4


def test_sampler_two_processes(runs):
    """The package's Sampler on a mesh spanning both processes gives the single-process texts."""
    single, parts, _ = runs
    assert single["sampler_error"] is None, single["sampler_error"]
    assert single["sampler_texts"] == single["texts"]  # the cached Sampler == full forward argmax
    for r in parts:
        assert r["sampler_error"] is None, r["sampler_error"]
        assert r["sampler_texts"] == single["texts"]


def test_scoring_two_processes(runs):
    """score_records on a mesh spanning both processes: every process gets the single-process scores."""
    single, parts, _ = runs
    assert single["score_error"] is None, single["score_error"]
    assert len(single["scores"]) == 6 and all(n > 1 and lp < 0 for lp, n in single["scores"])
    for r in parts:
        assert r["score_error"] is None, r["score_error"]
        assert [n for _, n in r["scores"]] == [n for _, n in single["scores"]]
        np.testing.assert_allclose([lp for lp, _ in r["scores"]], [lp for lp, _ in single["scores"]], rtol=1e-5)


def test_sft_driver_two_processes(runs):
    """run_sft: the same losses as one process; only process 0 writes metrics, logs and the model;
    both write one set of checkpoints."""
    single, parts, tmp_path = runs
    assert len(single["sft_losses"]) == 3 and len(single["sft_eval"]) == 1
    for r in parts:
        np.testing.assert_allclose(r["sft_losses"], single["sft_losses"], rtol=2e-5)
        np.testing.assert_allclose(r["sft_eval"], single["sft_eval"], rtol=2e-5)
    p0, p1 = (set(r["sft_files"]) for r in parts)
    assert {"metrics.jsonl", "compile.json", "model/w2s_model.json"} <= p0
    assert any(f.startswith("tensorboard/") for f in p0)
    no_tb = lambda files: {f for f in files if not f.startswith("tensorboard/")}  # noqa: E731 (host-named)
    assert no_tb(p0) == no_tb(single["sft_files"])
    assert p1 == set()  # process 1 wrote nothing outside the shared checkpoint dir
    from w2s_jax.train.metrics_log import read_metrics

    train_recs = read_metrics(tmp_path / "p0_sft" / "metrics.jsonl", split="train")
    assert [m["step"] for m in train_recs] == [1, 2, 3]
    np.testing.assert_allclose([m["loss"] for m in train_recs], single["sft_losses"], rtol=2e-5)
    assert sorted(p.name for p in (tmp_path / "multi_ckpt").iterdir() if p.name.isdigit()) == ["3"]


def test_check_shared_dir(runs):
    """A directory that is not the same for all processes is refused on every process."""
    single, parts, _ = runs
    assert single["shared_error"] is None  # one process: nothing to check
    for r in parts:
        assert r["shared_error"] and "not shared by all 2 processes (processes [1]" in r["shared_error"]


def test_run_lock_taken_once_on_process_0(runs):
    """Every process sees the lock that process 0 took in the shared directory; process 1 took none."""
    single, parts, tmp_path = runs
    assert single["lock_holder"] == single["pid"]
    assert [r["lock_holder"] for r in parts] == [parts[0]["pid"]] * 2
    assert not (tmp_path / "multi_ckpt" / ".w2s.lock").exists()  # released


def test_generate_records_two_processes(runs):
    """generate_records: every process returns the single-process records; the output file is complete."""
    single, parts, tmp_path = runs
    assert len(single["generated"]) == 8
    for r in parts:
        assert r["generated"] == single["generated"]
    lines = (tmp_path / "multi_gen.jsonl").read_text().splitlines()
    assert [json.loads(ln)["id"] for ln in lines] == [g["id"] for g in single["generated"]]


# ----------------------------------------------------------------------------- helpers, in one process


def test_initialize_single_process(monkeypatch):
    for k in ("W2S_COORDINATOR", "W2S_NUM_PROCESSES", "W2S_PROCESS_ID", "W2S_DISTRIBUTED", "SLURM_NTASKS",
              "OMPI_COMM_WORLD_SIZE"):
        monkeypatch.delenv(k, raising=False)
    assert D.initialize() is False
    assert D.initialize("127.0.0.1:1", 1, 0) is False  # one process: nothing to join
    assert D.is_main_process() and D.process_count() == 1
    D.sync("noop")
    with pytest.raises(UserError, match="process count"):
        D.initialize("127.0.0.1:1")
    monkeypatch.setenv("W2S_COORDINATOR", "127.0.0.1:1")
    monkeypatch.setenv("W2S_NUM_PROCESSES", "2")
    monkeypatch.setenv("W2S_PROCESS_ID", "x")
    with pytest.raises(UserError, match="W2S_PROCESS_ID"):
        D.initialize()
    monkeypatch.setenv("W2S_PROCESS_ID", "2")
    with pytest.raises(UserError, match="not in"):
        D.initialize()


@pytest.mark.parametrize("n, parts", [(10, 3), (3, 4), (0, 2), (8, 2)])
def test_shard_records_partition(n, parts):
    recs = list(range(n))
    pieces = [D.shard_records(recs, i, parts) for i in range(parts)]
    assert sum(pieces, []) == recs
    assert max(map(len, pieces)) - min(map(len, pieces)) <= 1


def test_gather_records_single():
    recs = [{"id": 1, "text": "héllo"}, {"id": 2, "x": [1, 2]}]
    assert D.gather_records(D.shard_records(recs)) == recs
    assert D.allgather_bytes(b"abc") == [b"abc"]


def test_process_local_batch_single_process():
    mesh = make_mesh({"data": 2, "fsdp": 4}, jax.devices()[:8])
    sh = NamedSharding(mesh, P(None, ("data", "fsdp"), None))
    x = np.arange(3 * 8 * 5, dtype=np.int32).reshape(3, 8, 5)
    assert D.local_slices(sh, x.shape) == (slice(0, 3), slice(0, 8), slice(0, 5))
    arr = D.process_local_batch({"a": x, "b": x + 1}, {"a": sh, "b": sh})
    np.testing.assert_array_equal(np.asarray(arr["a"]), x)
    np.testing.assert_array_equal(D.to_host(arr["b"]), x + 1)
    assert arr["a"].sharding == sh
    arr2 = D.process_local_batch(x, sh, global_shape=x.shape)
    np.testing.assert_array_equal(np.asarray(arr2), x)
