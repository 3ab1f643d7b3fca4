"""Native CPU kernels (``w2s_jax/infer/kernels.py``): the skinny matmul against float64 numpy on every code
path (K-split with partial sums, column panels, row and column remainders, inside a while loop); the
decode-attention kernel against float64 numpy (empty, partial and full slot ranges, head sizes on and
off the vector width, grouped queries) and, inside ``decoder.decode_attention``, against XLA's masked
attention (with a shared prefix and a sliding window); the Sampler's kernel path against its XLA path
for both engines; and the fallback when the kernels cannot be built."""

from __future__ import annotations

import logging
import shutil
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import w2s_jax.infer.sampler as sampler_mod
from w2s_jax.core.errors import UserError
from w2s_jax.infer import kernels as cpu_kernels
from w2s_jax.infer.sampler import SampleConfig, Sampler
from w2s_jax.models.config import get_preset
from w2s_jax.models.params import init_params

needs_kernel = pytest.mark.skipif(
    cpu_kernels._compiler() is None or jax.default_backend() != "cpu", reason="no C++ compiler / not on CPU"
)


@needs_kernel
@pytest.mark.parametrize(
    "shape",
    [
        (1, 576, 960),  # decode q/k/v shape: K split over threads, partials summed
        (3, 1536, 576),  # several rows
        (16, 576, 1100),  # 16 rows, column blocks of 512 with a remainder
        (2, 64, 9000),  # wide: column panels
        (4, 37, 4100),  # K % 8 != 0, N % 16 != 0 (remainders)
        (1, 5, 7),  # tiny: one thread, scalar tails only
        (2, 3, 24),  # x as [2, 1, 3] (3-D)
    ],
)
def test_skinny_matmul_matches_numpy(shape):
    assert cpu_kernels.available()
    M, K, N = shape
    rng = np.random.default_rng(sum(shape))
    x = rng.standard_normal((M, K)).astype(np.float32)
    w = rng.standard_normal((K, N)).astype(np.float32)
    ref = x.astype(np.float64) @ w.astype(np.float64)
    xin = x[:, None, :] if shape == (2, 3, 24) else x
    y = np.asarray(jax.jit(cpu_kernels.skinny_matmul)(xin, w)).reshape(M, N)
    scale = np.abs(ref).max()
    np.testing.assert_allclose(y, ref, rtol=0, atol=2e-6 * scale * np.sqrt(K))

    # inside a while loop (the decode loop's setting): 3 chained products, each must be right
    def loop(x, w):
        return jax.lax.fori_loop(0, 3, lambda i, acc: acc + cpu_kernels.skinny_matmul(x, w), jnp.zeros((M, N)))

    np.testing.assert_allclose(np.asarray(jax.jit(loop)(x, w)), 3 * ref, rtol=0, atol=6e-6 * scale * np.sqrt(K))


@needs_kernel
def test_skinny_matmul_rejects_bad_operands():
    with pytest.raises(ValueError, match="float32"):
        cpu_kernels.skinny_matmul(jnp.ones((1, 4), jnp.bfloat16), jnp.ones((4, 3), jnp.bfloat16))
    with pytest.raises(ValueError, match=r"K\]"):
        cpu_kernels.skinny_matmul(jnp.ones((1, 4)), jnp.ones((5, 3)))


