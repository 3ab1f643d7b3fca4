"""Logits parity against PyTorch transformers, loading through our Hugging Face import.

Tiny random fp32 models (Llama MHA, Llama-3-style GQA with llama3 rope scaling, Mistral with a
sliding window shorter than the sequence, Gemma) are saved with ``save_pretrained`` and loaded with
``load_model``; our logits must match within 1e-4. Each case also checks that the feature under test
matters (turning it off moves the logits by much more than the tolerance), so the test can fail.
"""

import json
from functools import partial

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from w2s_jax.io.native import load_model  # noqa: E402
from w2s_jax.models.decoder import forward  # noqa: E402

TOL = 1e-4
V, T = 300, 24


def make_hf(kind: str, seed: int = 0):
    """A tiny random fp32 transformers model; weights drawn large enough that logits are O(1)."""
    torch.manual_seed(seed)
    common = dict(
        vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        rms_norm_eps=1e-5, max_position_embeddings=256,
    )
    if kind == "llama":
        m = transformers.LlamaForCausalLM(transformers.LlamaConfig(**common, num_key_value_heads=4))
    elif kind == "llama3":
        rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 32}
        m = transformers.LlamaForCausalLM(
            transformers.LlamaConfig(**common, num_key_value_heads=2, rope_theta=500000.0, rope_scaling=rope)
        )
    elif kind == "mistral":
        m = transformers.MistralForCausalLM(
            transformers.MistralConfig(**common, num_key_value_heads=2, sliding_window=5)
        )
    elif kind == "gemma":
        m = transformers.GemmaForCausalLM(
            transformers.GemmaConfig(**common, num_key_value_heads=1, head_dim=32)
        )
    else:
        raise ValueError(kind)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "norm" in name:  # Gemma stores w of (1 + w): keep both conventions away from trivial values
                p.copy_((0.0 if kind == "gemma" else 1.0) + 0.2 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.15)
    return m.float().eval()


def hf_logits(m, tokens, attention_mask=None):
    with torch.no_grad():
        am = None if attention_mask is None else torch.as_tensor(attention_mask)
        return m(torch.as_tensor(tokens), attention_mask=am).logits.float().numpy()


@pytest.mark.parametrize("kind", ["llama", "llama3", "mistral", "gemma"])
def test_logits_match_transformers(kind, tmp_path):
    m = make_hf(kind)
    d = tmp_path / kind
    m.save_pretrained(d, max_shard_size="50KB" if kind == "llama" else "5GB")
    if kind == "llama":
        assert (d / "model.safetensors.index.json").is_file()  # the sharded-index path is exercised
        assert len(list(d.glob("model-*.safetensors"))) > 2
    lm = load_model(d)
    assert lm.format == "hf" and lm.cfg.param_dtype == "float32"
    tokens = np.random.RandomState(1).randint(0, V, (2, T))
    ref = hf_logits(m, tokens)
    assert ref.std() > 0.5  # non-trivial logits
    fwd = jax.jit(lambda p, t, cfg: forward(p, t, cfg), static_argnums=2)
    ours = np.asarray(fwd(lm.params, jnp.asarray(tokens), lm.cfg))
    diff = np.abs(ours - ref).max()
    print(f"{kind}: max abs logits diff {diff:.2e}")
    assert diff <= TOL, f"{kind}: max abs diff {diff}"

    # the feature under test matters (so this test can fail)
    off = {
        "llama": lm.cfg.replace(rope_theta=500.0),
        "llama3": lm.cfg.replace(rope_scaling=None),
        "mistral": lm.cfg.replace(sliding_window=None),
        "gemma": lm.cfg.replace(norm_plus_one=False),
    }[kind]
    assert np.abs(np.asarray(fwd(lm.params, jnp.asarray(tokens), off)) - ref).max() > 100 * TOL


def test_padding_matches_attention_mask(tmp_path):
    """Right padding through segment_ids equals transformers with an attention mask (valid positions)."""
    m = make_hf("llama3", seed=3)
    m.save_pretrained(tmp_path / "m")
    lm = load_model(tmp_path / "m")
    tokens = np.random.RandomState(2).randint(0, V, (3, T))
    lengths = [T, 17, 5]
    seg = np.zeros((3, T), np.int32)
    for b, n in enumerate(lengths):
        seg[b, :n] = 1
    ref = hf_logits(m, tokens, attention_mask=seg)
    ours = np.asarray(forward(lm.params, jnp.asarray(tokens), lm.cfg, segment_ids=jnp.asarray(seg)))
    for b, n in enumerate(lengths):
        assert np.abs(ours[b, :n] - ref[b, :n]).max() <= TOL


def test_hf_config_variants(tmp_path):
    """transformers 4.x style keys (rope_theta / rope_scaling at top level, eos list) are understood."""
    from w2s_jax.io.hf import hf_config_to_model

    c = {
        "model_type": "llama", "vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336,
        "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0, "max_position_embeddings": 131072, "bos_token_id": 128000,
        "eos_token_id": [128001, 128008, 128009],
        "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    }
    cfg = hf_config_to_model(c)
    assert (cfg.rope_scaling, cfg.rope_theta, cfg.n_kv_heads, cfg.head_dim) == ("llama3", 500000.0, 8, 128)
    assert cfg.eos_token_id == 128001 and not cfg.tie_embeddings
    g = hf_config_to_model({"model_type": "gemma", "vocab_size": 256000, "hidden_size": 2048,
                            "intermediate_size": 16384, "num_hidden_layers": 18, "num_attention_heads": 8,
                            "num_key_value_heads": 1, "head_dim": 256, "hidden_act": "gelu",
                            "hidden_activation": None})
    assert g.activation == "gelu_tanh" and g.tie_embeddings and g.norm_plus_one and g.scale_embeddings
    (tmp_path / "c.json").write_text(json.dumps(c))


def test_grouped_causal_attention_matches_reference():
    """The XLA:CPU training attention (grouped layout, causal query blocks) against
    ``jax.nn.dot_product_attention`` with the same packed causal mask: outputs and gradients."""
    from w2s_jax.models import decoder as M
    B, T, H, KV, D = 2, 128, 6, 2, 16
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.standard_normal((B, T, h, D)), jnp.float32) for h in (H, KV, KV))
    seg = np.ones((B, T), np.int32)
    seg[0, 50:] = 2  # two packed examples in row 0
    seg[1, 100:] = 0  # padding in row 1
    slots = np.broadcast_to(np.arange(T), (B, T))
    mask = M._attention_mask(jnp.asarray(slots), jnp.asarray(slots), jnp.asarray(seg), jnp.asarray(seg),
                             jnp.asarray(seg > 0), None) | jnp.eye(T, dtype=bool)[None]
    ref = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, mask=mask[:, None])
    g_ref = jax.grad(lambda *a: (ref(*a) ** 2).sum(), argnums=(0, 1, 2))(q, k, v)
    for blocks in (1, 2, 4):
        fn = partial(M._grouped_causal_attention, mask=mask, blocks=blocks)
        np.testing.assert_allclose(fn(q, k, v), ref(q, k, v), atol=2e-5)
        g = jax.grad(lambda *a, fn=fn: (fn(*a) ** 2).sum(), argnums=(0, 1, 2))(q, k, v)
        for a, b in zip(g, g_ref):
            np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4)
