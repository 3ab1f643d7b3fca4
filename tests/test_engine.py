"""Continuous-batching engine (w2s_jax/infer/engine.py): greedy outputs identical to the static Sampler
(model variants, LoRA, shared prefixes, rows finishing at different steps, slots refilled), sampled
outputs independent of the other requests and of resuming, prefill shared by samples and prompts,
occupancy, no cache copies in the decode loop."""

from __future__ import annotations

from collections import Counter

import jax
import pytest
from test_sampler import rand_prompts, sharp_params  # the sampler tests' random models and prompts

import w2s_jax.infer.sampler as sampler_mod
from w2s_jax.infer.sampler import SampleConfig, Sampler
from w2s_jax.infer.scheduler import common_prefix
from w2s_jax.models.config import get_preset
from w2s_jax.models.lora import LoRAConfig, init_lora
from w2s_jax.models.params import init_params

BYTE = dict(vocab_size=259, bos_token_id=257, eos_token_id=258, pad_token_id=256)
REAL_OPTIONS = dict(sampler_mod.CPU_COMPILER_OPTIONS)


@pytest.fixture(autouse=True)
def fast_compile(monkeypatch):
    monkeypatch.setattr(sampler_mod, "CPU_COMPILER_OPTIONS", {**REAL_OPTIONS, "xla_backend_optimization_level": 0})


def ids_of(outs):
    return [[c.token_ids for c in o] for o in outs]


def frequent_token(outs) -> int:
    """A token the model generates often after the first step (as EOS it ends rows at different steps)."""
    cnt = Counter(t for o in outs for c in o for t in c.token_ids[1:])
    return cnt.most_common(1)[0][0]


def test_common_prefix():
    assert common_prefix([[1, 2, 3], [1, 2, 4], [1, 2]]) == 2
    assert common_prefix([[1, 2, 3]]) == 3
    assert common_prefix([[5], [1, 2]]) == 0
    assert common_prefix([]) == 0


@pytest.mark.parametrize("name,loop,lora", [("tiny-gqa", "unroll", False), ("tiny-gqa", "scan", False),
                                            ("tiny-mistral", "unroll", False), ("tiny-gemma", "unroll", False),
                                            ("tiny-gqa", "unroll", True)])
def test_greedy_equals_static(name, loop, lora):
    cfg = get_preset(name, **BYTE)
    params = sharp_params(cfg, seed=1, scale=3.0)
    kw = dict(layer_loop=loop)
    if lora:
        lcfg = LoRAConfig(rank=4, alpha=8.0)
        lo = init_lora(cfg, lcfg, jax.random.PRNGKey(5))
        lo = {"layers": {k: {"a": v["a"], "b": 0.5 * jax.random.normal(jax.random.PRNGKey(6), v["b"].shape)}
                         for k, v in lo["layers"].items()}}
        kw.update(lora=lo, lora_scale=lcfg.scale)
    # mistral's window is 8: crossed by the prefix, the suffixes and the decode steps
    shared = rand_prompts([24], seed=3)[0]
    groups = [rand_prompts([5, 13, 2, 9, 17, 1, 6], seed=2), [shared + p for p in rand_prompts([3, 9, 1, 14], seed=4)]]
    static = Sampler(params, cfg, eos_ids=[], engine="static", **kw)
    for prompts in groups:
        sc = SampleConfig(max_new_tokens=10, batch_size=3, n=2)
        full = ids_of(static.generate(prompts, sc, progress=False))
        eos = Counter(t for o in full for ids in o for t in ids[1:]).most_common(1)[0][0]
        # greedy decoding with that EOS = the same tokens cut after its first occurrence
        want = [[ids[: ids.index(eos) + 1] if eos in ids else ids for ids in o] for o in full]
        got = Sampler(params, cfg, eos_ids=[eos], **kw).generate(prompts, sc, progress=False)
        assert ids_of(got) == want
        assert [[c.finish_reason for c in o] for o in got] == [
            ["eos" if ids[-1] == eos else "length" for ids in o] for o in want]
        lengths = {len(ids) for o in want for ids in o}
        assert len(lengths) > 1  # rows did finish at different steps (slots were refilled)


