"""Every shipped config parses strictly; the paper's GSM8K data stage reproduces the paper's split sizes."""

from __future__ import annotations

from pathlib import Path

import pytest

from w2s_jax.core.config import load_config
from w2s_jax.core.jsonl import read_jsonl
from w2s_jax.pipeline.config import RunConfig, config_path, default_config_path, load_run_config
from w2s_jax.pipeline.stages import Pipeline

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("**/*.yaml"))
RUN_CONFIGS = [p for p in CONFIGS if "tpu" not in p.parts]


@pytest.mark.parametrize("path", RUN_CONFIGS, ids=lambda p: p.name)
def test_run_config_parses(path: Path):
    cfg = load_config(RunConfig, str(path), [])
    assert cfg.name and cfg.data.task in ("gsm8k", "math", "olympicarena")
    assert cfg.stage1.train_set in ("hybrid", "weak", "icl")


def test_default_config_is_smollm2_and_smoke_is_offline():
    root = Path(__file__).resolve().parents[1]
    assert default_config_path().is_file()
    assert (root / "configs" / "default.yaml").resolve() == default_config_path().resolve()
    cfg = load_run_config(None, [])  # parses without fetching anything: the address is resolved by `run`
    assert cfg.name == "default" and cfg.data.source == "synthetic" and cfg.data.n_test >= 200
    assert cfg.strong.path.startswith("hf://") and cfg.strong.path.endswith("SmolLM2-135M-Instruct.Q4_1.gguf")
    assert cfg.weak.tokenizer == "byte" and cfg.weak.preset is not None
    assert cfg.stage1.variants == [cfg.stage1.train_set] and cfg.stage1.train is not None and cfg.eval_samples == 0
    smoke = load_run_config("smoke", [])  # a packaged config by name
    assert smoke.name == "smoke" and smoke.strong.preset is not None and smoke.strong.path is None
    assert (root / "configs" / "smoke.yaml").resolve() == config_path("smoke").resolve()
    assert not (root / "configs" / "smollm2.yaml").exists() and not (root / "configs" / "demo.yaml").exists()


def test_paper_gsm8k_data_stage(shared_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(shared_dir)  # the config's data paths are relative to the repository root
    cfg = load_config(RunConfig, str(CONFIGS[0].parent / "paper" / "gsm8k-base.yaml"), ["weak.preset=tiny"])
    assert cfg.data.train_1 == "data/gsm8k/train_1.jsonl"
    Pipeline(cfg, tmp_path, log=lambda m: None).run(until="data")
    splits = ("train_1", "train_2", "test")
    counts = {s: len(read_jsonl(tmp_path / "data" / f"{s}.jsonl")) for s in splits}
    assert counts == {"train_1": 7000, "train_2": 7000, "test": 1319}


@pytest.mark.parametrize("path", [p for p in RUN_CONFIGS if "paper" in p.parts], ids=lambda p: p.name)
def test_paper_configs_keep_the_release_settings(path: Path):
    """What the release fixes: LoRA r8/a16, examples per batch (no packing), truncation at 1,024, the
    vanilla template, LLaMA-Factory's ORPO, generation lengths, gold-free demonstrations."""
    cfg = load_config(RunConfig, str(path), [])
    for tc in (cfg.strong_train, cfg.stage2.train):
        assert (tc.lora.rank, tc.lora.alpha) == (8, 16.0)
        assert tc.truncate and tc.seq_len == 1024 and tc.template == "vanilla"
    assert not cfg.strong_train.packing and not cfg.weak_train.packing and cfg.weak_train.template == "vanilla"
    assert cfg.stage2.train.loss_type == "orpo_llamafactory" and cfg.stage2.train.beta == 0.1
    assert cfg.generation.max_new_tokens == (1024 if cfg.data.task == "gsm8k" else 2048)
    assert cfg.stage1.demos == "weak" and cfg.stage1.variants == ["weak", "icl", "hybrid"]
    assert cfg.stage1.rounds == (1 if cfg.data.task == "math" else 2) and cfg.eval_samples == 10
    import yaml

    base = yaml.safe_load(path.read_text()).get("base")
    text = path.read_text() + ((path.parent / base).read_text() if base else "")
    assert "# ours" in text  # the values the release does not fix are marked as this project's choice


def test_one_model_spec_for_run_and_train_configs():
    """`weak:`/`strong:` of `w2s run` and `model:` of `w2s sft`/`w2s dpo` are one ModelSpec read by one loader:
    a preset takes the byte tokenizer's vocabulary (259) and ids (pad 256, bos 257, eos 258); a smaller
    `overrides.vocab_size` and an unknown override are errors naming the key; run-only keys stay run-only."""
    from w2s_jax.core.errors import UserError
    from w2s_jax.io.tokenizer import ByteTokenizer
    from w2s_jax.pipeline.config import RunModelSpec
    from w2s_jax.pipeline.model_spec import ModelSpec, check_model_spec, preset_config
    from w2s_jax.pipeline.train_job import TrainRunConfig

    assert issubclass(RunModelSpec, ModelSpec) and TrainRunConfig().model == ModelSpec()
    cfg = preset_config(ModelSpec(preset="tiny"), ByteTokenizer())
    assert (cfg.vocab_size, cfg.pad_token_id, cfg.bos_token_id, cfg.eos_token_id) == (259, 256, 257, 258)
    assert preset_config(ModelSpec(preset="tiny", overrides={"vocab_size": 300}), ByteTokenizer()).vocab_size == 300
    with pytest.raises(UserError, match=r"`model.overrides.vocab_size`: 100 is smaller than the tokenizer's"):
        preset_config(ModelSpec(preset="tiny", overrides={"vocab_size": 100}), ByteTokenizer())
    with pytest.raises(UserError, match=r"unknown key `strong.overrides.n_layer` \(did you mean `strong.overrides"
                                        r".n_layers`\?\)"):
        check_model_spec(ModelSpec(preset="tiny", overrides={"n_layer": 1}), "strong")
    with pytest.raises(UserError, match="give exactly one of `weak.path` or `weak.preset`"):
        check_model_spec(ModelSpec(), "weak")
    with pytest.raises(UserError, match="unknown key `model.trained`"):
        load_config(TrainRunConfig, None, ["model.trained=true"])
    with pytest.raises(UserError, match="unknown key `weak.overrides.n_layer`"):
        load_run_config("smoke", ["weak.overrides={n_layer: 1}"])
