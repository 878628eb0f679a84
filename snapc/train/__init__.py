"""Training for snapc: one loop (snapc.train.loop) and the methods that plug into it.

- ``RecoveryDistillation``: win back what block removal lost (task + output KD + feature KD).
- ``RobustTraining``: the full UNet learns to work with blocks skipped (SnapFusion).
- ``distill_recovery``: the whole ``snapc distill`` flow (search, robust, recover, write).
"""

from snapc.train.checkpoint import CheckpointError
from snapc.train.distill import RecoveryOptions, RobustOptions, checkpoint_folder, distill_recovery
from snapc.train.loop import Method, TrainingDivergedError, TrainProgress, TrainResult, train
from snapc.train.options import RecoveryLoss, TrainOptions
from snapc.train.recovery import RecoveryDistillation, RobustTraining

__all__ = [
    "CheckpointError",
    "Method",
    "RecoveryDistillation",
    "RecoveryLoss",
    "RecoveryOptions",
    "RobustOptions",
    "RobustTraining",
    "TrainOptions",
    "TrainProgress",
    "TrainResult",
    "TrainingDivergedError",
    "checkpoint_folder",
    "distill_recovery",
    "train",
]
