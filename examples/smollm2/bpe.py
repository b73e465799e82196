"""A minimal byte-level BPE tokenizer for SmolLM2, built from the vocabulary and merges of its GGUF file.

What it does: pre-tokenizes text with the GPT-2 pattern, with every digit a piece of its own (SmolLM2's
tokenizer splits numbers digit by digit), maps bytes to GPT-2's printable alphabet, applies the merges in rank
order, and matches control tokens such as ``<|im_start|>`` before anything else. It reads the tokens from a GGUF
reader (``BPE.from_gguf``) or from the small JSON file that ``convert.py`` writes next to the checkpoint
(``BPE.from_json``), so a converted checkpoint directory is all that is needed to tokenize.

What it does not do: it is close to, but not guaranteed identical to, the Hugging Face tokenizer (no
normalizer, no byte fallback, control tokens only among the special tokens); it adds no BOS token; and it is
slow (pure Python), which is fine for short prompts. Without the optional ``regex`` package the pre-tokenizer
uses ``re`` classes that agree with the Unicode-property pattern on ASCII text but may split rare non-ASCII
numerals differently.
"""

from __future__ import annotations

import itertools
import json
import math
import re
from functools import lru_cache
from pathlib import Path
from typing import Any

#: The GPT-2 pre-tokenizer pattern with single-digit number pieces, in ``re`` syntax (which has no Unicode
#: property classes): ``[^\W\d_]`` stands for a letter, ``\d`` for a digit, ``[^\s\w]|_`` for anything else.
PAT_STDLIB = re.compile(r"\d|'s|'t|'re|'ve|'m|'ll|'d| ?[^\W\d_]+| ?(?:[^\s\w]|_)+|\s+(?!\S)|\s+")
try:  # the exact Unicode-property form, when the ``regex`` package is installed
    import regex

    PAT: Any = regex.compile(r"\p{N}|'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+")
except ImportError:  # pragma: no cover - depends on the environment
    PAT = PAT_STDLIB

#: llama.cpp's token type for control tokens (``<|im_start|>``, ``<|im_end|>``, ...).
CONTROL = 3


@lru_cache(maxsize=1)
def byte_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable-character map (the alphabet of byte-level BPE vocabularies)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs), strict=True))


class BPE:
    """Byte-level BPE over ``tokens`` (id -> string) and ``merges`` ("a b", best first); ``special`` matched first."""

    def __init__(self, tokens: list[str], merges: list[str], special: list[str]) -> None:
        self.tokens = list(tokens)
        self.ranks = {tuple(m.split(" ", 1)): i for i, m in enumerate(merges)}
        self.ids = {t: i for i, t in enumerate(self.tokens)}
        self.special = sorted(special, key=len, reverse=True)  # longest first, so no prefix wins
        self.b2u = byte_unicode()
        self.u2b = {c: b for b, c in self.b2u.items()}

    @classmethod
    def from_gguf(cls, reader: Any) -> BPE:
        tokens = list(reader.get_field("tokenizer.ggml.tokens").contents())
        types = reader.get_field("tokenizer.ggml.token_type").contents()
        merges = list(reader.get_field("tokenizer.ggml.merges").contents())
        special = [t for t, ty in zip(tokens, types, strict=True) if ty == CONTROL]
        return cls(tokens, merges, special)

    @classmethod
    def from_json(cls, path: str | Path) -> BPE:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        return cls(data["tokens"], data["merges"], data["special_tokens"])

    def _bpe(self, word: str) -> list[str]:
        parts = list(word)
        while len(parts) > 1:
            pairs = [
                (self.ranks.get((a, b), math.inf), i) for i, (a, b) in enumerate(itertools.pairwise(parts))
            ]
            rank, i = min(pairs)
            if rank == math.inf:
                break
            parts[i : i + 2] = [parts[i] + parts[i + 1]]
        return parts

    def encode(self, text: str) -> list[int]:
        out: list[int] = []
        if not text:
            return out
        for sp in self.special:
            if sp in text:
                head, _, tail = text.partition(sp)
                return [*self.encode(head), self.ids[sp], *self.encode(tail)]
        for piece in PAT.findall(text):
            word = "".join(self.b2u[b] for b in piece.encode("utf-8"))
            out.extend(self.ids[p] for p in self._bpe(word))
        return out

    def decode(self, ids: list[int]) -> str:
        s = "".join(self.tokens[i] for i in ids)
        return bytes(self.u2b[c] for c in s if c in self.u2b).decode("utf-8", errors="replace")
