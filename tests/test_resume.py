"""Checkpoints: kill -9 and restart is bitwise the uninterrupted run; SIGTERM saves at the next step
and exits 75; a checkpoint restores onto another mesh; a non-finite group keeps its last good one.

The CLI runs in subprocesses (`python -m saejax.cli train`) on a tiny synthetic config.
"""
import dataclasses
import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file

from saejax import mesh as meshlib
from saejax.data.synthetic import SyntheticSource
from saejax.sae.group import GroupSpec
from saejax.preempt import EXIT_PREEMPTED
from saejax.train import checkpoint as ckpt
from saejax.train import loop, optim
from saejax.train.trainer import Trainer, to_host

SLOW_OK = "--xla_cpu_collective_call_terminate_timeout_seconds=600"  # see conftest.py
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GROUP = "jumprelu_d32_w128"
STEPS = 400

CONFIG = textwrap.dedent('''
    from saejax import config as cfg

    def get_config(arg=""):
        v = cfg.parse_variants(arg, {"workdir": str, "steps": int})
        c = cfg.defaults()
        c.workdir = v["workdir"]
        c.train.source = "synthetic"
        c.synthetic.sites, c.synthetic.d, c.synthetic.n_features = 4, 32, 128
        c.sae.widths = (128,)
        c.sae.sparsity = (0.003, 0.01)
        c.train.batch_size = 256
        c.train.tokens = 256 * int(v.get("steps", 400))
        c.train.lr = 1e-3
        c.train.lr_warmup = 0.05
        c.train.sparsity_warmup = 0.3
        c.train.dead_tokens = 256 * 50
        c.train.log_every = 20
        c.train.checkpoint_every = 50
        c.train.keep_checkpoints = 3
        c.mesh.data, c.mesh.latent = 2, 4
        return c
''')


def _env(devices=8):
    return {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices} {SLOW_OK}"}


def _cmd(config, workdir, steps=STEPS):
    return [sys.executable, "-m", "saejax.cli", "train", "--config", f"{config}:workdir={workdir},steps={steps}"]


