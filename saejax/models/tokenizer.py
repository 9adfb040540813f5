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
