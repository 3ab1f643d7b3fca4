"""Per-backend defaults chosen from GPU measurements: cuDNN attention for training, unrolled decode layers."""

import pytest

from w2s_jax.infer.sampler import default_layer_loop
from w2s_jax.models.config import get_preset
from w2s_jax.models.decoder import attention_implementation


def test_attention_auto_resolution():
    bf16 = get_preset("llama2-7b", dtype="bfloat16", param_dtype="bfloat16")
    assert bf16.attention_impl == "auto"
    assert attention_implementation(bf16, "gpu") == "cudnn"
    assert attention_implementation(bf16, "cpu") == "xla"
    assert attention_implementation(bf16, "tpu") == "xla"
    assert attention_implementation(bf16) == "xla"  # this process runs on CPU
    assert attention_implementation(get_preset("llama2-7b"), "gpu") == "xla"  # float32: no cuDNN flash path
    assert attention_implementation(get_preset("gemma-2b", dtype="bfloat16"), "gpu") == "xla"  # head_dim 256
    assert attention_implementation(bf16.replace(attention_impl="xla"), "gpu") == "xla"  # explicit wins
    assert attention_implementation(bf16.replace(attention_impl="cudnn"), "cpu") == "cudnn"
    with pytest.raises(ValueError, match="attention_impl"):
        get_preset("tiny", attention_impl="flash")


def test_default_layer_loop():
    assert default_layer_loop("cpu") == "unroll"
    assert default_layer_loop("gpu") == "unroll"
    assert default_layer_loop("tpu") == "scan"


def test_cudnn_fallback_and_error(monkeypatch, caplog):
    """'auto' on a GPU without usable cuDNN attention falls back to XLA's (same output, one warning);
    an explicit 'cudnn' is a clear error. Simulated on CPU, where JAX reports that cuDNN is absent."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from w2s_jax.core.errors import UserError
    from w2s_jax.models import decoder as M
    from w2s_jax.models import params as MP

    cfg = get_preset("tiny", dtype="bfloat16", param_dtype="bfloat16")
    params = MP.init_params(cfg, jax.random.PRNGKey(0))
    tokens = jnp.asarray(np.random.default_rng(0).integers(3, cfg.vocab_size, (2, 16)), jnp.int32)
    monkeypatch.setattr(M.jax, "default_backend", lambda: "gpu")
    assert attention_implementation(cfg) == "cudnn"
    M._warn_once.cache_clear()
    with caplog.at_level("WARNING", logger="w2s_jax.models.decoder"):
        auto = M.forward(params, tokens, cfg.replace(attention_impl="auto"))[0]
    assert "cuDNN attention is not available" in caplog.text
    ref = M.forward(params, tokens, cfg.replace(attention_impl="xla"))[0]
    np.testing.assert_array_equal(np.asarray(auto, np.float32), np.asarray(ref, np.float32))
    with pytest.raises(UserError, match="attention_impl='cudnn' is not available"):
        M.forward(params, tokens, cfg.replace(attention_impl="cudnn"))


def test_gpu_layer_loop_keeps_scan_when_memory_is_short():
    GB = 10**9
    assert default_layer_loop("gpu", 13 * GB, 80 * GB) == "unroll"  # Llama-2-7B bf16 on an 80 GB card
    assert default_layer_loop("gpu", 30 * GB, 80 * GB) == "scan"  # the per-layer copy would not leave room
    assert default_layer_loop("gpu", 30 * GB, None) == "unroll"  # no memory statistics: the fast path
    assert default_layer_loop("cpu", 30 * GB, 8 * GB) == "unroll"


def test_per_device_bytes_counts_one_shard():
    import jax
    import jax.numpy as jnp

    from w2s_jax.infer.sampler import _per_device_bytes

    tree = {"a": jnp.zeros((4, 8), jnp.float32), "b": [jnp.zeros((3,), jnp.bfloat16)]}
    assert _per_device_bytes(tree) == 4 * 8 * 4 + 3 * 2
    if len(jax.devices()) >= 2:  # sharded over 2 devices: one device holds half
        from jax.sharding import Mesh, NamedSharding, PartitionSpec

        mesh = Mesh(jax.devices()[:2], ("x",))
        a = jax.device_put(jnp.zeros((4, 8), jnp.float32), NamedSharding(mesh, PartitionSpec("x")))
        assert _per_device_bytes([a]) == 2 * 8 * 4
