"""Step arithmetic, as kohya users reason about it:

    images x repeats (+ as many regularisation images) = samples per epoch
    samples per epoch / batch size (rounded up per bucket) = batches per epoch
    batches / gradient accumulation (rounded up) = optimizer steps per epoch
    steps per epoch x epochs = total steps   (or: max_train_steps -> epochs = ceil(max / per epoch))
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class StepPlan:
    num_images: int  # distinct training images
    num_train_images: int  # training images x repeats
    num_reg_images: int  # regularisation images x (balanced) repeats
    batch_size: int
    gradient_accumulation_steps: int
    batches_per_epoch: int
    steps_per_epoch: int
    epochs: int
    total_steps: int
    num_buckets: int = 1

    def as_dict(self) -> dict:
        return asdict(self)

    def explain(self) -> str:
        reg = f" + {self.num_reg_images} regularisation" if self.num_reg_images else ""
        samples = self.num_train_images + self.num_reg_images
        repeats = self.num_train_images / self.num_images if self.num_images else 0
        rep = f"{repeats:g}" if float(repeats).is_integer() else f"{repeats:.2f} (avg)"
        bucket_note = f" in {self.num_buckets} buckets" if self.num_buckets > 1 else ""
        return (f"{self.num_images} images x {rep} repeats = {self.num_train_images}{reg} = {samples} samples/epoch; "
                f"/ batch {self.batch_size}{bucket_note} = {self.batches_per_epoch} batches; "
                f"/ accumulation {self.gradient_accumulation_steps} = {self.steps_per_epoch} steps/epoch; "
                f"x {self.epochs} epochs = {self.total_steps} steps")


def plan_steps(*, num_images: int, num_train_images: int, num_reg_images: int, batches_per_epoch: int,
               batch_size: int, gradient_accumulation_steps: int, max_train_epochs: int | None,
               max_train_steps: int, num_buckets: int = 1) -> StepPlan:
    if batches_per_epoch < 1:
        raise ValueError("an epoch needs at least one batch")
    steps_per_epoch = math.ceil(batches_per_epoch / gradient_accumulation_steps)
    if max_train_epochs is not None:
        epochs = max_train_epochs
        total = epochs * steps_per_epoch
    else:
        total = max_train_steps
        epochs = math.ceil(total / steps_per_epoch)
    return StepPlan(num_images, num_train_images, num_reg_images, batch_size, gradient_accumulation_steps,
                    batches_per_epoch, steps_per_epoch, epochs, total, num_buckets)
