"""Reliability: one writer per run directory / output, no silent resume with another model or settings,
outputs never destroy inputs or unrelated files, and clean one-line errors."""

from __future__ import annotations

import json
import os
import shlex
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from w2s_jax.core.errors import UserError
from w2s_jax.core.jsonl import read_jsonl, write_jsonl_atomic
from w2s_jax.parallel.locking import LOCK_NAME, FileLock, hold, lock_path_for_file

REPO = Path(__file__).resolve().parents[1]

HOLDER = """
import sys, time
from w2s_jax.parallel.locking import FileLock
FileLock(sys.argv[1], "test").acquire()
print("locked", flush=True)
time.sleep(120)
"""


def start_holder(lock: Path) -> subprocess.Popen:
    """Another process holding ``lock`` (it runs this checkout's code)."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    p = subprocess.Popen([sys.executable, "-c", HOLDER, str(lock)], cwd=REPO, env=env, stdout=subprocess.PIPE,
                         text=True)
    assert p.stdout.readline().strip() == "locked"
    return p


def kill(p: subprocess.Popen) -> None:
    p.send_signal(signal.SIGKILL)
    p.wait(timeout=30)


# ----------------------------------------------------------------------------- locks


def test_lock_refuses_a_second_writer_naming_pid_and_host_then_takes_over_when_stale(tmp_path, capsys):
    lock = tmp_path / "run" / LOCK_NAME
    holder = start_holder(lock)
    try:
        with pytest.raises(UserError, match=rf"pid {holder.pid} on host {socket.gethostname()}"):
            FileLock(lock, "run directory x").acquire()
    finally:
        kill(holder)
    assert lock.exists()  # killed: the file is left behind, but nobody holds it
    with FileLock(lock, "run directory x"):
        assert json.loads(lock.read_text())["pid"] == os.getpid()
        assert f"stale lock {lock} left by pid {holder.pid}" in capsys.readouterr().err
        with pytest.raises(UserError, match=f"pid {os.getpid()}"):  # a second lock in this process too
            FileLock(lock, "run directory x").acquire()
    assert not lock.exists()  # released: removed


def test_lock_leaves_no_directory_it_made_for_nothing(tmp_path):
    with FileLock(tmp_path / "new" / "run" / LOCK_NAME, "run directory"):
        assert (tmp_path / "new" / "run").is_dir()
    assert not (tmp_path / "new").exists()
    with FileLock(tmp_path / "kept" / LOCK_NAME, "run directory"):
        (tmp_path / "kept" / "results.md").write_text("x")
    assert (tmp_path / "kept" / "results.md").exists() and not (tmp_path / "kept" / LOCK_NAME).exists()


def test_lock_without_flock_decides_by_pid(tmp_path, monkeypatch, capsys):
    """On a file system without flock: a live pid on this host or any pid on another host is refused,
    a dead pid on this host is taken over."""
    import fcntl

    def no_flock(fd, op):
        raise OSError(38, "Function not implemented")  # ENOSYS

    monkeypatch.setattr(fcntl, "flock", no_flock)
    lock = tmp_path / LOCK_NAME
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    for info, refused in (({"pid": os.getppid(), "host": socket.gethostname()}, True),
                          ({"pid": dead.pid, "host": "elsewhere"}, True),
                          ({"pid": dead.pid, "host": socket.gethostname()}, False)):
        lock.write_text(json.dumps(info))
        if refused:
            with pytest.raises(UserError, match=f"pid {info['pid']} on host {info['host']}"):
                FileLock(lock, "x").acquire()
        else:
            FileLock(lock, "x").acquire().release()
            assert "stale lock" in capsys.readouterr().err


def test_multihost_locks_once_on_process_0(tmp_path, monkeypatch):
    from w2s_jax.parallel import distributed
    monkeypatch.setattr(distributed, "process_count", lambda: 2)
    monkeypatch.setattr(distributed, "is_main_process", lambda: False)
    monkeypatch.setattr(distributed, "all_true", lambda flag: flag)
    lock = tmp_path / LOCK_NAME
    with hold(lock, "run directory"):
        assert not lock.exists()  # only process 0 takes it
    monkeypatch.setattr(distributed, "all_true", lambda flag: False)  # process 0 found it held
    with pytest.raises(UserError, match="process 0 could not take the lock"):
        with hold(lock, "run directory"):
            pass


def test_w2s_run_refuses_a_second_run_in_the_same_directory(tmp_path):
    from w2s_jax.pipeline.config import load_run_config
    from w2s_jax.pipeline.stages import Pipeline

    out = tmp_path / "run"
    holder = start_holder(out / LOCK_NAME)
    try:
        with pytest.raises(UserError, match=rf"run directory {out} is in use .*pid {holder.pid}"):
            Pipeline(load_run_config(None), out).run()
    finally:
        kill(holder)
    assert not (out / "config.yaml").exists()  # nothing written by the refused run


# ----------------------------------------------------------------------------- generate


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    import jax

    from w2s_jax.io.native import save_model
    from w2s_jax.io.tokenizer import ByteTokenizer
    from w2s_jax.models.config import get_preset
    from w2s_jax.models.params import init_params

    cfg = get_preset("tiny", vocab_size=259, bos_token_id=257, eos_token_id=258, pad_token_id=256, max_seq_len=96,
                     n_layers=1)
    out = []
    for seed in (0, 1):
        d = tmp_path_factory.mktemp("models") / f"m{seed}"
        save_model(d, init_params(cfg, jax.random.PRNGKey(seed)), cfg, ByteTokenizer())
        out.append(d)
    return out


@pytest.fixture(autouse=True)
def fast_compile(monkeypatch):
    import w2s_jax.infer.sampler as sampler_mod

    opts = {**sampler_mod.CPU_COMPILER_OPTIONS, "xla_backend_optimization_level": 0}
    monkeypatch.setattr(sampler_mod, "CPU_COMPILER_OPTIONS", opts)


INPUTS = [{"id": "a", "question": "2+3?", "gold": "5"}, {"id": "b", "question": "1+1?", "gold": "2"}]


def generate(model, inp, out, *extra):
    from w2s_jax.cli.generate import main

    return main(["--model", str(model), "--input", str(inp), "--output", str(out), "--max-new-tokens", "4",
                 "--no-progress", *extra])


@pytest.fixture
def inp(tmp_path):
    p = tmp_path / "in.jsonl"
    write_jsonl_atomic(p, INPUTS)
    return p


def no_model_load(monkeypatch):
    import w2s_jax.io.native as cio

    def boom(*a, **k):
        raise AssertionError("the model was loaded before the input was checked")

    monkeypatch.setattr(cio, "load_model", boom)


def test_generate_resume_refuses_another_model_or_settings(model_dirs, inp, tmp_path):
    out = tmp_path / "out.jsonl"
    assert generate(model_dirs[0], inp, out) == 0
    before = out.read_bytes()
    with pytest.raises(UserError, match=r"another model or other settings \(model: "):
        generate(model_dirs[1], inp, out)
    with pytest.raises(UserError, match=r"temperature: 0.0 then, 0.7 now"):
        generate(model_dirs[0], inp, out, "--temperature", "0.7")
    with pytest.raises(UserError, match=r"max_new_tokens"):
        generate(model_dirs[0], inp, out, "--max-new-tokens", "5")
    assert out.read_bytes() == before
    assert generate(model_dirs[0], inp, out, "--n", "2") == 0  # more samples: same settings
    assert len(read_jsonl(out)) == 4


def test_generate_refuses_a_locked_output(model_dirs, inp, tmp_path):
    out = tmp_path / "out.jsonl"
    holder = start_holder(lock_path_for_file(out))
    try:
        with pytest.raises(UserError, match=rf"output {out} is in use .*pid {holder.pid}"):
            generate(model_dirs[0], inp, out)
    finally:
        kill(holder)
    assert not out.exists()


def test_generate_leaves_a_file_that_is_not_an_output_unchanged(model_dirs, inp, tmp_path, monkeypatch):
    no_model_load(monkeypatch)
    for text in ('{"id": "a", "sample": 0}\nmy notes without a newline', "just notes\nno newline here"):
        notes = tmp_path / "notes.txt"
        notes.write_text(text)
        with pytest.raises(UserError, match=r"notes.txt:\d"):
            generate(model_dirs[0], inp, notes)
        assert notes.read_text() == text


def test_generate_output_equal_to_an_input_is_refused(model_dirs, inp, tmp_path, monkeypatch):
    no_model_load(monkeypatch)
    demos = tmp_path / "demos.jsonl"
    write_jsonl_atomic(demos, [{"question": "1+2?", "response": "3"}])
    link = tmp_path / "hard.jsonl"
    os.link(inp, link)
    before = {p: p.read_bytes() for p in (inp, demos)}
    for out, msg in ((inp, "--input"), (demos, "--few-shot"), (link, "--input"),
                     (tmp_path / "sub" / ".." / "in.jsonl", "--input")):
        with pytest.raises(UserError, match=f"same file as {msg}"):
            generate(model_dirs[0], inp, out, "--few-shot", str(demos))
    assert {p: p.read_bytes() for p in (inp, demos)} == before


def test_generate_checks_input_before_loading_the_model(model_dirs, tmp_path, monkeypatch):
    no_model_load(monkeypatch)
    dup = tmp_path / "dup.jsonl"
    write_jsonl_atomic(dup, [*INPUTS, {"id": "a", "question": "again"}])
    with pytest.raises(UserError, match=rf"{dup}: duplicate id 'a'"):
        generate(model_dirs[0], dup, tmp_path / "o.jsonl")
    nogold = tmp_path / "nogold.jsonl"
    write_jsonl_atomic(nogold, [{"id": "q", "question": "?"}])
    with pytest.raises(UserError, match=rf"{nogold}: record 1 \(id 'q'\) has no `gold`"):
        generate(model_dirs[0], nogold, tmp_path / "o.jsonl", "--grade", "gsm8k")
    with pytest.raises(UserError, match=r"streamed as JSONL"):  # .json is one JSON list: refused up front
        generate(model_dirs[0], nogold, tmp_path / "o.json")
    (tmp_path / "afile").write_text("x")
    with pytest.raises(UserError, match="is a file, not a directory"):
        generate(model_dirs[0], nogold, tmp_path / "afile" / "o.jsonl")
    assert not (tmp_path / "o.jsonl").exists() and not (tmp_path / "o.json").exists()


@pytest.mark.parametrize("sub", ["vote", "full-weak", "pairs"])
def test_data_commands_refuse_an_output_that_is_an_input(sub, tmp_path):
    from w2s_jax.cli.data import main as data

    recs = [{"id": 1, "prompt": "Q", "response": "5", "pred": "5", "result": True}]
    s = tmp_path / "s.jsonl"
    write_jsonl_atomic(s, recs)
    link = tmp_path / "link.jsonl"
    os.link(s, link)
    before = s.read_bytes()
    for out in (s, link):
        args = {"vote": ["vote", "--samples", str(s), "--output", str(out)],
                "full-weak": ["full-weak", "--weak", str(s), "--output", str(out)],
                "pairs": ["pairs", "--task", "gsm8k", "--weak", str(tmp_path / "w.jsonl"), "--votes", str(s),
                          "--output", str(out)]}[sub]
        with pytest.raises(UserError, match="is the same file as"):
            data(args)
    assert s.read_bytes() == before and not (tmp_path / "link.stats.json").exists()


def test_grade_refuses_an_output_that_is_its_input(tmp_path, capsys):
    from w2s_jax.cli.app import main

    s = tmp_path / "s.jsonl"
    write_jsonl_atomic(s, [{"id": 1, "response": "#### 5", "gold": "5"}])
    os.link(s, tmp_path / "link.jsonl")
    before = s.read_bytes()
    for out in (f"--output={s}", f"--out={tmp_path / 'link.jsonl'}"):
        assert main(["grade", "--task", "gsm8k", "--input", str(s), out]) == 2
        assert "is the same file as --input" in capsys.readouterr().err
    assert s.read_bytes() == before
    assert main(["grade", "--task", "gsm8k", "--input", str(s), "--output", str(tmp_path / "g.jsonl")]) == 0


def test_sft_refuses_a_locked_out_dir(tmp_path):
    from w2s_jax.cli.train import main as sft

    data = tmp_path / "sft.jsonl"
    write_jsonl_atomic(data, [{"id": "a", "prompt": "1+1=", "completion": "2"}])
    out = tmp_path / "o"
    holder = start_holder(out / LOCK_NAME)
    try:
        with pytest.raises(UserError, match=rf"output directory {out} is in use .*pid {holder.pid}"):
            sft(["--set", "model.preset=tiny", "--set", f"data.train={data}", "--set", f"out_dir={out}"])
    finally:
        kill(holder)
    assert not (out / "config.yaml").exists()


# ----------------------------------------------------------------------------- JSONL


def test_json_suffix_means_a_json_list_for_writers_and_readers(tmp_path):
    recs = [{"id": 1, "x": "a"}, {"id": 2, "x": "b"}]
    write_jsonl_atomic(tmp_path / "v.json", recs)
    assert json.loads((tmp_path / "v.json").read_text()) == recs
    assert read_jsonl(tmp_path / "v.json") == recs
    write_jsonl_atomic(tmp_path / "v.jsonl", recs)
    assert read_jsonl(tmp_path / "v.jsonl") == recs


def test_utf8_bom_is_accepted(tmp_path):
    p = tmp_path / "bom.jsonl"
    p.write_bytes(b"\xef\xbb\xbf" + b'{"id": 1}\n{"id": 2}\n')
    assert read_jsonl(p) == [{"id": 1}, {"id": 2}]
    q = tmp_path / "bom.json"
    q.write_bytes(b"\xef\xbb\xbf" + b'[{"id": 1}]')
    assert read_jsonl(q) == [{"id": 1}]


def test_atomic_outputs_get_the_umask_mode(tmp_path):
    from w2s_jax.core.jsonl import write_json_atomic, write_text_atomic

    old = os.umask(0o027)
    try:
        write_jsonl_atomic(tmp_path / "a.jsonl", [{"id": 1}])
        write_json_atomic(tmp_path / "b.json", {"x": 1})
        write_text_atomic(tmp_path / "c.md", "# hi\n")
        (tmp_path / "ref").write_text("")
    finally:
        os.umask(old)
    want = (tmp_path / "ref").stat().st_mode & 0o777
    assert want == 0o640
    for name in ("a.jsonl", "b.json", "c.md"):
        assert (tmp_path / name).stat().st_mode & 0o777 == want, name


def test_write_errors_name_the_path(tmp_path, monkeypatch):
    (tmp_path / "afile").write_text("x")
    with pytest.raises(UserError, match=r"afile/out.jsonl: cannot write: a parent of it is a file"):
        write_jsonl_atomic(tmp_path / "afile" / "out.jsonl", [{"id": 1}])

    import errno

    import w2s_jax.core.jsonl as J

    real = os.fsync

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(J.os, "fsync", full)
    try:
        with pytest.raises(UserError, match=r"full.jsonl: cannot write: No space left on device"):
            write_jsonl_atomic(tmp_path / "full.jsonl", [{"id": 1}])
    finally:
        monkeypatch.setattr(J.os, "fsync", real)
    assert not (tmp_path / "full.jsonl").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".full")]  # no temp file left


def test_cli_errors_are_one_line_without_traceback(tmp_path):
    """A user error through the real entry point: one `w2s CMD: error:` line, exit 2."""
    write_jsonl_atomic(tmp_path / "s.jsonl", [{"id": 1, "response": "5", "gold": "5"}])
    env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"}
    r = subprocess.run([sys.executable, "-m", "w2s_jax.cli", "data", "vote", "--samples", str(tmp_path / "s.jsonl"),
                        "--output", str(tmp_path / "s.jsonl")], cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2, r.stderr
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("w2s data: error: --output"), r.stderr
    assert "Traceback" not in r.stderr


# ----------------------------------------------------------------------------- model directories


def test_native_model_bit_flip_is_detected_naming_the_file(model_dirs, tmp_path):
    import shutil

    from w2s_jax.io.native import PARAMS_FILE, load_model

    d = tmp_path / "m"
    shutil.copytree(model_dirs[0], d)
    load_model(d)  # intact: loads
    f = d / PARAMS_FILE
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0x10  # one bit in the middle of the tensors
    f.write_bytes(bytes(data))
    with pytest.raises(UserError, match=rf"{f}: checksum mismatch"):
        load_model(d)


def test_convert_never_deletes_a_directory_it_did_not_write(model_dirs, tmp_path, capsys):
    from w2s_jax.cli.convert import main as convert

    project = tmp_path / "project"
    (project / "src").mkdir(parents=True)
    (project / "src" / "code.py").write_text("print('hi')\n")
    (project / "notes.txt").write_text("notes\n")
    (project / "config.json").write_text("{}\n")
    before = sorted(str(p.relative_to(project)) for p in project.rglob("*"))
    args = ["--from", "native", "--to", "hf", "--input", str(model_dirs[0]), "--output", str(project)]
    with pytest.raises(UserError, match=rf"refusing to overwrite {project}: .*--overwrite"):
        convert(args)
    assert sorted(str(p.relative_to(project)) for p in project.rglob("*")) == before
    assert (project / "notes.txt").read_text() == "notes\n"
    out = tmp_path / "hf"
    assert convert([*args[:-1], str(out)]) == 0
    assert convert([*args[:-1], str(out)]) == 0  # a directory it wrote is replaced
    assert convert([*args, "--overwrite"]) == 0  # asked for explicitly
    assert (project / "config.json").read_text() != "{}\n" and not (project / "notes.txt").exists()


# ----------------------------------------------------------------------------- config and user errors


@pytest.mark.parametrize("override,key", [
    ("weak_train.lr=-1", "weak_train.lr"), ("strong_train.lr=.nan", "strong_train.lr"),
    ("stage2.train.lr=-0.5", "stage2.train.lr"), ("stage2.n_samples=0", "stage2.n_samples"),
    ("mesh.data=0", "mesh.data"), ("stage1.n_demos=0", "stage1.n_demos"),
    ("weak_train.max_steps=0", "weak_train.max_steps"), ("generation.max_new_tokens=0", "generation.max_new_tokens"),
])
def test_bad_config_values_are_rejected_at_load_naming_the_key(override, key):
    from w2s_jax.pipeline.config import load_run_config

    with pytest.raises(UserError, match=f"config key `{key}` must be"):
        load_run_config(None, [override])


def test_train_config_lr_rejected_naming_the_key():
    from w2s_jax.core.config import load_config
    from w2s_jax.pipeline.train_job import TrainRunConfig

    with pytest.raises(UserError, match="config key `train.lr` must be a finite number >= 0, got -1"):
        load_config(TrainRunConfig, None, ["train.lr=-1"])


def test_sft_non_string_completion_is_a_one_line_error(tmp_path, capsys):
    from w2s_jax.cli.app import main

    data = tmp_path / "sft.jsonl"
    write_jsonl_atomic(data, [{"id": "a", "prompt": "1+1=", "completion": "2"},
                              {"id": "b", "prompt": "x", "completion": 5}])
    rc = main(["sft", "--set", "model.preset=tiny", "--set", f"data.train={data}",
               "--set", f"out_dir={tmp_path / 'o'}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err == [f"w2s sft: error: {data}: record 2 (id 'b'): `completion` must be a string, got int 5"]


def test_corrupt_run_directory_config_is_a_user_error(tmp_path):
    from w2s_jax.pipeline.config import load_run_config
    from w2s_jax.pipeline.stages import Pipeline

    out = tmp_path / "run"
    out.mkdir()
    (out / "config.yaml").write_text("name: [unclosed\n")
    with pytest.raises(UserError, match=rf"{out / 'config.yaml'}: corrupt"):
        Pipeline(load_run_config(None), out).run()


def test_wrapped_disk_errors_are_one_line(monkeypatch, capsys):
    """A library that wraps the OSError (Orbax, TensorStore) still gives one line; a bug stays a traceback."""
    import w2s_jax.cli.grade as grading
    from w2s_jax.cli import main

    def wrapped(*a, **k):
        try:
            raise OSError(28, "No space left on device", "/ckpt/3/state")
        except OSError as e:
            raise RuntimeError("commit failed") from e

    monkeypatch.setattr(grading, "main", wrapped)
    assert main(["grade"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == ["w2s grade: error: /ckpt/3/state: No space left on device"]

    def tensorstore(*a, **k):
        raise ValueError('UNKNOWN: Error writing "/ckpt/3/x": No space left on device [source locations=...]\nmore')

    monkeypatch.setattr(grading, "main", tensorstore)
    assert main(["grade"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith('w2s grade: error: UNKNOWN: Error writing "/ckpt/3/x"')

    def bug(*a, **k):
        raise KeyError("x")

    monkeypatch.setattr(grading, "main", bug)
    with pytest.raises(KeyError):
        main(["grade"])


@pytest.mark.parametrize("err", [(28, "No space left on device"), (30, "Read-only file system")])
def test_disk_errors_are_one_line_naming_the_path(err, monkeypatch, capsys):
    import w2s_jax.cli.grade as grading
    from w2s_jax.cli import main

    def fail(*a, **k):
        raise OSError(err[0], err[1], "/data/out.jsonl")

    monkeypatch.setattr(grading, "main", fail)
    assert main(["grade", "--input", "x", "--output", "y"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [f"w2s grade: error: /data/out.jsonl: {err[1]}"]


# ----------------------------------------------------------------------------- TPU scripts


def _shell_words(command: str) -> list[str]:
    lex = shlex.shlex(command, posix=True, punctuation_chars=True)
    lex.whitespace_split = True
    return list(lex)


def test_launch_quotes_every_user_value_for_the_remote_shell(tmp_path):
    """A config path and an --out holding a space and `;` stay single words on the workers."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("W2S_")}
    env["W2S_REMOTE_DIR"] = "w2s dir;x"
    cfg, out = "gs://b/my dir/c;touch pwned.yaml", "/mnt/gcs/run a;b"
    p = subprocess.run(["bash", str(REPO / "tpu_scripts" / "launch.sh"), "--dry-run", "--config", cfg, "--out", out,
                        "--set", "name=a b;c", "--no-follow"], env=env, capture_output=True, text=True, timeout=30,
                       cwd=REPO)
    assert p.returncode == 0, p.stderr
    remote = [shlex.split(line[2:])[-1] for line in p.stdout.splitlines() if line.startswith("+ ")]
    words = [_shell_words(r) for r in remote]
    assert words[0] == ["mkdir", "-p", "w2s dir;x/configs", "w2s dir;x/logs"]
    assert words[1] == ["gsutil", "-q", "cp", cfg, "w2s dir;x/configs/c_touch_pwned.yaml"]
    start = words[2]
    for word in (out, "name=a b;c", "w2s dir;x/configs/c_touch_pwned.yaml", "w2s dir;x/logs/run.log"):
        assert word in start, word
    assert "pwned.yaml" not in " ".join(w for w in start if w not in (cfg,)).replace("c_touch_pwned.yaml", "")


