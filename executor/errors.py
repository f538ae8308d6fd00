"""Errors the executor raises for mistakes a user can fix (wrong launch, wrong plan, unsupported model layout)."""

import math

from planner.errors import AutoparError


class ExecutorError(AutoparError):
    """A plan that cannot be run as launched, with what to change."""


class LossDiverged(ExecutorError):
    """The training loss became NaN or infinite; the run stops before that state is saved."""

    def __init__(self, step: int, loss: float) -> None:
        self.step, self.loss = step, loss
        what = "NaN" if math.isnan(loss) else ("inf" if loss > 0 else "-inf")
        super().__init__(
            f"loss became {what} at step {step}; the run was stopped and this state was not saved. Lower the "
            "learning rate, add --clip-grad, or resume from the last checkpoint"
        )
