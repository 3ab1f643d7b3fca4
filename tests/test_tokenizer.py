"""Tokenizers and the BOS/EOS policy (byte tokenizer, Hugging Face tokenizers built offline)."""

import pytest

from w2s_jax.errors import UserError
from w2s_jax.tokenizer import (
    ByteTokenizer,
    HFTokenizer,
    decode_generation,
    encode_example,
    encode_prompt,
    load_tokenizer,
)

TEXT = "Héllo wörld: 12 + 7 = 19\n  ✓"


def test_byte_tokenizer_ids_and_policy():
    t = ByteTokenizer()
    assert (t.pad_id, t.bos_id, t.eos_id, t.vocab_size) == (256, 257, 258, 259)
    ids = t.encode(TEXT)
    assert ids == list(TEXT.encode("utf-8")) and max(ids) < 256
    assert t.decode(ids + [256, 257, 258]) == TEXT
    assert encode_prompt(t, "ab") == [257, 97, 98]
    ids, n = encode_example(t, "ab", "c")
    assert ids == [257, 97, 98, 32, 99, 258] and n == 3
    assert decode_generation(t, [32, 99, 100, 258, 101]) == "cd"
    assert load_tokenizer(t.spec).spec == {"type": "byte"}
    assert isinstance(load_tokenizer("byte"), ByteTokenizer)


def test_byte_tokenizer_exports_equivalent_hf(tmp_path):
    b = ByteTokenizer()
    b.to_hf().save_pretrained(str(tmp_path))
    h = load_tokenizer(tmp_path)
    assert isinstance(h, HFTokenizer)
    assert (h.bos_id, h.eos_id, h.pad_id, h.vocab_size, h.add_bos) == (257, 258, 256, 259, True)
    assert h.encode(TEXT) == b.encode(TEXT)
    assert h.decode(b.encode(TEXT)) == TEXT
    assert encode_example(h, "Q: x", "A: y") == encode_example(b, "Q: x", "A: y")


def _bpe_dir(tmp_path, with_bos: bool, merges):
    """A small byte-level BPE tokenizer (GPT-2 style) with chosen merges, saved as HF files."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    chars = list(bytes_to_unicode().values())
    vocab = {c: i for i, c in enumerate(chars)}
    for a, b in merges:
        vocab[a + b] = len(vocab)
    for s in ("<s>", "</s>"):
        vocab[s] = len(vocab)
    tk = Tokenizer(models.BPE(vocab=vocab, merges=list(merges)))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tk.decoder = decoders.ByteLevel()
    if with_bos:
        tk.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>")
    d = tmp_path / ("bos" if with_bos else "nobos")
    tok.save_pretrained(str(d))
    return d, vocab


def test_hf_tokenizer_bos_detection_and_boundary_merge(tmp_path):
    merges = [("Ġ", "Ġ"), ("a", "b")]
    d, vocab = _bpe_dir(tmp_path, with_bos=True, merges=merges)
    t = load_tokenizer(d)
    assert t.add_bos and t.bos_id == vocab["<s>"] and t.eos_id == vocab["</s>"]
    assert t.pad_id == t.eos_id  # no pad token: falls back to eos
    assert t.encode("ab") == [vocab["ab"]]
    # the prompt ends with a space, so "prompt" + " " + "b" merges "ĠĠ" across the boundary
    prompt, completion = "x ", "b"
    p_ids = encode_prompt(t, prompt)
    assert p_ids == [t.bos_id, vocab["x"], vocab["Ġ"]]
    ids, n = encode_example(t, prompt, completion)
    assert ids == [t.bos_id, vocab["x"], vocab["ĠĠ"], vocab["b"], t.eos_id]
    assert n == 2 and ids[:n] == p_ids[:n]  # boundary token counted as completion
    assert t.decode(ids) == "x  b"  # the whole example is exactly prompt + " " + completion
    # an ordinary boundary: the prompt ids are exactly what generation conditions on
    ids, n = encode_example(t, "ab", "ab")
    assert ids[:n] == encode_prompt(t, "ab") and t.decode(ids[n:]) == " ab"

    d2, _ = _bpe_dir(tmp_path, with_bos=False, merges=merges)
    t2 = load_tokenizer({"type": "hf", "path": str(d2)})
    assert not t2.add_bos and encode_prompt(t2, "ab") == t2.encode("ab")


def test_save_and_reload_spec(tmp_path):
    d, _ = _bpe_dir(tmp_path, with_bos=True, merges=[("a", "b")])
    t = load_tokenizer(str(d))
    spec = t.save(tmp_path / "model")
    assert spec == {"type": "hf", "path": "."}
    t2 = load_tokenizer(spec, base_dir=tmp_path / "model")
    assert t2.encode("abab x") == t.encode("abab x") and t2.bos_id == t.bos_id
    b = ByteTokenizer()
    b.save(tmp_path / "bytes")
    assert isinstance(load_tokenizer(tmp_path / "bytes"), ByteTokenizer)


def test_bad_tokenizer_inputs(tmp_path):
    with pytest.raises(UserError, match="unknown tokenizer type"):
        load_tokenizer({"type": "sentencepiece"})
    with pytest.raises(UserError, match="not found"):
        load_tokenizer(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="empty"):
        load_tokenizer(tmp_path / "empty")
