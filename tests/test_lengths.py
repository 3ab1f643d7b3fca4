"""core.lengths: the truncation policy and the bucket ladders, against values worked out by hand."""

import pytest

from w2s_jax.core.errors import UserError
from w2s_jax.core.lengths import bucket_length, doubling_buckets, pick_bucket, round_up, truncate_example


def test_doubling_buckets_and_pick():
    assert doubling_buckets(100) == (16, 32, 64, 100)
    assert doubling_buckets(64) == (16, 32, 64)
    assert doubling_buckets(10) == (10,)
    assert doubling_buckets(round_up(6, 4), start=4) == (4, 8)  # a batch of 6 rows on 4 data-parallel devices
    assert [pick_bucket(n, (16, 32, 100)) for n in (1, 16, 17, 100)] == [16, 16, 32, 100]
    with pytest.raises(UserError, match="101 exceeds the largest bucket 100"):
        pick_bucket(101, (100, 16))
    assert [bucket_length(n) for n in (1, 16, 17, 100, 1024, 1025, 3000)] == [16, 16, 32, 128, 1024, 2048, 3072]


def test_truncate_right_keeps_the_first_tokens():
    ids = list(range(10))
    assert truncate_example(ids, 4, 6, side="right") == ([0, 1, 2, 3, 4, 5], 4)
    assert truncate_example(ids, 8, 6, side="right") == ([0, 1, 2, 3, 4, 5], 6)  # no completion left
    assert truncate_example(ids, 4, 10, side="right") == (ids, 4)


def test_truncate_left_cuts_the_prompt_then_the_completion():
    ids = list(range(10))  # prompt 0..5 (0 = BOS), completion 6..9
    assert truncate_example(ids, 6, 8, keep_head=1) == ([0, 3, 4, 5, 6, 7, 8, 9], 4)
    assert truncate_example(ids, 6, 5, keep_head=1) == ([0, 6, 7, 8, 9], 1)
    assert truncate_example(ids, 6, 3, keep_head=1) == ([0, 6, 7], 1)
    # without a kept head one context token stays
    assert truncate_example(ids, 6, 3) == ([5, 6, 7], 1)
    # a prompt alone (generation): its last tokens after the BOS
    assert truncate_example(ids, 10, 4, keep_head=1) == ([0, 7, 8, 9], 4)
    with pytest.raises(ValueError):
        truncate_example(ids, 6, 3, side="middle")