def _run(config, workdir):
    p = subprocess.run(_cmd(config, workdir), cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    return p.stderr


def _finished_steps(workdir):
    d = os.path.join(workdir, "train", GROUP, "checkpoints")
    return sorted(int(n) for n in os.listdir(d) if n.isdigit()) if os.path.isdir(d) else []


def _wait_for_checkpoint(proc, workdir, step=50, timeout=120):
    t0 = time.time()
    while step not in _finished_steps(workdir):
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        assert time.time() - t0 < timeout, "no checkpoint appeared"
        time.sleep(0.02)


def _params(workdir):
    return load_file(os.path.join(workdir, "train", GROUP, "final", "params.safetensors"))


def _metrics(workdir):
    with open(os.path.join(workdir, "train", GROUP, "metrics.jsonl")) as fh:
        return fh.read().splitlines()


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run: (config path, workdir)."""
    root = tmp_path_factory.mktemp("resume")
    config = root / "tiny.py"
    config.write_text(CONFIG)
    _run(str(config), str(root / "ref"))
    return str(config), str(root / "ref")


def _assert_same_run(workdir, ref):
    a, b = _params(workdir), _params(ref)
    assert a.keys() == b.keys()
    for k in a:
        assert np.array_equal(a[k], b[k]), f"{k} differs from the uninterrupted run"
    lines = _metrics(workdir)
    steps = [json.loads(ln)["step"] for ln in lines]
    assert steps == list(range(20, STEPS + 1, 20)), steps  # no step logged twice, none missing
    assert lines == _metrics(ref)


def test_kill_9_then_restart_is_bitwise_the_uninterrupted_run(reference, tmp_path):
    config, ref = reference
    work = str(tmp_path / "run")
    proc = subprocess.Popen(_cmd(config, work), cwd=REPO, env=_env(), stderr=subprocess.PIPE, text=True)
    _wait_for_checkpoint(proc, work)
    delay = random.Random().uniform(0.0, 0.6)
    time.sleep(delay)
    assert proc.poll() is None, "the run finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    killed_at = json.loads(_metrics(work)[-1])["step"]
    restored = max(_finished_steps(work))
    assert 50 <= restored < STEPS, restored
    err = _run(config, work)
    assert f"resumed from the checkpoint at step {restored}" in err, (delay, err[-2000:])
    print(f"killed after {delay:.2f}s (last logged step {killed_at}), resumed from step {restored}")
    _assert_same_run(work, ref)


def test_sigterm_saves_at_the_next_step_and_exits_75(reference, tmp_path):
    config, ref = reference
    work = str(tmp_path / "run")
    proc = subprocess.Popen(_cmd(config, work), cwd=REPO, env=_env(), stderr=subprocess.PIPE, text=True)
    _wait_for_checkpoint(proc, work)
    time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_PREEMPTED == 75, err[-3000:]
    saved = max(_finished_steps(work))
    assert f"preempted: checkpoint at step {saved} saved" in err
    assert 50 < saved < STEPS
    assert json.loads(_metrics(work)[-1])["step"] <= saved
    err = _run(config, work)
    assert f"resumed from the checkpoint at step {saved}" in err
    _assert_same_run(work, ref)


def _group(T=4):
    spec = GroupSpec(arch="jumprelu", sites=tuple(f"res.{i}" for i in range(T)), d=32, width=128,
                     sweep=(0.003, 0.01))
    hp = optim.Hyper(total_steps=20, batch_size=256, lr=1e-3, lr_warmup=2, sparsity_warmup=5)
    return spec, hp, SyntheticSource(spec.sites, d=32, n_features=128)


def test_checkpoint_restores_onto_another_mesh(tmp_path):
    spec, hp, src = _group()
    mesh_a = meshlib.make_mesh(dict(data=2, stack=1, latent=4))
    state = loop.train_group(spec, hp, src, mesh_a, progress=False, ckpt_dir=str(tmp_path), checkpoint_every=10)
    want = to_host(state)
    mesh_b = meshlib.make_mesh(dict(data=2, stack=4, latent=1))
    trainer = Trainer(spec, hp, mesh_b)
    store = ckpt.Checkpoints(str(tmp_path), 10, 2)
    assert store.latest_step() == 20
    got = store.restore(trainer.abstract, trainer.state_shardings)
    store.close()
    for (path, a), b, sh in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree_util.tree_leaves(want),
                                jax.tree_util.tree_leaves(trainer.state_shardings)):
        assert a.sharding.is_equivalent_to(sh, a.ndim), jax.tree_util.keystr(path)
        assert np.array_equal(np.asarray(a), b), jax.tree_util.keystr(path)
    assert got["params"]["W_enc"].sharding.spec[0] == "stack"
    # ... and training continues there: 10 more steps on the new mesh.
    more = loop.train_group(spec, dataclasses.replace(hp, total_steps=30), src, mesh_b, progress=False,
                            ckpt_dir=str(tmp_path), checkpoint_every=10)
    assert int(more["step"]) == 30


def test_nonfinite_sae_is_frozen_and_a_dead_group_keeps_its_last_checkpoint(tmp_path, capsys):
    spec, hp, src = _group(T=2)
    mesh = meshlib.make_mesh(dict(data=1, stack=1, latent=1), jax.devices()[:1])
    state = loop.train_group(spec, hp, src, mesh, progress=False, ckpt_dir=str(tmp_path), checkpoint_every=10,
                             log_every=5)
    # One SAE's parameters go NaN: it is frozen at the next logging step, the others train on.
    host = to_host(state)  # (the train step donates its input state: rebuild from host copies)
    p = {k: np.array(v) for k, v in host["params"].items()}
    p["W_enc"][1, 0, 3, 7] = np.nan
    hp2 = dataclasses.replace(hp, total_steps=25)
    trainer = Trainer(spec, hp2, mesh)
    one = jax.device_put(dict(host, params=p), trainer.state_shardings)
    out = loop.train_group(spec, hp2, src, mesh, progress=False, state=one, log_every=5, trainer=trainer)
    frozen = np.asarray(out["frozen"])
    assert frozen.tolist() == [[False, False], [True, False]]
    err = capsys.readouterr().err  # the SAE named fully: members of one site are told apart
    assert "SAE res.1 member 0 (lambda 0.003) went non-finite by step 25" in err and "member 1" not in err
    assert np.all(np.isfinite(np.asarray(out["params"]["W_enc"])[0]))
    assert not np.array_equal(np.asarray(out["params"]["W_enc"])[0], p["W_enc"][0])  # still training
    # Every SAE non-finite: no checkpoint of that state; the last good one (step 20) stays.
    bad = jax.tree_util.tree_map(lambda a: np.full_like(a, np.nan), p)
    nan_state = jax.device_put(dict(host, params=bad), trainer.state_shardings)
    with pytest.raises(loop.NonFinite, match=r"last good checkpoint \(step 20\) is kept"):
        loop.train_group(spec, dataclasses.replace(hp, total_steps=40), src, mesh, progress=False,
                         state=nan_state, ckpt_dir=str(tmp_path), checkpoint_every=10, log_every=100)
    assert _finished(tmp_path) == [10, 20]


def _finished(d):
    return sorted(int(n) for n in os.listdir(d) if n.isdigit())


def test_is_complete_once_every_group_is_final(reference):
    from saejax import config as cfg
    config, ref = reference
    c = cfg.load(f"{config}:workdir={ref},steps={STEPS}")
    assert loop.is_complete(c)
    c2 = cfg.load(f"{config}:workdir={ref},steps={STEPS}", ["--config.sae.widths=(128, 64)"])
    assert not loop.is_complete(c2)  # the width-64 group was never trained
