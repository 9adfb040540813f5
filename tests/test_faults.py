"""Faults and bad input through the CLI (issue #18): each is one line on stderr with rc 2, raised
before anything is created, and nothing on disk is damaged."""
import os
import subprocess
import sys

import numpy as np
import pytest

from saejax.store import write_store

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, "tests", "configs", "tiny.py")


def _store(workdir, width_of=lambda site: 16, n=2048):
    """A store of sites res.0 and res.3 for the tiny config's model, written from arrays."""
    rng = np.random.default_rng(0)
    arrays = {split: {site: (rng.standard_normal((rows, width_of(site))).astype(np.float32),
                             np.zeros((rows, 3), np.int32)) for site in ("res.0", "res.3")}
              for split, rows in (("train", n), ("heldout", 64))}
    path = os.path.join(workdir, "store")
    write_store(path, arrays, model="tiny", context_len=16, shard_rows=512,
                heldout_tokens=np.zeros((4, 16), np.int32), extra={"model_source": "random:tiny-llama"})
    return path


def _train(workdir, *extra):
    args = [sys.executable, "-m", "saejax.cli", "train", "--config", CONFIG, f"--config.workdir={workdir}",
            "--config.harvest.kinds=('res',)", "--config.sae.widths=(32,)", "--config.train.tokens=2048",
            "--config.train.batch_size=256", "--config.mesh.data=1", *extra]
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")
    return subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def _one_line(p):
    """The error: the last line of stderr, rc 2, no traceback (progress lines may come before it;
    a progress line ending in a carriage return is overwritten by the next on a terminal)."""
    lines = p.stderr.strip().replace("\r", "\n").splitlines()
    assert p.returncode == 2 and "Traceback" not in p.stderr, (p.returncode, p.stderr[-3000:])
    assert lines[-1].startswith("saejax "), lines[-1]
    return lines[-1]


def test_width_mismatch_between_shard_and_manifest_creates_nothing(tmp_path):
    work = str(tmp_path / "w")
    store = _store(work)
    import json
    mp = os.path.join(store, "manifest.json")
    m = json.load(open(mp))
    m["sites"]["res.3"]["width"] = 32  # the shards hold width 16
    json.dump(m, open(mp, "w"))
    p = _train(work)
    line = _one_line(p)
    assert len(p.stderr.strip().splitlines()) == 1
    assert "train/res.3/00000.npy: shape (512, 16), the manifest implies (512, 32)" in line
    assert sorted(os.listdir(work)) == ["store"]  # no train/ folder, no metrics, no checkpoints


def test_flipped_bytes_in_a_shard_stop_training_in_one_line(tmp_path):
    work = str(tmp_path / "w")
    store = _store(work)
    f = os.path.join(store, "train/res.3/00002.npy")
    data = bytearray(open(f, "rb").read())
    data[8192:12288] = bytes(b ^ 0xA5 for b in data[8192:12288])  # 4 KiB, same size
    open(f, "wb").write(bytes(data))
    line = _one_line(_train(work))
    assert "train/res.3/00002.npy: chunk 0" in line and "does not match its checksum" in line


SYNTH = os.path.join(REPO, "experiments", "synthetic.py") + ":runlocal"


def _synth(workdir, steps, *extra):
    args = [sys.executable, "-m", "saejax.cli", "train", "--config", SYNTH, f"--config.workdir={workdir}",
            f"--config.train.tokens={2048 * steps}", "--config.train.checkpoint_every=20",
            "--config.train.keep_checkpoints=2", "--config.mesh.data=1", *extra]
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")
    return subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def _final(workdir):
    from safetensors.numpy import load_file
    (path,) = [os.path.join(r, "params.safetensors") for r, _, f in os.walk(workdir)
               if r.endswith("final") and "params.safetensors" in f]
    return path, load_file(path)


def test_corrupt_latest_checkpoint_falls_back_to_the_newest_good_one(tmp_path):
    work = str(tmp_path / "w")
    p = _synth(work, 40)
    assert p.returncode == 0, p.stderr[-2000:]
    path, want = _final(work)
    import shutil
    shutil.rmtree(os.path.dirname(path))  # as if killed after the step-40 checkpoint
    ckpts = os.path.join(os.path.dirname(os.path.dirname(path)), "checkpoints")
    assert sorted(os.listdir(ckpts)) == ["20", "40"]
    for root, _, files in os.walk(os.path.join(ckpts, "40")):
        for f in files:
            fp = os.path.join(root, f)
            if os.path.getsize(fp) > 64:
                with open(fp, "r+b") as fh:  # same size, garbage bytes
                    fh.write(b"\x5a" * os.path.getsize(fp))
    p = _synth(work, 40)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "the checkpoint at step 40" in p.stderr and "falling back to step 20" in p.stderr
    assert "Traceback" not in p.stderr
    _, got = _final(work)
    for k in want:  # the resumed run is the uninterrupted one, bit for bit
        np.testing.assert_array_equal(got[k], want[k])


# --- a full disk: one line naming the path and the bytes, no temporary file left behind ----------

