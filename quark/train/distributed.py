"""Process-group set-up for `torchrun` (torch.distributed DDP), and the helpers the loop needs from it.

Choices:
- No launcher of our own: `torchrun --nproc_per_node N -m quark pretrain ...` (add `--nnodes/--rdzv-*` for several
  machines) sets RANK / WORLD_SIZE / LOCAL_RANK, and `setup()` reads them. Without them the run is one process.
- NCCL on CUDA, gloo on CPU (so the DDP path is tested on CPU).
- DDP rather than FSDP: Quark-72M's weights + AdamW state are ~1.2 GB, which fits on any training GPU many times
  over, so sharding them would only add communication.
- Only rank 0 writes files and prints; every rank runs the same number of steps, so collectives stay matched.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Dist:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def pick_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    dev = torch.device(name)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device={name!r} but CUDA is not available; use device='cpu' or 'auto'")
        if dev.index is None:
            dev = torch.device(f"cuda:{local_rank}")
    elif dev.type != "cpu":
        raise ValueError(f"device={name!r}: allowed 'auto', 'cpu', 'cuda', 'cuda:N'")
    return dev


def setup(device: str = "auto") -> Dist:
    """Join the torchrun process group when launched by torchrun; otherwise a single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    dev = pick_device(device, local_rank)
    if world > 1 and not dist.is_initialized():
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo",
                                device_id=dev if dev.type == "cuda" else None)
    return Dist(rank, world, local_rank, dev)


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(t: torch.Tensor, d: Dist) -> torch.Tensor:
    if d.enabled:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def broadcast_object(obj, d: Dist):
    """Rank 0's value on every rank (for decisions such as 'stop now' that must agree)."""
    if not d.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def hardware(d: Dist) -> str:
    if d.device.type == "cuda":
        return f"{torch.cuda.get_device_name(d.device)} x {d.world_size}"
    import platform

    return f"CPU {platform.machine()} ({torch.get_num_threads()} threads) x {d.world_size} process(es)"


# Dense bf16 tensor-core peaks (TFLOP/s) for MFU; matched by substring of the device name.
BF16_PEAK_TFLOPS = {
    "H200": 989.0, "H100 SXM": 989.0, "H100 NVL": 835.0, "H100 PCIe": 756.0, "H100": 989.0, "GH200": 989.0,
    "B200": 2250.0, "A100": 312.0, "A10G": 70.0, "A10": 125.0, "L40S": 362.0, "L40": 181.0, "L4": 121.0,
    "RTX 4090": 165.0, "RTX 4080": 97.0, "RTX 3090": 71.0, "RTX 3080": 59.0, "RTX 3070": 41.0, "V100": 125.0,
    "T4": 65.0,
}


def bf16_peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, tflops in BF16_PEAK_TFLOPS.items():
        if key in name:
            return tflops * 1e12
    return None
