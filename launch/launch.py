#!/usr/bin/env python3
"""Start one saejax command on every host of a cluster (or several processes on this machine).

Every target ends in the same entry point: each process runs

    saejax <stage> --config <experiment> [--config.a.b=v ...]

with the environment that tells ``saejax.mesh.init_distributed`` who it is:

    SAEJAX_COORDINATOR    host:port of process 0 (unset on TPU VMs: JAX detects the pod itself)
    SAEJAX_NUM_PROCESSES  number of processes
    SAEJAX_PROCESS_ID     this process's index

Targets:
    local    N processes on this machine (CPU; each sees --devices virtual devices)
    tpu-vm   a Cloud TPU VM slice: copy the code to every worker, install it, run on all workers
    xpk      a GKE TPU cluster through xpk (queued workloads)
    slurm    a GPU cluster under SLURM: an sbatch script with one process per node

Every target has --dry-run, which prints the commands it would run and runs nothing.

    python launch/launch.py local --processes 2 -- train --config experiments/synthetic.py:runlocal
    python launch/launch.py tpu-vm --tpu my-v5p-128 --zone us-east5-a --dry-run -- run --config experiments/gemma2_2b.py
"""
from __future__ import annotations

import argparse
import os
import shlex
import socket
import subprocess
import sys
import threading

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REMOTE_DIR = "saejax"  # the code's folder in each TPU worker's home directory


def _saejax_cmd(args: list[str]) -> str:
    return ".venv/bin/saejax " + " ".join(shlex.quote(a) for a in args)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------------------------
# local: several processes on this machine, through the same entry point as a cluster.


