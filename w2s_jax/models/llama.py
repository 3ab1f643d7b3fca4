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


def _values(module: nnx.Module, names) -> dict:
    """The arrays of ``module``'s weights ``names`` as the functional layer dict."""
    return {n: getattr(module, n)[...] for n in names}


def _unstacked(module: nnx.Module, name: str) -> None:
    if getattr(module, name).ndim != len(_LAYER_WEIGHTS[name][1]):
        raise ValueError("these weights are stacked over layers; use Llama.layer(i) for one layer")


def _rope(cfg: ModelConfig, positions, B: int, T: int):
    if positions is None:
        positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    return partial(decoder.apply_rope, positions=positions, inv_freq=decoder.rope_frequencies(cfg))


def _proj(mesh) -> decoder.Proj:
    return decoder.Proj(flat=decoder._flat_dots(decoder.platform_of(mesh)))


# one layer's weights: shape (from the config), logical axes, contracted input dims (kernels; None for norms)
_LAYER_WEIGHTS = {
    "attn_norm": (lambda c: (c.d_model,), ("norm",), None),
    "wq": (lambda c: (c.d_model, c.n_heads, c.head_dim), ("embed", "heads", "head_dim"), 1),
    "wk": (lambda c: (c.d_model, c.n_kv_heads, c.head_dim), ("embed", "kv_heads", "head_dim"), 1),
    "wv": (lambda c: (c.d_model, c.n_kv_heads, c.head_dim), ("embed", "kv_heads", "head_dim"), 1),
    "wo": (lambda c: (c.n_heads, c.head_dim, c.d_model), ("heads", "head_dim", "embed"), 2),
    "mlp_norm": (lambda c: (c.d_model,), ("norm",), None),
    "w_gate": (lambda c: (c.d_model, c.d_ff), ("embed", "mlp"), 1),
    "w_up": (lambda c: (c.d_model, c.d_ff), ("embed", "mlp"), 1),
    "w_down": (lambda c: (c.d_ff, c.d_model), ("mlp", "embed"), 1),
}
ATTENTION = ("wq", "wk", "wv", "wo")
MLP_WEIGHTS = ("w_gate", "w_up", "w_down")


def _weights(module: nnx.Module, cfg: ModelConfig, names, given: dict | None, values: dict | None, rngs) -> None:
    """Set ``module``'s weights ``names``: the given ``nnx.Param`` objects (shared, not copied), or new
    ones from ``values`` / ``rngs`` (see :func:`_declare`)."""
    for n in names:
        if given is not None:
            setattr(module, n, given[n])
        else:
            shape, axes, n_in = _LAYER_WEIGHTS[n]
            setattr(module, n, _declare(cfg, values, rngs, n, shape(cfg), axes, n_in))


class Embedding(nnx.Module):
    """The token embedding table ``[V, D]``; :meth:`__call__` looks tokens up in the compute dtype
    (Gemma: times ``sqrt(d_model)``); a tied model's output head is its transpose."""

    def __init__(self, cfg: ModelConfig, weight: nnx.Param | None = None, *, rngs: nnx.Rngs | None = None):
        self.cfg = cfg
        shape = (cfg.vocab_size, cfg.d_model)
        self.weight = weight if weight is not None else _declare(cfg, None, rngs, "embed", shape, ("vocab", "embed"))

    def __call__(self, tokens, *, mesh=None, rules: Rules = DEFAULT_RULES):
        return decoder.embed(self.cfg, self.weight[...], jnp.asarray(tokens), mesh, rules)


class RMSNorm(nnx.Module):
    """``x * rsqrt(mean(x^2) + eps) * w`` over the last axis (Gemma: ``* (1 + w)``, in float32)."""

    def __init__(self, cfg: ModelConfig, weight: nnx.Param | None = None, *, rngs: nnx.Rngs | None = None):
        self.cfg = cfg
        self.weight = weight if weight is not None else _declare(cfg, None, rngs, "weight", (cfg.d_model,), ("norm",))

    def __call__(self, x):
        return decoder.rms_norm(x, self.weight[...], self.cfg.norm_eps, self.cfg.norm_plus_one)


