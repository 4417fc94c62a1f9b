# SPDX-License-Identifier: Apache-2.0
"""The only importer of ``torch.distributed``: process-group set-up and the few collectives used."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from detrkit.errors import UserError


@dataclass(frozen=True)
class DistContext:
    """Where this process stands: rank, world size and device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _env_int(*names: str, default: int) -> int:
    for name in names:
        if name in os.environ:
            return int(os.environ[name])
    return default


_DEVICE_PATTERN = re.compile(r"cpu|mps|cuda(?::\d+)?")


def _mps_available() -> bool:
    return bool(getattr(torch.backends, "mps", None)) and torch.backends.mps.is_available()


def available_devices() -> list[str]:
    """The devices this machine can run on, e.g. ``["cpu", "cuda", "cuda:0", "cuda:1"]``."""
    found = ["cpu"]
    if torch.cuda.is_available():
        found += ["cuda"] + [f"cuda:{index}" for index in range(torch.cuda.device_count())]
    if _mps_available():
        found.append("mps")
    return found


def choose_device(requested: str | torch.device | None = None) -> torch.device:
    """``requested`` if given, else CUDA, then MPS, then CPU.

    Raises:
        UserError: ``requested`` is no device name (valid: cpu, cuda, cuda:N, mps) or names one
            this machine does not have; the message lists the available ones.
    """
    if isinstance(requested, torch.device):
        return requested
    if requested:
        return _checked_device(requested.strip().lower())
    if torch.cuda.is_available():
        return torch.device("cuda")
    if _mps_available():
        return torch.device("mps")
    return torch.device("cpu")


def _checked_device(name: str) -> torch.device:
    # Checked here, not left to torch: an unknown name or a missing GPU would otherwise fail
    # deep inside model building with a traceback.
    available = ", ".join(available_devices())
    if not _DEVICE_PATTERN.fullmatch(name):
        raise UserError(
            f"--device {name}: unknown device; valid: cpu, cuda, cuda:N, mps "
            f"(available here: {available})"
        )
    if name not in available_devices():
        why = "torch sees no CUDA GPU" if name.startswith("cuda") else "not available"
        if name.startswith("cuda") and torch.cuda.is_available():
            why = f"only {torch.cuda.device_count()} CUDA device(s)"
        raise UserError(f"--device {name}: {why} on this machine; available: {available}")
    return torch.device(name)


def init_distributed(device: str | None = None) -> DistContext:
    """Join the process group described by torchrun (or Slurm) environment variables, if any.

    torchrun sets RANK/WORLD_SIZE/LOCAL_RANK and the rendezvous address; a job started with
    ``srun`` (one task per GPU) gives SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID instead, and the
    first host of SLURM_JOB_NODELIST becomes the address (set MASTER_PORT to pick the port).
    """
    world_size = _env_int("WORLD_SIZE", "SLURM_NTASKS", default=1)
    rank = _env_int("RANK", "SLURM_PROCID", default=0)
    local_rank = _env_int("LOCAL_RANK", "SLURM_LOCALID", default=0)
    chosen = choose_device(device)
    if chosen.type == "cuda":
        chosen = torch.device("cuda", local_rank % max(torch.cuda.device_count(), 1))
        torch.cuda.set_device(chosen)
    if world_size > 1 and not dist.is_initialized():
        # torchrun sets MASTER_ADDR; under plain srun every task derives the first node's name.
        nodes = os.environ.get("SLURM_JOB_NODELIST") if "RANK" not in os.environ else None
        os.environ.setdefault("MASTER_ADDR", first_slurm_host(nodes) if nodes else "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29500")
        backend = "nccl" if chosen.type == "cuda" else "gloo"
        dist.init_process_group(backend, rank=rank, world_size=world_size)
    return DistContext(rank, world_size, local_rank, chosen)


def first_slurm_host(nodelist: str) -> str:
    """The first host of a Slurm node list: "gpu[003-005,9],cpu1" -> "gpu003"."""
    match = re.match(r"([^,\[]+)(?:\[([^\],-]+))?", nodelist.strip())
    if not match:
        raise ValueError(f"cannot read a host name from SLURM_JOB_NODELIST={nodelist!r}")
    prefix, first_index = match.groups()
    return prefix + (first_index or "")


def all_reduce_mean(value: Tensor) -> Tensor:
    """Mean of ``value`` over ranks (identity without a process group)."""
    if not (dist.is_available() and dist.is_initialized()):
        return value
    value = value.clone()
    dist.all_reduce(value)
    return value / dist.get_world_size()


def all_true(flag: bool) -> bool:
    """Whether ``flag`` holds on every rank (``flag`` itself without a process group)."""
    if not (dist.is_available() and dist.is_initialized()):
        return flag
    value = torch.tensor([int(flag)], device=_collective_device())
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return bool(value.item())


def mean_over_ranks(value: float) -> float:
    """The mean of a Python number over ranks (for logging)."""
    if not (dist.is_available() and dist.is_initialized()):
        return value
    tensor = torch.tensor([value], dtype=torch.float64, device=_collective_device())
    return all_reduce_mean(tensor).item()


def _collective_device() -> torch.device:
    """NCCL reduces CUDA tensors only; gloo CPU tensors."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_gather_object(obj: object) -> list[object]:
    """Every rank's ``obj`` (a one-element list without a process group)."""
    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
