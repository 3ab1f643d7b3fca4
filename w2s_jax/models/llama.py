"""The decoder as a Flax NNX model: :class:`Llama` with its stacked :class:`DecoderLayer`.

The modules own the parameter layout. Every weight is an ``nnx.Param`` whose ``out_sharding``
metadata holds its logical axis names (``sharding.py`` maps them onto a mesh); kernels also carry
``n_in``, the number of leading input dimensions (``wo`` contracts heads x head_dim, the others one
dimension), which LoRA uses to split a kernel into its factors. The layers are created with
``nnx.vmap``, which stacks them on a leading axis and adds ``"layers"`` to their axis names, so

    nnx.to_pure_dict(nnx.state(Llama(cfg, rngs=nnx.Rngs(0)), nnx.Param))

is exactly the parameter dict the functional code uses (``params.py``). ``param_axes`` and
``param_shapes`` are read off the abstract model (``nnx.eval_shape``), not written out by hand.

Computation stays in ``decoder.py``: :meth:`Llama.__call__` runs ``decoder.forward`` on the module's
pure-dict state, and :meth:`DecoderLayer.__call__` runs ``decoder``'s layer body for one layer, so
the module and the functional training, scoring and generation paths share one implementation.
LoRA adapters attach as ``nnx.LoRAParam`` variables under ``model.lora`` (``lora.add_lora``);
``nnx.LoRAParam`` is a subclass of ``nnx.Param``, so the base weights alone are the filter
:data:`BASE`.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from functools import partial

import jax
import jax.numpy as jnp
from flax import nnx

from w2s_jax.models import decoder
from w2s_jax.models.config import ModelConfig
from w2s_jax.parallel.sharding import DEFAULT_RULES, Rules, tree_shardings

# the base weights of a model that may carry adapters (nnx.LoRAParam subclasses nnx.Param)
BASE = nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam))
STACK = {nnx.PARTITION_NAME: "layers"}  # nnx.vmap's metadata: the stacked axis is named "layers"


def is_norm(axes: tuple) -> bool:
    """Whether logical axes ``axes`` describe a norm scale (``("norm",)`` or ``("layers", "norm")``)."""
    return bool(axes) and axes[-1] == "norm"


def _declare(cfg: ModelConfig, values, rngs, name: str, shape: tuple, axes: tuple, n_in: int | None = None):
    """One ``nnx.Param``: the given value (shape-checked), a fresh draw from ``rngs``, or zeros."""
    dtype = jnp.dtype(cfg.param_dtype)
    if values is not None:
        if name not in values:
            raise ValueError(f"parameter {name!r} is missing for {cfg.name}")
        value = values[name]
        if tuple(value.shape) != tuple(shape):
            raise ValueError(f"parameter {name!r}: shape {tuple(value.shape)}, expected {tuple(shape)} for {cfg.name}")
    elif rngs is not None and is_norm(axes):
        value = jnp.full(shape, 0.0 if cfg.norm_plus_one else 1.0, dtype)
    elif rngs is not None:
        value = (cfg.initializer_range * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)
    else:
        value = jnp.zeros(shape, dtype)
    meta = {"out_sharding": axes} if n_in is None else {"out_sharding": axes, "n_in": n_in}
    return nnx.Param(value, eager_sharding=False, **meta)


class DecoderLayer(nnx.Module):
    """The weights of one decoder layer (or, inside :class:`Llama`, of all layers stacked).

    ``values``: a dict of existing arrays to wrap (not copied); otherwise drawn from ``rngs``
    (norm scales constant, kernels normal with ``initializer_range``); with neither, zeros (for
    ``nnx.eval_shape``)."""

    def __init__(self, cfg: ModelConfig, values: dict | None = None, *, rngs: nnx.Rngs | None = None):
        D, F, H, K, Dh = cfg.d_model, cfg.d_ff, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        p = partial(_declare, cfg, values, rngs)
        self.cfg = cfg
        self.attn_norm = p("attn_norm", (D,), ("norm",))
        self.wq = p("wq", (D, H, Dh), ("embed", "heads", "head_dim"), n_in=1)
        self.wk = p("wk", (D, K, Dh), ("embed", "kv_heads", "head_dim"), n_in=1)
        self.wv = p("wv", (D, K, Dh), ("embed", "kv_heads", "head_dim"), n_in=1)
        self.wo = p("wo", (H, Dh, D), ("heads", "head_dim", "embed"), n_in=2)
        self.mlp_norm = p("mlp_norm", (D,), ("norm",))
        self.w_gate = p("w_gate", (D, F), ("embed", "mlp"), n_in=1)
        self.w_up = p("w_up", (D, F), ("embed", "mlp"), n_in=1)
        self.w_down = p("w_down", (F, D), ("mlp", "embed"), n_in=1)

    def __call__(self, x, *, positions=None, segment_ids=None, lora: dict | None = None, lora_scale: float = 1.0,
                 mesh=None, rules: Rules = DEFAULT_RULES):
        """Hidden states ``[B, T, D]`` after this layer (a single, unstacked layer: ``Llama.layer(i)``).

        ``lora``: this layer's adapters ``{kernel: {"a", "b"}}`` without the layer axis."""
        if self.wq.ndim != 3:
            raise ValueError("this DecoderLayer holds stacked layers; call Llama.layer(i) for one of them")
        B, T = x.shape[:2]
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
        if segment_ids is None:
            segment_ids = jnp.ones((B, T), jnp.int32)
        slots = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
        mask = decoder._attention_mask(slots, slots, segment_ids, segment_ids, segment_ids > 0, self.cfg.sliding_window)
        mask |= jnp.eye(T, dtype=bool)[None]
        p = nnx.to_pure_dict(nnx.state(self, BASE))
        platform = decoder.platform_of(mesh)
        (x, *_), _ = decoder._scan_layer(self.cfg, mesh, rules, platform, lora_scale, 0.0, (x, mask, positions, None),
                                         (p, lora, 0))
        return x


