"""Data parallelism for ``zoo eval`` under torchrun: the launcher's environment, the process
group, one device per rank, and merging the ranks' shards into one output file.

When torchrun's ``RANK`` / ``WORLD_SIZE`` are set (world size > 1) the process group is
initialised (gloo on CPU, nccl on CUDA, each rank on ``cuda:LOCAL_RANK``); every rank writes its
round-robin share of the samples into its own shard ``run.rankR.jsonl`` (each record signed, see
``zoocli.evaluation.store``); after a barrier rank 0 merges the signed shards (and any earlier
``--out``) into ``--out`` and deletes them; files merely named like shards are left alone. A single
process (world size 1) makes every call here a no-op. torch is imported inside the calls.
"""

from __future__ import annotations

import os
from pathlib import Path

from zoocli.errors import UsageError


def dist_env() -> tuple[int, int, int]:
    """(rank, world size, local rank) from the launcher's environment (torchrun), else (0, 1, 0)."""
    def num(name: str, default: int) -> int:
        v = os.environ.get(name)
        try:
            return int(v) if v is not None and v.strip() else default
        except ValueError:
            raise UsageError(f"environment variable {name}={v!r} is not an integer") from None

    world = num("WORLD_SIZE", 1)
    rank = num("RANK", 0)
    local = num("LOCAL_RANK", rank)
    if world < 1 or not 0 <= rank < world:
        raise UsageError(f"RANK={rank} / WORLD_SIZE={world} are inconsistent")
    return rank, world, local


def rank_device(device: str, world: int, local: int) -> str:
    """One GPU per rank under torchrun: ``auto`` / ``cuda`` become ``cuda:LOCAL_RANK``."""
    spec = device.strip().lower()
    if world == 1:
        return spec
    if spec == "auto":
        import torch

        spec = "cuda" if torch.cuda.is_available() else "cpu"
    if spec == "cuda":
        return f"cuda:{local}"
    return spec


class ProcessGroup:
    """The process group of a torchrun launch (a no-op for one process)."""

    def __init__(self, world: int, rank: int, local: int, device: str):
        self.world, self.rank, self.local = world, rank, local
        self.device = device
        self.backend = None

    def init(self) -> None:
        if self.world == 1:
            return
        import torch
        import torch.distributed as dist

        self.backend = "nccl" if self.device.startswith("cuda") else "gloo"
        if self.backend == "nccl":
            torch.cuda.set_device(self.local)
        if not dist.is_initialized():
            dist.init_process_group(backend=self.backend, rank=self.rank, world_size=self.world)

    def barrier(self) -> None:
        if self.world == 1:
            return
        import torch.distributed as dist

        if self.backend == "nccl":
            dist.barrier(device_ids=[self.local])
        else:
            dist.barrier()

    def totals(self, predictions: int, seconds: float) -> tuple[int, float]:
        """All ranks' predictions summed and the slowest rank's seconds (a collective call)."""
        if self.world == 1:
            return predictions, seconds
        import torch
        import torch.distributed as dist

        dev = f"cuda:{self.local}" if self.backend == "nccl" else "cpu"
        n = torch.tensor([float(predictions)], dtype=torch.float64, device=dev)
        t = torch.tensor([float(seconds)], dtype=torch.float64, device=dev)
        dist.all_reduce(n, op=dist.ReduceOp.SUM)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return int(n.item()), float(t.item())

    def close(self) -> None:
        if self.world == 1:
            return
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def merge_into(out: Path) -> None:
    """Merge every shard a torchrun run wrote for ``out`` (``zoo_shards``: signed) into ``out``
    (``merge_shards`` keeps what ``out`` already holds) in canonical (sorted) form, then delete
    those shards. Rank 0 calls it after the barrier (one process: shards a crashed torchrun run
    left)."""
    from zoocli.evaluation.store import merge_shards, zoo_shards

    shards = zoo_shards(out)
    if shards or out.exists():
        merge_shards(shards, out)
        for p in shards:
            p.unlink(missing_ok=True)
