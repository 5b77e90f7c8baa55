"""How a run's steps are laid out: the batch geometry (a global batch split over ranks and
gradient-accumulation rounds) and the learning rate as a function of the image count (EDM's
linear ramp-up; EDM2's ``learning_rate_schedule`` has the same shape). Plain Python numbers:
nothing here touches the device, so the loop can call it every step without a host sync.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

__all__ = ["BatchGeometry", "LearningRateSchedule"]


@dataclasses.dataclass(frozen=True)
class BatchGeometry:
    """A global batch of ``batch`` images over ``world_size`` ranks: each rank takes ``per_rank``
    of them in ``rounds`` chunks of ``batch_gpu`` (gradient accumulation)."""

    batch: int
    world_size: int
    per_rank: int
    batch_gpu: int
    rounds: int

    @classmethod
    def resolve(cls, batch: int, batch_gpu: Optional[int], world_size: int) -> "BatchGeometry":
        """The geometry of ``batch`` on ``world_size`` ranks; ``batch_gpu`` None = one round.
        ValueError when the batch does not split evenly."""
        if batch % world_size:
            raise ValueError(f"batch ({batch}) must be divisible by the number of ranks ({world_size})")
        per_rank = batch // world_size
        batch_gpu = batch_gpu or per_rank
        if per_rank % batch_gpu:
            raise ValueError(
                f"batch per rank ({per_rank} = batch {batch} / {world_size} ranks) must be a "
                f"multiple of batch_gpu ({batch_gpu})"
            )
        return cls(
            batch=batch, world_size=world_size, per_rank=per_rank, batch_gpu=batch_gpu, rounds=per_rank // batch_gpu
        )


@dataclasses.dataclass(frozen=True)
class LearningRateSchedule:
    """``lr`` after a linear ramp-up over the first ``rampup_kimg`` thousand images (None or 0:
    no ramp-up): lr(n) = lr · min(n / (rampup_kimg·1000), 1)."""

    lr: float
    rampup_kimg: Optional[float] = None

    def __call__(self, cur_nimg: int) -> float:
        """The learning rate of the step that starts at image ``cur_nimg``."""
        scale = 1.0 if not self.rampup_kimg else min(cur_nimg / (self.rampup_kimg * 1000), 1.0)
        return self.lr * scale

    def apply(self, optimizer, cur_nimg: int) -> None:
        """Set every parameter group of ``optimizer`` to the rate at ``cur_nimg``."""
        lr = self(cur_nimg)
        for group in optimizer.param_groups:
            group["lr"] = lr
