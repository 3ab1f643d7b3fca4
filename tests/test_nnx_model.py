"""The Flax NNX model (``models.llama``): logits and per-layer hidden states against PyTorch
transformers, the parameter names/shapes/axes against the literal layout, sharding on 8 simulated
devices, optax training through ``nnx.split`` against the project's SFT step, LoRA variables against
peft, and a native checkpoint written by the code before the package layout change."""

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import w2s_jax.models as wm  # noqa: E402
from w2s_jax.core.errors import UserError  # noqa: E402
from w2s_jax.io.convert import lora_to_peft, params_to_hf  # noqa: E402
from w2s_jax.io.native import load_model  # noqa: E402
from w2s_jax.models.decoder import forward, rms_norm  # noqa: E402
from w2s_jax.models.logprobs import token_logps  # noqa: E402
from w2s_jax.models.lora import init_lora, lora_axes  # noqa: E402
from w2s_jax.models.params import init_params, param_axes, param_shapes  # noqa: E402
from w2s_jax.parallel.sharding import make_mesh  # noqa: E402
from w2s_jax.train import build as T  # noqa: E402
from w2s_jax.train import optim  # noqa: E402
from w2s_jax.train.config import TrainConfig  # noqa: E402

TOL = 1e-4
V, T_LEN = 300, 24
OLD_CKPT = Path(__file__).resolve().parent / "data" / "old_layout_ckpt"


def _hf_model(seed=0):
    """Tiny random fp32 Llama (GQA, untied head) with weights large enough that logits are O(1)."""
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                                   num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5,
                                   max_position_embeddings=256)
    m = transformers.LlamaForCausalLM(cfg)
    with torch.no_grad():
        for name, p in m.named_parameters():
            p.copy_(1.0 + 0.2 * torch.randn_like(p) if "norm" in name else 0.15 * torch.randn_like(p))
    return m.float().eval()


def _torch_out(m, tokens, **kw):
    with torch.no_grad():
        return m(torch.as_tensor(np.asarray(tokens)), **kw)


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    m = _hf_model()
    d = tmp_path_factory.mktemp("nnx") / "hf"
    m.save_pretrained(d)
    return m, d


def test_logits_and_layers_match_transformers(hf):
    m, d = hf
    model = wm.load(d)
    assert isinstance(model, wm.Llama) and model.lora is None
    tokens = np.random.RandomState(1).randint(0, V, (2, T_LEN))
    out = _torch_out(m, tokens, output_hidden_states=True)
    ref = out.logits.numpy()
    assert ref.std() > 0.5
    assert np.abs(np.asarray(model(tokens)) - ref).max() <= TOL

    # one layer at a time through DecoderLayer.__call__: transformers' hidden states after each layer
    hs = [h.numpy() for h in out.hidden_states]
    x = model.params()["embed"][jnp.asarray(tokens)]
    for i in range(model.cfg.n_layers):
        layer = model.layer(i)
        assert isinstance(layer, wm.DecoderLayer) and layer.wq.shape == (64, 4, 16)
        x = layer(x)
        if i < model.cfg.n_layers - 1:
            assert np.abs(np.asarray(x) - hs[i + 1]).max() <= TOL, i
    normed = rms_norm(x, model.final_norm[...], model.cfg.norm_eps, False)
    assert np.abs(np.asarray(normed) - hs[-1]).max() <= TOL
    with pytest.raises(ValueError, match="stacked"):
        model.layers(x)


EXPECTED_AXES = {
    "embed": ("vocab", "embed"),
    "layers": {
        "attn_norm": ("layers", "norm"),
        "wq": ("layers", "embed", "heads", "head_dim"),
        "wk": ("layers", "embed", "kv_heads", "head_dim"),
        "wv": ("layers", "embed", "kv_heads", "head_dim"),
        "wo": ("layers", "heads", "head_dim", "embed"),
        "mlp_norm": ("layers", "norm"),
        "w_gate": ("layers", "embed", "mlp"),
        "w_up": ("layers", "embed", "mlp"),
        "w_down": ("layers", "mlp", "embed"),
    },
    "final_norm": ("norm",),
    "lm_head": ("embed", "vocab"),
}


