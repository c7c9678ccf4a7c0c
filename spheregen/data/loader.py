"""Batches decoded in DataLoader worker processes, in the deterministic order of the trainer's sampler.

The workers follow a copy of the sampler (spheregen.engine.state.EpochSampler: next() -> this rank's indices and
flips, .epoch the batch's epoch), prefetching ahead; the trainer's own sampler stays the source of truth for
checkpoints, and every batch is checked against it, so a resumed run (a new WorkerBatches from the restored
sampler) sees exactly the batches an uninterrupted run would.
"""

from __future__ import annotations

import copy

import torch

from spheregen.errors import UserError


class _Plan:
    """An endless batch_sampler: lists of (index, flip, epoch) from a private copy of the sampler."""

    def __init__(self, sampler):
        self.sampler = copy.deepcopy(sampler)

    def __iter__(self):
        while True:
            idx, flips = self.sampler.next()
            epoch = int(self.sampler.epoch)
            yield [(int(i), bool(f), epoch) for i, f in zip(idx.tolist(), flips.tolist())]


def collate(items: list[tuple]) -> tuple:
    """(indices int64 [B], x [B, C, H, W], y int64 [B]), or ("error", message) if an item failed."""
    for _, x, y in items:
        if x is None:
            return "error", y
    idx = torch.tensor([i for i, _, _ in items], dtype=torch.int64)
    return idx, torch.stack([x for _, x, _ in items]), torch.tensor([y for _, _, y in items], dtype=torch.int64)


class WorkerBatches:
    """`dataset[(index, flip, epoch)]` for every item of the sampler's batches, in `workers` processes
    (0: in this process), collated to (x, y)."""

    def __init__(self, dataset, sampler, workers: int = 2, pin_memory: bool = False):
        if workers < 0:
            raise UserError(f"train.data_workers must be >= 0, got {workers}")
        self.loader = torch.utils.data.DataLoader(
            dataset, batch_sampler=_Plan(sampler), num_workers=workers, collate_fn=collate, pin_memory=pin_memory,
            prefetch_factor=2 if workers else None,
            generator=torch.Generator().manual_seed(0))  # its seed draw must not touch the global RNG (resume)
        self._it = iter(self.loader)

    def next(self, expected: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The next batch, which must hold the items `expected` (the trainer's sampler's indices)."""
        got = next(self._it)
        if got[0] == "error":
            raise UserError(got[1])
        idx, x, y = got
        if not torch.equal(idx, expected.cpu().long()):
            raise RuntimeError("the data workers fell out of step with the sampler")
        return x, y

    def close(self) -> None:
        """Stop the worker processes."""
        self._it = None
