"""Tokenizers: a byte tokenizer for the random presets, and byte-level BPE built from GGUF metadata.

Both expose ``encode(text) -> list[int]`` (no special tokens added) and ``decode(ids) -> str``.
"""
from __future__ import annotations

from typing import Sequence


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255; specials <bos>=256, <eos>=257, <pad>=258; ids up to vocab-1 unused."""
    bos_id, eos_id, pad_id = 256, 257, 258

    def __init__(self, vocab_size: int):
        if vocab_size < 259:
            raise ValueError(f"byte tokenizer needs vocab_size >= 259, got {vocab_size}")
        self.vocab_size = vocab_size

    @property
    def special_ids(self) -> tuple[int, ...]:
        return (self.bos_id, self.eos_id, self.pad_id)

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")


class BPETokenizer:
    """A ``tokenizers.Tokenizer`` (byte-level BPE) with the two-method interface."""

    def __init__(self, tok, special_ids: Sequence[int]):
        self.tok = tok
        self.special_ids = tuple(int(i) for i in special_ids)

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=False)


# llama.cpp's pre-tokenizer names (tokenizer.ggml.pre) -> split regex before byte-level mapping.
# "smollm": digits split one by one, then GPT-2's regex (llama.cpp's LLAMA_VOCAB_PRE_TYPE_SMOLLM,
# the same as the pre-tokenizer in SmolLM2's tokenizer.json).
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


def bpe_from_gguf(tokens: Sequence[str], merges: Sequence[str], token_types: Sequence[int],
                  pre: str | None) -> BPETokenizer:
    """Byte-level BPE from GGUF metadata (tokenizer.ggml.{tokens, merges, token_type, pre}).

    tokens are spelled in GPT-2's byte alphabet; merges are "a b" strings in priority order;
    token_type 3 (CONTROL) tokens become special added tokens (matched whole, e.g. <|endoftext|>).
    """
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

    vocab = {t: i for i, t in enumerate(tokens)}
    pairs = [tuple(m.split(" ", 1)) for m in merges]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=pairs, fuse_unk=False, byte_fallback=False))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre == "smollm":
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    elif pre in ("llama3", "llama-v3", "llama-bpe"):
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    elif pre in (None, "default", "gpt2"):
        tok.pre_tokenizer = byte_level
    else:
        raise ValueError(f"unsupported GGUF pre-tokenizer {pre!r}; supported: smollm, llama-bpe, gpt2")
    tok.decoder = decoders.ByteLevel()
    control = [i for i, t in enumerate(token_types) if int(t) == 3]
    tok.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False) for i in control])
    return BPETokenizer(tok, control)


class HFTokenizer:
    """A transformers tokenizer of a checkpoint directory, without added special tokens."""

    def __init__(self, tok):
        self.tok = tok
        self.special_ids = tuple(int(i) for i in tok.all_special_ids)

    def encode(self, text: str) -> list[int]:
        return list(self.tok.encode(text, add_special_tokens=False))

    def decode(self, ids: Sequence[int]) -> str:
        return self.tok.decode([int(i) for i in ids])


class MissingTokenizer:
    """Stands in when a checkpoint directory has no tokenizer files; using it is an error."""
    special_ids: tuple[int, ...] = ()

    def __init__(self, where: str):
        self.where = where

    def encode(self, text: str) -> list[int]:
        raise ValueError(f"{self.where} has no tokenizer files (tokenizer.json / tokenizer.model)")

    decode = encode