class Attention(nnx.Module):
    """Causal self-attention with grouped-query heads, RoPE (the config's theta and scaling) and the
    config's sliding window: ``wq``, ``wk``, ``wv`` ``[D, heads, Dh]`` and ``wo`` ``[H, Dh, D]``.
    ``weights``: existing ``nnx.Param`` objects to use (shared); otherwise new ones from ``rngs``."""

    def __init__(self, cfg: ModelConfig, weights: dict | None = None, *, rngs: nnx.Rngs | None = None):
        self.cfg = cfg
        _weights(self, cfg, ATTENTION, weights, None, rngs)

    def __call__(self, h, *, positions=None, segment_ids=None, mesh=None, rules: Rules = DEFAULT_RULES):
        """The attention output ``[B, T, D]`` of the normed input ``h`` (before the residual)."""
        _unstacked(self, "wq")
        B, T = h.shape[:2]
        if segment_ids is None:
            segment_ids = jnp.ones((B, T), jnp.int32)
        mask = decoder.self_attention_mask(self.cfg, segment_ids)
        attend = decoder.causal_attention(self.cfg, mask, decoder.platform_of(mesh), mesh, rules)
        out, _ = decoder.attention_block(self.cfg, _values(self, ATTENTION), None, h, _rope(self.cfg, positions, B, T),
                                         attend, _proj(mesh), mesh, rules)
        return out


class MLP(nnx.Module):
    """The gated MLP ``down(act(gate(h)) * up(h))``: ``w_gate``, ``w_up`` ``[D, F]``, ``w_down`` ``[F, D]``."""

    def __init__(self, cfg: ModelConfig, weights: dict | None = None, *, rngs: nnx.Rngs | None = None):
        self.cfg = cfg
        _weights(self, cfg, MLP_WEIGHTS, weights, None, rngs)

    def __call__(self, h, *, mesh=None, rules: Rules = DEFAULT_RULES):
        _unstacked(self, "w_up")
        return decoder.mlp_block(self.cfg, _values(self, MLP_WEIGHTS), None, h, _proj(mesh), mesh, rules)


class DecoderLayer(nnx.Module):
    """One decoder layer (or, inside :class:`Llama`, all layers stacked): pre-norm attention and
    pre-norm gated MLP, each with a residual.

    The layer owns its nine weights under the names of the parameter dict (``attn_norm``, ``wq`` ...
    ``w_down``); :attr:`attention_norm`, :attr:`attention`, :attr:`mlp_norm_module` and :attr:`mlp` are
    :class:`RMSNorm`, :class:`Attention` and :class:`MLP` modules over those same ``nnx.Param`` objects
    (views: an update through one is seen by the other), so the state keeps the checkpoint names
    while the parts can be called, displayed and tested on their own.

    ``values``: a dict of existing arrays to wrap (not copied); otherwise drawn from ``rngs``
    (norm scales constant, kernels normal with ``initializer_range``); with neither, zeros (for
    ``nnx.eval_shape``)."""

    def __init__(self, cfg: ModelConfig, values: dict | None = None, *, rngs: nnx.Rngs | None = None):
        self.cfg = cfg
        _weights(self, cfg, tuple(_LAYER_WEIGHTS), None, values, rngs)

    @property
    def attention_norm(self) -> RMSNorm:
        return RMSNorm(self.cfg, self.attn_norm)

    @property
    def attention(self) -> Attention:
        return Attention(self.cfg, {n: getattr(self, n) for n in ATTENTION})

    @property
    def mlp_norm_module(self) -> RMSNorm:
        return RMSNorm(self.cfg, self.mlp_norm)

    @property
    def mlp(self) -> MLP:
        return MLP(self.cfg, {n: getattr(self, n) for n in MLP_WEIGHTS})

    def __call__(self, x, *, positions=None, segment_ids=None, lora: dict | None = None, lora_scale: float = 1.0,
                 mesh=None, rules: Rules = DEFAULT_RULES):
        """Hidden states ``[B, T, D]`` after this layer (a single, unstacked layer: ``Llama.layer(i)``),
        through ``decoder.layer`` as training runs it.

        ``lora``: this layer's adapters ``{kernel: {"a", "b"}}`` without the layer axis."""
        _unstacked(self, "wq")
        B, T = x.shape[:2]
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
        if segment_ids is None:
            segment_ids = jnp.ones((B, T), jnp.int32)
        mask = decoder.self_attention_mask(self.cfg, segment_ids)
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

    @property
    def embedding(self) -> Embedding:
        """The token embedding as an :class:`Embedding` module over ``embed`` (shared, not copied)."""
        return Embedding(self.cfg, self.embed)

    @property
    def norm(self) -> RMSNorm:
        """The final norm as an :class:`RMSNorm` module over ``final_norm``."""
        return RMSNorm(self.cfg, self.final_norm)

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
