from dataclasses import dataclass, field
from typing import Literal

import pytest
import yaml

from w2s_jax.core.config import (
    config_hash,
    dump_yaml,
    from_dict,
    load_config,
    parse_overrides,
    to_dict,
)
from w2s_jax.core.errors import UserError
from w2s_jax.method.splits import DataConfig, SyntheticConfig


@dataclass(frozen=True)
class Train:
    lr: float = 1e-5
    steps: int = 10
    bf16: bool = True
    schedule: Literal["cosine", "linear"] = "cosine"
    betas: tuple[float, float] = (0.9, 0.95)
    layers: list[int] = field(default_factory=list)
    extra: dict[str, float] = field(default_factory=dict)
    warmup: int | None = None


@dataclass(frozen=True)
class Model:
    path: str  # required
    dim: int = 32


@dataclass(frozen=True)
class Run:
    model: Model
    train: Train = field(default_factory=Train)
    name: str = "run"


def test_nested_build_and_types():
    cfg = from_dict(
        Run,
        {
            "model": {"path": "m"},
            "train": {"lr": 3, "betas": [0.8, 0.9], "layers": [1, 2], "extra": {"a": 1}, "warmup": None},
        },
    )
    assert cfg.model == Model("m", 32)
    assert cfg.train.lr == 3.0 and isinstance(cfg.train.lr, float)  # int accepted for float
    assert cfg.train.betas == (0.8, 0.9)
    assert cfg.train.layers == [1, 2]
    assert cfg.train.extra == {"a": 1.0}
    assert cfg.train.warmup is None
    assert from_dict(Train, {"lr": "1e-5"}).lr == 1e-5  # YAML 1.1 reads 1e-5 as a string


def test_unknown_key_suggests_nearest():
    with pytest.raises(UserError, match=r"unknown key `train\.lrr` \(did you mean `train\.lr`\?\)"):
        from_dict(Run, {"model": {"path": "m"}, "train": {"lrr": 1.0}})
    with pytest.raises(UserError, match=r"unknown key `modle` \(did you mean `model`\?\)"):
        from_dict(Run, {"modle": {}})


@pytest.mark.parametrize(
    "train, msg",
    [
        ({"steps": 1.5}, r"`train\.steps`: expected int, got float"),
        ({"steps": True}, r"`train\.steps`: expected int, got bool"),
        ({"bf16": 1}, r"`train\.bf16`: expected bool"),
        ({"lr": "fast"}, r"`train\.lr`: expected float, got str"),
        ({"lr": False}, r"`train\.lr`: expected float, got bool"),
        ({"schedule": "step"}, r"`train\.schedule`: expected one of 'cosine', 'linear'"),
        ({"betas": [0.9]}, r"`train\.betas`: expected a list of 2 items"),
        ({"layers": [1, "x"]}, r"`train\.layers\[1\]`: expected int"),
        ({"warmup": "x"}, r"`train\.warmup`: expected int"),
        ({"steps": None}, r"`train\.steps`: a value is required"),
        ([1], r"`train`: expected a mapping"),
    ],
)
def test_wrong_types_name_the_key(train, msg):
    with pytest.raises(UserError, match=msg):
        from_dict(Run, {"model": {"path": "m"}, "train": train})


def test_missing_required():
    with pytest.raises(UserError, match=r"missing required value `model\.path`"):
        from_dict(Run, {"model": {}})
    with pytest.raises(UserError, match=r"missing required value `model`"):
        from_dict(Run, {})


def test_overrides_and_base_inheritance(tmp_path):
    (tmp_path / "base.yaml").write_text("model:\n  path: base_model\n  dim: 64\ntrain:\n  steps: 5\n")
    (tmp_path / "child.yaml").write_text("base: base.yaml\ntrain:\n  lr: 2e-4\nname: child\n")
    cfg = load_config(Run, tmp_path / "child.yaml", ["train.steps=7", "model.path=x", "train.layers=[3, 4]"])
    assert cfg.model == Model("x", 64)
    assert cfg.train.steps == 7 and cfg.train.lr == 2e-4 and cfg.train.layers == [3, 4]
    assert cfg.name == "child"
    # one level only
    (tmp_path / "grandchild.yaml").write_text("base: child.yaml\n")
    with pytest.raises(UserError, match="one level only"):
        load_config(Run, tmp_path / "grandchild.yaml")
    with pytest.raises(UserError, match=r"unknown key `train\.stpes` \(did you mean `train\.steps`\?\)"):
        load_config(Run, tmp_path / "child.yaml", ["train.stpes=3"])
    with pytest.raises(UserError, match="must look like"):
        load_config(Run, tmp_path / "child.yaml", ["train.steps"])
    with pytest.raises(UserError, match=r"`train\.steps`: expected int, got str"):
        load_config(Run, tmp_path / "child.yaml", ["train.steps=many"])
    with pytest.raises(UserError, match="no such config file"):
        load_config(Run, tmp_path / "missing.yaml")


def test_defaults_yaml_layer():
    cfg = load_config(Run, None, ["train.bf16=false"], defaults_yaml="model: {path: emb}\nname: demo\n")
    assert cfg.model.path == "emb" and cfg.name == "demo" and cfg.train.bf16 is False


def test_parse_overrides():
    assert parse_overrides(["a.b=1", "c=x", "d=1e-5", "e=", "f=[1, 2]", "g=a=b"]) == [
        (["a", "b"], 1),
        (["c"], "x"),
        (["d"], "1e-5"),
        (["e"], None),
        (["f"], [1, 2]),
        (["g"], "a=b"),
    ]
    with pytest.raises(UserError):
        parse_overrides(["a..b=1"])


def test_dump_roundtrip_and_hash(tmp_path):
    cfg = load_config(Run, None, ["model.path=m", "train.betas=[0.5, 0.6]"])
    dump_yaml(cfg, tmp_path / "out" / "config.yaml")
    data = yaml.safe_load((tmp_path / "out" / "config.yaml").read_text())
    assert data == to_dict(cfg)
    assert from_dict(Run, data) == cfg
    h = config_hash(cfg)
    assert len(h) == 64 and h == config_hash(from_dict(Run, data))
    assert config_hash(load_config(Run, None, ["model.path=m2"])) != h


def test_data_config():
    cfg = load_config(DataConfig, None, ["source=synthetic", "synthetic.max_value=9", "n_train_1=5"])
    assert cfg.synthetic == SyntheticConfig(max_value=9)
    assert cfg.n_train_1 == 5 and cfg.task == "gsm8k"
    with pytest.raises(UserError, match=r"unknown task `gsm9k` \(did you mean `gsm8k`\?\)"):
        load_config(DataConfig, None, ["task=gsm9k"])
    with pytest.raises(UserError, match=r"`source`: expected one of"):
        load_config(DataConfig, None, ["source=s3"])