# ----------------------------------------------------------------------------- checkpoints


def test_checkpoint_fallback_warning_names_step_and_path_without_tensorstore_dump(tmp_path, monkeypatch):
    from w2s_jax.io.orbax import Checkpointer, CheckpointWarning

    ck = Checkpointer(tmp_path / "ck", async_save=False)
    dump = ("INVALID_ARGUMENT: Error opening \"zarr\" driver: Error reading chunk state.params.embed/0.0 "
            "[source locations='tensorstore/driver/zarr/driver.cc:566\ntensorstore/driver/driver.cc:112'] "
            "[tensorstore_spec='{\"driver\":\"zarr\",\"kvstore\":{\"driver\":\"file\",\"path\":\"/x/\"}}']")

    def restore(step, abstract):
        if step == 3:
            raise ValueError(dump)
        return ("restored", step)

    monkeypatch.setattr(ck, "all_steps", lambda: [2, 3])
    monkeypatch.setattr(ck, "restore", restore)
    with pytest.warns(CheckpointWarning) as rec:
        assert ck.restore_latest(None) == ("restored", 2)
    ck.close()
    msg = str(rec[0].message)
    assert msg.startswith(f"checkpoint step 3 ({tmp_path / 'ck' / '3'}) is unusable: ValueError: INVALID_ARGUMENT")
    assert "tensorstore_spec" not in msg and "source locations" not in msg and "\n" not in msg


