"""The Warmup-Stable-Decay learning-rate schedule LLaDA used, as one pure function."""

from __future__ import annotations


def wsd_lr(
    step: int,
    *,
    lr: float,
    max_steps: int,
    warmup_steps: int,
    drop_step: int | None = None,
    drop_lr: float | None = None,
    decay_steps: int = 0,
    final_lr: float = 0.0,
) -> float:
    """Learning rate at optimizer step ``step`` (0-based).

    Linear warmup from lr/warmup_steps to ``lr`` over ``warmup_steps``; constant ``lr``; from
    ``drop_step`` on, constant ``drop_lr`` (LLaDA: 4e-4 -> 1e-4 after 1.2T tokens); over the last
    ``decay_steps`` steps, linear decay from the current level to ``final_lr`` (LLaDA: to 1e-5).
    """
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    level = drop_lr if drop_step is not None and drop_lr is not None and step >= drop_step else lr
    decay_start = max_steps - decay_steps
    if decay_steps > 0 and step >= decay_start:
        # the level in force when the decay starts
        if drop_step is not None and drop_lr is not None and decay_start >= drop_step:
            level = drop_lr
        frac = (step - decay_start + 1) / decay_steps
        return level + (final_lr - level) * frac
    return level
