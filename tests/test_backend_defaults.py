"""Per-backend defaults chosen from GPU measurements: cuDNN attention for training, unrolled decode layers."""

import pytest

from w2s_jax.model import attention_implementation, get_preset
from w2s_jax.sampler import default_layer_loop


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
