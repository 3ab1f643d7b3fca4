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


def test_cudnn_fallback_and_error(caplog):
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
    assert attention_implementation(cfg, "gpu") == "cudnn"
    M._warn_once.cache_clear()
    with caplog.at_level("WARNING", logger="w2s_jax.models.decoder"):
        auto = M.forward(params, tokens, cfg.replace(attention_impl="auto"), platform="gpu")
    assert "cuDNN attention is not available" in caplog.text
    ref = M.forward(params, tokens, cfg.replace(attention_impl="xla"), platform="gpu")
    np.testing.assert_array_equal(np.asarray(auto, np.float32), np.asarray(ref, np.float32))
    with pytest.raises(UserError, match="attention_impl='cudnn' is not available"):
        M.forward(params, tokens, cfg.replace(attention_impl="cudnn"), platform="gpu")


def test_program_follows_the_mesh_platform_not_the_default_backend():
    """The backend-specific forms (2-D matmuls and the grouped causal attention on CPU) follow the
    platform the program is built for: a mesh's devices, else an explicit platform, else the first device."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from w2s_jax.models import decoder as M
    from w2s_jax.models import params as MP
    from w2s_jax.parallel.sharding import make_mesh

    cfg = get_preset("tiny")
    params = MP.init_params(cfg, jax.random.PRNGKey(0))
    tokens = jnp.asarray(np.random.default_rng(0).integers(3, cfg.vocab_size, (2, 128)), jnp.int32)
    mesh = make_mesh({"data": 1}, jax.devices()[:1])
    assert M.platform_of(mesh) == M.platform_of() == jax.devices()[0].platform == "cpu"
    assert M.platform_of(None, "tpu") == "tpu"
    progs = {p: str(jax.make_jaxpr(lambda pr, t, p=p: M.forward(pr, t, cfg, platform=p))(params, tokens))
             for p in ("cpu", "tpu", "gpu")}
    assert progs["tpu"] == progs["gpu"] != progs["cpu"]  # (tiny is float32: no cuDNN on gpu either)
    assert progs["cpu"].count("dot_general") > progs["tpu"].count("dot_general")  # the blocked CPU attention
    on_mesh = str(jax.make_jaxpr(lambda pr, t: M.forward(pr, t, cfg, mesh=mesh, platform="tpu"))(params, tokens))
    assert on_mesh.count("dot_general") == progs["cpu"].count("dot_general")  # the mesh's platform wins


def test_gpu_layer_loop_keeps_scan_when_memory_is_short():
    GB = 10**9
    assert default_layer_loop("gpu", 13 * GB, 80 * GB) == "unroll"  # Llama-2-7B bf16 on an 80 GB card
    assert default_layer_loop("gpu", 30 * GB, 80 * GB) == "scan"  # the per-layer copy would not leave room
    assert default_layer_loop("gpu", 30 * GB, None) == "unroll"  # no memory statistics: the fast path
    assert default_layer_loop("cpu", 30 * GB, 8 * GB) == "unroll"


def test_per_device_bytes_counts_one_shard():
    import jax
    import jax.numpy as jnp

    from w2s_jax.infer.layer_loop import per_device_bytes as _per_device_bytes

    tree = {"a": jnp.zeros((4, 8), jnp.float32), "b": [jnp.zeros((3,), jnp.bfloat16)]}
    assert _per_device_bytes(tree) == 4 * 8 * 4 + 3 * 2
    if len(jax.devices()) >= 2:  # sharded over 2 devices: one device holds half
        from jax.sharding import Mesh, NamedSharding, PartitionSpec

        mesh = Mesh(jax.devices()[:2], ("x",))
        a = jax.device_put(jnp.zeros((4, 8), jnp.float32), NamedSharding(mesh, PartitionSpec("x")))
        assert _per_device_bytes([a]) == 2 * 8 * 4
