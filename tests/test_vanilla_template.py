"""The `vanilla` template: prompt and completion tokenized separately and concatenated, as
LLaMA-Factory's trainer does for the paper's runs, checked with a tokenizer that merges across the
prompt/completion boundary when the two are joined into one text."""

import pytest

from w2s_jax.io.tokenizer import encode_example, encode_prompt, load_tokenizer
from w2s_jax.train.batching import TEMPLATES, encode_vanilla, tokenize_pairs, tokenize_sft


def _merging_tokenizer(tmp_path):
    """Byte-level BPE whose merges join `:` with the following space and `Ġ` with `a` (Llama-3-like)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    vocab = {c: i for i, c in enumerate(bytes_to_unicode().values())}
    merges = [(":", "Ġ"), ("Ġ", "a")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    for s in ("<s>", "</s>"):
        vocab[s] = len(vocab)
    tk = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tk.decoder = decoders.ByteLevel()
    tk.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
    PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>").save_pretrained(str(tmp_path))
    return tmp_path, vocab


def test_vanilla_equals_separate_tokenization_and_differs_from_joined(tmp_path):
    transformers = pytest.importorskip("transformers")
    d, vocab = _merging_tokenizer(tmp_path)
    tok = load_tokenizer(d)
    hf = transformers.AutoTokenizer.from_pretrained(str(d))
    prompt, completion = "Question 1+1?\nAnswer:", "a 2"  # ": " only at the boundary
    # what LLaMA-Factory's vanilla template gives: the prompt with its special tokens, then the
    # completion without them, then eos
    want = hf(prompt)["input_ids"] + hf(completion, add_special_tokens=False)["input_ids"] + [hf.eos_token_id]
    ids, n = encode_vanilla(tok, prompt, completion)
    assert ids == want and n == len(hf(prompt)["input_ids"])
    assert ids[:n] == encode_prompt(tok, prompt)  # generation conditions on exactly these ids
    # joined into one text, ":" + " " merge into one token across the boundary: other ids
    joined, nj = encode_example(tok, prompt, completion)
    assert vocab[":Ġ"] in joined and vocab[":Ġ"] not in ids
    assert joined != ids and nj < n
    # the trainer's tokenization uses the template by name
    ex, _ = tokenize_sft([{"id": "a", "prompt": prompt, "completion": completion}], tok, 64,
                         encode=TEMPLATES["vanilla"])
    assert list(ex[0].ids) == want and ex[0].n_prompt == n
    pairs, _ = tokenize_pairs([{"id": "p", "prompt": prompt, "chosen": completion, "rejected": "b"}], tok, 64,
                              encode=TEMPLATES["vanilla"])
    assert list(pairs[0].rejected.ids) == hf(prompt)["input_ids"] + hf("b", add_special_tokens=False)["input_ids"] + [
        hf.eos_token_id]


def test_truncation_is_counted_not_an_error(tmp_path):
    d, _ = _merging_tokenizer(tmp_path)
    tok = load_tokenizer(d)
    recs = [{"id": "long", "prompt": "Question: q\nAnswer:", "completion": "x" * 50},
            {"id": "short", "prompt": "Q", "completion": "y"}]
    ex, stats = tokenize_sft(recs, tok, 24, truncate=True, encode=TEMPLATES["vanilla"])
    assert stats.n_truncated == 1 and stats.n_dropped == 0 and len(ex[0].ids) == 24 and len(ex) == 2
