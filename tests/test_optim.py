"""``optim.adamw`` (one fused pass) equals optax's clip_by_global_norm + adamw(mask) chain."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from w2s_jax.train import optim
from w2s_jax.train.config import TrainConfig
from w2s_jax.train.optim import decay_mask, make_schedule


def _tree(seed):
    r = np.random.default_rng(seed)
    return {
        "embed": jnp.asarray(r.normal(size=(11, 6)), jnp.float32),
        "layers": {"wq": jnp.asarray(r.normal(size=(2, 6, 3, 2)), jnp.float32),
                   "attn_norm": jnp.asarray(r.normal(size=(2, 6)), jnp.float32)},
        "final_norm": jnp.asarray(r.normal(size=(6,)), jnp.float32),
    }


@pytest.mark.parametrize("max_norm", [0.0, 0.5, 1e6])
def test_fused_adamw_equals_optax_chain(max_norm):
    cfg = TrainConfig(lr=3e-2, warmup_ratio=0.3, weight_decay=0.1, max_grad_norm=max_norm, max_steps=10)
    sched = make_schedule(cfg, 10)
    ref = optax.adamw(sched, b1=0.8, b2=0.95, eps=1e-6, weight_decay=0.1, mask=decay_mask)
    if max_norm:
        ref = optax.chain(optax.clip_by_global_norm(max_norm), ref)
    ours = optim.adamw(sched, b1=0.8, b2=0.95, eps=1e-6, weight_decay=0.1, mask=decay_mask, max_grad_norm=max_norm)
    p_ref = p_ours = _tree(0)
    s_ref, s_ours = ref.init(p_ref), ours.init(p_ours)
    for step in range(6):
        g = jax.tree.map(lambda x, s=step: x * (s + 1.0), _tree(100 + step))
        u, s_ref = jax.jit(ref.update)(g, s_ref, p_ref)
        p_ref = optax.apply_updates(p_ref, u)
        u, s_ours = jax.jit(ours.update)(g, s_ours, p_ours)
        p_ours = optax.apply_updates(p_ours, u)
        for a, b in zip(jax.tree.leaves(p_ref), jax.tree.leaves(p_ours)):
            np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-6, atol=1e-7)
    assert int(s_ours.count) == 6
    # the norms got no decay, the matrices did (a check that the mask is applied at all)
    assert not np.allclose(np.asarray(p_ours["layers"]["wq"]), np.asarray(_tree(0)["layers"]["wq"]))


def test_fused_adamw_needs_params():
    tx = optim.adamw(1e-3)
    p = _tree(0)
    with pytest.raises(ValueError, match="params"):
        tx.update(p, tx.init(p))