# ----------------------------------------------------------------------------- JAX platforms


def test_cpu_commands_keep_jax_away_from_libtpu(monkeypatch):
    import importlib
    import importlib.util

    cli = importlib.import_module("w2s_jax.cli.app")
    if importlib.util.find_spec("libtpu") is None:
        pytest.skip("libtpu is not installed (it comes with the [test] extra on Linux x86-64)")
    monkeypatch.delenv("JAX_PLATFORMS", raising=False)
    monkeypatch.setattr(cli, "_tpu_chips_present", lambda: False)
    cli._platform_defaults("generate")
    platforms = os.environ.pop("JAX_PLATFORMS").split(",")
    assert "tpu" not in platforms and platforms[-1] == "cpu"
    cli._platform_defaults("compile-check")  # asks for a TPU topology: libtpu stays available
    assert "JAX_PLATFORMS" not in os.environ
    monkeypatch.setattr(cli, "_tpu_chips_present", lambda: True)  # a TPU VM: JAX picks the TPU
    cli._platform_defaults("run")
    assert "JAX_PLATFORMS" not in os.environ
    monkeypatch.setenv("JAX_PLATFORMS", "cpu,tpu")  # the user's choice is kept
    monkeypatch.setattr(cli, "_tpu_chips_present", lambda: False)
    cli._platform_defaults("run")
    assert os.environ["JAX_PLATFORMS"] == "cpu,tpu"


def test_data_and_logs_scripts_quote_user_values(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("W2S_")}
    env["W2S_REMOTE_DIR"] = "w2s dir;x"

    def remote(script, *args):
        p = subprocess.run(["bash", str(REPO / "tpu_scripts" / script), "--dry-run", *args], env=env,
                           capture_output=True, text=True, timeout=30, cwd=REPO)
        assert p.returncode == 0, p.stderr
        return [_shell_words(shlex.split(line[2:])[-1]) for line in p.stdout.splitlines() if line.startswith("+ ")]

    words = remote("data.sh", "--bucket", "b", "download", "ck pt;x", "/tmp/a b;c")[0]
    assert "/tmp/a b;c" in words and "gs://b/ck pt;x" in words
    words = remote("data.sh", "--bucket", "b", "--mount-dir", "/mnt/g s;x", "unmount")[0]
    assert words.count("/mnt/g s;x") == 2
    assert remote("logs.sh", "--stage", "sft")[0] == ["tail", "-n", "+1", "-F", "w2s dir;x/logs/sft.log"]
