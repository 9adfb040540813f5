"""Two processes on localhost (jax.distributed, 4 virtual CPU devices each) train like one process
with 8 devices; SIGTERM to one of them checkpoints both at an agreed step.

Each process runs the CLI, `python -m saejax.cli train`, with the environment launch/launch.py sets
(SAEJAX_COORDINATOR, SAEJAX_NUM_PROCESSES, SAEJAX_PROCESS_ID).
"""
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import numpy as np
from safetensors.numpy import load_file

SLOW_OK = "--xla_cpu_collective_call_terminate_timeout_seconds=600"  # see conftest.py
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GROUP = "jumprelu_d32_w128"
LR = 1e-3

CONFIG = textwrap.dedent(f'''
    from saejax import config as cfg

    def get_config(arg=""):
        v = cfg.parse_variants(arg, {{"workdir": str, "steps": int}})
        c = cfg.defaults()
        c.workdir = v["workdir"]
        c.train.source = "synthetic"
        c.synthetic.sites, c.synthetic.d, c.synthetic.n_features = 4, 32, 128
        c.sae.widths = (128,)
        c.sae.sparsity = (0.003, 0.01)
        c.train.batch_size = 256
        c.train.tokens = 256 * int(v["steps"])
        c.train.lr = {LR}
        c.train.lr_warmup = 10.0
        c.train.sparsity_warmup = 30.0
        c.train.dead_tokens = 256 * 50
        c.train.log_every = 10
        c.train.checkpoint_every = 50
        return c
''')


def _port():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _args(config, workdir, steps, mesh):
    return [sys.executable, "-m", "saejax.cli", "train", "--config", f"{config}:workdir={workdir},steps={steps}",
            *(f"--config.mesh.{k}={v}" for k, v in mesh.items())]