def _tmp_files(root):
    return [os.path.join(r, f) for r, _, fs in os.walk(root) for f in fs if ".tmp-" in f]


def test_enospc_while_writing_a_shard_is_one_line_and_leaves_no_temp_file(tmp_path, monkeypatch):
    import errno

    from saejax import files
    real = np.lib.format.write_array

    def full(fp, arr, **kw):  # half the bytes reach the disk, then it is full
        fp.write(b"\0" * (arr.nbytes // 2))
        raise OSError(errno.ENOSPC, "No space left on device")

    path = str(tmp_path / "s")
    monkeypatch.setattr(np.lib.format, "write_array", full)
    with pytest.raises(files.DiskFull, match=r"train/res.0/00000.npy: disk full while writing it: it needs about "):
        _store(path)
    monkeypatch.setattr(np.lib.format, "write_array", real)
    assert _tmp_files(path) == []


def test_full_disk_before_a_checkpoint_is_one_line(tmp_path, monkeypatch):
    import jax.numpy as jnp

    from saejax import files
    from saejax.train import checkpoint as ckpt
    c = ckpt.Checkpoints(str(tmp_path / "ck"), every=1, keep=1, async_save=False)
    state = {"w": jnp.zeros((256, 256))}
    monkeypatch.setattr(files, "free_bytes", lambda path: 1000)
    with pytest.raises(files.DiskFull, match=r"ck: disk full: the checkpoint of step 1 needs 256.0 KiB, 1000 bytes free"):
        c.save(1, state, force=True)
    assert c.latest_step() is None


@pytest.fixture
def small_disk(tmp_path):
    """A 256 KiB tmpfs (root can mount one; elsewhere the test is skipped)."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    yield str(mnt)
    subprocess.run(["umount", str(mnt)], capture_output=True)


def test_harvest_on_a_full_disk_is_one_line_and_leaves_no_temp_file(tmp_path, small_disk):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(3):
        (corpus / f"{i}.txt").write_text("Now, fair Hippolyta, our nuptial hour draws on apace; " * 40)
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")
    p = subprocess.run([sys.executable, "-m", "saejax.cli", "harvest", "--config", CONFIG,
                        f"--config.data.corpus={corpus}", f"--config.workdir={small_disk}/w", "--config.mesh.data=1",
                        "--config.harvest.batch_contexts=1"], cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=300)
    line = _one_line(p)
    assert "disk full while writing it" in line and small_disk in line
    assert _tmp_files(small_disk) == []


def test_training_on_a_full_disk_is_one_line(tmp_path, small_disk):
    store = _store(str(tmp_path / "elsewhere"))
    work = os.path.join(small_disk, "w")
    os.makedirs(work)
    os.symlink(store, os.path.join(work, "store"))
    line = _one_line(_train(work, "--config.sae.widths=(1024,)"))
    assert "disk full: the checkpoint of step" in line
    assert _tmp_files(small_disk) == []


# --- one writer per workdir, and no resume with another config -------------------------------------

def test_two_trainers_on_one_workdir_second_is_refused(tmp_path):
    work = str(tmp_path / "w")
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")
    args = [sys.executable, "-m", "saejax.cli", "train", "--config", SYNTH, f"--config.workdir={work}",
            "--config.mesh.data=1"]
    first = subprocess.Popen(args, cwd=REPO, env=env, stderr=subprocess.PIPE, text=True)
    try:
        import time
        deadline = time.time() + 120
        while not os.path.isdir(os.path.join(work, "train")) and time.time() < deadline:
            time.sleep(0.2)
        second = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
        line = _one_line(second)
        assert "another `saejax train` (process 0) is writing this workdir" in line
    finally:
        first.kill()
        first.wait()


def test_resume_with_another_config_is_refused_naming_the_keys(tmp_path):
    work = str(tmp_path / "w")
    p = _synth(work, 40)
    assert p.returncode == 0, p.stderr[-2000:]
    import shutil
    path, _ = _final(work)
    shutil.rmtree(os.path.dirname(path))  # a checkpoint at step 40 to resume from
    before = tree_digest_of(work)
    line = _one_line(_synth(work, 40, "--config.train.lr=0.002", "--config.sae.sparsity=(0.05,0.02)"))
    assert "was trained with another config" in line and "hyper.lr: 0.003 -> 0.002" in line
    assert "spec.sweep: [0.01, 0.02] -> [0.05, 0.02]" in line and "move that folder away" in line
    assert tree_digest_of(work) == before  # nothing touched
    p = _synth(work, 40)  # the same config resumes
    assert p.returncode == 0 and "resumed from the checkpoint at step 40" in p.stderr, p.stderr[-2000:]
    # a finished group with another config is not silently kept either
    line = _one_line(_synth(work, 40, "--config.train.lr=0.002"))
    assert "was trained with another config" in line


def tree_digest_of(root):
    import hashlib
    return {os.path.join(d, f): hashlib.sha256(open(os.path.join(d, f), "rb").read()).hexdigest()
            for d, _, fs in os.walk(root) for f in fs if ".locks" not in d}
