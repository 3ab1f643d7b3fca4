"""Tokenizers and the BOS/EOS policy (byte tokenizer, Hugging Face tokenizers built offline)."""

import os
from pathlib import Path

import pytest

from w2s_jax.core.errors import UserError
from w2s_jax.io.tokenizer import (
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


# ----------------------------------------------------------------------------- GGUF (no torch)

GGUF_TEXTS = [
    "Question: Natalia sold clips to 48 of her friends in April. How many? Answer: 72 ✓",
    "Tom has 12 apples and buys 345 more.\nTom has 12 + 345 = 357 apples.\n#### 357",
    "<|im_start|>user\nhi<|im_end|>",
    "Héllo  wörld\t\n\n  x's don't 1000000",
    "  leading spaces, trailing ",
    "emoji 🤖 and 中文 and 3.14159",
]


def _write_tokenizer_gguf(path, pre="smollm"):
    """A llama GGUF with only a byte-level BPE tokenizer in its metadata (llama.cpp's key names)."""
    gguf = pytest.importorskip("gguf")
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    chars = list(bytes_to_unicode().values())
    merges = ["Ġ t", "h e", "Ġt he", "a n", "Ġ a", "p p", "a pp", "Ġa pp", "l e", "app le", "Ġapp le", "e s", "Ġ Ġ"]
    tokens = specials + chars + ["".join(m.split(" ")) for m in merges]
    w = gguf.GGUFWriter(str(path), "llama")
    for key, v in (("block_count", 1), ("context_length", 64), ("embedding_length", 8), ("feed_forward_length", 8),
                   ("attention.head_count", 1)):
        w.add_uint32(f"llama.{key}", v)
    w.add_float32("llama.attention.layer_norm_rms_epsilon", 1e-5)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types([3] * len(specials) + [1] * (len(tokens) - len(specials)))
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_pad_token_id(2)
    w.add_add_bos_token(False)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _smollm2_gguf():
    import glob

    env = os.environ.get("W2S_SMOLLM2_GGUF")
    hits = [env] if env else sorted(glob.glob(os.path.expanduser("~/.cache/w2s/SmolLM2-135M-Instruct*.gguf")))
    return Path(hits[0]) if hits and Path(hits[0]).is_file() else None


def _transformers_ids(path, texts):
    pytest.importorskip("torch")  # transformers' GGUF tokenizer loader reads the file with torch
    from transformers import AutoTokenizer

    ref = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    return [ref(t, add_special_tokens=False)["input_ids"] for t in texts], ref


def test_gguf_tokenizer_equals_transformers_loader(tmp_path):
    path = _write_tokenizer_gguf(tmp_path / "tok.gguf")
    t = load_tokenizer(path)
    assert (t.bos_id, t.eos_id, t.pad_id, t.add_bos, t.vocab_size) == (1, 2, 2, False, 3 + 256 + 13)
    assert t.encode(" the apple") == [259 + 2, 259 + 10]  # "Ġthe", "Ġapple": the file's merges are used
    assert t.encode("12") == [3 + ord("1") - 33, 3 + ord("2") - 33]  # digits one by one (pre: smollm)
    assert t.encode("<|im_end|>") == [2]  # control tokens stay whole ...
    assert t.decode([1, *t.encode("hi"), 2]) == "hi"  # ... and are skipped when decoding
    ref_ids, ref = _transformers_ids(path, GGUF_TEXTS)
    assert [t.encode(x) for x in GGUF_TEXTS] == ref_ids
    assert [t.decode(i) for i in ref_ids] == [ref.decode(i, skip_special_tokens=True) for i in ref_ids]


@pytest.mark.slow
def test_smollm2_gguf_tokenizer_equals_transformers_loader():
    path = _smollm2_gguf()
    if path is None:
        pytest.skip("SmolLM2 GGUF not found ($W2S_SMOLLM2_GGUF or ~/.cache/w2s/); bash scripts/fetch_smollm2.sh")
    t = load_tokenizer(path)
    ref_ids, _ = _transformers_ids(path, GGUF_TEXTS)
    assert [t.encode(x) for x in GGUF_TEXTS] == ref_ids
    assert all(t.decode(t.encode(x)) == x for x in GGUF_TEXTS if "<|" not in x)  # specials are skipped
    assert (t.bos_id, t.eos_id, t.add_bos, t.vocab_size) == (1, 2, False, 49152)


_NO_TORCH = """
import json, sys
try:
    import torch  # noqa: F401
    sys.exit("torch is importable")
except ImportError:
    pass
from w2s_jax.io.tokenizer import load_tokenizer
out = {}
for path, saved in zip(sys.argv[1::2], sys.argv[2::2]):
    t = load_tokenizer(path)
    t.save(saved)
    t2 = load_tokenizer(saved)
    out[path] = [[t.encode(x), t2.encode(x), t2.decode(t.encode(x))] for x in json.loads(sys.stdin.read() or "[]")
                 or TEXTS]
assert "torch" not in sys.modules
print(json.dumps(out))
"""


def test_gguf_tokenizer_without_torch(tmp_path):
    """In an interpreter where torch cannot be imported (site-packages without torch): the GGUF tokenizer
    loads, saves with a model and reloads from that directory, with the same ids as in this process."""
    import json
    import subprocess
    import sys
    import sysconfig

    site = Path(sysconfig.get_paths()["purelib"])
    farm = tmp_path / "site"
    farm.mkdir()
    for entry in site.iterdir():
        if entry.name.split("-")[0].split(".")[0].lower() not in ("torch", "torchgen", "functorch"):
            (farm / entry.name).symlink_to(entry)
    paths = [_write_tokenizer_gguf(tmp_path / "tok.gguf")]
    if _smollm2_gguf() is not None:
        paths.append(_smollm2_gguf())
    args = []
    for i, p in enumerate(paths):
        args += [str(p), str(tmp_path / f"saved{i}")]
    root = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env["PYTHONPATH"] = os.pathsep.join([str(root), str(farm)])
    code = f"TEXTS = {GGUF_TEXTS!r}\n" + _NO_TORCH
    proc = subprocess.run([sys.executable, "-S", "-c", code, *args], env=env, capture_output=True, text=True,
                          timeout=300, input="")
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-1000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    for p in paths:
        t = load_tokenizer(p)
        for (ids, ids_saved, text), x in zip(got[str(p)], GGUF_TEXTS):
            assert ids == ids_saved == t.encode(x)
            assert text == t.decode(t.encode(x))
