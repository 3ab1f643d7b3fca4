"""Sampler: parity with transformers' greedy generate, cached decoding vs full forward, bounded
compilation, seeds, stop strings, top-k/top-p, LoRA unmerged vs merged, sharding, no cache copies."""

from __future__ import annotations

import re

import jax
import numpy as np
import pytest

import w2s_jax.infer.sampler as sampler_mod
from w2s_jax.infer.sampler import (
    SampleConfig,
    Sampler,
    StopMatcher,
    cut_at_stop,
    default_batch_buckets,
    default_prompt_buckets,
    token_pieces,
)
from w2s_jax.io.hf import state_dict_to_params
from w2s_jax.io.tokenizer import ByteTokenizer
from w2s_jax.models.config import ModelConfig, get_preset
from w2s_jax.models.decoder import forward
from w2s_jax.models.lora import LoRAConfig, init_lora, merge_lora
from w2s_jax.models.params import init_params

BYTE = dict(vocab_size=259, bos_token_id=257, eos_token_id=258, pad_token_id=256)
REAL_OPTIONS = dict(sampler_mod.CPU_COMPILER_OPTIONS)


@pytest.fixture(autouse=True)
def fast_compile(monkeypatch):
    """Tests compile with LLVM optimizations off (half the compile time; same programs otherwise)."""
    monkeypatch.setattr(sampler_mod, "CPU_COMPILER_OPTIONS", {**REAL_OPTIONS, "xla_backend_optimization_level": 0})


def tiny(name="tiny", **kw) -> ModelConfig:
    return get_preset(name, **{**BYTE, **kw})


def sharp_params(cfg, seed=0, scale=6.0):
    """Random params with larger weights, so logits are peaked (no near-ties between implementations)."""
    p = init_params(cfg, jax.random.PRNGKey(seed))
    return jax.tree.map(lambda a: a * scale if a.ndim > 1 else a, p)


def rand_prompts(lengths, seed=0, vocab=256):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab, size=n).tolist() for n in lengths]


# ----------------------------------------------------------------------------- transformers parity


def hf_to_params(m, cfg: ModelConfig) -> dict:
    """LlamaForCausalLM state dict -> our params tree (the mapping of ``w2s_jax.io.convert``)."""
    return state_dict_to_params({k: v.detach().float().numpy() for k, v in m.state_dict().items()}, cfg)


