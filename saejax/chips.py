"""Public figures of the chips a plan can target (``config.mesh.target_chip``), for the step cost
model (saejax.train.cost). Imports nothing heavy: config validation reads the names.

Every figure is the vendor's published one; where a page gives a figure in another unit it is
converted here (bits to bytes, GiB to bytes), and a figure derived from others says how.

ICI (``ici``): what one chip's collectives can move per second, the vendor's per-chip bidirectional
figure. The cost model divides a collective's bytes on the wire (an all-reduce: 2x its operand) by
it: a bidirectional ring along the reduced axis moves half each way. NVLink likewise (900 GB/s per
GPU, bidirectional). ``host_read``: the bytes per second a host can read from a remote store, taken
as its chips' data-center-network bandwidth (the store lives on a bucket or a filer, docs/store.md).
"""
from __future__ import annotations

import dataclasses

GB = 10 ** 9
GIB = 2 ** 30


@dataclasses.dataclass(frozen=True)
class Chip:
    name: str
    bf16_flops: float  # dense bf16 FLOP/s per chip
    hbm_bw: float  # bytes/s per chip
    hbm: float  # device memory per chip, bytes
    ici: float  # bytes/s per chip, bidirectional
    chips_per_host: int
    host_memory: float  # bytes per host (one process per host)
    dcn: float  # data-center network bytes/s per chip
    source: str

    @property
    def host_read(self) -> float:
        """Bytes/s one host (one process) can read from the store."""
        return self.dcn * self.chips_per_host


CHIPS = {c.name: c for c in (
    # https://cloud.google.com/tpu/docs/v5p: 459 TFLOP/s bf16, 95 GB HBM2e at 2,765 GB/s, ICI 4,800 Gbps
    # per chip (the newer table: 1,200 GB/s bidirectional), 4-chip VMs with 448 GB of RAM, DCN 50 Gbps
    # per chip.
    Chip("v5p", 459e12, 2765 * GB, 95 * GB, 1200 * GB, 4, 448 * GB, 50e9 / 8,
         "cloud.google.com/tpu/docs/v5p"),
    # https://cloud.google.com/tpu/docs/v5e: 197 TFLOP/s bf16, 16 GB HBM2 at 819 GB/s, ICI 400 GB/s
    # bidirectional per chip, 8 chips and 512 GiB of DRAM per host, 2 x 100 Gbps NICs per host.
    Chip("v5e", 197e12, 819 * GB, 16 * GB, 400 * GB, 8, 512 * GIB, 2 * 100e9 / 8 / 8,
         "cloud.google.com/tpu/docs/v5e"),
    # https://cloud.google.com/tpu/docs/v4: 275 TFLOP/s bf16, 32 GiB HBM2 at 1,200 GB/s; ICI derived from
    # the page's all-reduce bandwidth per Pod (1.1 PB/s over 4,096 chips: 268 GB/s per chip). Hosts: 4
    # chips, 407 GB of RAM (Compute Engine ct4p-hightpu-4t). DCN: not stated per chip; 50 Gbps as v5p.
    Chip("v4", 275e12, 1200 * GB, 32 * GIB, 1.1e15 / 4096, 4, 407 * GB, 50e9 / 8,
         "cloud.google.com/tpu/docs/v4"),
    # NVIDIA H100 SXM datasheet: 989 TFLOP/s bf16 dense (1,979 with sparsity), 80 GB HBM3 at 3.35 TB/s,
    # NVLink 900 GB/s; DGX H100: 8 GPUs, 2 TB of system memory, 8 x 400 Gb/s ConnectX-7 (one per GPU).
    Chip("h100", 989e12, 3350 * GB, 80 * GB, 900 * GB, 8, 2000 * GB, 400e9 / 8,
         "nvidia.com/en-us/data-center/h100 (datasheet), DGX H100 user guide"),
    # NVIDIA H200 SXM datasheet: 989 TFLOP/s bf16 dense, 141 GB HBM3e at 4.8 TB/s, NVLink 900 GB/s;
    # DGX H200: 8 GPUs, 2 TB of system memory, 8 x 400 Gb/s ConnectX-7.
    Chip("h200", 989e12, 4800 * GB, 141 * GB, 900 * GB, 8, 2000 * GB, 400e9 / 8,
         "nvidia.com/en-us/data-center/h200 (datasheet), DGX H200 user guide"),
)}


def get(name: str) -> Chip:
    return CHIPS[name]