@pytest.mark.parametrize("preset", ["tiny-gqa", "tiny-gemma"])
def test_state_names_shapes_axes(preset):
    cfg = wm.get_preset(preset)
    L, D, F, H, K, Dh, Vc = 2, 64, 128, 4, cfg.n_kv_heads, cfg.head_dim, 256  # the presets' shapes
    expected_shapes = {
        "embed": (Vc, D), "final_norm": (D,), "lm_head": (D, Vc),
        "layers": {"attn_norm": (L, D), "mlp_norm": (L, D), "wq": (L, D, H, Dh), "wk": (L, D, K, Dh),
                   "wv": (L, D, K, Dh), "wo": (L, H, Dh, D), "w_gate": (L, D, F), "w_up": (L, D, F),
                   "w_down": (L, F, D)},
    }
    expected_axes = dict(EXPECTED_AXES)
    if cfg.tie_embeddings:
        del expected_shapes["lm_head"], expected_axes["lm_head"]

    model = wm.Llama(cfg, rngs=nnx.Rngs(0))
    state = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    assert jax.tree.map(lambda x: tuple(x.shape), state) == expected_shapes
    assert param_axes(cfg) == expected_axes
    assert jax.tree.map(lambda s: s.shape, param_shapes(cfg)) == expected_shapes
    axes_meta = nnx.to_pure_dict(jax.tree.map(lambda v: v.get_metadata("out_sharding"), nnx.state(model, nnx.Param),
                             is_leaf=lambda x: isinstance(x, nnx.Variable)))
    assert axes_meta == expected_axes
    # initial values: norm scales constant (Gemma's 1 + w starts at w = 0), kernels N(0, 0.02)
    norm = 0.0 if cfg.norm_plus_one else 1.0
    assert np.all(np.asarray(state["layers"]["attn_norm"]) == norm) and np.all(np.asarray(state["final_norm"]) == norm)
    assert abs(float(jnp.std(state["layers"]["w_up"])) - 0.02) < 2e-3
    # the functional initialiser gives the same values for the same key
    ref = init_params(cfg, nnx.Rngs(0).params())
    assert all(jax.tree.leaves(jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), state, ref)))
    # from_params wraps the given arrays without copying
    wrapped = wm.Llama.from_params(cfg, ref)
    assert wrapped.params()["layers"]["wq"] is ref["layers"]["wq"] and wrapped.embed.get_value() is ref["embed"]


def test_lora_axes_from_metadata():
    cfg = wm.get_preset("tiny-gqa")
    lcfg = wm.LoRAConfig(rank=4, targets=("o", "down"))
    assert lora_axes(cfg, lcfg) == {"layers": {
        "wo": {"a": ("layers", "heads", "head_dim", "lora_rank"), "b": ("layers", "lora_rank", "embed")},
        "w_down": {"a": ("layers", "mlp", "lora_rank"), "b": ("layers", "lora_rank", "embed")},
    }}
    model = wm.add_lora(wm.load("tiny-gqa"), lcfg, rngs=nnx.Rngs(1))
    tree = nnx.to_pure_dict(nnx.state(model.lora, nnx.LoRAParam))
    assert jax.tree.map(lambda x: x.shape, tree) == {"layers": {
        "wo": {"a": (2, 4, 16, 4), "b": (2, 4, 64)}, "w_down": {"a": (2, 128, 4), "b": (2, 4, 64)}}}
    assert set(model.params()) == {"embed", "layers", "final_norm", "lm_head"}  # adapters are not base weights


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (simulated) devices; see tests/conftest.py")
def test_sharded_model_same_logits():
    overrides = dict(vocab_size=264, n_heads=8, n_kv_heads=4, head_dim=8)
    ref_model = wm.load("tiny", seed=3, **overrides)
    tokens = np.random.RandomState(0).randint(0, 264, (8, 16))
    ref = np.asarray(ref_model(tokens))
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    model = wm.load("tiny", seed=3, mesh=mesh, **overrides)
    wq = model.layers.wq[...]
    assert isinstance(wq.sharding, NamedSharding) and wq.sharding.spec == P(None, "fsdp", "tensor", None)
    assert wq.addressable_shards[0].data.shape == (2, 32, 4, 8)
    assert model.embed[...].sharding.spec == P("tensor", "fsdp")
    sh = model.shardings(mesh)
    assert jax.tree.all(jax.tree.map(lambda s, x: s.is_equivalent_to(x.sharding, x.ndim), sh, model.params()))
    out = np.asarray(model(tokens, mesh=mesh))
    assert np.abs(out - ref).max() <= 1e-5


