"""Initial learning-rate estimation of paper 000 (section 3).

- :func:`range_test`: fast.ai's LR range test (an exponential LR ramp, stop when the smoothed loss explodes,
  choose the point of steepest descent), run after one epoch at a small LR so that a pretrained model is not
  wrecked by the ramp's large LRs (the paper's change). The slope is a Savitzky-Golay (scipy) local fit of the
  raw losses, centred, so it neither lags the ramp like fast.ai's running average nor is dominated by the first
  few noisy losses, which that average weights most.
- :func:`tpe_search`: Optuna's TPE over an LR interval with median pruning; each trial trains a few epochs and
  reports validation top-1 after each.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np


@dataclasses.dataclass
class RangeTest:
    lrs: list[float]
    losses: list[float]
    """The raw loss of each step (before its update)."""
    smoothed: list[float]
    """The Savitzky-Golay smoothed losses the choice was made on."""
    chosen: float


def steepest_point(lrs: list[float], losses: list[float], *, skip_start: float = 0.1,
                   window_fraction: float = 0.2) -> tuple[float, np.ndarray]:
    """The LR where the loss falls fastest per unit of log LR, and the smoothed losses.

    ``lrs`` must be a geometric ramp (equal steps in log LR). Loss and slope are local quadratic least-squares
    fits over a centred window of ``window_fraction`` of the points (at least 5); the search skips the first
    ``skip_start`` of the points and ends at the minimum of the smoothed loss (beyond it the loss only rises).
    """
    from scipy.signal import savgol_filter

    if len(lrs) < 5:
        from .errors import TrainError

        raise TrainError(f"the LR range test has {len(lrs)} usable points (the loss diverged or --range-steps is "
                         "too small); it needs at least 5: raise --range-steps, or give --lr")
    values = np.asarray(losses, dtype=np.float64)
    window = min(max(5, int(window_fraction * len(values)) | 1), (len(values) - 1) | 1)
    smoothed = savgol_filter(values, window, 2, mode="interp")
    slopes = savgol_filter(values, window, 2, deriv=1, mode="interp")
    first = min(int(skip_start * len(values)), len(values) - 1)
    last = first + int(np.argmin(smoothed[first:]))
    return float(lrs[first + int(np.argmin(slopes[first:last + 1]))]), smoothed


def range_test(train_step: Callable[[Any, float], float], batches: Iterable[Any], *, start_lr: float = 1e-6,
               end_lr: float = 1.0, num_steps: int = 100, smoothing: float = 0.98,
               divergence: float = 4.0) -> RangeTest:
    """Ramp the LR geometrically from ``start_lr`` to ``end_lr`` over ``num_steps`` batches of ``batches``
    (``train_step(batch, lr)`` trains one step and returns its loss); stop early once a running average of the
    loss (``smoothing``, bias-corrected) exceeds ``divergence`` times its minimum, or the loss is not finite.
    Returns the points and the steepest-descent LR (:func:`steepest_point`)."""
    ratio = (end_lr / start_lr) ** (1 / max(num_steps - 1, 1))
    lrs: list[float] = []
    losses: list[float] = []
    average, best = 0.0, math.inf
    for step, batch in enumerate(batches):
        if step == num_steps:
            break
        lr = start_lr * ratio ** step
        loss = train_step(batch, lr)
        if not math.isfinite(loss):
            break
        lrs.append(lr)
        losses.append(loss)
        average = smoothing * average + (1 - smoothing) * loss
        running = average / (1 - smoothing ** (step + 1))
        best = min(best, running)
        if step > 0 and running > divergence * best:
            break
    chosen, smoothed = steepest_point(lrs, losses)
    return RangeTest(lrs, losses, smoothed.tolist(), chosen)


def tpe_search(objective: Callable[[float, Callable[[float, int], bool]], float], low: float, high: float, *,
               trials: int = 15, seed: int = 0) -> tuple[float, list[dict[str, float]]]:
    """Optuna TPE over ``[low, high]`` (log scale) maximizing ``objective(lr, report)``.

    ``report(score, epoch)`` records an intermediate validation score and returns True when the trial should
    stop (Optuna's MedianPruner: its best so far is below the median of earlier trials at that epoch).
    Returns the best LR and every finished or pruned trial.
    """
    try:
        import optuna
    except ImportError as error:
        from .errors import TrainError

        raise TrainError("--lr-search tpe needs Optuna: pip install 'reinforce[train]'") from error
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=seed),
                                pruner=optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=1))

    def run_trial(trial: Any) -> float:
        lr = trial.suggest_float("lr", low, high, log=True)

        def report(score: float, epoch: int) -> bool:
            trial.report(score, epoch)
            return trial.should_prune()

        score = objective(lr, report)
        if trial.should_prune():
            raise optuna.TrialPruned()
        return score

    study.optimize(run_trial, n_trials=trials)
    history = [{"lr": t.params["lr"], "score": t.value if t.value is not None else max(t.intermediate_values.values(),
                                                                                            default=float("nan")),
                "pruned": float(t.state == optuna.trial.TrialState.PRUNED)} for t in study.trials]
    return float(study.best_params["lr"]), history