@pytest.mark.parametrize("kv_heads", [4, 2], ids=["llama", "gqa"])
def test_greedy_matches_transformers(kv_heads):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(kv_heads)
    hc = transformers.LlamaConfig(
        vocab_size=259, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=kv_heads,
        head_dim=16, intermediate_size=128, max_position_embeddings=256, rope_theta=10000.0, rms_norm_eps=1e-5,
        tie_word_embeddings=False, bos_token_id=257, eos_token_id=258, pad_token_id=256, initializer_range=0.2,
    )
    hc._attn_implementation = "eager"
    m = transformers.LlamaForCausalLM(hc).float().eval()
    cfg = ModelConfig("hf", 259, 64, 2, 4, kv_heads, 16, 128, 256, bos_token_id=257, eos_token_id=258,
                      pad_token_id=256)
    params = hf_to_params(m, cfg)
    prompts = rand_prompts([3, 11, 6, 17, 1], seed=kv_heads)
    new = 12
    P = max(map(len, prompts))
    ids = torch.full((len(prompts), P), 256, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for r, p in enumerate(prompts):
        ids[r, P - len(p):] = torch.tensor(p)
        mask[r, P - len(p):] = 1
    with torch.no_grad():
        hf = m.generate(ids, attention_mask=mask, max_new_tokens=new, do_sample=False, num_beams=1,
                        eos_token_id=258, pad_token_id=256)[:, P:].tolist()
    outs = Sampler(params, cfg).generate(prompts, SampleConfig(max_new_tokens=new), progress=False)
    for r, row in enumerate(hf):
        if 258 in row:
            row = row[: row.index(258) + 1]
        c = outs[r][0]
        assert c.token_ids == row, f"prompt {r}: {c.token_ids} != {row}"
        assert c.num_tokens == len(row)
        assert c.finish_reason == ("eos" if row[-1] == 258 else "length")


# ----------------------------------------------------------------------------- cache vs full forward


@pytest.mark.parametrize(
    "name,loop", [("tiny-gqa", "unroll"), ("tiny-gqa", "scan"), ("tiny-mistral", "unroll"), ("tiny-gemma", "unroll")]
)
def test_cached_logits_equal_full_forward(name, loop):
    cfg = tiny(name)
    params = sharp_params(cfg, seed=1, scale=3.0)
    prompts = rand_prompts([5, 13, 2, 9], seed=2)  # mistral window is 8: crossed by prompt and decode
    sampler = Sampler(params, cfg, layer_loop=loop, eos_ids=[])
    res = sampler.generate_with_logits(prompts, SampleConfig(max_new_tokens=10))
    T = max(len(p) + c.num_tokens for p, (c, _) in zip(prompts, res))
    toks = np.zeros((len(prompts), T), np.int32)
    seg = np.zeros((len(prompts), T), np.int32)
    for r, (p, (c, _)) in enumerate(zip(prompts, res)):
        full = p + c.token_ids
        toks[r, : len(full)] = full
        seg[r, : len(full)] = 1
    ref = jax.jit(lambda t, s: forward(params, t, cfg, segment_ids=s))(toks, seg)
    ref = np.asarray(ref)
    for r, (p, (c, logits)) in enumerate(zip(prompts, res)):
        assert c.num_tokens == 10 and logits.shape == (10, cfg.vocab_size)
        want = ref[r, len(p) - 1 : len(p) - 1 + c.num_tokens]
        np.testing.assert_allclose(logits, want, rtol=2e-4, atol=2e-4 * np.abs(want).max())
        assert c.token_ids == np.argmax(want, -1).tolist()


# ----------------------------------------------------------------------------- compilation is bounded


def test_compiled_programs_bounded_by_buckets():
    """Static engine: one program per (batch bucket, prompt bucket)."""
    cfg = tiny("tiny")
    sampler = Sampler(init_params(cfg, jax.random.PRNGKey(0)), cfg, eos_ids=[], engine="static")
    sc = SampleConfig(max_new_tokens=3, batch_size=8)
    compiles, counting = [], [True]

    def listener(ev, dur, **kw):
        if counting[0] and ev == "/jax/core/compile/backend_compile_duration":
            compiles.append(ev)

    jax.monitoring.register_event_duration_secs_listener(listener)
    used = set()
    for n, length in [(1, 5), (3, 20), (4, 30), (7, 10), (8, 12)]:
        prompts = rand_prompts([length - (k % 3) for k in range(n)], seed=n)
        outs = sampler.generate(prompts, sc, progress=False)
        assert [len(o) for o in outs] == [1] * n
        used.add((min(b for b in default_batch_buckets(8) if b >= n),
                  min(b for b in default_prompt_buckets(cfg.max_seq_len - 3) if b >= length)))
    assert len(used) == 3
    assert sampler.num_compiled == len(used)
    counting[0] = False
    assert len(compiles) <= len(used), compiles  # every XLA compilation, not just our counter
    # more rows than the batch size: full batches plus a smaller bucket, nothing new for repeats
    before = sampler.num_compiled
    outs = sampler.generate(rand_prompts([10] * 20, seed=9), sc, progress=False)
    assert all(o[0].num_tokens == 3 for o in outs)
    assert sampler.num_compiled == before + 1  # (8, 16) was compiled already; (4, 16) is new


def test_continuous_compiles_a_bounded_set_once():
    """Continuous engine: every XLA compilation is a counted program (empty state, prefill per (rows,
    suffix) bucket, insert, decode, shared prefix), bounded by the buckets; a rerun compiles nothing."""
    cfg = tiny("tiny")
    sampler = Sampler(init_params(cfg, jax.random.PRNGKey(0)), cfg, eos_ids=[])
    sc = SampleConfig(max_new_tokens=3, batch_size=8)
    compiles, counting = [], [True]

    def listener(ev, dur, **kw):
        if counting[0] and ev == "/jax/core/compile/backend_compile_duration":
            compiles.append(ev)

    jax.monitoring.register_event_duration_secs_listener(listener)
    cases = [(1, 5), (3, 20), (4, 30), (7, 10), (8, 12), (20, 10)]
    work = [rand_prompts([length - (k % 3) for k in range(n)], seed=n) for n, length in cases]
    work.append([[9] * 20 + p for p in rand_prompts([3, 7, 12], seed=11)])  # a shared prefix
    for prompts in work:
        outs = sampler.generate(prompts, sc, progress=False)
        assert [[c.num_tokens for c in o] for o in outs] == [[3]] * len(prompts)
    counting[0] = False
    # every program is counted once; JAX's own compile events are not compared one to one (it also compiles
    # small eager helpers on first use, and reuses one executable for two programs that lower identically)
    assert compiles and sampler.num_compiled == len(sampler._programs)
    kinds = [k[0] for k in sampler._programs]
    # slots x suffix buckets used: (1, 16) (4, 32) (8, 32) (8, 16); rows buckets 1, 2, 4, 8
    assert kinds.count("decode") <= 5 and kinds.count("prefix") == 1
    assert kinds.count("prefill") <= 4 * 3 + 1 and kinds.count("insert") <= kinds.count("prefill") * 4
    before = sampler.num_compiled
    counting[0] = True
    compiles.clear()
    for prompts in work:
        sampler.generate(prompts, sc, progress=False)
    assert sampler.num_compiled == before and not compiles


def test_program_cache_is_the_samplers():
    """A Sampler keeps its compiled programs in the ProgramCache it is given: a second Sampler on the same
    cache compiles nothing, one on a fresh cache compiles again."""
    cfg = tiny("tiny")
    params = init_params(cfg, jax.random.PRNGKey(0))
    prompts, sc = rand_prompts([5, 9], seed=3), SampleConfig(max_new_tokens=3, batch_size=2)
    cache = sampler_mod.ProgramCache()
    first = Sampler(params, cfg, eos_ids=[], programs=cache)
    ref = first.generate(prompts, sc, progress=False)
    assert first.compile_seconds > 0 and len(cache) == first.num_compiled > 0
    again = Sampler(params, cfg, eos_ids=[], programs=cache)
    assert again.generate(prompts, sc, progress=False) == ref and again.compile_seconds == 0
    fresh = Sampler(params, cfg, eos_ids=[], programs=sampler_mod.ProgramCache())
    assert fresh.generate(prompts, sc, progress=False) == ref and fresh.compile_seconds > 0


# ----------------------------------------------------------------------------- seeds


def test_seeds_reproducible_and_independent_of_batch():
    cfg = tiny("tiny-gqa")
    sampler = Sampler(sharp_params(cfg, scale=1.0), cfg, eos_ids=[])
    sc = SampleConfig(max_new_tokens=8, temperature=1.0, n=3, seed=0, batch_buckets=(8,), prompt_buckets=(32,))
    a, b, c, d = rand_prompts([7, 12, 4, 20], seed=3)
    toks = lambda outs: [[s.token_ids for s in o] for o in outs]
    first = toks(sampler.generate([a, b], sc, progress=False))
    assert toks(sampler.generate([a, b], sc, progress=False)) == first
    assert len({tuple(t) for t in first[0]}) == 3  # seeds 0, 1, 2 differ
    # the same (prompt, seed) in another batch composition and position: the same tokens
    other = toks(sampler.generate([c, d, b, a], sc, progress=False))
    assert other[3] == first[0] and other[2] == first[1]
    shifted = toks(sampler.generate([a], sc.replace(seed=1, n=2), progress=False))
    assert shifted[0] == first[0][1:]
    assert [s.seed for s in sampler.generate([a], sc.replace(seed=5, n=2), progress=False)[0]] == [5, 6]
    assert toks(sampler.generate([a], sc.replace(seed=7), progress=False))[0] != first[0]


# ----------------------------------------------------------------------------- top-k / top-p


def test_top_k_top_p():
    cfg = tiny("tiny")
    sampler = Sampler(sharp_params(cfg, scale=2.0), cfg, eos_ids=[])
    prompts = rand_prompts([4, 9, 6], seed=5)
    greedy = [c.token_ids for c, _ in sampler.generate_with_logits(prompts, SampleConfig(max_new_tokens=8))]
    tiny_p = SampleConfig(max_new_tokens=8, temperature=1.0, top_p=1e-6)  # the nucleus is the argmax
    assert [c.token_ids for c, _ in sampler.generate_with_logits(prompts, tiny_p)] == greedy
    res = sampler.generate_with_logits(prompts, SampleConfig(max_new_tokens=8, temperature=1.5, top_k=3, seed=4))
    for c, logits in res:
        for t, lg in zip(c.token_ids, logits):
            assert lg[t] >= np.sort(lg)[-3]
    res = sampler.generate_with_logits(prompts, SampleConfig(max_new_tokens=8, temperature=1.0, top_p=0.5, seed=4))
    for c, logits in res:
        for t, lg in zip(c.token_ids, logits):
            p = np.exp(lg - lg.max())
            p /= p.sum()
            assert p[p > p[t]].sum() < 0.5 + 1e-5  # t is inside the nucleus


def test_argmax_first_index_of_max():
    from w2s_jax.infer.sampling import argmax

    x = np.random.default_rng(0).normal(size=(5, 300)).astype(np.float32)
    x[1, [7, 9, 250]] = 50.0  # ties: the first index wins, as in np.argmax
    x[2, :] = 1.0
    np.testing.assert_array_equal(np.asarray(jax.jit(argmax)(x)), np.argmax(x, -1))


# ----------------------------------------------------------------------------- stop strings


def test_stop_matcher_equals_substring_search():
    pieces = ["Q", "ue", "st", "ion", "Ans", "wer", "A", " ", "x", "Question", "Qu", "estion", "n", "A\n", "", "sw",
              "e", "nQ", "Answe", "r"]
    stops = ("Question", "Answer", "st x")
    m = StopMatcher(stops, pieces)
    rng = np.random.default_rng(0)
    hits = 0
    for _ in range(400):
        ids = rng.integers(0, len(pieces), size=rng.integers(1, 12)).tolist()
        for k in range(1, len(ids) + 1):
            text = "".join(pieces[i] for i in ids[:k])
            assert (m.run(ids[:k]) == m.match_state) == any(s in text for s in stops), (ids[:k], text)
        hits += m.run(ids) == m.match_state
    assert 20 < hits < 380


def test_token_pieces_and_cut():
    from w2s_jax.io.tokenizer import HFTokenizer

    bt = ByteTokenizer()
    pieces = token_pieces(bt, 300)
    assert pieces[ord("Q")] == "Q" and pieces[257] == "" and pieces[299] == "" and len(pieces) == 300
    hf = HFTokenizer(bt.to_hf(), {"type": "hf", "path": "."})
    assert token_pieces(hf, 259)[32:127] == pieces[32:127]
    assert cut_at_stop("  12 + 3\nQuestion: x Answer", ("Question", "Answer")) == ("  12 + 3\n", True)
    assert cut_at_stop("no stop", ("Question",)) == ("no stop", False)


def test_stop_strings_end_generation():
    cfg = tiny("tiny")
    tok = ByteTokenizer()
    sampler = Sampler(sharp_params(cfg, seed=3), cfg, tok, eos_ids=[])
    prompts = ["Question: what is 2+2?\nAnswer:", "hi", "Question: x"]
    base = sampler.generate(prompts, SampleConfig(max_new_tokens=40, stop=()), progress=False)
    checked = 0
    for r, p in enumerate(prompts):
        ids = base[r][0].token_ids
        # a 2-character stop string made of printable ASCII generated at position k, k+1 (k >= 2)
        ks = [k for k in range(2, len(ids) - 1) if all(33 <= t < 127 for t in ids[k:k + 2])]
        if not ks:
            continue
        k = ks[0]
        stop = bytes(ids[k:k + 2]).decode()
        first = next(j for j in range(len(ids) - 1) if bytes(ids[j:j + 2]).decode("latin-1") == stop)
        c = sampler.generate([p], SampleConfig(max_new_tokens=40, stop=(stop, "\x00never")), progress=False)[0][0]
        assert c.finish_reason == "stop"
        assert c.token_ids == ids[: first + 2]  # stopped in the loop right after completing the string
        assert c.text == tok.decode(ids[:first]).strip()
        checked += 1
    assert checked >= 1
    assert base[0][0].finish_reason == "length" and base[0][0].num_tokens == 40


# ----------------------------------------------------------------------------- LoRA, sharding, copies


def test_lora_unmerged_equals_merged():
    cfg = tiny("tiny-gqa")
    params = sharp_params(cfg, seed=4, scale=3.0)
    lcfg = LoRAConfig(rank=4, alpha=8.0)
    lora = init_lora(cfg, lcfg, jax.random.PRNGKey(5))
    lora = {"layers": {k: {"a": v["a"], "b": 0.5 * jax.random.normal(jax.random.PRNGKey(6), v["b"].shape)}
                       for k, v in lora["layers"].items()}}
    prompts = rand_prompts([6, 3, 10], seed=6)
    sc = SampleConfig(max_new_tokens=8)
    un = Sampler(params, cfg, lora=lora, lora_scale=lcfg.scale, eos_ids=[]).generate_with_logits(prompts, sc)
    # the other weight layouts: separate q/k/v and gate/up, column-split matmuls; stacked (scan)
    un2 = Sampler(params, cfg, lora=lora, lora_scale=lcfg.scale, eos_ids=[], fuse_projections=False,
                  matmul_split=3).generate_with_logits(prompts, sc)
    un3 = Sampler(params, cfg, lora=lora, lora_scale=lcfg.scale, eos_ids=[], layer_loop="scan"
                  ).generate_with_logits(prompts, sc)
    me = Sampler(merge_lora(params, lora, cfg, lcfg.scale), cfg, eos_ids=[]).generate_with_logits(prompts, sc)
    base = Sampler(params, cfg, eos_ids=[]).generate_with_logits(prompts, sc)
    for (cu, lu), (cu2, lu2), (cu3, lu3), (cm, lm), (_, lb) in zip(un, un2, un3, me, base):
        assert cu.token_ids == cm.token_ids == cu2.token_ids == cu3.token_ids
        for got in (lu, lu2, lu3):
            np.testing.assert_allclose(got, lm, rtol=1e-4, atol=1e-4 * np.abs(lm).max())
        assert not np.allclose(lu[0], lb[0], atol=1e-3)  # the adapter does change the model


def test_sharded_equals_single_device():
    from w2s_jax.parallel.sharding import make_mesh

    if len(jax.devices()) < 8:
        pytest.skip("needs 8 (simulated) devices")
    cfg = tiny("tiny-gqa")
    mesh = make_mesh({"data": 4, "tensor": 2})
    params = sharp_params(cfg, seed=7, scale=3.0)
    sharded_params = init_params(cfg, jax.random.PRNGKey(7), mesh)
    sharded_params = jax.tree.map(lambda a, s: jax.device_put(a, s.sharding), params, sharded_params)
    prompts = rand_prompts([5, 9, 3, 12, 7], seed=8)
    sc = SampleConfig(max_new_tokens=6)
    want = [o[0].token_ids for o in Sampler(params, cfg, eos_ids=[]).generate(prompts, sc, progress=False)]
    s = Sampler(sharded_params, cfg, mesh=mesh, eos_ids=[])
    assert s.data_parallel == 4
    got = [o[0].token_ids for o in s.generate(prompts, sc, progress=False)]
    assert got == want


def _while_bodies(hlo: str) -> list[str]:
    names = set(re.findall(r"\bwhile\(.*?body=%?([\w.\-]+)", hlo))
    comps = re.split(r"\n(?=\S)", hlo)
    return [c for c in comps if any(c.startswith(f"%{n} ") or c.startswith(f"{n} ") for n in names)]


def test_decode_loop_does_not_copy_the_cache():
    """Static engine (the continuous engine's decode loop: tests/test_engine.py)."""
    cfg = tiny("tiny-gqa")
    sampler = Sampler(init_params(cfg, jax.random.PRNGKey(0)), cfg, eos_ids=[], compiler_options=REAL_OPTIONS,
                      engine="static")
    sampler.generate([[1, 2, 3]], SampleConfig(max_new_tokens=5, batch_size=2, prompt_buckets=(16,)), progress=False)
    (prog,) = sampler._programs.values()
    bodies = _while_bodies(prog.as_text())
    assert bodies
    cache_shape = f"f32[1,{cfg.n_kv_heads},{16 + 5},{cfg.head_dim}]"
    assert any(cache_shape in b for b in bodies)
    copies = [ln for b in bodies for ln in b.splitlines() if " copy(" in ln and cache_shape in ln]
    assert not copies, copies[:3]
