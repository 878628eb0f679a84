"""Training for snapc: one loop (snapc.train.loop) and the methods that plug into it.

- ``RecoveryDistillation``: win back what block removal lost (task + output KD + feature KD).
- ``RobustTraining``: the full UNet learns to work with blocks skipped (SnapFusion).
- ``distill_recovery``: the whole ``snapc distill`` flow (search, robust, recover, write).
- ``StepDistillation``: one progressive round of guided step distillation (snapc.train.steps);
  ``distill_steps``: ``snapc distill --sampling-steps N``, every round, then the folder.
"""

from snapc.train.checkpoint import CheckpointError
from snapc.train.distill import RecoveryOptions, RobustOptions, checkpoint_folder, distill_recovery
from snapc.train.distill_steps import StepOptions, distill_steps
from snapc.train.loop import Method, TrainingDivergedError, TrainProgress, TrainResult, train
from snapc.train.options import RecoveryLoss, TrainOptions
from snapc.train.recovery import RecoveryDistillation, RobustTraining
from snapc.train.steps import StepDistillation, StepLoss

__all__ = [
    "CheckpointError",
    "Method",
    "RecoveryDistillation",
    "RecoveryLoss",
    "RecoveryOptions",
    "RobustOptions",
    "RobustTraining",
    "StepDistillation",
    "StepLoss",
    "StepOptions",
    "TrainOptions",
    "TrainProgress",
    "TrainResult",
    "TrainingDivergedError",
    "checkpoint_folder",
    "distill_recovery",
    "distill_steps",
    "train",
]
