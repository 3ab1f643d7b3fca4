"""LoRA: merged equals unmerged, PEFT adapter import/export with peft's own logits."""

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from w2s_jax.cli.app import main as cli_main  # noqa: E402
from w2s_jax.core.errors import UserError  # noqa: E402
from w2s_jax.io.native import load_model, save_model  # noqa: E402
from w2s_jax.io.peft import lora_to_peft  # noqa: E402
from w2s_jax.models.config import get_preset  # noqa: E402
from w2s_jax.models.decoder import forward  # noqa: E402
from w2s_jax.models.lora import LoRAConfig, lora_axes, lora_shapes, merge_lora  # noqa: E402
from w2s_jax.models.params import param_shapes  # noqa: E402

TOL = 1e-4
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _fwd(params, cfg, tokens, lora=None, scale=1.0):
    f = jax.jit(lambda p, t, lo: forward(p, t, cfg, lora=lo, lora_scale=scale))
    return np.asarray(f(params, jnp.asarray(tokens), lora))


def test_merged_equals_unmerged_and_shapes():
    cfg = get_preset("tiny-gqa", n_layers=2)
    lcfg = LoRAConfig(rank=4, alpha=8.0, targets=("q", "v", "o", "down"))
    rng = np.random.RandomState(0)
    rand = lambda s: jnp.asarray(0.1 * rng.standard_normal(s.shape), s.dtype)  # numpy: nothing to compile
    params = jax.tree.map(rand, param_shapes(cfg))
    shapes, axes = lora_shapes(cfg, lcfg), lora_axes(cfg, lcfg)
    lora = jax.tree.map(rand, shapes)  # B != 0
    for name in shapes["layers"]:
        for ab in ("a", "b"):
            assert len(shapes["layers"][name][ab].shape) == len(axes["layers"][name][ab])
    tokens = np.random.RandomState(0).randint(0, 256, (2, 12))
    base = _fwd(params, cfg, tokens)
    unmerged = _fwd(params, cfg, tokens, lora, lcfg.scale)
    merged = _fwd(merge_lora(params, lora, cfg, lcfg.scale), cfg, tokens)
    assert np.abs(unmerged - base).max() > 100 * TOL  # the adapters do something
    assert np.abs(unmerged - merged).max() <= TOL


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    torch.manual_seed(0)
    c = transformers.LlamaConfig(
        vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, rms_norm_eps=1e-5, max_position_embeddings=64,
    )
    m = transformers.LlamaForCausalLM(c).float().eval()
    with torch.no_grad():
        for n, p in m.named_parameters():
            p.normal_(1.0 if "norm" in n else 0.0, 0.2)
    d = tmp_path_factory.mktemp("lora") / "base"
    m.save_pretrained(d)
    return d


def _base(d):
    return transformers.AutoModelForCausalLM.from_pretrained(str(d), dtype=torch.float32).eval()


def _peft_adapter(base_dir, out, targets, rslora=False):
    torch.manual_seed(1)
    pm = peft.get_peft_model(_base(base_dir), peft.LoraConfig(
        r=4, lora_alpha=8, lora_dropout=0.0, target_modules=targets, use_rslora=rslora, task_type="CAUSAL_LM"))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n or "lora_A" in n:
                p.normal_(0.0, 0.2)  # nonzero B
    pm.eval()
    pm.save_pretrained(str(out))
    return pm


def _torch(m, tokens):
    with torch.no_grad():
        return m(torch.as_tensor(tokens)).logits.numpy()


