"""The learning-rate schedule of snapc.train.loop: warm-up, then constant or cosine."""

from __future__ import annotations

import pytest

from snapc.errors import SnapcError
from snapc.train.loop import _lr_scale
from snapc.train.options import TrainOptions


def test_warmup_then_constant() -> None:
    options = TrainOptions(steps=100, warmup=10)
    assert _lr_scale(0, 0.0, options) == pytest.approx(0.1)
    assert _lr_scale(9, 0.0, options) == pytest.approx(1.0)
    assert _lr_scale(99, 0.0, options) == pytest.approx(1.0)


def test_cosine_anneals_to_zero_by_steps() -> None:
    options = TrainOptions(steps=110, warmup=10, lr_decay="cosine")
    assert _lr_scale(10, 0.0, options) == pytest.approx(1.0)
    assert _lr_scale(60, 0.0, options) == pytest.approx(0.5)
    assert _lr_scale(110, 0.0, options) == pytest.approx(0.0, abs=1e-9)
    scales = [_lr_scale(s, 0.0, options) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(scales, scales[1:], strict=False))


def test_cosine_follows_the_training_clock_when_minutes_bound() -> None:
    options = TrainOptions(minutes=2.0, warmup=10, lr_decay="cosine")
    assert _lr_scale(500, 60.0, options) == pytest.approx(0.5)
    assert _lr_scale(500, 120.0, options) == pytest.approx(0.0, abs=1e-9)
    both = TrainOptions(steps=1000, minutes=2.0, warmup=0, lr_decay="cosine")
    # The nearer bound decides: 30 s of 120 is a quarter, step 500 of 1000 a half.
    assert _lr_scale(500, 30.0, both) == pytest.approx(0.5)


def test_unknown_decay_is_an_error() -> None:
    with pytest.raises(SnapcError, match="--lr-decay"):
        TrainOptions(steps=1, lr_decay="linear").check()
