"""Tokenizers: a byte tokenizer for the random presets, and byte-level BPE / Gemma's SentencePiece
vocabulary built from GGUF metadata.

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


# llama.cpp's pre-tokenizer names (tokenizer.ggml.pre) -> split regex before byte-level mapping
# (the regexes of transformers' GGUF tokenizer and of the models' own tokenizer.json files).
# "smollm": digits split one by one, then GPT-2's regex (llama.cpp's LLAMA_VOCAB_PRE_TYPE_SMOLLM,
# the same as the pre-tokenizer in SmolLM2's tokenizer.json); "olmo" (GPT-NeoX's vocabulary) and
# "gpt2": GPT-2's regex; "dbrx" (cl100k: OLMo 2) and "smaug-bpe": Llama 3's; "qwen2": Llama 3's with
# digits one by one (Qwen 2/2.5/3's tokenizer.json).
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = _LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")
_SPLITS = {"llama3": _LLAMA3_SPLIT, "llama-v3": _LLAMA3_SPLIT, "llama-bpe": _LLAMA3_SPLIT, "dbrx": _LLAMA3_SPLIT,
           "smaug-bpe": _LLAMA3_SPLIT, "qwen2": _QWEN2_SPLIT}
CONTROL, USER_DEFINED = 3, 4  # tokenizer.ggml.token_type values (llama.cpp's)


def _added(tok, tokens, token_types) -> list[int]:
    """CONTROL tokens become special added tokens and USER_DEFINED ones plain added tokens, both
    matched whole in the text (as llama.cpp and transformers' GGUF tokenizer do); returns the CONTROL ids."""
    from tokenizers import AddedToken
    types = [int(t) for t in token_types]
    control = [i for i, t in enumerate(types) if t == CONTROL]
    tok.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False) for i in control])
    tok.add_tokens([AddedToken(tokens[i], special=False, normalized=False)
                    for i, t in enumerate(types) if t == USER_DEFINED])
    return control


def bpe_from_gguf(tokens: Sequence[str], merges: Sequence[str], token_types: Sequence[int],
                  pre: str | None) -> BPETokenizer:
    """Byte-level BPE from GGUF metadata (tokenizer.ggml.{tokens, merges, token_type, pre}).

    tokens are spelled in GPT-2's byte alphabet; merges are "a b" strings in priority order;
    token_type 3 (CONTROL) tokens become special added tokens (matched whole, e.g. <|endoftext|>),
    4 (USER_DEFINED, e.g. Qwen 3's <think>) plain added tokens.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    vocab = {t: i for i, t in enumerate(tokens)}
    pairs = [tuple(m.split(" ", 1)) for m in merges]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=pairs, fuse_unk=False, byte_fallback=False))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre == "smollm":
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    elif pre in _SPLITS:
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_SPLITS[pre]), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    elif pre in (None, "default", "gpt2", "olmo"):
        tok.pre_tokenizer = byte_level
    else:
        raise ValueError(f"unsupported GGUF pre-tokenizer {pre!r}; supported: smollm, gpt2, olmo, "
                         f"{', '.join(_SPLITS)}")
    tok.decoder = decoders.ByteLevel()
    return BPETokenizer(tok, _added(tok, tokens, token_types))


def spm_from_gguf(tokens: Sequence[str], token_types: Sequence[int], unk_id: int | None) -> BPETokenizer:
    """Gemma's SentencePiece vocabulary (tokenizer.ggml.model "llama", no merges) as the BPE
    transformers' GGUF loader builds for Gemma: merges recovered from the vocabulary in file order
    (Gemma's scores do not follow its merge order), byte fallback to the <0xNN> tokens, spaces as
    "▁"; tokens of spaces alone are stored as spaces and respelled with "▁". No space prefix."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers

    tokens = ["\u2581" * len(t) if " " in t and not t.strip() else t for t in tokens]
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = []
    for t, rank in vocab.items():  # every split of a token into two tokens, best (earliest) token first
        local = sorted(((t[:k], t[k:]) for k in range(1, len(t)) if t[:k] in vocab and t[k:] in vocab),
                       key=lambda p: (vocab[p[0]], vocab[p[1]]))
        merges += [(rank, -len(a), -len(b), a, b) for a, b in local]
    merges.sort(key=lambda m: m[:3])
    unk = tokens[unk_id] if unk_id is not None else None
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[m[3:] for m in merges], fuse_unk=True, unk_token=unk,
                               byte_fallback=True))
    tok.normalizer = normalizers.Replace(" ", "\u2581")
    tok.pre_tokenizer = pre_tokenizers.Split(" ", behavior="merged_with_previous")
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    return BPETokenizer(tok, _added(tok, tokens, token_types))


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
