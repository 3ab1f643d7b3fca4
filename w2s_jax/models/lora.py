"""LoRA adapters as a separate parameter tree, applied unmerged inside the model's einsums.

``lora["layers"][target] = {"a": [L, in..., r], "b": [L, r, out...]}`` with the base kernel's
input/output dims (the kernel's metadata in ``llama.py``); delta W = (alpha / r) * A @ B. ``b``
starts at zero so a fresh adapter leaves the model unchanged (as in PEFT).

On the NNX model the same tree is held as ``nnx.LoRAParam`` variables (:class:`Adapters`, attached
by :func:`add_lora` as ``model.lora``): ``nnx.to_pure_dict(nnx.state(model.lora, nnx.LoRAParam))`` is
the tree above, and ``nnx.split(model, nnx.LoRAParam, ...)`` separates the adapters from the frozen
weights.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
from flax import nnx

from w2s_jax.core.errors import UserError
from w2s_jax.models.config import ModelConfig
from w2s_jax.models.llama import Llama, layout

# short name (PEFT target module) -> our kernel name
TARGETS = {"q": "wq", "k": "wk", "v": "wv", "o": "wo", "gate": "w_gate", "up": "w_up", "down": "w_down"}
PEFT_NAMES = {
    "wq": "self_attn.q_proj",
    "wk": "self_attn.k_proj",
    "wv": "self_attn.v_proj",
    "wo": "self_attn.o_proj",
    "w_gate": "mlp.gate_proj",
    "w_up": "mlp.up_proj",
    "w_down": "mlp.down_proj",
}


@dataclass(frozen=True)
class LoRAConfig:
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = field(default_factory=lambda: ("q", "k", "v", "o", "gate", "up", "down"))

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def kernel_names(self) -> list[str]:
        bad = [t for t in self.targets if t not in TARGETS]
        if bad:
            raise UserError(f"unknown LoRA target(s) {bad}; valid: {sorted(TARGETS)}")
        return [TARGETS[t] for t in self.targets]


def _split_dims(cfg: ModelConfig, name: str):
    """(input dims, input logical names, output dims, output logical names) of a kernel, from the
    base weight's metadata in the NNX model (its per-layer shape and axes, split after ``n_in``)."""
    leaf = next((x for x in layout(cfg) if x.path == ("layers", name)), None)
    if leaf is None or leaf.n_in is None:
        raise KeyError(name)
    shape, axes, n = leaf.shape[1:], leaf.axes[1:], leaf.n_in  # without the stacked layer axis
    return shape[:n], axes[:n], shape[n:], axes[n:]


def lora_axes(cfg: ModelConfig, lcfg: LoRAConfig) -> dict:
    out = {}
    for name in lcfg.kernel_names():
        _, in_names, _, out_names = _split_dims(cfg, name)
        out[name] = {"a": ("layers", *in_names, "lora_rank"), "b": ("layers", "lora_rank", *out_names)}
    return {"layers": out}


def lora_shapes(cfg: ModelConfig, lcfg: LoRAConfig, dtype=jnp.float32) -> dict:
    out = {}
    L, r = cfg.n_layers, lcfg.rank
    for name in lcfg.kernel_names():
        ind, _, outd, _ = _split_dims(cfg, name)
        out[name] = {
            "a": jax.ShapeDtypeStruct((L, *ind, r), dtype),
            "b": jax.ShapeDtypeStruct((L, r, *outd), dtype),
        }
    return {"layers": out}


def init_lora(cfg: ModelConfig, lcfg: LoRAConfig, key: jax.Array, dtype=jnp.float32) -> dict:
    """A ~ Kaiming-uniform over the fan-in (PEFT's default), B = 0."""
    shapes = lora_shapes(cfg, lcfg, dtype)
    out = {}
    for i, (name, ab) in enumerate(shapes["layers"].items()):
        fan_in = 1
        for d in ab["a"].shape[1:-1]:
            fan_in *= d
        bound = (1.0 / fan_in) ** 0.5  # kaiming_uniform(a=sqrt(5)) gives 1/sqrt(fan_in)
        a = jax.random.uniform(jax.random.fold_in(key, i), ab["a"].shape, jnp.float32, -bound, bound)
        out[name] = {"a": a.astype(dtype), "b": jnp.zeros(ab["b"].shape, dtype)}
    return {"layers": out}


def lora_delta(cfg: ModelConfig, name: str, ab: dict, scale: float) -> jax.Array:
    """Delta of one stacked kernel, in the kernel's own shape [L, in..., out...]."""
    a, b = ab["a"], ab["b"]
    L, r = a.shape[0], a.shape[-1]
    ind, _, outd, _ = _split_dims(cfg, name)
    a2 = a.reshape(L, -1, r).astype(jnp.float32)
    b2 = b.reshape(L, r, -1).astype(jnp.float32)
    return (scale * jnp.einsum("lir,lro->lio", a2, b2)).reshape(L, *ind, *outd)


def merge_lora(params: dict, lora: dict, cfg: ModelConfig, scale: float) -> dict:
    """Base weights with the adapters folded in (a new tree; the inputs are not modified)."""
    layers = dict(params["layers"])
    for name, ab in lora["layers"].items():
        w = layers[name]
        layers[name] = (w.astype(jnp.float32) + lora_delta(cfg, name, ab, scale)).astype(w.dtype)
    return {**params, "layers": layers}


# ----------------------------------------------------------------------------- adapters on the NNX model


class Adapters(nnx.Module):
    """LoRA adapters of a :class:`~w2s_jax.models.llama.Llama` as ``nnx.LoRAParam`` variables, laid out as
    the adapter tree (``layers/<kernel>/{a,b}``) with their logical axes as ``out_sharding`` metadata."""

    def __init__(self, cfg: ModelConfig, lcfg: LoRAConfig, lora: dict):
        axes, shapes = lora_axes(cfg, lcfg)["layers"], lora_shapes(cfg, lcfg)["layers"]
        if set(lora["layers"]) != set(axes):
            raise ValueError(f"adapter targets {sorted(lora['layers'])} differ from the config's {sorted(axes)}")
        layers = {}
        for name, ab in lora["layers"].items():
            for k in ("a", "b"):
                got, want = tuple(ab[k].shape), shapes[name][k].shape
                if got != want:
                    raise ValueError(f"adapter {name}.{k}: shape {got}, expected {want}")
            layers[name] = nnx.Dict(
                {k: nnx.LoRAParam(ab[k], out_sharding=axes[name][k], eager_sharding=False) for k in ("a", "b")}
            )
        self.lcfg = lcfg
        self.layers = nnx.Dict(layers)

    @property
    def scale(self) -> float:
        return self.lcfg.scale

    def tree(self) -> dict:
        """The adapter tree (the module's arrays, not copies)."""
        return nnx.to_pure_dict(nnx.state(self, nnx.LoRAParam))


def add_lora(model: Llama, lcfg: LoRAConfig, *, rngs: nnx.Rngs | None = None, lora: dict | None = None) -> Llama:
    """Attach adapters to ``model`` (in place; returned for chaining): ``lora`` (an existing tree) or
    fresh ones drawn with :func:`init_lora` from ``rngs.params()`` (float32, ``b`` = 0)."""
    if lora is None:
        if rngs is None:
            raise ValueError("add_lora needs rngs (fresh adapters) or lora (an existing adapter tree)")
        lora = init_lora(model.cfg, lcfg, rngs.params())
    model.lora = Adapters(model.cfg, lcfg, lora)
    return model
