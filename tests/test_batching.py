import jax
import jax.numpy as jnp
import numpy as np
import pytest

from w2s_jax.core.errors import UserError
from w2s_jax.io.tokenizer import ByteTokenizer, encode_example
from w2s_jax.models.config import ModelConfig
from w2s_jax.models.decoder import forward
from w2s_jax.models.logprobs import token_logps
from w2s_jax.models.params import init_params
from w2s_jax.train import losses as L
from w2s_jax.train.batching import (
    DataPosition,
    PreferenceBatcher,
    SFTBatcher,
    pack_first_fit,
    split_eval,
    tokenize_pairs,
    tokenize_sft,
)

TOK = ByteTokenizer()


def recs(n, long=False):
    return [{"id": f"r{i}", "prompt": f"Q{i}: " + "x" * (i % 7), "completion": "a" * (1 + i % 5)} for i in range(n)]


def test_tokenize_matches_encode_example_and_masks_completion_only():
    ex, stats = tokenize_sft(recs(3), TOK, 64)
    ids, n_prompt = encode_example(TOK, "Q1: x", "aa")
    assert ex[1].ids.tolist() == ids and ex[1].n_prompt == n_prompt
    b = SFTBatcher(ex, rows=3, seq_len=32, packing=False, shuffle=False).all_batches()[0]
    row = {k: v[0, 1] for k, v in b.items()}
    L_ = len(ids)
    assert row["tokens"][:L_].tolist() == ids and row["tokens"][L_:].sum() == 0
    assert row["targets"][: L_ - 1].tolist() == ids[1:]
    # the loss covers exactly the targets that are completion tokens: " aa" + eos
    masked = [int(t) for t, m in zip(row["targets"], row["loss_mask"]) if m]
    assert masked == ids[n_prompt:]
    assert row["segment_ids"][:L_].tolist() == [1] * L_ and row["segment_ids"][L_:].sum() == 0


def test_too_long_errors_naming_id_or_truncates_counted():
    r = [{"id": "short", "prompt": "p", "completion": "c"}, {"id": "longone", "prompt": "p" * 50, "completion": "c"}]
    with pytest.raises(UserError, match="longone"):
        tokenize_sft(r, TOK, 32)
    ex, stats = tokenize_sft(r, TOK, 32, truncate=True)
    assert stats.n_truncated == 1 and stats.n_dropped == 1 and len(ex) == 1
    r2 = [{"id": "x", "prompt": "p", "completion": "c" * 50}]
    ex, stats = tokenize_sft(r2, TOK, 32, truncate=True)
    assert stats.n_truncated == 1 and stats.n_dropped == 0 and len(ex[0].ids) == 32
    with pytest.raises(UserError, match="pairlong"):
        tokenize_pairs([{"id": "pairlong", "prompt": "p", "chosen": "c", "rejected": "r" * 40}], TOK, 32)


def test_packing_positions_restart_and_rows_full():
    ex, _ = tokenize_sft(recs(40), TOK, 64)
    b = SFTBatcher(ex, rows=4, seq_len=64, packing=True, seed=1)
    assert b.utilisation() > 0.8
    n_real = 0
    for T, rows in b.plan(0):
        batch = b.build(T, rows)
        for r in range(4):
            seg, pos = batch["segment_ids"][0, r], batch["positions"][0, r]
            for s in set(seg.tolist()) - {0}:
                idx = np.flatnonzero(seg == s)
                assert pos[idx].tolist() == list(range(len(idx)))  # restart per segment
                assert idx.tolist() == list(range(idx[0], idx[0] + len(idx)))  # contiguous
                n_real += 1
                # the last token of a segment has no target
                assert batch["loss_mask"][0, r, idx[-1]] == 0 and batch["targets"][0, r, idx[-1]] == 0
    # every example used at most once per epoch; all but a final partial batch are used
    used = [i for _, rows in b.plan(0) for row in rows for i in row]
    assert len(used) == len(set(used)) == n_real
    assert len(used) > 30


def test_first_fit():
    assert pack_first_fit([5, 4, 3, 2, 1], 6) == [[0, 4], [1, 3], [2]]


def test_order_is_deterministic_per_seed_and_epoch_and_resumable():
    ex, _ = tokenize_sft(recs(50), TOK, 64)
    mk = lambda seed: SFTBatcher(ex, rows=2, seq_len=64, packing=False, seed=seed)
    a, b, c = mk(0), mk(0), mk(1)
    assert a.plan(0) == b.plan(0) and a.plan(1) == b.plan(1)
    assert a.plan(0) != a.plan(1) and a.plan(0) != c.plan(0)
    full = [(p, bt) for p, bt in a.batches(epochs=2)]
    k = 7
    resumed = list(b.batches(start=full[k - 1][0], epochs=2))
    assert len(resumed) == len(full) - k
    for (p1, b1), (p2, b2) in zip(full[k:], resumed):
        assert p1 == p2
        for key in b1:
            np.testing.assert_array_equal(b1[key], b2[key])
    assert full[-1][0] == DataPosition(1, a.num_batches(1))


