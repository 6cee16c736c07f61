"""Training: the EDM2 training loop, learning-rate schedule, power-function EMA, post-hoc EMA,
checkpoints and snapshots (the torch.distributed set-up it uses is fastdiff._dist).

Heavy pieces are imported lazily so that ``import fastdiff.training.phema`` stays light.
"""

from fastdiff.training.phema import (
    PowerFunctionEMA,
    exp_to_std,
    power_function_beta,
    power_function_correlation,
    solve_posthoc_coefficients,
    std_to_exp,
)
from fastdiff.training.units import format_nimg, parse_nimg

__all__ = [
    "PowerFunctionEMA", "exp_to_std", "std_to_exp", "power_function_beta", "power_function_correlation",
    "solve_posthoc_coefficients", "parse_nimg", "format_nimg",
    "learning_rate_schedule", "TrainConfig", "training_loop",
]


def __getattr__(name):
    if name in ("learning_rate_schedule", "TrainConfig", "training_loop"):
        from fastdiff.training import loop

        return getattr(loop, name)
    raise AttributeError(f"module 'fastdiff.training' has no attribute {name!r}")
