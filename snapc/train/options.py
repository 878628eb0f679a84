"""Options of a training run, one frozen dataclass per concern; the CLI builds them."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from snapc.errors import SnapcError

__all__ = ["TrainOptions", "RecoveryLoss", "LR_DECAYS"]

LR_DECAYS = ("constant", "cosine")


@dataclass(frozen=True)
class TrainOptions:
    """How long and how to optimise: steps or minutes, batch, AdamW, EMA, checkpoints.

    ``steps`` and ``minutes`` both bound the run; whichever comes first ends it (``minutes``
    counts training time only, summed over resumed runs). ``batch`` is the global batch,
    split evenly over data-parallel processes. ``device`` ``auto`` is CUDA when present.
    ``lr_decay`` ``cosine`` anneals the learning rate after the warm-up to 0 at the end of the
    run, measured by whichever bound (steps or minutes) is nearer; ``constant`` keeps it.
    """

    steps: int | None = None
    minutes: float | None = None
    batch: int = 64
    lr: float = 1e-4
    warmup: int = 100
    lr_decay: str = "constant"
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    ema: float = 0.995
    seed: int = 0
    device: str = "auto"
    checkpoint_every: int = 200
    keep_checkpoints: int = 2
    log_every: int = 10

    def check(self) -> None:
        """Raise SnapcError naming the option when a value is out of range."""
        if self.steps is None and self.minutes is None:
            raise SnapcError("give a training length: --steps N or --minutes M")
        if self.steps is not None and self.steps < 1:
            raise SnapcError(f"--steps must be >= 1, not {self.steps}")
        if self.minutes is not None and not (self.minutes > 0 and math.isfinite(self.minutes)):
            raise SnapcError(f"--minutes must be > 0, not {self.minutes}")
        if self.batch < 1:
            raise SnapcError(f"--batch must be >= 1, not {self.batch}")
        if not self.lr > 0:
            raise SnapcError(f"--lr must be > 0, not {self.lr}")
        if self.lr_decay not in LR_DECAYS:
            raise SnapcError(f"unknown --lr-decay {self.lr_decay!r}; use one of "
                             f"{', '.join(LR_DECAYS)}")
        if not 0.0 <= self.ema < 1.0:
            raise SnapcError(f"--ema must be in [0, 1), not {self.ema}")
        if self.checkpoint_every < 1:
            raise SnapcError(f"--checkpoint-every must be >= 1, not {self.checkpoint_every}")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise SnapcError(f"unknown --train-device {self.device!r}; use auto, cpu or cuda")

    def to_json(self) -> dict:
        """Return the options as a JSON-ready dict."""
        return asdict(self)


@dataclass(frozen=True)
class RecoveryLoss:
    """BK-SDM's recovery loss weights: task (student eps vs the true noise), output KD
    (student eps vs the teacher's) and feature KD (stage outputs vs the teacher's)."""

    task: float = 1.0
    output_kd: float = 1.0
    feature_kd: float = 1.0
    caption_dropout: float = 0.1

    def check(self) -> None:
        """Raise SnapcError when a weight is negative or all are zero."""
        weights = (self.task, self.output_kd, self.feature_kd)
        if min(weights) < 0 or max(weights) == 0:
            raise SnapcError("loss weights must be >= 0 and not all 0 "
                             "(--task-weight, --kd-weight, --feature-weight)")
        if not 0.0 <= self.caption_dropout < 1.0:
            raise SnapcError(f"--caption-dropout must be in [0, 1), not {self.caption_dropout}")

    def to_json(self) -> dict:
        """Return the weights as a JSON-ready dict."""
        return asdict(self)