def test_grad_accum_shape_and_last_partial_batch():
    ex, _ = tokenize_sft(recs(10), TOK, 64)
    b = SFTBatcher(ex, rows=2, seq_len=64, packing=False, grad_accum=2, drop_last=False, shuffle=False)
    batches = b.all_batches()
    assert all(x["tokens"].shape == (2, 2, 64) for x in batches)
    assert len(batches) == 3  # 10 rows / 4 per step, the last one padded with empty rows
    assert batches[-1]["segment_ids"][1].sum() == 0
    b2 = SFTBatcher(ex, rows=2, seq_len=64, packing=False, grad_accum=2, drop_last=True)
    assert b2.num_batches(0) == 2


def test_bucketed_padding_uses_smallest_fitting_length():
    ex, _ = tokenize_sft(recs(64), TOK, 64)
    b = SFTBatcher(ex, rows=4, seq_len=64, packing=False, bucket_lengths=(16, 32), seed=3)
    assert b.shapes() == [16, 32, 64]
    for T, rows in b.plan(0):
        longest = max(len(ex[i].ids) for row in rows for i in row)
        assert longest <= T and (T == 16 or longest > {32: 16, 64: 32}[T])
        assert b.build(T, rows)["tokens"].shape == (1, 4, T)


def test_preference_batch_layout():
    pr = [{"id": f"p{i}", "prompt": f"q{i}", "chosen": "yes" * (i + 1), "rejected": "no", "ref_chosen": -1.0 * i,
           "ref_rejected": -2.0} for i in range(3)]
    pairs, _ = tokenize_pairs(pr, TOK, 32)
    b = PreferenceBatcher(pairs, rows=2, seq_len=32, shuffle=False, drop_last=False)
    batches = b.all_batches()
    assert len(batches) == 2
    x = batches[0]
    assert x["tokens"].shape == (1, 4, 32) and x["pair_mask"].tolist() == [[1, 1]]
    ids_c0, n0 = encode_example(TOK, "q0", "yes")
    ids_r1, _ = encode_example(TOK, "q1", "no")
    assert x["tokens"][0, 0, : len(ids_c0)].tolist() == ids_c0  # chosen rows first
    assert x["tokens"][0, 3, : len(ids_r1)].tolist() == ids_r1  # then rejected rows
    assert x["ref_logps"].tolist() == [[0.0, -1.0, -2.0, -2.0]]
    assert x["nll_mask"][0, 0].sum() == len(ids_c0) - 1  # every real target (prompt too)
    assert x["loss_mask"][0, 0].sum() == len(ids_c0) - n0
    assert batches[1]["pair_mask"].tolist() == [[1, 0]]


def test_split_eval_deterministic():
    items = list(range(20))
    tr, ev = split_eval(items, 0.1, 0)
    assert len(ev) == 2 and sorted(tr + ev) == items
    assert split_eval(items, 0.1, 0) == (tr, ev)
    assert split_eval(items, 0.0, 0) == (items, [])


def test_packed_batch_gives_the_same_loss_as_unpacked_examples():
    """Attention must not cross packed examples and positions must restart: the masked loss (and
    its gradient) of one packed row equals that of the same examples one per row."""
    cfg = ModelConfig(vocab_size=259, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, d_ff=64)
    params = init_params(cfg, jax.random.PRNGKey(0))
    ex, _ = tokenize_sft(recs(4), TOK, 64)
    packed = SFTBatcher(ex, rows=1, seq_len=64, packing=True, shuffle=False).all_batches()
    assert len(packed) == 1 and packed[0]["segment_ids"].max() == 4
    padded = SFTBatcher(ex, rows=4, seq_len=32, packing=False, shuffle=False).all_batches()[0]

    def loss(p, b):
        b = jax.tree.map(lambda x: jnp.asarray(x[0]), b)
        logits = forward(p, b["tokens"], cfg, positions=b["positions"], segment_ids=b["segment_ids"])
        return L.sft_loss(token_logps(logits, b["targets"]), b["loss_mask"])

    fast = {"xla_backend_optimization_level": 0}  # tiny model: compile time dominates
    vg = jax.jit(jax.value_and_grad(loss), compiler_options=fast)
    l1, g1 = vg(params, packed[0])
    l2, g2 = vg(params, padded)
    np.testing.assert_allclose(float(l1), float(l2), rtol=1e-6)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-7)
    # and it is not trivially equal: without segment ids (attention crossing) the loss changes
    bad = dict(packed[0], segment_ids=(packed[0]["segment_ids"] > 0).astype(np.int32))
    assert abs(float(jax.jit(loss, compiler_options=fast)(params, bad)) - float(l1)) > 1e-4