def test_greedy_with_stop_strings_and_text():
    from w2s_jax.io.tokenizer import ByteTokenizer

    cfg = get_preset("tiny", **BYTE)
    tok = ByteTokenizer()
    params = sharp_params(cfg, seed=3)
    prompts = ["Question: what is 2+2?\nAnswer:", "hi", "Question: x", "Question: what is 3+5?\nAnswer: 8"]
    sc = SampleConfig(max_new_tokens=30, batch_size=2, stop=())
    base = Sampler(params, cfg, tok, eos_ids=[], engine="static").generate(prompts, sc, progress=False)
    text = base[0][0].text
    stop = next(text[k:k + 2] for k in range(2, len(text) - 1) if text[k:k + 2].isprintable()
                and text[k:k + 2].strip() == text[k:k + 2])
    sc = sc.replace(stop=(stop,))
    want = Sampler(params, cfg, tok, eos_ids=[], engine="static").generate(prompts, sc, progress=False)
    got = Sampler(params, cfg, tok, eos_ids=[]).generate(prompts, sc, progress=False)
    assert [(c.token_ids, c.text, c.finish_reason) for o in got for c in o] == \
        [(c.token_ids, c.text, c.finish_reason) for o in want for c in o]
    assert got[0][0].finish_reason == "stop"


def test_sampled_outputs_depend_only_on_seed_and_prompt():
    cfg = get_preset("tiny-gqa", **BYTE)
    sampler = Sampler(sharp_params(cfg, scale=1.0), cfg, eos_ids=[])
    eos = frequent_token(sampler.generate(rand_prompts([7, 12], seed=3),
                                          SampleConfig(max_new_tokens=12, temperature=1.0, n=3), progress=False))
    sampler = Sampler(sharp_params(cfg, scale=1.0), cfg, eos_ids=[eos])
    sc = SampleConfig(max_new_tokens=12, temperature=1.0, n=3, seed=0, batch_size=4, prompt_buckets=(32,))
    a, b, c, d = rand_prompts([7, 12, 4, 20], seed=3)
    first = ids_of(sampler.generate([a, b], sc, progress=False))
    assert ids_of(sampler.generate([a, b], sc, progress=False)) == first
    assert len({tuple(t) for t in first[0]}) == 3  # seeds 0, 1, 2 differ
    # other requests around it, another order, other slots: the same tokens per (prompt, seed)
    other = ids_of(sampler.generate([c, d, b, a], sc, progress=False))
    assert other[3] == first[0] and other[2] == first[1]
    # resuming: the samples not skipped are the ones a full run gives
    part = {(i, j): cc.token_ids for i, j, cc in sampler.stream([c, d, b, a], sc, progress=False,
                                                                skip={(3, 0), (2, 2), (0, 1)})}
    assert len(part) == 12 - 3
    assert all(part[i, j] == other[i][j] for i, j in part)
    shifted = ids_of(sampler.generate([a], sc.replace(seed=1, n=2), progress=False))
    assert shifted[0] == first[0][1:]
    # the static engine draws the same tokens from the same keys
    static = Sampler(sharp_params(cfg, scale=1.0), cfg, eos_ids=[eos], engine="static")
    assert ids_of(static.generate([a, b], sc.replace(batch_buckets=(8,)), progress=False)) == first