def _sft_batch(vocab, rows=4, length=16, seed=0):
    rng = np.random.RandomState(seed)
    seq = rng.randint(3, vocab, (1, rows, length + 1))
    mask = np.zeros((1, rows, length), np.float32)
    mask[..., length // 2:] = 1.0
    pos = np.broadcast_to(np.arange(length, dtype=np.int32), (1, rows, length))
    return {"tokens": jnp.asarray(seq[..., :-1], jnp.int32), "targets": jnp.asarray(seq[..., 1:], jnp.int32),
            "loss_mask": jnp.asarray(mask), "segment_ids": jnp.ones((1, rows, length), jnp.int32),
            "positions": jnp.asarray(pos)}


def test_optax_steps_through_nnx_split_match_sft_step():
    cfg = wm.get_preset("tiny-gqa", vocab_size=64)
    tcfg = TrainConfig(lr=1e-2, warmup_steps=0, schedule="constant", weight_decay=0.1, batch_size=4, seq_len=16,
                         packing=False)
    steps = 4
    batch = _sft_batch(cfg.vocab_size)
    params = init_params(cfg, jax.random.PRNGKey(0))

    # the project's compiled SFT step
    bundle = T.build_steps("sft", cfg, tcfg, total_steps=steps, mesh=make_mesh({"data": 1}))
    state = T.init_state(bundle, jax.tree.map(jnp.copy, params), seed=0)
    ref_losses = []
    for _ in range(steps):
        state, metrics = bundle.step_fn(state, batch, None)
        ref_losses.append(float(metrics["loss"]))

    # ordinary optax over the NNX model's split state
    model = wm.Llama.from_params(cfg, jax.tree.map(jnp.copy, params))
    graphdef, weights = nnx.split(model, nnx.Param)
    tx, _ = optim.make_optimizer(tcfg, steps)
    opt_state = tx.init(weights)
    mb = jax.tree.map(lambda x: x[0], batch)

    @jax.jit
    def step(weights, opt_state):
        def loss_fn(w):
            logits = nnx.merge(graphdef, w)(mb["tokens"], positions=mb["positions"], segment_ids=mb["segment_ids"])
            logps = token_logps(logits, mb["targets"])
            return -jnp.sum(logps * mb["loss_mask"]) / jnp.sum(mb["loss_mask"])

        loss, grads = jax.value_and_grad(loss_fn)(weights)
        updates, opt_state = tx.update(grads, opt_state, weights)
        return optax.apply_updates(weights, updates), opt_state, loss

    losses = []
    for _ in range(steps):
        weights, opt_state, loss = step(weights, opt_state)
        losses.append(float(loss))
    assert losses[-1] < losses[0] - 0.1
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    trained = nnx.to_pure_dict(weights)
    for a, b in zip(jax.tree.leaves(trained), jax.tree.leaves(state.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)
    # norms got no weight decay: with zero gradient they would stay put (the mask reads the metadata)
    mask = optim.decay_mask(weights)
    assert not mask["layers"]["attn_norm"].get_value() and mask["layers"]["wq"].get_value()


def test_lora_variables_match_decoder_forward():
    cfg = wm.get_preset("tiny-gqa")
    lcfg = wm.LoRAConfig(rank=2, alpha=4.0, targets=("q", "v", "o", "down"))
    params = init_params(cfg, jax.random.PRNGKey(0))
    lora = jax.tree.map(lambda x: x + 0.05, init_lora(cfg, lcfg, jax.random.PRNGKey(1)))  # b != 0
    model = wm.add_lora(wm.Llama.from_params(cfg, params), lcfg, lora=lora)
    assert jax.tree.map(jnp.shape, nnx.to_pure_dict(nnx.state(model.lora, nnx.LoRAParam))) == \
        jax.tree.map(jnp.shape, lora)
    tokens = jnp.asarray(np.random.RandomState(0).randint(0, 256, (2, 12)))
    ref = forward(params, tokens, cfg, lora=lora, lora_scale=lcfg.scale)
    base = forward(params, tokens, cfg)
    assert float(jnp.abs(ref - base).max()) > 100 * TOL
    assert float(jnp.abs(model(tokens) - ref).max()) <= 1e-5

    # adapters split from the frozen weights: gradients only for the LoRAParams, equal to the functional ones
    graphdef, adapters, frozen = nnx.split(model, nnx.LoRAParam, ...)
    loss = lambda a: jnp.mean(nnx.merge(graphdef, a, frozen)(tokens) ** 2)
    grads = nnx.to_pure_dict(jax.grad(loss)(adapters))["lora"]
    ref_loss = lambda lo: jnp.mean(forward(params, tokens, cfg, lora=lo, lora_scale=lcfg.scale) ** 2)
    ref_grads = jax.grad(ref_loss)(lora)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-7)


def test_old_layout_checkpoint_loads(tmp_path):
    """A native checkpoint (with adapters) written by the code before the package layout change."""
    model = wm.load(OLD_CKPT)
    assert model.cfg.name == "old-layout" and model.lora is not None and model.lora.lcfg.rank == 2
    lm = load_model(OLD_CKPT)
    params_to_hf(tmp_path / "hf", lm.params, lm.cfg)
    lora_to_peft(tmp_path / "peft", lm.lora, lm.lora_cfg, lm.cfg)
    base = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), dtype=torch.float32).eval()
    tokens = np.random.RandomState(5).randint(0, model.cfg.vocab_size, (2, 20))
    base_ref = _torch_out(base, tokens).logits.numpy()
    assert base_ref.std() > 0.5
    base_ours = wm.Llama.from_params(model.cfg, model.params())(tokens)
    assert np.abs(np.asarray(base_ours) - base_ref).max() <= TOL
    with_lora = peft.PeftModel.from_pretrained(base, str(tmp_path / "peft")).eval()
    ref = _torch_out(with_lora, tokens).logits.numpy()
    assert np.abs(ref - base_ref).max() > 100 * TOL  # the adapters matter
    assert np.abs(np.asarray(model(tokens)) - ref).max() <= TOL