@pytest.mark.parametrize("targets,rslora", [(ALL, False), (["q_proj", "v_proj", "down_proj"], True)])
def test_peft_import_and_export(base_dir, tmp_path, targets, rslora):
    pm = _peft_adapter(base_dir, tmp_path / "adapter", targets, rslora)
    conf = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert conf["base_model_name_or_path"] == str(base_dir)
    tokens = np.random.RandomState(0).randint(0, 128, (2, 16))
    ref = _torch(pm, tokens)
    base_ref = _torch(_base(base_dir), tokens)
    assert np.abs(ref - base_ref).max() > 100 * TOL

    lm = load_model(tmp_path / "adapter")  # base found through base_model_name_or_path
    assert lm.format == "peft" and lm.lora_cfg.rank == 4 and len(lm.lora_cfg.targets) == len(targets)
    unmerged = _fwd(lm.params, lm.cfg, tokens, lm.lora, lm.lora_cfg.scale)
    merged = _fwd(merge_lora(lm.params, lm.lora, lm.cfg, lm.lora_cfg.scale), lm.cfg, tokens)
    assert np.abs(unmerged - ref).max() <= TOL
    assert np.abs(merged - ref).max() <= TOL

    # export ours -> PEFT dir -> peft loads it on the HF base with the same logits
    lora_to_peft(tmp_path / "out", lm.lora, lm.lora_cfg, lm.cfg, base_model_name_or_path=str(base_dir))
    pm2 = peft.PeftModel.from_pretrained(_base(base_dir), str(tmp_path / "out")).eval()
    assert np.abs(_torch(pm2, tokens) - ref).max() <= TOL


def test_native_with_lora_and_cli(base_dir, tmp_path):
    _peft_adapter(base_dir, tmp_path / "adapter", ["q_proj", "o_proj", "up_proj"])
    lm = load_model(tmp_path / "adapter", base=base_dir)
    tokens = np.random.RandomState(3).randint(0, 128, (1, 10))
    ref = _fwd(lm.params, lm.cfg, tokens, lm.lora, lm.lora_cfg.scale)
    save_model(tmp_path / "native", lm.params, lm.cfg, None, lora=lm.lora, lora_cfg=lm.lora_cfg)
    nm = load_model(tmp_path / "native")
    assert nm.lora_cfg == lm.lora_cfg
    assert np.abs(_fwd(nm.params, nm.cfg, tokens, nm.lora, nm.lora_cfg.scale) - ref).max() <= TOL
    # CLI: native with adapters -> HF (merged) -> transformers
    assert cli_main(["convert", "--from", "native", "--input", str(tmp_path / "native"), "--output",
                     str(tmp_path / "hf"), "--to", "hf"]) == 0
    assert np.abs(_torch(_base(tmp_path / "hf"), tokens) - ref).max() <= TOL
    # CLI: peft -> peft (re-export) keeps the base path
    assert cli_main(["convert", "--from", "peft", "--input", str(tmp_path / "adapter"), "--output",
                     str(tmp_path / "p2"), "--to", "peft"]) == 0
    assert json.loads((tmp_path / "p2" / "adapter_config.json").read_text())["base_model_name_or_path"] == str(base_dir)


def test_bad_adapters(base_dir, tmp_path):
    _peft_adapter(base_dir, tmp_path / "a", ["q_proj"])
    cpath = tmp_path / "a" / "adapter_config.json"
    conf = json.loads(cpath.read_text())
    cpath.write_text(json.dumps({**conf, "base_model_name_or_path": "meta-llama/Llama-2-70b-hf"}))
    with pytest.raises(UserError, match="not a local path; pass --base"):
        load_model(tmp_path / "a")
    cpath.write_text(json.dumps({**conf, "use_dora": True}))
    with pytest.raises(UserError, match="use_dora"):
        load_model(tmp_path / "a")
    cpath.write_text(json.dumps(conf))
    from safetensors.numpy import load_file, save_file

    f = tmp_path / "a" / "adapter_model.safetensors"
    t = load_file(str(f))
    key = "base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight"
    t[key] = np.zeros((31, 4), np.float32)
    save_file(t, str(f))
    with pytest.raises(UserError, match=r"`base_model\.model\.model\.layers\.1\.self_attn\.q_proj\.lora_B\.weight` "
                                        r"has shape \(31, 4\), expected \(32, 4\)"):
        load_model(tmp_path / "a")
    del t[key]
    save_file(t, str(f))
    with pytest.raises(UserError, match=r"layers\.1\.self_attn\.q_proj\.lora_B\.weight` is missing"):
        load_model(tmp_path / "a")
