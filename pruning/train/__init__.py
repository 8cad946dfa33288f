"""Training: data, Taylor calibration, inline and extended fine-tuning, evaluation, the embedded default model.

Modules: :mod:`~pruning.train.data` (datasets and loaders), :mod:`~pruning.train.calibrate`
(calibration gradients), :mod:`~pruning.train.evaluate` (metrics, BatchNorm re-calibration),
:mod:`~pruning.train.finetune` (inline fine-tuning, the shared epoch loop),
:mod:`~pruning.train.extended` (KD/EMA fine-tuning with checkpoints),
:mod:`~pruning.train.default_model` (the embedded digits ResNet-18).
"""
from pruning.models import Family  # noqa: F401
from pruning.train._common import ProgressCallback  # noqa: F401
from pruning.train.calibrate import calibrate_copy, calibrated, calibration_gradients, zero_grads  # noqa: F401
from pruning.train.evaluate import EvalResult, accuracy_collapsed, evaluate, recalibrate_batchnorm  # noqa: F401
from pruning.train.extended import (  # noqa: F401
    Checkpointer,
    ExtendedConfig,
    ExtendedResult,
    FileCheckpointer,
    InMemoryCheckpointer,
    extended_finetune,
    state_from_bytes,
    state_to_bytes,
)
from pruning.train.finetune import (  # noqa: F401
    DIGITS_RECOVERY_LR,
    EpochRecord,
    FinetuneConfig,
    FinetuneResult,
    finetune,
    kd_loss,
)
