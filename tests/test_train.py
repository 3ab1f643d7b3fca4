"""SFT/DPO steps: PyTorch parity, accumulation, LoRA, preference training, drivers."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from w2s_jax.core.programs import ProgramCache
from w2s_jax.io.hf import params_to_state_dict, state_dict_to_params
from w2s_jax.io.tokenizer import ByteTokenizer
from w2s_jax.models.config import ModelConfig
from w2s_jax.models.lora import LoRAConfig
from w2s_jax.models.params import param_shapes
from w2s_jax.train import build as TB
from w2s_jax.train import config as TC
from w2s_jax.train import loop as T
from w2s_jax.train import optim as TO
from w2s_jax.train import reference as TR
from w2s_jax.train import steps as TS
from w2s_jax.train.batching import PreferenceBatcher, SFTBatcher, tokenize_pairs, tokenize_sft

torch = pytest.importorskip("torch")
TOK = ByteTokenizer()
CFG = ModelConfig("t", vocab_size=259, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, d_ff=64,
                  rope_theta=10000.0, norm_eps=1e-5)


@pytest.fixture(autouse=True)
def fast_compile(monkeypatch):
    monkeypatch.setattr(TB, "COMPILER_OPTIONS", {"xla_backend_optimization_level": 0})


def init_params(cfg, seed):
    """Random parameters made with numpy (model.init_params compiles for seconds on CPU)."""
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map_with_path(
        lambda path, s: jnp.ones(s.shape, s.dtype) if "norm" in jax.tree_util.keystr(path)
        else jnp.asarray(rng.normal(0, cfg.initializer_range, s.shape), s.dtype), param_shapes(cfg))


def init_lora(cfg, lcfg, seed):
    from w2s_jax.models.lora import lora_shapes

    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map_with_path(
        lambda path, s: jnp.zeros(s.shape, s.dtype) if path[-1].key == "b"
        else jnp.asarray(rng.uniform(-0.2, 0.2, s.shape), s.dtype), lora_shapes(cfg, lcfg))


def sft_records(n=24):
    return [{"id": f"s{i}", "prompt": f"{i}+{i % 5}=", "completion": str(i + i % 5)} for i in range(n)]


def pref_records(n=16):
    return [{"id": f"p{i}", "prompt": f"{i}*2=", "chosen": str(2 * i), "rejected": str(2 * i + 3)} for i in range(n)]


# ----------------------------------------------------------------------------- PyTorch parity


def to_torch_llama(params, cfg: ModelConfig):
    from transformers import LlamaConfig, LlamaForCausalLM

    D, H, K, Dh = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    hc = LlamaConfig(vocab_size=cfg.vocab_size, hidden_size=D, intermediate_size=cfg.d_ff,
                     num_hidden_layers=cfg.n_layers, num_attention_heads=H, num_key_value_heads=K, head_dim=Dh,
                     rms_norm_eps=cfg.norm_eps, rope_theta=cfg.rope_theta, max_position_embeddings=cfg.max_seq_len,
                     tie_word_embeddings=cfg.tie_embeddings, attention_bias=False, mlp_bias=False)
    hc._attn_implementation = "eager"
    model = LlamaForCausalLM(hc).float()
    sd = {k: torch.tensor(v, dtype=torch.float32) for k, v in params_to_state_dict(params, cfg).items()}
    missing, unexpected = model.load_state_dict(sd, strict=False)
    assert not unexpected and all("rotary" in m for m in missing), (missing, unexpected)
    return model


def torch_grads_as_ours(model, cfg):
    g = state_dict_to_params({n: p.grad.detach().numpy() for n, p in model.named_parameters()}, cfg)
    return jax.tree.map(np.asarray, g)


@pytest.mark.parametrize("packing", [False, True])
def test_sft_loss_and_gradients_match_transformers(packing):
    """Masked cross-entropy (completion tokens only, mean per token) of a tiny Llama: loss and every
    parameter gradient equal transformers' LlamaForCausalLM with the same weights (fp32). The packed
    JAX batch is compared with the same examples unpacked in PyTorch."""
    cfg = CFG.replace(initializer_range=0.2)  # larger weights: gradients well above rounding noise
    params = init_params(cfg, 1)
    ex, _ = tokenize_sft(sft_records(6), TOK, 32)
    padded = SFTBatcher(ex, rows=6, seq_len=16, packing=False, shuffle=False).all_batches()[0]
    batch = SFTBatcher(ex, rows=2, seq_len=48, packing=True, shuffle=False).all_batches()[0] if packing else padded

    spec = TS.StepSpec(cfg, "sft")

    def loss_fn(p, b):
        b = jax.tree.map(lambda x: x[0], b)
        lp = TS.sequence_token_logps(p, None, b, spec)
        return -jnp.sum(lp * b["loss_mask"]) / jnp.sum(b["loss_mask"])

    loss, grads = jax.jit(jax.value_and_grad(loss_fn), compiler_options=TB.COMPILER_OPTIONS)(
        params, jax.tree.map(jnp.asarray, batch))

    model = to_torch_llama(params, cfg)
    tokens = torch.tensor(padded["tokens"][0], dtype=torch.long)
    attn = torch.tensor(padded["segment_ids"][0] > 0, dtype=torch.long)
    # labels: the token itself where it is a completion token (HF shifts internally)
    labels = np.full(tokens.shape, -100)
    lm = padded["loss_mask"][0]
    labels[:, 1:] = np.where(lm[:, :-1] > 0, padded["tokens"][0][:, 1:], -100)
    out = model(input_ids=tokens, attention_mask=attn, labels=torch.tensor(labels))
    out.loss.backward()
    np.testing.assert_allclose(float(loss), out.loss.item(), rtol=1e-5)
    want = torch_grads_as_ours(model, cfg)
    flat_w = dict(jax.tree_util.tree_flatten_with_path(want)[0])
    for path, g in jax.tree_util.tree_flatten_with_path(grads)[0]:
        w = flat_w[path]
        scale = np.abs(w).max()
        assert scale > 1e-4, path
        # 1e-5 relative to each tensor's largest gradient entry (elementwise relative error is
        # meaningless for entries that are themselves rounding noise)
        np.testing.assert_allclose(np.asarray(g), w, rtol=1e-5, atol=1e-5 * scale, err_msg=jax.tree_util.keystr(path))


# ----------------------------------------------------------------------------- steps


def _state_for(bundle, trainable):
    return TB.init_state(bundle, trainable, seed=0)


def test_grad_accumulation_equals_one_big_batch():
    params = init_params(CFG, 2)
    ex, _ = tokenize_sft(sft_records(8), TOK, 32)
    # eps=1: Adam's first update is ~lr*g (not ~lr*sign(g), which amplifies rounding of tiny g)
    cfg1 = TC.TrainConfig(lr=1e-1, batch_size=4, grad_accum=1, seq_len=32, packing=False, max_steps=1, eps=1.0)
    cfg2 = TC.TrainConfig(lr=1e-1, batch_size=2, grad_accum=2, seq_len=32, packing=False, max_steps=1, eps=1.0)
    out = []
    for c in (cfg1, cfg2):
        b = SFTBatcher(ex, rows=c.batch_size, seq_len=32, packing=False, grad_accum=c.grad_accum, shuffle=False)
        batch = b.all_batches()[0]
        bundle = TB.build_steps("sft", CFG, c, 1, TB.single_mesh())
        st, m = bundle.step_fn(_state_for(bundle, jax.tree.map(jnp.copy, params)), batch, None)
        out.append((float(m["loss"]), float(m["grad_norm"]), st.params))
    assert out[0][0] == pytest.approx(out[1][0], rel=1e-6)
    assert out[0][1] == pytest.approx(out[1][1], rel=1e-5)
    for a, b, p0 in zip(jax.tree.leaves(out[0][2]), jax.tree.leaves(out[1][2]), jax.tree.leaves(params)):
        da, db = np.asarray(a) - np.asarray(p0), np.asarray(b) - np.asarray(p0)
        assert np.abs(da).max() > 0
        # tolerance: 1e-5 of the largest update, at least a few float32 ulps of the weights
        np.testing.assert_allclose(da, db, rtol=1e-4, atol=max(1e-5 * np.abs(da).max(), 1e-8))


def test_bf16_compute_with_fp32_params():
    """bf16 compute (ModelConfig.dtype) with float32 parameters and optimizer state: the loss is close
    to the float32 one and the updated parameters stay float32."""
    params = init_params(CFG, 6)
    ex, _ = tokenize_sft(sft_records(8), TOK, 32)
    batch = SFTBatcher(ex, rows=4, seq_len=32, packing=False, shuffle=False).all_batches()[0]
    c = TC.TrainConfig(lr=1e-3, batch_size=4, seq_len=32, packing=False, max_steps=1)
    losses = {}
    for dt in ("float32", "bfloat16"):
        mcfg = CFG.replace(dtype=dt)
        bundle = TB.build_steps("sft", mcfg, c, 1, TB.single_mesh())
        st, m = bundle.step_fn(_state_for(bundle, jax.tree.map(jnp.copy, params)), batch, None)
        losses[dt] = float(m["loss"])
        assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(st.params))
        assert np.isfinite(float(m["grad_norm"]))
    assert losses["bfloat16"] == pytest.approx(losses["float32"], rel=2e-2)
    assert losses["bfloat16"] != losses["float32"]


def test_weight_decay_mask_skips_norms():
    params = init_params(CFG, 0)
    m = TO.decay_mask(params)
    assert m["embed"] and m["lm_head"] and m["layers"]["wq"] and m["layers"]["w_down"]
    assert not m["final_norm"] and not m["layers"]["attn_norm"] and not m["layers"]["mlp_norm"]
    lm = TO.decay_mask(init_lora(CFG, LoRAConfig(rank=2), 0))
    assert all(jax.tree.leaves(lm))


def test_schedules():
    c = TC.TrainConfig(lr=1.0, warmup_steps=2, schedule="linear", min_lr_ratio=0.1)
    s = TO.make_schedule(c, 12)
    assert [float(s(i)) for i in (0, 1, 2)] == pytest.approx([0.0, 0.5, 1.0])
    assert float(s(12)) == pytest.approx(0.1)
    s = TO.make_schedule(TC.TrainConfig(lr=1.0, schedule="cosine", min_lr_ratio=0.0), 10)
    assert float(s(0)) == pytest.approx(1.0) and float(s(5)) == pytest.approx(0.5) and float(s(10)) == pytest.approx(0)
    s = TO.make_schedule(TC.TrainConfig(lr=2.0, schedule="constant", warmup_ratio=0.5), 4)
    assert [float(s(i)) for i in range(5)] == pytest.approx([0.0, 1.0, 2.0, 2.0, 2.0])


def test_a_shared_program_cache_compiles_a_step_once():
    tc = TC.TrainConfig(batch_size=2, seq_len=16, packing=False, max_steps=3)
    mesh = TB.single_mesh()
    programs = ProgramCache()
    first = TB.build_steps("sft", CFG, tc, 3, mesh, programs=programs)
    assert "cached" not in TB.compile_steps(first, "sft", tc, [16], 3)[16]
    second = TB.build_steps("sft", CFG, tc, 3, mesh, programs=programs)
    assert TB.compile_steps(second, "sft", tc, [16], 3)[16]["cached"] is True
    assert second.compiled[16] is first.compiled[16] and second.eval_fn is first.eval_fn
    own = TB.build_steps("sft", CFG, tc, 3, mesh)  # a bundle without a shared cache compiles its own
    assert own.programs is not programs and own.eval_fn is not first.eval_fn


def _dpo_batch(pairs, rows, seq_len=32):
    return PreferenceBatcher(pairs, rows=rows, seq_len=seq_len, shuffle=False).all_batches()[0]


@pytest.mark.parametrize("loss_type,reference", [("sigmoid", "lora_off"), ("sigmoid", "precompute"),
                                                 ("ipo", "lora_off"), ("simpo", "lora_off"), ("orpo", "lora_off")])
def test_dpo_steps_raise_margin_and_lora_keeps_base(loss_type, reference):
    """A few steps on one batch raise the chosen-minus-rejected margin (summed log-probs), and the
    base weights passed as the frozen argument stay bit-identical."""
    params = init_params(CFG, 3)
    base_copy = jax.tree.map(lambda x: np.array(x, copy=True), params)
    pairs, _ = tokenize_pairs(pref_records(4), TOK, 32)
    lcfg = LoRAConfig(rank=4, alpha=8.0)
    c = TC.TrainConfig(lr=5e-3, batch_size=4, seq_len=32, loss_type=loss_type, beta=0.5, lora=lcfg,
                      reference=reference, max_steps=6, max_grad_norm=0)
    mesh = TB.single_mesh()
    if reference == "precompute":
        pairs = TR.precompute_reference(params, CFG, pairs, c, mesh)
        assert all(p.ref_chosen < 0 and p.ref_rejected < 0 for p in pairs)
    batch = _dpo_batch(pairs, 4)
    bundle = TB.build_steps("dpo", CFG, c, 6, mesh)
    frozen = jax.device_put(params, bundle.frozen_sh)
    state = _state_for(bundle, init_lora(CFG, lcfg, 9))
    margins, losses = [], []
    for _ in range(6):  # metrics of step k are those of the parameters after k - 1 updates
        state, m = bundle.step_fn(state, batch, frozen)
        losses.append(float(m["loss"]))
        margins.append(float(m["logps/chosen"] - m["logps/rejected"]))
    if loss_type in ("sigmoid", "ipo"):
        assert losses[0] == pytest.approx({"sigmoid": np.log(2), "ipo": 1.0}[loss_type], rel=1e-5)
    assert margins[-1] > margins[0] + 0.05, margins
    assert losses[-1] < losses[0], losses
    for a, b in zip(jax.tree.leaves(frozen), jax.tree.leaves(base_copy)):
        np.testing.assert_array_equal(np.asarray(a), b)


def test_lora_off_reference_equals_precomputed():
    """The reference computed inside the step with the adapters off equals the scoring pass."""
    params = init_params(CFG, 4)
    pairs, _ = tokenize_pairs(pref_records(4), TOK, 32)
    lcfg = LoRAConfig(rank=2)
    mesh = TB.single_mesh()
    c1 = TC.TrainConfig(batch_size=4, seq_len=32, lora=lcfg, reference="lora_off", max_steps=1)
    c2 = TC.TrainConfig(batch_size=4, seq_len=32, lora=lcfg, reference="precompute", max_steps=1)
    ms = []
    for c in (c1, c2):
        ps = TR.precompute_reference(params, CFG, pairs, c, mesh) if c.reference == "precompute" else pairs
        bundle = TB.build_steps("dpo", CFG, c, 1, mesh)
        lora = init_lora(CFG, lcfg, 0)
        lora["layers"]["wq"]["b"] = lora["layers"]["wq"]["b"] + 0.05  # a non-trivial policy
        _, m = bundle.step_fn(_state_for(bundle, lora), _dpo_batch(ps, 4), jax.device_put(params, bundle.frozen_sh))
        ms.append({k: float(v) for k, v in m.items()})
    for k in ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins"):
        assert ms[0][k] == pytest.approx(ms[1][k], rel=1e-5, abs=1e-7), k


def test_lora_off_without_lora_is_an_error():
    from w2s_jax.core.errors import UserError

    with pytest.raises(UserError, match="lora_off"):
        TB.build_steps("dpo", CFG, TC.TrainConfig(reference="lora_off"), 1, TB.single_mesh())


# ----------------------------------------------------------------------------- drivers


def test_run_sft_and_dpo_drivers_write_outputs(tmp_path):
    params = init_params(CFG, 5)
    model = T.TrainModel(params, CFG, TOK)
    c = TC.TrainConfig(lr=3e-3, batch_size=4, seq_len=32, epochs=2, log_every=2, eval_fraction=0.2,
                      eval_every=3, progress=False)
    r = T.run_sft(model, sft_records(48), c, tmp_path / "sft")
    assert r.step == len(r.history) and r.step > 3
    assert r.history[-1]["loss"] < r.history[0]["loss"]
    assert r.eval_history and r.eval_history[-1]["step"] == r.step
    recs = [json.loads(x) for x in (tmp_path / "sft" / "metrics.jsonl").read_text().splitlines()]
    assert {x["split"] for x in recs} == {"train", "eval"} and all("lr" in x for x in recs if x["split"] == "train")
    assert any((tmp_path / "sft" / "tensorboard").iterdir())
    assert (tmp_path / "sft" / "compile.json").is_file()
    from w2s_jax.io.native import load_model

    loaded = load_model(r.model_dir)
    for a, b in zip(jax.tree.leaves(loaded.params), jax.tree.leaves(r.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    # DPO from the SFT model, LoRA with precomputed reference cached as JSONL
    cache = tmp_path / "prefs.jsonl.ref.jsonl"
    c2 = TC.TrainConfig(lr=3e-3, batch_size=2, seq_len=32, epochs=1, log_every=2, progress=False,
                       lora=LoRAConfig(rank=2), reference="precompute", beta=0.2)
    r2 = T.run_dpo(T.TrainModel(loaded.params, CFG, TOK), pref_records(8), c2, tmp_path / "dpo", ref_cache=cache)
    assert cache.is_file() and len(cache.read_text().splitlines()) == 8
    m = r2.history[0]
    for k in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
              "logps/rejected", "loss"):
        assert k in m
    assert m["rewards/margins"] == pytest.approx(0.0, abs=1e-5)  # policy == reference at step 0
    lm = load_model(r2.model_dir)
    assert lm.lora is not None and lm.lora_cfg.rank == 2


# ----------------------------------------------------------------------------- CLI


def test_cli_sft_then_dpo_and_unknown_keys(tmp_path, capsys):
    from w2s_jax.cli.app import main
    from w2s_jax.core.jsonl import write_jsonl_atomic

    write_jsonl_atomic(tmp_path / "sft.jsonl", sft_records(16))
    write_jsonl_atomic(tmp_path / "prefs.jsonl", pref_records(8))
    (tmp_path / "c.yaml").write_text(
        "model: {preset: tiny, overrides: {vocab_size: 264, n_layers: 1}}\n"
        f"data: {{train: {tmp_path / 'sft.jsonl'}}}\n"
        "train: {batch_size: 2, seq_len: 32, max_steps: 2, progress: false, tensorboard: false}\n"
        f"mesh: {{data: 1}}\nout_dir: {tmp_path / 'sft'}\n"
    )
    assert main(["sft", "--config", str(tmp_path / "c.yaml"), "--log-level", "WARNING"]) == 0
    assert "2 steps" in capsys.readouterr().out
    assert (tmp_path / "sft" / "model").is_dir() and (tmp_path / "sft" / "config.yaml").is_file()
    sets = ["--set", f"model={{path: {tmp_path / 'sft' / 'model'}}}", "--set", f"data.train={tmp_path / 'prefs.jsonl'}",
            "--set", f"out_dir={tmp_path / 'dpo'}", "--set", "train.lora={rank: 2}",
            "--set", "train.reference=lora_off", "--set", "train.loss_type=ipo", "--log-level", "WARNING"]
    assert main(["dpo", "--config", str(tmp_path / "c.yaml"), *sets]) == 0
    assert (tmp_path / "dpo" / "model").is_dir()
    assert main(["sft", "--config", str(tmp_path / "c.yaml"), "--set", "train.lrr=1"]) == 2
    assert "unknown key `train.lrr` (did you mean `train.lr`?)" in capsys.readouterr().err
    assert main(["dpo", "--config", str(tmp_path / "c.yaml"), "--set", "train.loss_type=kto"]) == 2
    assert "train.loss_type" in capsys.readouterr().err


def test_orpo_llamafactory_loss_on_a_tiny_model_matches_a_hand_computation():
    """LLaMA-Factory 0.6.2's ORPO: per pair the average completion log-prob (prompt masked, eos
    included) of chosen ``ac`` and rejected ``ar``, loss ``-ac + beta * -logsigmoid(log_odds)`` with
    ``log_odds = (ac - ar) - (log(1 - e^ac) - log(1 - e^ar))``, mean over pairs. The reference takes
    transformers' logits of the same weights and does the arithmetic in float64 numpy."""
    cfg = CFG.replace(initializer_range=0.2)
    params = init_params(cfg, 11)
    recs = pref_records(4)
    pairs, _ = tokenize_pairs(recs, TOK, 32)
    beta = 0.1
    c = TC.TrainConfig(lr=0.0, batch_size=4, seq_len=32, loss_type="orpo_llamafactory", beta=beta, max_steps=1)
    bundle = TB.build_steps("dpo", cfg, c, 1, TB.single_mesh())
    _, m = bundle.step_fn(_state_for(bundle, jax.tree.map(jnp.copy, params)), _dpo_batch(pairs, 4), None)

    model = to_torch_llama(params, cfg)

    def avg_logp(ex):
        ids = torch.tensor(np.asarray(ex.ids)[None], dtype=torch.long)
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0].double().numpy()
        lsm = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(
            -1, keepdims=True)
        tgt = np.asarray(ex.ids)
        lp = [lsm[t - 1, tgt[t]] for t in range(ex.n_prompt, len(tgt))]  # completion tokens, eos included
        return float(np.mean(lp))

    per = []
    for p in pairs:
        ac, ar = avg_logp(p.chosen), avg_logp(p.rejected)
        log_odds = (ac - ar) - (np.log1p(-np.exp(ac)) - np.log1p(-np.exp(ar)))
        per.append(-ac + beta * np.log1p(np.exp(-log_odds)))
    assert float(m["loss"]) == pytest.approx(float(np.mean(per)), rel=1e-5)
    # TRL's ORPO (NLL over prompt and completion, per token over the batch) is a different number
    c2 = TC.TrainConfig(lr=0.0, batch_size=4, seq_len=32, loss_type="orpo", beta=beta, max_steps=1)
    b2 = TB.build_steps("dpo", cfg, c2, 1, TB.single_mesh())
    _, m2 = b2.step_fn(_state_for(b2, jax.tree.map(jnp.copy, params)), _dpo_batch(pairs, 4), None)
    assert abs(float(m2["loss"]) - float(m["loss"])) > 1e-3
