"""Stop strings in token space: each generated token advances an automaton over the stop strings'
characters, so generation ends inside the compiled loop when a stop string appears.

An Aho-Corasick automaton over the characters of the stop strings is lifted to whole tokens on the
host once (a table ``[automaton states, vocab]`` built from each token's text piece), and each step
does one gather per row. The pieces come from ``decode([ref, id])`` minus ``decode([ref])`` (which
keeps sentencepiece's leading spaces). Which strings stop generation is the caller's choice (the
method's prompt format has its own, ``method.prompts.STOP_STRINGS``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def cut_at_stop(text: str, stop: Sequence[str]) -> tuple[str, bool]:
    """``(text cut before the first occurrence of any stop string, whether one occurred)``."""
    cut = len(text)
    for s in stop:
        i = text.find(s)
        if 0 <= i < cut:
            cut = i
    return text[:cut], cut < len(text)


# ----------------------------------------------------------------------------- stop strings in token space


def token_pieces(tokenizer, vocab_size: int) -> list[str]:
    """The text each token id contributes when appended to a sequence (``""`` for special or
    out-of-vocabulary ids). Uses ``decode([ref, id])`` minus ``decode([ref])`` so that a
    sentencepiece token keeps its leading space."""
    ref_ids = tokenizer.encode("a")
    ref = ref_ids[-1] if ref_ids else None
    tok_vocab = int(getattr(tokenizer, "vocab_size", vocab_size))
    n = min(vocab_size, tok_vocab)
    ids = range(n)
    hf = getattr(tokenizer, "tok", None)
    if ref is not None and hf is not None and hasattr(hf, "batch_decode"):
        pre = hf.decode([ref], skip_special_tokens=True)
        both = hf.batch_decode([[ref, i] for i in ids], skip_special_tokens=True)
        pieces = [s[len(pre):] if s.startswith(pre) else hf.decode([i], skip_special_tokens=True)
                  for i, s in zip(ids, both)]
    elif ref is not None:
        pre = tokenizer.decode([ref])
        pieces = []
        for i in ids:
            s = tokenizer.decode([ref, i])
            pieces.append(s[len(pre):] if s.startswith(pre) else tokenizer.decode([i]))
    else:
        pieces = [tokenizer.decode([i]) for i in ids]
    return pieces + [""] * (vocab_size - n)


class StopMatcher:
    """Aho-Corasick automaton over the characters of the stop strings, lifted to whole tokens.

    ``table[state, token]`` is the state after appending ``token``'s text piece; ``match_state``
    (absorbing) means some stop string occurred. Start state 0.
    """

    def __init__(self, stop: Sequence[str], pieces: Sequence[str]):
        self.stop = tuple(stop)
        alphabet = sorted(set("".join(self.stop)))
        cls = {c: i + 1 for i, c in enumerate(alphabet)}  # 0 = any other character
        # trie
        goto: list[dict[int, int]] = [{}]
        out = [False]
        for s in self.stop:
            node = 0
            for ch in s:
                c = cls[ch]
                if c not in goto[node]:
                    goto.append({})
                    out.append(False)
                    goto[node][c] = len(goto) - 1
                node = goto[node][c]
            out[node] = True
        n_nodes = len(goto)
        fail = [0] * n_nodes
        delta = np.zeros((n_nodes, len(alphabet) + 1), np.int64)
        order = [0]
        for node in order:  # BFS
            for c in range(len(alphabet) + 1):
                if c in goto[node]:
                    child = goto[node][c]
                    fail[child] = 0 if node == 0 else delta[fail[node], c]
                    out[child] = out[child] or out[fail[child]]
                    delta[node, c] = child
                    order.append(child)
                else:
                    delta[node, c] = 0 if node == 0 else delta[fail[node], c]
        match = n_nodes
        full = np.full((n_nodes + 1, len(alphabet) + 1), match, np.int64)
        full[:n_nodes] = np.where(np.asarray(out)[delta], match, delta)
        self.match_state = match
        self.num_states = n_nodes + 1
        # run every token's piece from every state at once, one character position at a time
        V = len(pieces)
        lens = np.fromiter((len(p) for p in pieces), np.int64, V)
        st = np.repeat(np.arange(self.num_states, dtype=np.int64)[:, None], V, axis=1)
        for pos in range(int(lens.max(initial=0))):
            idx = np.nonzero(lens > pos)[0]
            c = np.fromiter((cls.get(pieces[i][pos], 0) for i in idx), np.int64, len(idx))
            st[:, idx] = full[st[:, idx], c[None, :]]
        self.table = st.astype(np.int32)

    def run(self, ids: Sequence[int]) -> int:
        """Final state after ``ids`` (host-side reference, for tests)."""
        s = 0
        for i in ids:
            s = int(self.table[s, int(i)])
        return s
