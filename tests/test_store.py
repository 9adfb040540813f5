"""The store format, writer and reader, on hand-made arrays (no model)."""
import hashlib
import os

import ml_dtypes
import numpy as np
import pytest

from saejax import config as cfg
from saejax.store import StoreError, check_store, open_store, write_store
from saejax.store import writer


def make(tmp_path, n=1000, w=8, dtype="float32", shard_rows=300, name="s"):
    """A store with sites res.0 (width w) and res.1 (width w), rows whose first column is the row id."""
    rng = np.random.default_rng(0)
    arrays = {}
    for split, rows in (("train", n), ("heldout", 50)):
        arrays[split] = {}
        for k, site in enumerate(("res.0", "res.1")):
            x = rng.standard_normal((rows, w)).astype(np.float32) * (k + 1)
            x[:, 0] = np.arange(rows) + 10000 * k  # row id, exact in float32
            meta = np.stack([np.arange(rows) % 7, np.arange(rows) // 15, 1 + np.arange(rows) % 15], 1)
            arrays[split][site] = (x, meta)
    path = str(tmp_path / name)
    write_store(path, arrays, model="test-model", corpus="unit", context_len=16, context_start_id=1,
                special_ids=(1, 2), dtype=dtype, shard_rows=shard_rows,
                heldout_tokens=np.arange(4 * 16).reshape(4, 16), extra={"model_source": "random:unit"})
    return path, arrays


def tree_digest(path):
    h = {}
    for d, _, files in os.walk(path):
        for f in files:
            p = os.path.join(d, f)
            h[p] = hashlib.sha256(open(p, "rb").read()).hexdigest()
    return h


def test_round_trip_and_norm_scale(tmp_path):
    path, arrays = make(tmp_path)
    st = open_store(path)
    st.verify()
    assert st.sites == ["res.0", "res.1"] and st.width("res.1") == 8 and st.model == "test-model"
    for split in ("train", "heldout"):
        for site in st.sites:
            x, meta = st.rows(site, split)
            np.testing.assert_array_equal(x, arrays[split][site][0])
            np.testing.assert_array_equal(meta, arrays[split][site][1])
    x = arrays["train"]["res.1"][0]
    assert st.norm_scale("res.1") == pytest.approx(1 / np.sqrt(np.mean(np.sum(x.astype(np.float64) ** 2, 1))), rel=1e-6)
    np.testing.assert_array_equal(st.heldout_tokens(), np.arange(64).reshape(4, 16))
    np.testing.assert_array_equal(st.heldout_contexts(), np.arange(4))
    assert len(st.manifest["shards"]) == 2 * (4 + 1)  # train: 1000 rows in 300-row shards; heldout: one


def test_bfloat16_stored_as_uint16_bits(tmp_path):
    path, arrays = make(tmp_path, dtype="bfloat16")
    raw = np.load(os.path.join(path, "train/res.0/00000.npy"))
    assert raw.dtype == np.uint16
    x, _ = open_store(path).rows("res.0", "train")
    want = arrays["train"]["res.0"][0].astype(ml_dtypes.bfloat16).astype(np.float32)
    np.testing.assert_array_equal(x, want)


def row_ids(batch):
    return batch[..., 0].astype(np.int64)


def test_reader_epochs_are_permutations_and_pure(tmp_path):
    path, _ = make(tmp_path)
    st = open_store(path)
    r = st.reader(seed=3, block_rows=64, prefetch=0)
    ids = np.concatenate([row_ids(r.batch(["res.0"], s, 100))[0] for s in range(10)])
    assert sorted(ids) == list(range(1000))  # epoch 0 visits every row once
    assert not np.array_equal(ids, np.arange(1000))  # and not in stored order
    ids1 = np.concatenate([row_ids(r.batch(["res.0"], s, 100))[0] for s in range(10, 20)])
    assert sorted(ids1) == list(range(1000)) and not np.array_equal(ids, ids1)  # epoch 1: a new order
    # pure in (seed, step): a fresh reader, steps out of order, with prefetch on
    r2 = st.reader(seed=3, block_rows=64, prefetch=3)
    for s in (7, 2, 3, 4, 15, 16):
        np.testing.assert_array_equal(r2.batch(["res.0"], s, 100), r.batch(["res.0"], s, 100))
    r2.close()
    other = open_store(path).reader(seed=4, block_rows=64, prefetch=0)
    assert not np.array_equal(other.batch(["res.0"], 0, 100), r.batch(["res.0"], 0, 100))


def test_reader_processes_split_the_global_batch(tmp_path):
    path, _ = make(tmp_path)
    r = open_store(path).reader(seed=0, block_rows=50, prefetch=2)
    full = r.batch(["res.0", "res.1"], 5, 120)
    parts = [r.batch(["res.0", "res.1"], 5, 120, p, 3) for p in range(3)]
    assert full.shape == (2, 120, 8)
    np.testing.assert_array_equal(np.concatenate(parts, axis=1), full)
    # a batch larger than the store loops into the next epoch
    big = r.batch(["res.1"], 0, 2500)
    assert np.bincount(row_ids(big)[0] - 10000).tolist().count(2) >= 500
    r.close()


def test_truncated_shard_is_named_and_store_untouched(tmp_path):
    path, _ = make(tmp_path)
    f = os.path.join(path, "train/res.1/00002.npy")
    with open(f, "r+b") as fh:
        fh.truncate(os.path.getsize(f) - 8)
    before = tree_digest(path)
    with pytest.raises(StoreError, match="train/res.1/00002.npy"):
        open_store(path)
    assert tree_digest(path) == before


def test_corrupted_shard_is_named_by_verify(tmp_path):
    path, _ = make(tmp_path)
    f = os.path.join(path, "heldout/res.0/00000.npy")
    data = bytearray(open(f, "rb").read())
    data[-3] ^= 0xFF
    open(f, "wb").write(bytes(data))
    st = open_store(path)  # sizes match: only the hash can tell
    st.verify(["res.1"])  # other sites are fine
    before = tree_digest(path)
    with pytest.raises(StoreError, match="heldout/res.0/00000.npy.*sha256"):
        st.verify()
    assert tree_digest(path) == before


def test_missing_file_and_bad_manifest(tmp_path):
    path, _ = make(tmp_path)
    os.remove(os.path.join(path, "train/res.0/00001.meta.npy"))
    with pytest.raises(StoreError, match="train/res.0/00001.meta.npy.*missing"):
        open_store(path)
    with pytest.raises(StoreError, match="manifest.json: no such file"):
        open_store(str(tmp_path / "nowhere"))
    path2, _ = make(tmp_path, name="t")
    with open(os.path.join(path2, "manifest.json"), "w") as fh:
        fh.write('{"format": "saejax-store/1"')
    with pytest.raises(StoreError, match="not valid JSON"):
        open_store(path2)


def test_check_store_names_site_width_and_model(tmp_path):
    path, _ = make(tmp_path)
    st = open_store(path)
    c = cfg.defaults()
    c.model.source = "random:unit"
    c.harvest.layers, c.harvest.kinds = (0, 1), ("res",)
    check_store(st, c, widths={"res.0": 8})
    with pytest.raises(StoreError, match="res.1: width 8 .* 576"):
        check_store(st, c, widths={"res.1": 576})
    c.harvest.kinds = ("res", "mlp")
    with pytest.raises(StoreError, match="site 'mlp.0' is not in the store"):
        check_store(st, c)
    c.harvest.kinds = ("res",)
    c.model.source = "smollm2"
    with pytest.raises(StoreError, match="random:unit.*smollm2"):
        check_store(st, c)
    with pytest.raises(StoreError, match="site 'att.3' is not in the store"):
        st.reader().batch(["att.3"], 0, 4)


# --- hostile and inconsistent manifests (issue #18): refused at open, in one line naming the entry --

def _edit_manifest(path, fn):
    import json
    mp = os.path.join(path, "manifest.json")
    m = json.load(open(mp))
    fn(m)
    json.dump(m, open(mp, "w"))


def _npy_entry(path, rel, arr):
    """Write ``arr`` as ``rel`` (may point anywhere) and return (sha256, bytes) of the file."""
    f = os.path.normpath(os.path.join(path, rel))
    os.makedirs(os.path.dirname(f), exist_ok=True)
    np.save(f, arr)
    data = open(f, "rb").read()
    return hashlib.sha256(data).hexdigest(), len(data)


@pytest.mark.parametrize("rel", ["/etc/passwd", "../outside/stolen.npy", "train/../../outside/x.npy",
                                 "./train/res.0/00000.npy", "C:/x.npy"])
def test_manifest_paths_must_stay_inside_the_store(tmp_path, rel):
    path, _ = make(tmp_path)
    if not rel.startswith(("/", "C:")):  # a valid .npy with matching bytes and sha256 outside the store
        sha, n = _npy_entry(path, rel, np.zeros((300, 8), np.float32))

        def fix(m):
            m["shards"][0].update(file=rel, sha256=sha, bytes=n)
    else:
        def fix(m):
            m["shards"][0]["file"] = rel
    _edit_manifest(path, fix)
    before = tree_digest(path)
    with pytest.raises(StoreError, match="manifest.json: shard entry 'file': path .* not a plain relative path") as e:
        open_store(path)
    assert "\n" not in str(e.value)
    assert tree_digest(path) == before


def test_symlink_leaving_the_store_is_refused(tmp_path):
    path, _ = make(tmp_path)
    outside = tmp_path / "outside.npy"
    f = os.path.join(path, "train/res.0/00000.npy")
    os.replace(f, outside)
    os.symlink(outside, f)
    with pytest.raises(StoreError, match="train/res.0/00000.npy resolves outside the store"):
        open_store(path)


def test_shard_listed_twice_is_refused(tmp_path):
    path, _ = make(tmp_path)
    _edit_manifest(path, lambda m: m["shards"].append(dict(m["shards"][0])))
    with pytest.raises(StoreError, match="train/res.0/00000.npy is listed more than once"):
        open_store(path)


def test_meta_rows_and_width_must_agree_with_the_manifest(tmp_path):
    path, _ = make(tmp_path)
    rel = "train/res.0/00001.meta.npy"  # meta of 299 rows for a 300-row shard
    sha, n = _npy_entry(path, rel, np.zeros((299, 3), np.int32))
    _edit_manifest(path, lambda m: m["shards"][1].update(meta_sha256=sha, meta_bytes=n,
                                                         meta_chunks=[writer.crc(open(os.path.join(path, rel), "rb").read())]))
    with pytest.raises(StoreError, match=r"00001.meta.npy: shape \(299, 3\), the manifest implies \(300, 3\)"):
        open_store(path)
    path, _ = make(tmp_path, name="w")
    rel = "train/res.1/00000.npy"  # a shard of width 4 in a site of width 8
    sha, n = _npy_entry(path, rel, np.zeros((300, 4), np.float32))
    _edit_manifest(path, lambda m: [sh.update(sha256=sha, bytes=n) for sh in m["shards"] if sh["file"] == rel])
    with pytest.raises(StoreError, match=r"res.1/00000.npy: shape \(300, 4\), the manifest implies \(300, 8\)"):
        open_store(path)


def test_flipped_bytes_are_caught_when_read(tmp_path, monkeypatch):
    """Corruption that keeps the size: found by the chunk checksums as the reader reaches it, naming
    the shard and chunk, with no full pass over the store first."""
    monkeypatch.setattr(writer, "CHUNK_BYTES", 4096)
    path, arrays = make(tmp_path, n=3000, shard_rows=1000)  # 32 KB shards: 8 chunks each
    f = os.path.join(path, "train/res.1/00001.npy")
    data = bytearray(open(f, "rb").read())
    data[3 * 4096:4 * 4096] = bytes(b ^ 0x5A for b in data[3 * 4096:4 * 4096])  # 4 KiB flipped: chunk 3
    open(f, "wb").write(bytes(data))
    st = open_store(path)  # sizes and headers are fine
    r = st.reader(seed=0, block_rows=100, prefetch=2)
    np.testing.assert_array_equal(st.rows("res.0", "train")[0], arrays["train"]["res.0"][0])  # other sites read
    with pytest.raises(StoreError, match=r"train/res.1/00001.npy: chunk 3 .*does not match its checksum"):
        for step in range(30):  # one epoch reaches every block
            r.batch(["res.0", "res.1"], step, 100)
    r.close()
    assert len(st._verified) < 2 * 3 * 8 + 2  # chunks are checked as read, not all at open


def test_format_1_store_is_verified_in_full_before_training_reads_it(tmp_path, capsys):
    path, _ = make(tmp_path)

    def old(m):
        m["format"] = "saejax-store/1"
        for sh in m["shards"]:
            for k in ("chunk_bytes", "chunks", "meta_chunks"):
                del sh[k]
    _edit_manifest(path, old)
    r = open_store(path).reader(prefetch=0)
    r.batch(["res.0"], 0, 10)
    assert "format /1 store without chunk checksums: verifying every shard of res.0" in capsys.readouterr().err
    f = os.path.join(path, "train/res.1/00000.npy")
    data = bytearray(open(f, "rb").read())
    data[-5] ^= 0xFF
    open(f, "wb").write(bytes(data))
    with pytest.raises(StoreError, match="train/res.1/00000.npy: sha256 does not match"):
        open_store(path).reader(prefetch=0).batch(["res.1"], 0, 10)


def test_pairs_align_the_reader_and_are_checked(tmp_path):
    """write_store(pairs=): the pair's rows stay aligned through the reader's block shuffle (batch and
    held-out batch); a pair with unequal rows is refused before writing, or naming the pair at open."""
    from saejax.store.manifest import align_keys
    assert align_keys(["a", "b", "c", "d", "e"], [("c", "b"), ("d", "a"), ("b", "d")]) == \
        {"a": "a", "b": "a", "c": "a", "d": "a", "e": "e"}  # joined through other pairs: one key
    rng = np.random.default_rng(1)
    arrays = {}
    for split, n in (("train", 500), ("heldout", 60)):
        meta = np.stack([rng.integers(0, 9, n), rng.permutation(n), np.arange(n)], 1)
        arrays[split] = {s: (np.repeat(meta[:, 1:2], 4, 1).astype(np.float32) * (k + 1), meta)
                         for k, s in enumerate(("mlp_in.0", "mlp.0", "res.0"))}
    path = str(tmp_path / "p")
    write_store(path, arrays, model="m", shard_rows=70, pairs=[("mlp_in.0", "mlp.0")])
    st = open_store(path)
    assert st.manifest["pairs"] == [["mlp_in.0", "mlp.0"]]
    r = st.reader(seed=5, block_rows=16, prefetch=0)
    for step in (0, 7, 31, 40):  # 40 * 32 > 500: the third epoch
        a, b = r.batch_meta(["mlp_in.0", "mlp.0"], step, 32)
        np.testing.assert_array_equal(a, b)
        x = r.batch(["mlp_in.0", "mlp.0"], step, 32)
        np.testing.assert_array_equal(x[0][:, 0], a[:, 1])  # batch_meta describes batch's rows
        np.testing.assert_array_equal(x[1][:, 0], 2 * a[:, 1])
        assert not np.array_equal(r.batch_meta(["res.0"], step, 32)[0], a)  # unpaired: its own order
    np.testing.assert_array_equal(*r.heldout_meta(["mlp_in.0", "mlp.0"], 32))
    r.close()
    short = {sp: dict(v) for sp, v in arrays.items()}
    short["train"]["mlp.0"] = tuple(a[:-1] for a in arrays["train"]["mlp.0"])
    with pytest.raises(StoreError, match=r"pair \('mlp_in.0', 'mlp.0'\): split train has rows \[500, 499\]"):
        write_store(str(tmp_path / "q"), short, model="m", pairs=[("mlp_in.0", "mlp.0")])
    assert not os.path.exists(tmp_path / "q")
    path2 = str(tmp_path / "r")
    m = write_store(path2, short, model="m", shard_rows=70)
    m["pairs"] = [["mlp_in.0", "mlp.0"]]
    writer.write_json(os.path.join(path2, "manifest.json"), m)
    with pytest.raises(StoreError, match="pair mlp_in.0, mlp.0: their train shards differ in rows"):
        open_store(path2)