@needs_kernel
@pytest.mark.parametrize("shape", [(5, 3, 3, 70, 64), (3, 2, 1, 37, 24), (2, 1, 5, 100, 128), (1, 1, 1, 1, 16)])
def test_decode_attention_kernel_matches_numpy(shape):
    assert cpu_kernels.available()
    B, K, G, S, D = shape
    rng = np.random.default_rng(sum(shape))
    q = (rng.standard_normal((B, K, G, D)) * 0.5).astype(np.float32)
    k = rng.standard_normal((B, K, S, D)).astype(np.float32)
    v = rng.standard_normal((B, K, S, D)).astype(np.float32)
    lo = rng.integers(0, S // 2 + 1, B).astype(np.int32)
    hi = rng.integers(S // 2, S + 1, B).astype(np.int32)
    lo[0], hi[0] = 0, S  # the whole cache
    if B > 1:
        lo[1] = hi[1] = S // 3  # an empty range
    if B > 2:
        lo[2], hi[2] = -4, S + 9  # out of bounds: clamped to the cache
    o, m, den = jax.jit(cpu_kernels.decode_attention)(q, k, v, lo, hi)
    for b in range(B):
        a, z = max(lo[b], 0), min(hi[b], S)
        if z <= a:
            assert np.all(np.asarray(m[b]) == -1e30) and np.all(np.asarray(den[b]) == 0) and not np.any(o[b])
            continue
        s = np.einsum("kgd,ksd->kgs", q[b].astype(np.float64), k[b, :, a:z].astype(np.float64))
        mm = s.max(-1)
        e = np.exp(s - mm[..., None])
        np.testing.assert_allclose(np.asarray(m[b]), mm, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(np.asarray(den[b]), e.sum(-1), rtol=1e-5)
        np.testing.assert_allclose(np.asarray(o[b]), np.einsum("kgs,ksd->kgd", e, v[b, :, a:z]), rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="float32"):
        cpu_kernels.decode_attention(jnp.asarray(q, jnp.bfloat16), k, v, lo, hi)


@needs_kernel
@pytest.mark.parametrize("window", [None, 6])
def test_decode_attention_with_kernel_equals_masked_attention(window):
    """decoder.decode_attention over each row's slot range, with the kernel and with the masked einsums,
    against a float64 softmax over the same keys (cache, the token itself, a shared prefix)."""
    from w2s_jax.infer.sampling import attention_kernel_for
    from w2s_jax.models import decoder as D

    cfg = get_preset("tiny", n_heads=8, n_kv_heads=2, d_model=128, sliding_window=window)
    B, K, S, Dh, Sp = 4, cfg.n_kv_heads, 20, cfg.head_dim, 7
    rng = np.random.default_rng(1)
    f = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.float32)  # noqa: E731
    ck, cv, q, k1, v1 = f(B, K, S, Dh), f(B, K, S, Dh), f(B, 1, cfg.n_heads, Dh), f(B, 1, K, Dh), f(B, 1, K, Dh)
    prefix, prefix_len = (f(K, Sp, Dh), f(K, Sp, Dh)), 5
    cur = jnp.asarray([0, 3, 11, 20], jnp.int32)  # slots filled per row (this token goes at slot cur)
    kslots = jnp.arange(S)
    valid = kslots[None] < cur[:, None]
    lo = jnp.zeros_like(cur)
    pos = prefix_len + cur
    pvalid = jnp.broadcast_to(jnp.arange(Sp)[None] < prefix_len, (B, Sp))
    if window is not None:
        valid &= (cur[:, None] - kslots[None]) < window
        lo = jnp.maximum(cur - window + 1, 0)
        pvalid &= (pos[:, None] - jnp.arange(Sp)[None]) < window
    kernel = attention_kernel_for(SimpleNamespace(cpu_kernels=True))
    # the range form of the slots is the window mask
    np.testing.assert_array_equal((kslots[None] >= lo[:, None]) & (kslots[None] < cur[:, None]), valid)

    def reference(pre, pv):  # float64 softmax over [prefix slots, cache slots, the token itself]
        a = lambda x: np.asarray(x, np.float64)  # noqa: E731
        G = cfg.n_heads // K
        out = np.zeros((B, 1, cfg.n_heads, Dh))
        for b in range(B):
            for h in range(cfg.n_heads):
                kv = h // G
                keys, vals = [a(ck[b, kv])[a(valid[b]) > 0]], [a(cv[b, kv])[a(valid[b]) > 0]]
                if pre is not None:
                    keys.insert(0, a(pre[0][kv])[a(pv[b]) > 0])
                    vals.insert(0, a(pre[1][kv])[a(pv[b]) > 0])
                keys = np.concatenate([*keys, a(k1[b, 0, kv])[None]])
                vals = np.concatenate([*vals, a(v1[b, 0, kv])[None]])
                sc = keys @ a(q[b, 0, h]) / np.sqrt(Dh)
                w = np.exp(sc - sc.max())
                out[b, 0, h] = w @ vals / w.sum()
        return out

    for pre, pv in ((None, None), (prefix, pvalid)):
        want = reference(pre, pv)
        xla = D.decode_attention(cfg, ck, cv, (lo, cur), pre, pv)(q, k1, v1)
        got = jax.jit(D.decode_attention(cfg, ck, cv, (lo, cur), pre, pv, kernel))(q, k1, v1)
        np.testing.assert_allclose(np.asarray(xla), want, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)


def _tiny_sampler_pair():
    # gate/up [128, 768]: big enough for the kernel to use 2 threads
    cfg = get_preset("tiny", vocab_size=259, bos_token_id=257, eos_token_id=258, pad_token_id=256, d_model=128,
                     n_heads=8, n_kv_heads=4, d_ff=384)
    assert cfg.dtype == "float32"
    p = jax.tree.map(lambda a: a * 4.0 if a.ndim > 1 else a, init_params(cfg, jax.random.PRNGKey(3)))
    return cfg, p


@needs_kernel
def test_sampler_kernel_path_equals_xla_path(monkeypatch):
    monkeypatch.setattr(sampler_mod, "CPU_COMPILER_OPTIONS",
                        {**sampler_mod.CPU_COMPILER_OPTIONS, "xla_backend_optimization_level": 0})
    cfg, p = _tiny_sampler_pair()
    fast = Sampler(p, cfg, eos_ids=[])
    assert fast.cpu_kernels  # the default on CPU when the kernel builds
    slow = Sampler(p, cfg, eos_ids=[], cpu_kernels=False)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, 256, n).tolist() for n in (3, 9, 17)]
    fast_static = Sampler(p, cfg, eos_ids=[], engine="static")
    slow_static = Sampler(p, cfg, eos_ids=[], cpu_kernels=False, engine="static")
    for B in (1, 3):  # decode steps of both batches go through the kernels (<= SKINNY_MAX_ROWS rows)
        sc = SampleConfig(max_new_tokens=12, batch_size=B)
        b = slow.generate_with_logits(prompts, sc)
        for other in (fast, fast_static, slow_static):
            a = other.generate_with_logits(prompts, sc)
            for (ca, la), (cb, lb) in zip(a, b):
                assert ca.token_ids == cb.token_ids
                np.testing.assert_allclose(la, lb, rtol=0, atol=1e-4)
    # the decode loop's products and attention go through the kernels; prefill (many rows per product)
    # keeps XLA's dot
    decode = [prog.as_text() for key, prog in fast._programs.items() if key[0] == "decode"]
    assert decode and all("w2s_skinny_matmul" in t and "w2s_decode_attention" in t for t in decode)
    assert all("w2s_decode_attention" in prog.as_text() for prog in fast_static._programs.values())
    assert not any("w2s_skinny_matmul" in prog.as_text() for key, prog in fast._programs.items() if key[0] == "prefill")
    for prog in (*slow._programs.values(), *slow_static._programs.values()):
        assert "w2s_skinny_matmul" not in prog.as_text() and "w2s_decode_attention" not in prog.as_text()


def test_kernel_unavailable_falls_back(monkeypatch, tmp_path, caplog):
    cfg, p = _tiny_sampler_pair()
    monkeypatch.setenv("W2S_CPU_KERNELS", "0")
    assert not cpu_kernels.available()
    assert not Sampler(p, cfg, eos_ids=[]).cpu_kernels
    monkeypatch.delenv("W2S_CPU_KERNELS")
    # a compiler that fails: a warning naming the failure, False, XLA's dot in the Sampler
    false = shutil.which("false")
    if false is None:
        pytest.skip("no `false` binary to stand in for a broken compiler")
    monkeypatch.setenv("CXX", false)
    monkeypatch.setenv("W2S_KERNEL_CACHE", str(tmp_path))
    cpu_kernels._load_once.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger="w2s_jax.infer.kernels"):
            assert not cpu_kernels.available()
        assert "native CPU kernels unavailable" in caplog.text
        assert not Sampler(p, cfg, eos_ids=[]).cpu_kernels
        with pytest.raises(UserError, match="cpu_kernels=True"):
            Sampler(p, cfg, eos_ids=[], cpu_kernels=True)
    finally:
        cpu_kernels._load_once.cache_clear()
