"""Native CPU kernel (``w2s_jax/infer/kernels.py``): the skinny matmul against float64 numpy on every code
path (K-split with partial sums, column panels, row and column remainders, inside a while loop), the
Sampler's kernel path against its XLA-dot path, and the fallback when the kernel cannot be built."""

from __future__ import annotations

import logging
import shutil

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
    for B in (1, 3):  # decode steps of both batches go through the kernel (<= SKINNY_MAX_ROWS rows)
        sc = SampleConfig(max_new_tokens=12, batch_size=B)
        a = fast.generate_with_logits(prompts, sc)
        b = slow.generate_with_logits(prompts, sc)
        for (ca, la), (cb, lb) in zip(a, b):
            assert ca.token_ids == cb.token_ids
            np.testing.assert_allclose(la, lb, rtol=0, atol=1e-4)
    # the decode loop's products go through the kernel; prefill (many rows per product) keeps XLA's dot
    decode = [prog.as_text() for key, prog in fast._programs.items() if key[0] == "decode"]
    assert decode and all("w2s_skinny_matmul" in t for t in decode)
    assert not any("w2s_skinny_matmul" in prog.as_text() for key, prog in fast._programs.items() if key[0] == "prefill")
    assert not any("w2s_skinny_matmul" in prog.as_text() for prog in slow._programs.values())


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
