"""Export to Hugging Face (transformers loads it with the same logits), native round trip, the
`w2s convert` CLI, and bad checkpoints giving errors that name the tensor / key / file."""

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from safetensors.numpy import load_file, save_file  # noqa: E402

from w2s_jax.cli.app import main as cli_main  # noqa: E402
from w2s_jax.core.errors import UserError  # noqa: E402
from w2s_jax.io.hf import params_to_hf, params_to_state_dict, state_dict_to_params  # noqa: E402
from w2s_jax.io.native import load_model, save_model  # noqa: E402
from w2s_jax.io.tokenizer import ByteTokenizer  # noqa: E402
from w2s_jax.models.config import ModelConfig  # noqa: E402
from w2s_jax.models.decoder import forward  # noqa: E402
from w2s_jax.models.params import param_shapes  # noqa: E402

CONFIGS = {
    "llama3-gqa": ModelConfig(
        "t", 300, 64, 2, 4, 2, 16, 96, 128, rope_theta=500000.0, rope_scaling="llama3", rope_original_max_pos=32,
    ),
    "mistral": ModelConfig("t", 300, 64, 2, 4, 2, 16, 96, 128, sliding_window=6),
    "gemma": ModelConfig(
        "t", 300, 64, 2, 4, 1, 32, 96, 128, norm_eps=1e-6, activation="gelu_tanh", tie_embeddings=True,
        scale_embeddings=True, norm_plus_one=True,
    ),
}


def random_params(cfg, seed=0):
    """Random parameters (numpy, no compile): weights N(0, 0.15), norms around their identity value."""
    rng = np.random.RandomState(seed)
    base = 0.0 if cfg.norm_plus_one else 1.0

    def leaf(path, s):
        norm = "norm" in path[-1].key
        x = (base if norm else 0.0) + (0.2 if norm else 0.15) * rng.standard_normal(s.shape)
        return jnp.asarray(x.astype(np.float32), s.dtype)

    return jax.tree_util.tree_map_with_path(leaf, param_shapes(cfg))


def ours(params, cfg, tokens):
    return np.asarray(jax.jit(lambda p, t: forward(p, t, cfg))(params, jnp.asarray(tokens)))


def torch_logits(d, tokens):
    m = transformers.AutoModelForCausalLM.from_pretrained(str(d), dtype=torch.float32).eval()
    with torch.no_grad():
        return m, m(torch.as_tensor(tokens)).logits.numpy()


@pytest.mark.parametrize("name", list(CONFIGS))
def test_export_to_hf_same_logits(name, tmp_path):
    cfg = CONFIGS[name]
    params = random_params(cfg)
    tokens = np.random.RandomState(0).randint(0, 300, (2, 20))
    sharded = name == "llama3-gqa"
    params_to_hf(tmp_path / "hf", params, cfg, ByteTokenizer(), max_shard_size="60KB" if sharded else "5GB")
    assert (tmp_path / "hf" / "model.safetensors.index.json").is_file() == sharded
    m, ref = torch_logits(tmp_path / "hf", tokens)
    expect = {"llama3-gqa": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "gemma": "GemmaForCausalLM"}[name]
    assert type(m).__name__ == expect
    mine = ours(params, cfg, tokens)
    assert ref.std() > 0.5
    assert np.abs(mine - ref).max() <= 1e-4
    # and back: HF dir -> ours gives the same parameters and a working tokenizer
    back = load_model(tmp_path / "hf")
    for a, b in zip(jax.tree.leaves(back.params), jax.tree.leaves(params)):
        assert np.array_equal(np.asarray(a), np.asarray(b))
    assert back.tokenizer.encode("hi ✓") == ByteTokenizer().encode("hi ✓")
    # in memory: the same tensors as transformers' own state dict, and back
    sd = {k: v.numpy() for k, v in m.state_dict().items()}
    mem = params_to_state_dict(params, cfg)
    assert set(mem) == set(sd) - ({"lm_head.weight"} if cfg.tie_embeddings else set())
    for k, v in mem.items():
        assert np.array_equal(v, sd[k]), k
    for a, b in zip(jax.tree.leaves(state_dict_to_params(sd, cfg)), jax.tree.leaves(params)):
        assert np.array_equal(np.asarray(a), np.asarray(b))


