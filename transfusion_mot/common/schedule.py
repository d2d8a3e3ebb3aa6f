"""The learning-rate schedule of every training loop: linear warm-up, then cosine decay (the paper's
recipe: 4000 warm-up steps, 3e-4 -> 1.5e-5). A constant schedule after warm-up is `min_lr = base_lr`."""

from __future__ import annotations

import math


def warmup_cosine(step: int, base_lr: float, warmup_steps: int, total_steps: int, min_lr: float,
                  progress: float | None = None) -> float:
    """The learning rate of 0-based `step`: base_lr * (step + 1) / warmup_steps during warm-up, then a cosine
    from base_lr down to min_lr at `total_steps` (and min_lr after it). `progress` in [0, 1], when given,
    replaces the step's position in the decay (a schedule that follows a wall-clock budget)."""
    if warmup_steps > 0 and step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    if progress is None:
        if step >= total_steps:
            return min_lr
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    progress = min(1.0, max(0.0, progress))
    return min_lr + 0.5 * (base_lr - min_lr) * (1 + math.cos(math.pi * progress))


__all__ = ["warmup_cosine"]