def _start(config, workdir, steps, mesh, processes):
    """Start the CLI as ``processes`` processes (8 devices in all); return the Popen objects."""
    port, procs = _port(), []
    for i in range(processes):
        env = {**os.environ, "JAX_PLATFORMS": "cpu",
               "XLA_FLAGS": f"--xla_force_host_platform_device_count={8 // processes} {SLOW_OK}"}
        if processes > 1:
            env.update(SAEJAX_COORDINATOR=f"localhost:{port}", SAEJAX_NUM_PROCESSES=str(processes),
                       SAEJAX_PROCESS_ID=str(i))
        procs.append(subprocess.Popen(_args(config, workdir, steps, mesh), cwd=REPO, env=env,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
    return procs


def _finish(procs, code=0):
    errs = []
    for p in procs:
        _, err = p.communicate(timeout=300)
        errs.append(err)
    for p, err in zip(procs, errs):
        assert p.returncode == code, err[-3000:]
    return errs


def _train(config, workdir, steps, mesh, processes):
    _finish(_start(config, workdir, steps, mesh, processes))
    group = os.path.join(workdir, "train", GROUP)
    with open(os.path.join(group, "metrics.jsonl")) as fh:
        metrics = [json.loads(ln) for ln in fh]
    return load_file(os.path.join(group, "final", "params.safetensors")), metrics


def _config(tmp_path):
    path = tmp_path / "tiny.py"
    path.write_text(CONFIG)
    return str(path)


def test_two_processes_one_step_update_matches_one_process(tmp_path):
    """Batch split over the processes (data 2 x latent 4): the update agrees to 1e-5 (Adam's
    sign-like first step gets an absolute slack of lr/100 where the gradient is at rounding level)."""
    config, mesh = _config(tmp_path), dict(data=2, stack=1, latent=4)
    one, m1 = _train(config, str(tmp_path / "one"), 1, mesh, 1)
    two, m2 = _train(config, str(tmp_path / "two"), 1, mesh, 2)
    for k in one:
        np.testing.assert_allclose(two[k], one[k], rtol=1e-5, atol=LR / 100, err_msg=k)
    assert m1[-1]["step"] == m2[-1]["step"] == 1 and m1[-1]["l0"] == m2[-1]["l0"]


def test_two_processes_after_100_steps_match_one_process(tmp_path):
    """Sites split over the processes (stack 4 x latent 2): each process feeds only its own sites."""
    config, mesh = _config(tmp_path), dict(data=1, stack=4, latent=2)
    one, m1 = _train(config, str(tmp_path / "one"), 100, mesh, 1)
    two, m2 = _train(config, str(tmp_path / "two"), 100, mesh, 2)
    assert [r["step"] for r in m1] == [r["step"] for r in m2] == list(range(10, 101, 10))
    assert max(m1[-1]["fvu"][0]) < 0.5  # it trained
    for k in ("l0", "fvu"):
        np.testing.assert_allclose(m2[-1][k], m1[-1][k], rtol=0.02, err_msg=k)
    for k in one:
        np.testing.assert_allclose(two[k], one[k], rtol=1e-3, atol=1e-3, err_msg=k)


def test_sigterm_to_one_process_checkpoints_both_at_an_agreed_step(tmp_path):
    config, mesh = _config(tmp_path), dict(data=2, stack=1, latent=4)
    work = str(tmp_path / "run")
    ckpts = os.path.join(work, "train", GROUP, "checkpoints")
    procs = _start(config, work, 400, mesh, 2)
    t0 = time.time()
    while not os.path.isdir(os.path.join(ckpts, "50")):
        assert all(p.poll() is None for p in procs) and time.time() - t0 < 120
        time.sleep(0.05)
    procs[1].send_signal(signal.SIGTERM)  # only one process is told
    errs = _finish(procs, code=75)
    saved = max(int(n) for n in os.listdir(ckpts) if n.isdigit())
    assert 50 < saved < 400
    assert f"preempted: checkpoint at step {saved} saved" in errs[0]
    # Restart the same run as one process with 8 devices: it resumes there (other process count).
    procs = _start(config, work, 400, mesh, 1)
    err = _finish(procs)[0]
    assert f"resumed from the checkpoint at step {saved}" in err
    with open(os.path.join(work, "train", GROUP, "metrics.jsonl")) as fh:
        steps = [json.loads(ln)["step"] for ln in fh]
    assert steps == list(range(10, 401, 10))


def _evaluate(workdir, processes):
    """``saejax evaluate`` of the tiny default's trained workdir as ``processes`` processes, with the
    transcoders' replacement model (evaluate.replacement)."""
    spec = os.path.join(REPO, "experiments", "default.py") + ":runlocal"
    port, procs = _port(), []
    for i in range(processes):
        env = {**os.environ, "JAX_PLATFORMS": "cpu",
               "XLA_FLAGS": f"--xla_force_host_platform_device_count={4 // processes} {SLOW_OK}"}
        if processes > 1:
            env.update(SAEJAX_COORDINATOR=f"localhost:{port}", SAEJAX_NUM_PROCESSES=str(processes),
                       SAEJAX_PROCESS_ID=str(i))
        procs.append(subprocess.Popen([sys.executable, "-m", "saejax.cli", "evaluate", "--config", spec,
                                       f"--config.workdir={workdir}", "--config.evaluate.replacement=True"],
                                      cwd=REPO, env=env,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
    errs = _finish(procs)
    evaluate = os.path.join(workdir, "evaluate")
    with open(os.path.join(evaluate, "results.json")) as fh:
        doc = json.load(fh)
    cards = {}
    for name in sorted(os.listdir(os.path.join(evaluate, "cards"))):
        with open(os.path.join(evaluate, "cards", name)) as fh:
            cards[name] = fh.read()
    return doc, cards, sorted(os.listdir(evaluate)), errs


def test_two_processes_evaluate_like_one_process(tmp_path):
    """The tiny default (SAE and transcoder groups, with evaluate.replacement): sites and the
    transcoders' replacement models split over 2 processes, results gathered
    to process 0: results.json equals one process's exactly (every site's SAEs run on one device,
    so the numbers do not depend on the split), and so do the latent cards."""
    import shutil
    spec = os.path.join(REPO, "experiments", "default.py") + ":runlocal"
    one = str(tmp_path / "one")
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    for stage in ("harvest", "train"):
        out = subprocess.run([sys.executable, "-m", "saejax.cli", stage, "--config", spec,
                              f"--config.workdir={one}"], cwd=REPO, env=env, capture_output=True,
                             text=True, timeout=600)
        assert out.returncode == 0, out.stderr[-3000:]
    two = str(tmp_path / "two")
    shutil.copytree(one, two)
    doc1, cards1, files1, _ = _evaluate(one, 1)
    doc2, cards2, files2, errs = _evaluate(two, 2)
    # work units: the sites of every group, then each transcoder member's replacement model
    reps = {(r["group"], r["member"]) for r in doc1["saes"] if r["kind"] == "transcoder"}
    n = len({(r["group"], r["t"]) for r in doc1["saes"]}) + len(reps)
    for i, err in enumerate(errs):  # each process evaluated its half
        assert f"process {i} of 2 evaluated {(n + 1 - i) // 2} of {n} work units" in err, err[-2000:]
    kinds = {r["kind"] for r in doc1["saes"]}
    assert "transcoder" in kinds and len(kinds) > 1 and len(doc1["saes"]) > 4
    assert all(r["delta_lm_loss"] is not None and r["card"] for r in doc1["saes"])
    assert sorted((r["group"], r["member"]) for r in doc1["replacements"]) == sorted(reps)
    assert doc2 == doc1
    assert cards2 == cards1 and len(cards1) == len(doc1["saes"])
    assert files2 == files1 == ["cards", "results.json"]  # no parts left behind
    assert not [n for n in os.listdir(two) if n.startswith("evaluate.tmp")]