def _stack(cfg: ModelConfig, values: dict | None) -> DecoderLayer:
    """All ``cfg.n_layers`` layers as one DecoderLayer with a leading ``layers`` axis."""
    if values is None:
        make = nnx.vmap(lambda: DecoderLayer(cfg), in_axes=None, out_axes=0, axis_size=cfg.n_layers,
                        transform_metadata=STACK)
        return make()
    n = {v.shape[0] for v in jax.tree.leaves(values)}
    if n != {cfg.n_layers}:
        raise ValueError(f"stacked layer parameters have leading sizes {sorted(n)}, expected {cfg.n_layers}")
    make = nnx.vmap(lambda v: DecoderLayer(cfg, v), in_axes=0, out_axes=0, transform_metadata=STACK)
    return make(values)


class Llama(nnx.Module):
    """A decoder of the Llama family (Llama 2/3, Mistral, Gemma, SmolLM2) as an NNX module.

    ``Llama(cfg, rngs=rngs)`` draws its weights with :func:`init_values` from the key
    ``rngs.params()`` (what ``params.init_params`` draws for that key); ``params=`` wraps an existing
    parameter dict (no copy); with neither the weights are zeros (the abstract model under
    ``nnx.eval_shape``)."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs | None = None, params: dict | None = None):
        if params is None and rngs is not None:
            params = _init_jit(cfg, rngs.params())
        V, D = cfg.vocab_size, cfg.d_model
        p = partial(_declare, cfg, params, None)
        self.cfg = cfg
        self.embed = p("embed", (V, D), ("vocab", "embed"))
        self.layers = _stack(cfg, None if params is None else params["layers"])
        self.final_norm = p("final_norm", (D,), ("norm",))
        if not cfg.tie_embeddings:
            self.lm_head = p("lm_head", (D, V), ("embed", "vocab"))
        self.lora = nnx.data(None)  # adapters (lora.Adapters), attached by lora.add_lora

    @classmethod
    def from_params(cls, cfg: ModelConfig, params: dict) -> Llama:
        """Wrap a parameter dict (the functional layout; arrays are used as they are, sharded or not)."""
        return cls(cfg, params=params)

    def params(self) -> dict:
        """The base weights as the functional parameter dict (the module's arrays, not copies)."""
        return nnx.to_pure_dict(nnx.state(self, BASE))

    def layer(self, i: int) -> DecoderLayer:
        """Layer ``i`` as a single DecoderLayer (its slices of the stacked weights)."""
        stacked = nnx.to_pure_dict(nnx.state(self.layers, BASE))
        return DecoderLayer(self.cfg, {k: v[i] for k, v in stacked.items()})

    def shardings(self, mesh, rules: Rules = DEFAULT_RULES) -> dict:
        """NamedShardings of :meth:`params` on ``mesh`` from the weights' logical axis metadata."""
        st = nnx.state(self, BASE)
        axes = nnx.to_pure_dict(jax.tree.map(lambda v: v.get_metadata("out_sharding"), st, is_leaf=_is_var))
        return tree_shardings(mesh, axes, nnx.to_pure_dict(st), rules)

    def __call__(self, tokens, *, positions=None, segment_ids=None, lora: dict | None = None,
                 lora_scale: float = 1.0, mesh=None, rules: Rules = DEFAULT_RULES):
        """Logits ``[B, T, V]`` (float32) from ``decoder.forward`` (compiled once per config/mesh/rules).

        ``lora``: an adapter tree to apply unmerged; by default the attached adapters (``self.lora``)
        with their own scale."""
        if lora is None and self.lora is not None:
            lora, lora_scale = self.lora.tree(), self.lora.scale
        return _logits(self.params(), jnp.asarray(tokens), positions, segment_ids, lora, lora_scale,
                       cfg=self.cfg, mesh=mesh, rules=rules)


@partial(jax.jit, static_argnames=("cfg", "mesh", "rules"))
def _logits(params, tokens, positions, segment_ids, lora, lora_scale, *, cfg, mesh, rules):
    return decoder.forward(params, tokens, cfg, positions=positions, segment_ids=segment_ids, lora=lora,
                           lora_scale=lora_scale, mesh=mesh, rules=rules)


def _is_var(x) -> bool:
    return isinstance(x, nnx.Variable)


# ----------------------------------------------------------------------------- layout from the abstract model


@dataclass(frozen=True)
class Leaf:
    """One parameter of the abstract model: its path in the parameter dict and its metadata."""

    path: tuple[str, ...]
    shape: tuple[int, ...]
    dtype: str
    axes: tuple[str, ...]
    n_in: int | None


def abstract_model(cfg: ModelConfig) -> Llama:
    """The model with ``jax.ShapeDtypeStruct`` values (``nnx.eval_shape``; nothing allocated)."""
    return nnx.eval_shape(lambda: Llama(cfg))


@functools.lru_cache(maxsize=64)
def layout(cfg: ModelConfig) -> tuple[Leaf, ...]:
    """Every parameter of ``cfg``'s model with its shape and metadata, in the parameter dict's
    flattening order (read off :func:`abstract_model`; cached per config)."""
    flat = nnx.to_flat_state(nnx.state(abstract_model(cfg), BASE))
    leaves = [
        Leaf(tuple(str(k) for k in path), tuple(v.shape), jnp.dtype(v.dtype).name,
             tuple(v.get_metadata("out_sharding")), v.get_metadata().get("n_in"))
        for path, v in flat
    ]
    return tuple(sorted(leaves, key=lambda leaf: leaf.path))


def layout_tree(cfg: ModelConfig, fn) -> dict:
    """The parameter dict's structure with ``fn(leaf)`` at every parameter."""
    out: dict = {}
    for leaf in layout(cfg):
        node = out
        for k in leaf.path[:-1]:
            node = node.setdefault(k, {})
        node[leaf.path[-1]] = fn(leaf)
    return out


def init_values(cfg: ModelConfig, key: jax.Array) -> dict:
    """Random parameters: one key per parameter (``jax.random.split`` in flattening order), norm
    scales constant (0 for Gemma's ``1 + w``, else 1), kernels normal with ``initializer_range``."""
    leaves = layout(cfg)
    keys = jax.random.split(key, len(leaves))
    norm_value = 0.0 if cfg.norm_plus_one else 1.0

    def draw(leaf: Leaf, k) -> jax.Array:
        if is_norm(leaf.axes):
            return jnp.full(leaf.shape, norm_value, leaf.dtype)
        return (cfg.initializer_range * jax.random.normal(k, leaf.shape, jnp.float32)).astype(leaf.dtype)

    index = {leaf.path: i for i, leaf in enumerate(leaves)}
    return layout_tree(cfg, lambda leaf: draw(leaf, keys[index[leaf.path]]))


# compiled, as params.init_params is, so both give the same bits for a key
_init_jit = jax.jit(init_values, static_argnums=0)