def test_native_round_trip_and_atomic_replace(tmp_path):
    cfg = CONFIGS["llama3-gqa"].replace(param_dtype="bfloat16")
    params = random_params(cfg)
    d = save_model(tmp_path / "m", params, cfg, ByteTokenizer())
    meta = json.loads((d / "w2s_model.json").read_text())
    assert meta["model"]["rope_scaling"] == "llama3" and meta["tokenizer"] == {"type": "byte"}
    lm = load_model(d)
    assert lm.cfg == cfg and lm.format == "native" and isinstance(lm.tokenizer, ByteTokenizer)
    for a, b in zip(jax.tree.leaves(lm.params), jax.tree.leaves(params)):
        assert a.dtype == jnp.bfloat16 and np.array_equal(np.asarray(a), np.asarray(b))
    save_model(d, params, cfg, ByteTokenizer())  # replacing an earlier model dir is fine
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dirs left
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("keep me")
    with pytest.raises(UserError, match="refusing to overwrite"):
        save_model(tmp_path / "other", params, cfg, None)
    f32 = load_model(d, dtype="float32")
    assert f32.params["embed"].dtype == jnp.float32 and f32.cfg.param_dtype == "float32"


def test_cli_convert_hf_native_hf(tmp_path, capsys):
    cfg = CONFIGS["mistral"]
    params = random_params(cfg, seed=5)
    params_to_hf(tmp_path / "hf", params, cfg, ByteTokenizer())
    assert cli_main(["convert", "--from", "hf", "--input", str(tmp_path / "hf"), "--output", str(tmp_path / "n")]) == 0
    assert (tmp_path / "n" / "w2s_model.json").is_file()
    assert cli_main(["convert", "--from", "native", "--input", str(tmp_path / "n"), "--output", str(tmp_path / "hf2"),
                     "--to", "hf"]) == 0
    a = load_file(str(tmp_path / "hf" / "model.safetensors"))
    b = load_file(str(tmp_path / "hf2" / "model.safetensors"))
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    args = ["convert", "--from", "gguf", "--input", str(tmp_path / "hf"), "--output", str(tmp_path / "x")]
    assert cli_main(args) == 2
    assert "looks like a hf checkpoint" in capsys.readouterr().err


# ----------------------------------------------------------------------------- bad inputs


@pytest.fixture
def hf_dir(tmp_path):
    cfg = CONFIGS["llama3-gqa"]
    params_to_hf(tmp_path / "hf", random_params(cfg), cfg, None)
    return tmp_path / "hf"


def _rewrite(d, fn):
    t = load_file(str(d / "model.safetensors"))
    fn(t)
    save_file(t, str(d / "model.safetensors"), metadata={"format": "pt"})


def test_missing_tensor(hf_dir):
    _rewrite(hf_dir, lambda t: t.pop("model.layers.1.self_attn.k_proj.weight"))
    with pytest.raises(UserError, match=r"`model\.layers\.1\.self_attn\.k_proj\.weight` is missing.*\(32, 64\)"):
        load_model(hf_dir)


def test_wrong_shape(hf_dir):
    _rewrite(hf_dir, lambda t: t.update({"model.layers.0.mlp.up_proj.weight": np.zeros((95, 64), np.float32)}))
    with pytest.raises(UserError, match=r"`model\.layers\.0\.mlp\.up_proj\.weight` has shape \(95, 64\).*\(96, 64\)"):
        load_model(hf_dir)


def test_wrong_dtype(hf_dir):
    _rewrite(hf_dir, lambda t: t.update({"model.norm.weight": np.zeros((64,), np.int32)}))
    with pytest.raises(UserError, match=r"`model\.norm\.weight` has dtype I32"):
        load_model(hf_dir)


def test_unknown_architecture(hf_dir):
    c = json.loads((hf_dir / "config.json").read_text())
    c["model_type"] = "gpt2"
    (hf_dir / "config.json").write_text(json.dumps(c))
    with pytest.raises(UserError, match=r"config\.json: unknown architecture model_type='gpt2'"):
        load_model(hf_dir)


def test_corrupt_and_truncated_files(hf_dir):
    f = hf_dir / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match=r"model\.safetensors: not a readable safetensors file"):
        load_model(hf_dir)
    f.write_bytes(b"garbage" * 100)
    with pytest.raises(UserError, match=r"model\.safetensors: not a readable safetensors file"):
        load_model(hf_dir)


def test_tokenizer_larger_than_embedding(tmp_path):
    cfg = CONFIGS["mistral"].replace(vocab_size=200)
    params_to_hf(tmp_path / "hf", random_params(cfg), cfg, ByteTokenizer())
    with pytest.raises(UserError, match=r"tokenizer has 259 tokens but the embedding has only 200 rows"):
        load_model(tmp_path / "hf")


def test_not_a_model(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_model(tmp_path / "nope")
    (tmp_path / "d").mkdir()
    with pytest.raises(UserError, match="not a model directory"):
        load_model(tmp_path / "d")
