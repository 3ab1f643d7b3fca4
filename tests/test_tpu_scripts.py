"""tpu_scripts/*.sh: every script with --dry-run prints the gcloud/gsutil commands it would run (and runs
none of them), settings come from flags or environment variables, and shellcheck passes."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "tpu_scripts"
ALL = sorted(SCRIPTS.glob("*.sh"))
RUNNABLE = [p for p in ALL if p.name != "lib.sh"]


@pytest.fixture
def env(tmp_path):
    """No W2S_* settings from the caller; fake gcloud/gsutil/git that record any call and fail."""
    fake = tmp_path / "bin"
    fake.mkdir()
    marker = tmp_path / "called"
    for tool in ("gcloud", "gsutil", "git"):
        p = fake / tool
        p.write_text(f"#!/bin/sh\necho {tool} \"$@\" >> {marker}\nexit 99\n")
        p.chmod(0o755)
    e = {k: v for k, v in os.environ.items() if not k.startswith("W2S_")}
    e["PATH"] = f"{fake}{os.pathsep}{e['PATH']}"
    e["TMPDIR"] = str(tmp_path)
    e["_MARKER"] = str(marker)
    return e


def run(script: str, *args: str, env: dict, ok: bool = True) -> subprocess.CompletedProcess:
    p = subprocess.run(["bash", str(SCRIPTS / script), *args], env=env, capture_output=True, text=True, timeout=30,
                       cwd=ROOT)
    if ok:
        assert p.returncode == 0, f"{script} {args}: exit {p.returncode}\n{p.stderr}"
        assert not Path(env["_MARKER"]).exists(), "dry-run executed: " + Path(env["_MARKER"]).read_text()
    return p


def commands(out: str) -> list[list[str]]:
    """The printed commands, as argument lists ('+ ' lines)."""
    return [shlex.split(line[2:]) for line in out.splitlines() if line.startswith("+ ")]


LOC = ["--zone", "us-east5-a", "--project", "my-proj"]


def test_create_tpu_vm(env):
    cmds = commands(run("create.sh", "--dry-run", "--name", "w2s-a", *LOC, "--accelerator-type", "v5p-128",
                        env=env).stdout)
    assert cmds == [["gcloud", "compute", "tpus", "tpu-vm", "create", "w2s-a", "--zone", "us-east5-a", "--project",
                     "my-proj", "--accelerator-type", "v5p-128", "--version", "v2-alpha-tpuv5"]]


def test_create_queued_from_env(env):
    env.update(W2S_TPU_NAME="qq", W2S_ZONE="europe-west4-a", W2S_ACCELERATOR_TYPE="v6e-8", W2S_QUEUED="1",
               W2S_SPOT="1", W2S_DRY_RUN="1")
    out = run("create.sh", env=env).stdout
    cmds = commands(out)
    assert cmds[0] == ["gcloud", "compute", "tpus", "queued-resources", "create", "qq-qr", "--node-id", "qq",
                       "--zone", "europe-west4-a", "--accelerator-type", "v6e-8", "--runtime-version",
                       "v2-alpha-tpuv6e", "--spot"]
    assert cmds[1][:6] == ["gcloud", "compute", "tpus", "queued-resources", "describe", "qq-qr"]
    assert "--format=value(state.state)" in cmds[1]
    # a flag wins over the environment
    cmds = commands(run("create.sh", "--accelerator-type", "v5litepod-16", "--reserved", "--no-wait", env=env).stdout)
    assert len(cmds) == 1 and cmds[0][cmds[0].index("--runtime-version") + 1] == "v2-alpha-tpuv5-lite"
    assert "--reserved" in cmds[0]


@pytest.mark.parametrize("accel, version", [("v4-32", "tpu-ubuntu2204-base"), ("v5e-8", "v2-alpha-tpuv5-lite")])
def test_runtime_version_defaults(env, accel, version):
    cmd = commands(run("create.sh", "--dry-run", "--accelerator-type", accel, env=env).stdout)[0]
    assert cmd[cmd.index("--version") + 1] == version
    cmd = commands(run("create.sh", "--dry-run", "--accelerator-type", accel, "--runtime-version", "custom",
                       env=env).stdout)[0]
    assert cmd[cmd.index("--version") + 1] == "custom"


def test_delete(env):
    assert commands(run("delete.sh", "--dry-run", "--name", "n", *LOC, env=env).stdout) == [
        ["gcloud", "compute", "tpus", "tpu-vm", "delete", "n", "--zone", "us-east5-a", "--project", "my-proj",
         "--quiet"]]
    assert commands(run("delete.sh", "--dry-run", "--name", "n", "--queued", "--async", env=env).stdout) == [
        ["gcloud", "compute", "tpus", "queued-resources", "delete", "n-qr", "--force", "--quiet", "--async"]]


def _ssh(cmd: list[str]) -> tuple[str, str]:
    """(worker, remote command) of a `gcloud compute tpus tpu-vm ssh` line."""
    assert cmd[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh"], cmd
    worker = next(a.split("=", 1)[1] for a in cmd if a.startswith("--worker="))
    return worker, cmd[cmd.index("--command") + 1]


def test_setup_from_head_archive(env):
    cmds = commands(run("setup.sh", "--dry-run", "--name", "n", "--zone", "z", env=env).stdout)
    assert _ssh(cmds[0]) == ("all", "mkdir -p w2s/configs w2s/logs w2s/dist")
    assert cmds[1][:4] == ["git", "-C", str(ROOT), "archive"] and cmds[1][-1] == "HEAD"
    assert cmds[2][:5] == ["gcloud", "compute", "tpus", "tpu-vm", "scp"] and "--worker=all" in cmds[2]
    worker, remote = _ssh(cmds[3])
    assert worker == "all" and "pip install --upgrade \"w2s-jax[tpu] @ file://$HOME/w2s/dist/" in remote
    worker, remote = _ssh(cmds[4])  # every worker starts JAX together and reports the slice
    assert worker == "all" and "jax.device_count()" in remote


def test_setup_from_git_url(env):
    url = "git+https://github.com/org/w2s-jax@v0.1.0"
    cmds = commands(run("setup.sh", "--dry-run", "--package", url, "--no-verify", env=env).stdout)
    assert len(cmds) == 2
    assert _ssh(cmds[1])[1].endswith(f'pip install --upgrade "w2s-jax[tpu] @ {url}"')


def test_data_actions(env):
    cmds = commands(run("data.sh", "--dry-run", "--bucket", "my-bucket", "upload", "configs/tpu", env=env).stdout)
    assert cmds == [["gsutil", "-m", "rsync", "-r", "configs/tpu", "gs://my-bucket/tpu"]]
    cmds = commands(run("data.sh", "--dry-run", "--bucket", "gs://b/", "upload", "pyproject.toml", "cfg/p.toml",
                        env=env).stdout)
    assert cmds == [["gsutil", "-m", "cp", "pyproject.toml", "gs://b/cfg/p.toml"]]
    worker, remote = _ssh(commands(run("data.sh", "--dry-run", "--bucket", "b", "mount", env=env).stdout)[0])
    assert worker == "all" and "gcsfuse --implicit-dirs b /mnt/gcs" in remote and "apt-get install" in remote
    worker, remote = _ssh(commands(run("data.sh", "--dry-run", "--bucket", "b", "--mount-dir", "/data", "unmount",
                                       env=env).stdout)[0])
    assert "fusermount -u /data" in remote
    worker, remote = _ssh(commands(run("data.sh", "--dry-run", "--bucket", "b", "download", "ckpt/70b",
                                       "/tmp/70b", env=env).stdout)[0])
    assert worker == "all" and "gsutil -m -q rsync -r gs://b/ckpt/70b /tmp/70b" in remote


def test_launch_run_on_all_workers(env):
    cfg = "configs/tpu/llama2-70b-full-v5p128.yaml"
    out = run("launch.sh", "--dry-run", "--name", "n", "--zone", "z", "--config", cfg, "--bucket", "b",
              "--set", "strong_train.lr=2e-5", "--env", "LIBTPU_INIT_ARGS=--xla_a=1 --xla_b", "--",
              "--until", "stage1", env=env).stdout
    cmds = commands(out)
    assert _ssh(cmds[0])[0] == "all"
    assert cmds[1][4] == "scp" and cmds[1][5:7] == [cfg, "n:w2s/configs/llama2-70b-full-v5p128.yaml"]
    worker, remote = _ssh(cmds[2])
    assert worker == "all"
    assert "nohup env W2S_DISTRIBUTED=1 'LIBTPU_INIT_ARGS=--xla_a=1 --xla_b' python3 -m w2s_jax.cli run " \
           "w2s/configs/llama2-70b-full-v5p128.yaml --out /mnt/gcs/runs/n --set strong_train.lr=2e-5 " \
           "--until stage1 > w2s/logs/run.log" in remote
    assert "echo $! > w2s/logs/run.pid" in remote
    assert _ssh(cmds[3]) == ("0", "tail -n +1 -F w2s/logs/run.log")


def test_launch_stage_foreground_and_stop(env):
    cmds = commands(run("launch.sh", "--dry-run", "--stage", "sft", "--config", "gs://b/sft.yaml", "--foreground",
                        env=env).stdout)
    assert _ssh(cmds[1])[1] == "gsutil -q cp gs://b/sft.yaml w2s/configs/sft.yaml"
    assert _ssh(cmds[2])[1] == ("set -o pipefail; cd ~ && env W2S_DISTRIBUTED=1 python3 -m w2s_jax.cli sft --config "
                                "w2s/configs/sft.yaml 2>&1 | tee w2s/logs/sft.log")
    assert len(cmds) == 3
    cmds = commands(run("launch.sh", "--dry-run", "--stop", "--stage", "dpo", env=env).stdout)
    assert len(cmds) == 1 and "kill $(cat w2s/logs/dpo.pid)" in _ssh(cmds[0])[1]


def test_logs(env):
    assert _ssh(commands(run("logs.sh", "--dry-run", env=env).stdout)[0]) == ("0", "tail -n +1 -F w2s/logs/run.log")
    assert _ssh(commands(run("logs.sh", "--dry-run", "--worker", "all", "--lines", "50", "--no-follow", "--stage",
                             "sft", env=env).stdout)[0]) == ("all", "tail -n 50 w2s/logs/sft.log")


def test_run_all_round_trip(env):
    out = run("run_all.sh", "--dry-run", "--queued", "--zone", "z", "--bucket", "b", "--config", "c.yaml",
              "--package", "git+https://x/y", "--", "--until", "eval", env=env).stdout
    cmds = commands(out)
    verbs = [" ".join(c[:5]) for c in cmds]
    assert verbs[0] == "gcloud compute tpus queued-resources create"
    assert verbs[-1] == "gcloud compute tpus queued-resources delete"  # deleted at the end
    remotes = [_ssh(c)[1] for c in cmds if c[4:5] == ["ssh"]]
    assert any("pip install" in r for r in remotes)
    assert any("gcsfuse" in r for r in remotes)
    assert any("w2s_jax.cli run w2s/configs/c.yaml --out /mnt/gcs/runs/w2s-tpu --until eval 2>&1 | tee" in r
               for r in remotes)
    kept = commands(run("run_all.sh", "--dry-run", "--config", "c.yaml", "--keep", env=env).stdout)
    assert "delete" not in [c[4] for c in kept]


@pytest.mark.parametrize(
    "script, args, message",
    [
        ("create.sh", ["--bogus"], "unknown argument"),
        ("create.sh", ["--accelerator-type", "v9-8"], "unknown accelerator type"),
        ("create.sh", ["--zone"], "--zone needs a value"),
        ("launch.sh", [], "no config"),
        ("launch.sh", ["--config", "c.yaml", "--stage", "Bad;rm"], "bad --stage"),
        ("data.sh", ["mount"], "no bucket"),
        ("data.sh", ["--bucket", "b", "frobnicate"], "unknown action"),
        ("logs.sh", ["--worker", "x"], "--worker"),
        ("run_all.sh", [], "no config"),
    ],
)
def test_errors(env, script, args, message):
    p = run(script, "--dry-run", *args, env=env, ok=False)
    assert p.returncode == 2 and message in p.stderr, p.stderr


@pytest.mark.parametrize("script", RUNNABLE, ids=lambda p: p.name)
def test_help_and_strict_mode(env, script):
    p = run(script.name, "--help", env=env)
    assert p.stdout.startswith("usage:") and "--dry-run" in p.stdout
    text = script.read_text()
    assert text.startswith("#!/usr/bin/env bash\n") and "set -euo pipefail" in text
    assert os.access(script, os.X_OK)


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck not installed (apt-get install shellcheck)")
def test_shellcheck():
    p = subprocess.run(["shellcheck", "-x", *map(str, ALL)], capture_output=True, text=True, cwd=SCRIPTS)
    assert p.returncode == 0, p.stdout + p.stderr


def test_bash_syntax():
    for script in ALL:
        p = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
        assert p.returncode == 0, f"{script.name}: {p.stderr}"