def test_load_errors():
    with pytest.raises(UserError, match="no file or directory.*did you mean `tiny-gqa`"):
        wm.load("tiny-gqq")


def test_parts_are_modules_over_the_layer_weights(hf):
    """Embedding, RMSNorm, Attention and MLP modules: composed, they give transformers' layer output and
    the layer's own call; each part equals transformers' module on the same weights."""
    m, _ = hf
    model = wm.load(hf[1])
    tokens = np.random.RandomState(2).randint(0, V, (2, T_LEN))
    hs = [h.numpy() for h in _torch_out(m, tokens, output_hidden_states=True).hidden_states]
    assert np.abs(np.asarray(model.embedding(tokens)) - hs[0]).max() <= TOL

    layer = model.layer(1)
    x = jnp.asarray(hs[1])
    h = layer.attention_norm(x)
    y = x + layer.attention(h)
    y = y + layer.mlp(layer.mlp_norm_module(y))
    assert np.abs(np.asarray(y) - hs[2]).max() <= TOL
    assert np.abs(np.asarray(y) - np.asarray(layer(x))).max() <= 1e-5

    hl = m.model.layers[1]
    with torch.no_grad():
        ref_norm = hl.input_layernorm(torch.as_tensor(hs[1])).numpy()
        ref_mlp = hl.mlp(torch.as_tensor(np.array(h))).numpy()
    assert np.abs(np.asarray(h) - ref_norm).max() <= TOL
    assert np.abs(np.asarray(layer.mlp(h)) - ref_mlp).max() <= TOL

    # views over the layer's own nnx.Param objects, not copies: the state keeps the checkpoint names
    assert layer.attention.wq is layer.wq and layer.mlp.w_down is layer.w_down and model.norm.weight is model.final_norm
    layer.attention.wo[...] = jnp.zeros_like(layer.wo[...])
    assert not np.any(np.asarray(layer.wo[...]))
    assert set(nnx.to_pure_dict(nnx.state(layer, nnx.Param))) == {"attn_norm", "wq", "wk", "wv", "wo", "mlp_norm",
                                                                   "w_gate", "w_up", "w_down"}
    with pytest.raises(ValueError, match="stacked"):
        model.layers.attention(x)

    # on their own: fresh weights with their logical axes, and a causal attention (a later token never
    # changes an earlier output)
    cfg = model.cfg
    attn = wm.Attention(cfg, rngs=nnx.Rngs(0))
    assert attn.wk.shape == (64, 2, 16) and attn.wo.get_metadata("out_sharding") == ("heads", "head_dim", "embed")
    assert wm.MLP(cfg, rngs=nnx.Rngs(0)).w_gate.shape == (64, 96)
    assert np.all(np.asarray(wm.RMSNorm(cfg, rngs=nnx.Rngs(0)).weight[...]) == 1.0)
    z = jax.random.normal(jax.random.PRNGKey(0), (1, 8, 64))
    out1, out2 = attn(z), attn(z.at[:, -1].set(0.0))
    assert np.abs(np.asarray(out1[:, :-1] - out2[:, :-1])).max() <= 1e-6
    assert np.abs(np.asarray(out1[:, -1] - out2[:, -1])).max() > 1e-3
