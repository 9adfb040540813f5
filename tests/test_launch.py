"""Launchers: every target's --dry-run prints the commands it would run; local mode really runs
several processes through the same entry point (saejax.cli with SAEJAX_* environment)."""
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = [sys.executable, os.path.join(REPO, "launch", "launch.py")]


def _dry(*args):
    out = subprocess.run([*LAUNCH, *args], capture_output=True, text=True, check=True)
    return out.stdout


def test_tpu_vm_dry_run_copies_installs_and_runs_on_every_worker():
    out = _dry("tpu-vm", "--tpu", "pod1", "--zone", "us-east5-a", "--dry-run", "--",
               "train", "--config", "experiments/gemma2_2b.py:width=16k")
    lines = out.strip().splitlines()
    assert len(lines) == 3
    assert all("--worker=all" in l and "--zone us-east5-a" in l for l in lines)
    assert lines[1].startswith("gcloud compute tpus tpu-vm scp --recurse") and "pod1:~/saejax/" in lines[1]
    assert "bash setup.sh tpu && .venv/bin/saejax train --config experiments/gemma2_2b.py:width=16k" in lines[2]


def test_xpk_dry_run_names_cluster_slice_and_command():
    out = _dry("xpk", "--cluster", "c1", "--tpu-type", "v5p-128", "--docker-image", "gcr.io/p/saejax",
               "--dry-run", "--", "run", "--config", "experiments/gemma2_9b.py")
    assert out.startswith("xpk workload create --cluster c1")
    assert "--tpu-type v5p-128" in out and "--docker-image gcr.io/p/saejax" in out
    assert ".venv/bin/saejax run --config experiments/gemma2_9b.py" in out


def test_slurm_dry_run_sets_the_coordinator_and_process_ids():
    out = _dry("slurm", "--nodes", "4", "--dry-run", "--", "train", "--config", "experiments/gemma2_2b.py")
    assert "#SBATCH --nodes=4" in out and "#SBATCH --ntasks-per-node=1" in out
    assert 'export SAEJAX_COORDINATOR="$head:12355"' in out
    assert "SAEJAX_PROCESS_ID=$SLURM_PROCID .venv/bin/saejax train --config experiments/gemma2_2b.py" in out


def test_local_dry_run_gives_each_process_its_id():
    out = _dry("local", "--processes", "3", "--devices", "2", "--dry-run", "--", "train", "--config", "x.py")
    lines = out.strip().splitlines()
    assert len(lines) == 3
    for i, l in enumerate(lines):
        assert f"SAEJAX_PROCESS_ID={i}" in l and "SAEJAX_NUM_PROCESSES=3" in l
        assert "--xla_force_host_platform_device_count=2" in l and l.endswith("-m saejax.cli train --config x.py")


def test_missing_command_is_a_one_line_error():
    out = subprocess.run([*LAUNCH, "local", "--dry-run"], capture_output=True, text=True)
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1 and "'--'" in out.stderr


def test_local_processes_train_through_the_cli(tmp_path):
    """Two processes on localhost train one synthetic group; both see two processes and finish."""
    workdir = tmp_path / "w"
    out = subprocess.run(
        [*LAUNCH, "local", "--processes", "2", "--devices", "2", "--", "train",
         "--config", os.path.join(REPO, "experiments", "synthetic.py") + ":runlocal",
         f"--config.workdir={workdir}", "--config.train.tokens=5120", "--config.train.batch_size=512",
         "--config.sae.widths=(64,)", "--config.train.log_every=5"],
        capture_output=True, text=True, cwd=REPO, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    assert "[p0]" in out.stdout and "[p1]" in out.stdout
    finals = list(workdir.glob("train/*/final/params.safetensors"))
    assert len(finals) == 1
