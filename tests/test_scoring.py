"""`w2s logprobs` equals the sums computed from torch logits; truncation; bucketing."""

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from w2s_jax.cli.app import main as cli_main  # noqa: E402
from w2s_jax.core.errors import UserError  # noqa: E402
from w2s_jax.core.lengths import bucket_length  # noqa: E402
from w2s_jax.infer.scoring import completion_logprobs, score_records, token_logprobs  # noqa: E402
from w2s_jax.io.native import load_model  # noqa: E402
from w2s_jax.io.tokenizer import ByteTokenizer  # noqa: E402

RECORDS = [
    {"id": "a", "prompt": "Q: 1+1?", "completion": "2"},
    {"id": "b", "prompt": "Question: what is 12*7? Think.", "completion": "12*7 = 84. The answer is 84."},
    {"id": "c", "prompt": "Hi", "completion": "x" * 40},
    {"id": "d", "prompt": "Pick one:", "chosen": "yes", "rejected": "no, definitely not"},
    {"id": "e", "prompt": "Ünïcödé ✓", "completion": "ok ✓"},
]


@pytest.fixture(scope="module")
def hf_model(tmp_path_factory):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=260, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, rms_norm_eps=1e-5, max_position_embeddings=128,
    )
    m = transformers.LlamaForCausalLM(cfg).float().eval()
    with torch.no_grad():
        for n, p in m.named_parameters():
            p.normal_(1.0 if "norm" in n else 0.0, 0.15)
    d = tmp_path_factory.mktemp("scoring") / "model"
    m.save_pretrained(d)
    ByteTokenizer().to_hf().save_pretrained(str(d))
    return m, d


def torch_sum(m, prompt, completion):
    """Independent reference: byte ids, BOS, one joining space, EOS; sum of completion log-probs."""
    p = [257] + list(prompt.encode())
    ids = p + list((" " + completion).encode()) + [258]
    with torch.no_grad():
        logits = m(torch.tensor([ids])).logits[0].double()
    lp = torch.log_softmax(logits, -1)
    total = sum(lp[t - 1, ids[t]].item() for t in range(len(p), len(ids)))
    return total, len(ids) - len(p)


def test_cli_logprobs_equal_torch(hf_model, tmp_path):
    m, d = hf_model
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    rc = cli_main(["logprobs", "--model", str(d), "--input", str(inp), "--output", str(out), "--batch-size", "2",
                   "--no-progress"])
    assert rc == 0
    got = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in got] == [r["id"] for r in RECORDS]
    worst = 0.0
    for r, g in zip(RECORDS, got):
        assert {k: g[k] for k in r} == r  # input fields kept
        pairs = [("completion", "logprob", "num_tokens")] if "completion" in r else [
            ("chosen", "chosen_logprob", "chosen_tokens"), ("rejected", "rejected_logprob", "rejected_tokens")]
        for field, lp_key, n_key in pairs:
            ref, n = torch_sum(m, r["prompt"], r[field])
            assert g[n_key] == n
            worst = max(worst, abs(g[lp_key] - ref))
            assert abs(g[lp_key] - ref) <= 1e-4 * max(1.0, abs(ref)), (r["id"], field, g[lp_key], ref)
    print(f"max abs logprob diff vs torch: {worst:.2e}")


def test_too_long_error_and_truncation(hf_model, tmp_path, capsys):
    _, d = hf_model
    lm = load_model(d)
    recs = [{"id": "short", "prompt": "a", "completion": "b"},
            {"id": "long-one", "prompt": "p" * 50, "completion": "q" * 10}]
    with pytest.raises(UserError, match="record long-one.*--truncate"):
        score_records(lm, recs, max_length=32)
    with pytest.raises(UserError, match="max_seq_len"):
        score_records(lm, recs, max_length=1000)
    out, stats = score_records(lm, recs, max_length=32, truncate=True)
    assert stats["truncated"] == 1 and stats["sequences"] == 2
    # the completion (space + 10 + eos) survives: the prompt was cut from the left
    assert out[1]["num_tokens"] == 12
    # the truncated score equals scoring the explicitly truncated text: bos + last 19 prompt bytes
    ref, _ = score_records(lm, [{"id": "x", "prompt": "p" * 19, "completion": "q" * 10}])
    assert abs(ref[0]["logprob"] - out[1]["logprob"]) < 1e-4
    # a completion longer than the limit is cut from the right, keeping the bos as context
    out, stats = score_records(lm, [{"id": "c", "prompt": "p", "completion": "q" * 40}], max_length=16, truncate=True)
    assert out[0]["num_tokens"] == 15 and stats["truncated"] == 1
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps(r) + "\n" for r in recs))
    rc = cli_main(["logprobs", "--model", str(d), "--input", str(inp), "--output", str(tmp_path / "o.jsonl"),
                   "--max-length", "32", "--truncate", "--no-progress"])
    assert rc == 0 and "truncated 1 of 2 sequences" in capsys.readouterr().out
    rc = cli_main(["logprobs", "--model", str(d), "--input", str(inp), "--output", str(tmp_path / "o2.jsonl"),
                   "--max-length", "32", "--no-progress"])
    assert rc == 2 and "record long-one" in capsys.readouterr().err and not (tmp_path / "o2.jsonl").exists()


def test_bad_records(hf_model):
    _, d = hf_model
    lm = load_model(d)
    with pytest.raises(UserError, match="record 7: needs `completion`"):
        score_records(lm, [{"id": 7, "prompt": "x"}])
    with pytest.raises(UserError, match="only one of"):
        score_records(lm, [{"prompt": "x", "chosen": "y"}])


def test_buckets_and_programs(hf_model):
    _, d = hf_model
    lm = load_model(d)
    assert [bucket_length(n) for n in (1, 16, 17, 100, 1024, 1025)] == [16, 16, 32, 128, 1024, 2048]
    recs = [{"prompt": "p" * k, "completion": "c"} for k in range(1, 60, 3)]
    out, stats = score_records(lm, recs, batch_size=4)
    assert {T for _, T in stats["programs"]} <= {16, 32, 64} and len(stats["programs"]) <= 3
    # batch composition does not change a score
    alone, _ = score_records(lm, recs[-1:], batch_size=1)
    assert abs(alone[0]["logprob"] - out[-1]["logprob"]) < 1e-4


def test_token_and_completion_logprobs_agree(hf_model):
    _, d = hf_model
    lm = load_model(d)
    rng = np.random.RandomState(0)
    tokens = rng.randint(0, 256, (2, 16))
    mask = np.zeros((2, 16), np.int32)
    mask[0, 5:] = 1
    mask[1, 3:9] = 1
    seg = np.ones((2, 16), np.int32)
    seg[1, 9:] = 0
    tl = np.asarray(token_logprobs(lm.params, lm.cfg, tokens, segment_ids=seg))
    lp, n = completion_logprobs(lm.params, lm.cfg, tokens, mask, segment_ids=seg)
    assert np.allclose(np.asarray(lp), [(tl[0] * mask[0]).sum(), (tl[1] * mask[1]).sum()], atol=1e-5)
    assert list(np.asarray(n)) == [11, 6]
    assert tl[:, 0].tolist() == [0.0, 0.0] and (tl[0, 1:] < 0).all()