def local_commands(n: int, devices: int, args: list[str], port: int) -> list[tuple[dict, list[str]]]:
    """(environment additions, argv) for each local process."""
    out = []
    for i in range(n):
        env = {"SAEJAX_COORDINATOR": f"localhost:{port}", "SAEJAX_NUM_PROCESSES": str(n),
               "SAEJAX_PROCESS_ID": str(i), "JAX_PLATFORMS": "cpu",
               "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
        out.append((env, [sys.executable, "-m", "saejax.cli", *args]))
    return out


def _pump(proc, prefix: str) -> None:
    for line in proc.stdout:
        sys.stdout.write(f"{prefix} {line}")
        sys.stdout.flush()


def run_local(n: int, devices: int, args: list[str], dry_run: bool) -> int:
    port = _free_port()
    cmds = local_commands(n, devices, args, port)
    if dry_run:
        for env, argv in cmds:
            print(" ".join(f"{k}={shlex.quote(v)}" for k, v in env.items()), " ".join(map(shlex.quote, argv)))
        return 0
    procs, pumps = [], []
    for i, (env, argv) in enumerate(cmds):
        p = subprocess.Popen(argv, env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True, bufsize=1)
        t = threading.Thread(target=_pump, args=(p, f"[p{i}]"), daemon=True)
        t.start()
        procs.append(p)
        pumps.append(t)
    codes = [p.wait() for p in procs]
    for t in pumps:
        t.join()
    bad = [(i, c) for i, c in enumerate(codes) if c != 0]
    if bad:
        print(f"launch: process {bad[0][0]} exited with code {bad[0][1]}", file=sys.stderr)
        return bad[0][1]
    return 0


# ---------------------------------------------------------------------------------------------
# Cloud TPU VMs: every worker of the slice runs the same command; JAX finds the pod by itself.


def tpu_vm_commands(tpu: str, zone: str, project: str | None, args: list[str]) -> list[list[str]]:
    where = ["--zone", zone] + (["--project", project] if project else [])
    setup = f"cd ~/{REMOTE_DIR} && bash setup.sh tpu && {_saejax_cmd(args)}"
    return [
        ["gcloud", "compute", "tpus", "tpu-vm", "ssh", tpu, *where, "--worker=all",
         "--command", f"mkdir -p ~/{REMOTE_DIR}"],
        ["gcloud", "compute", "tpus", "tpu-vm", "scp", "--recurse", *where, "--worker=all",
         *_code_paths(), f"{tpu}:~/{REMOTE_DIR}/"],
        ["gcloud", "compute", "tpus", "tpu-vm", "ssh", tpu, *where, "--worker=all", "--command", setup],
    ]


def _code_paths() -> list[str]:
    """What a worker needs: the package, its configs and the installer (not runs/ or .venv/)."""
    names = ["saejax", "experiments", "setup.cfg", "pyproject.toml", "setup.sh", "README.md"]
    return [os.path.join(REPO, n) for n in names]


# ---------------------------------------------------------------------------------------------
# GKE through xpk: a queued workload on a TPU cluster; the image must hold the code (see docs).


def xpk_commands(cluster: str, tpu_type: str, slices: int, workload: str, image: str,
                 project: str | None, zone: str | None, args: list[str]) -> list[list[str]]:
    cmd = ["xpk", "workload", "create", "--cluster", cluster, "--workload", workload,
           "--tpu-type", tpu_type, "--num-slices", str(slices), "--docker-image", image,
           "--command", f"cd /app && {_saejax_cmd(args)}"]
    if project:
        cmd += ["--project", project]
    if zone:
        cmd += ["--zone", zone]
    return [cmd]


# ---------------------------------------------------------------------------------------------
# SLURM: one process per node; the coordinator is the first node of the allocation.


def slurm_script(nodes: int, gpus_per_node: int, time_limit: str, partition: str | None,
                 args: list[str]) -> str:
    lines = [
        "#!/bin/bash",
        "#SBATCH --job-name=saejax",
        f"#SBATCH --nodes={nodes}",
        "#SBATCH --ntasks-per-node=1",
        f"#SBATCH --gpus-per-node={gpus_per_node}",
        f"#SBATCH --time={time_limit}",
        *([f"#SBATCH --partition={partition}"] if partition else []),
        "#SBATCH --signal=TERM@120  # saejax checkpoints at an agreed step on SIGTERM, then exits 75",
        "set -euo pipefail",
        f"cd {shlex.quote(REPO)}",
        'head=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
        "export SAEJAX_COORDINATOR=\"$head:12355\"",
        "export SAEJAX_NUM_PROCESSES=$SLURM_NTASKS",
        "srun bash -c 'SAEJAX_PROCESS_ID=$SLURM_PROCID " + _saejax_cmd(args).replace("'", "'\\''") + "'",
    ]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------


def _print_cmds(cmds: list[list[str]]) -> None:
    for c in cmds:
        print(" ".join(shlex.quote(x) for x in c))


def _run_cmds(cmds: list[list[str]]) -> int:
    for c in cmds:
        print("+", " ".join(shlex.quote(x) for x in c), flush=True)
        code = subprocess.call(c)
        if code:
            return code
    return 0


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--" not in argv:
        print("launch: give the saejax command after '--', e.g. -- run --config experiments/default.py",
              file=sys.stderr)
        return 2
    cut = argv.index("--")
    ours, saejax_args = argv[:cut], argv[cut + 1:]
    p = argparse.ArgumentParser(prog="launch.py", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="target", required=True)
    lo = sub.add_parser("local", help="N processes on this machine")
    lo.add_argument("--processes", type=int, default=2)
    lo.add_argument("--devices", type=int, default=1, help="virtual CPU devices per process")
    tv = sub.add_parser("tpu-vm", help="a Cloud TPU VM slice (all workers)")
    tv.add_argument("--tpu", required=True)
    tv.add_argument("--zone", required=True)
    tv.add_argument("--project")
    xp = sub.add_parser("xpk", help="a GKE TPU cluster through xpk")
    xp.add_argument("--cluster", required=True)
    xp.add_argument("--tpu-type", required=True, help="e.g. v5p-128")
    xp.add_argument("--num-slices", type=int, default=1)
    xp.add_argument("--workload", default="saejax")
    xp.add_argument("--docker-image", required=True, help="an image with this repo at /app, set up by setup.sh")
    xp.add_argument("--project")
    xp.add_argument("--zone")
    sl = sub.add_parser("slurm", help="a SLURM GPU cluster (sbatch)")
    sl.add_argument("--nodes", type=int, required=True)
    sl.add_argument("--gpus-per-node", type=int, default=8)
    sl.add_argument("--time", default="24:00:00")
    sl.add_argument("--partition")
    for s in (lo, tv, xp, sl):
        s.add_argument("--dry-run", action="store_true", help="print the commands; run nothing")
    a = p.parse_args(ours)
    if not saejax_args:
        print("launch: no saejax command after '--'", file=sys.stderr)
        return 2

    if a.target == "local":
        if a.processes < 1 or a.devices < 1:
            print("launch: --processes and --devices must be >= 1", file=sys.stderr)
            return 2
        return run_local(a.processes, a.devices, saejax_args, a.dry_run)
    if a.target == "tpu-vm":
        cmds = tpu_vm_commands(a.tpu, a.zone, a.project, saejax_args)
    elif a.target == "xpk":
        cmds = xpk_commands(a.cluster, a.tpu_type, a.num_slices, a.workload, a.docker_image, a.project,
                            a.zone, saejax_args)
    else:
        script = slurm_script(a.nodes, a.gpus_per_node, a.time, a.partition, saejax_args)
        if a.dry_run:
            print(script, end="")
            return 0
        return subprocess.run(["sbatch"], input=script, text=True).returncode
    if a.dry_run:
        _print_cmds(cmds)
        return 0
    return _run_cmds(cmds)


if __name__ == "__main__":
    sys.exit(main())