def test_prefill_shared_by_samples_and_prompts():
    cfg = get_preset("tiny-gqa", **BYTE)
    params = sharp_params(cfg, scale=2.0)
    shared = rand_prompts([40], seed=5)[0]
    suffixes = rand_prompts([3, 9, 5, 12], seed=6)
    prompts = [shared + p for p in suffixes]
    sc = SampleConfig(max_new_tokens=6, n=3, batch_size=4)
    s = Sampler(params, cfg, eos_ids=[])
    got = s.generate(prompts, sc, progress=False)
    assert s.stats["prefill_tokens"] == 40 + sum(map(len, suffixes))  # prefix once, each suffix once
    assert len(s._prefixes) == 1
    s.generate(prompts[:2], sc, progress=False)  # the prefix is reused (cached by its token ids)
    assert s.stats["prefill_tokens"] == 40 + sum(map(len, suffixes)) + len(suffixes[0]) + len(suffixes[1])
    static = Sampler(params, cfg, eos_ids=[], engine="static")
    assert ids_of(static.generate(prompts, sc, progress=False)) == ids_of(got)
    assert static.stats["prefill_tokens"] == 3 * sum(map(len, prompts))


def test_occupancy_higher_than_static():
    cfg = get_preset("tiny-gqa", **BYTE)
    params = sharp_params(cfg, seed=2, scale=1.0)
    prompts = rand_prompts([6, 9, 4, 11, 7, 5, 8, 10], seed=7)
    sc = SampleConfig(max_new_tokens=24, temperature=1.0, n=2, batch_size=4)
    eos = frequent_token(Sampler(params, cfg, eos_ids=[]).generate(prompts, sc, progress=False))
    st = Sampler(params, cfg, eos_ids=[eos], engine="static")
    co = Sampler(params, cfg, eos_ids=[eos])
    assert ids_of(st.generate(prompts, sc, progress=False)) == ids_of(co.generate(prompts, sc, progress=False))
    assert 0 < st.occupancy < co.occupancy <= 1


def test_sharded_continuous_equals_single_device():
    from w2s_jax.parallel.sharding import make_mesh

    if len(jax.devices()) < 8:
        pytest.skip("needs 8 (simulated) devices")
    cfg = get_preset("tiny-gqa", **BYTE)
    mesh = make_mesh({"data": 4, "tensor": 2})
    params = sharp_params(cfg, seed=7, scale=3.0)
    sharded = init_params(cfg, jax.random.PRNGKey(7), mesh)
    sharded = jax.tree.map(lambda a, s: jax.device_put(a, s.sharding), params, sharded)
    shared = rand_prompts([20], seed=1)[0]
    prompts = [shared + p for p in rand_prompts([5, 9, 3, 12, 7], seed=8)]
    sc = SampleConfig(max_new_tokens=6, n=2, batch_size=4)
    probe = Sampler(params, cfg, eos_ids=[]).generate(prompts, sc, progress=False)
    eos = frequent_token(probe)
    want = ids_of(Sampler(params, cfg, eos_ids=[eos], engine="static").generate(prompts, sc, progress=False))
    for loop in ("unroll", "scan"):
        s = Sampler(sharded, cfg, mesh=mesh, eos_ids=[eos], layer_loop=loop)
        assert s.data_parallel == 4
        assert ids_of(s.generate(prompts, sc, progress=False)) == want
        n = s.num_compiled
        assert ids_of(s.generate(prompts, sc, progress=False)) == want and s.num_compiled == n


def test_decode_loop_does_not_copy_the_cache():
    from test_sampler import _while_bodies

    cfg = get_preset("tiny-gqa", **BYTE)
    sampler = Sampler(init_params(cfg, jax.random.PRNGKey(0)), cfg, eos_ids=[], compiler_options=REAL_OPTIONS)
    sampler.generate([[1, 2, 3], [4, 5]], SampleConfig(max_new_tokens=5, batch_size=2, prompt_buckets=(16,)),
                     progress=False)
    (prog,) = [p for k, p in sampler._programs.items() if k[0] == "decode"]
    bodies = _while_bodies(prog.as_text())
    assert bodies
    cache_shape = f"f32[2,{cfg.n_kv_heads},{16 + 5},{cfg.head_dim}]"
    assert any(cache_shape in b for b in bodies)
    copies = [ln for b in bodies for ln in b.splitlines() if " copy(" in ln and cache_shape in ln]
    assert not copies, copies[:3]
