"""The screening study (issue 16): a recovery probe measures a set along one short recovery
without changing that recovery, estimators come out of it, rank agreement is Spearman's rho
(checked by hand), and bench/screening_study.py writes, skips, reports and refuses bad input."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from snapc.shapes.model import load_unet
from snapc.testing import one_error_line
from snapc.train import RecoveryDistillation, RecoveryLoss, TrainOptions, train
from snapc.train.data import ShapesScenes
from snapc.train.distributed import World
from snapc.train.estimators import (
    concordant_pairs,
    power_law_at,
    probe_estimates,
    rank_agreement,
    rank_correlation,
)
from snapc.train.screening import (
    adherence_score,
    heldout_batches,
    heldout_parts,
    recovery_probe,
)

REPO = Path(__file__).resolve().parents[2]
REMOVED = ["mid_block.attentions.0", "up_blocks.0.attentions.2", "down_blocks.0.resnets.1"]
WORLD = World(0, 1, torch.device("cpu"))
OPTIONS = TrainOptions(steps=1, batch=4, lr=1e-3, warmup=1, seed=0, device="cpu",
                       checkpoint_every=10_000, log_every=1)


def test_rank_correlation_matches_hand_computed_spearman():
    # one swapped pair of four: rho = 1 - 6 * 2 / (4 * 15) = 0.8
    assert rank_correlation([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(0.8)
    assert rank_correlation([1, 2, 3, 4], [4, 2, 3, 1]) == pytest.approx(-0.8)
    # a tie shares its mean rank: ranks (1, 2.5, 2.5, 4) vs (1, 2, 3, 4) -> 4.5 / sqrt(4.5 * 5)
    assert rank_correlation([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(4.5 / math.sqrt(22.5))
    assert math.isnan(rank_correlation([1, 2], [2, 1]))  # too few pairs to mean anything
    assert math.isnan(rank_correlation([1, 1, 1], [1, 2, 3]))


def test_rank_agreement_orients_losses_and_works_within_budgets():
    # budget a: the loss orders the sets exactly backwards of adherence (right for a loss);
    # budget b: its lowest loss is the worst set (top-1 missed, 2 of 3 pairs right)
    loss = [0.3, 0.2, 0.1, 0.1, 0.2, 0.3, None]
    adherence = [0.80, 0.85, 0.90, 0.70, 0.95, 0.90, 0.99]
    groups = ["a", "a", "a", "b", "b", "b", "b"]
    got = rank_agreement(loss, adherence, groups, higher_is_better=False)
    assert got.n == 6 and got.n_within == {"a": 3, "b": 3}
    assert got.rho_within["a"] == pytest.approx(1.0)
    assert got.rho_within["b"] == pytest.approx(-0.5)
    assert got.mean_within == pytest.approx(0.25)
    assert got.pairs_within == (4.0, 6) and got.top1_within == (1, 2)
    flipped = rank_agreement(loss, adherence, groups, higher_is_better=True)
    assert flipped.rho_within["a"] == pytest.approx(-1.0)
    assert concordant_pairs([1, 1, 2], [1, 2, 3]) == (2.5, 3)  # a tie counts half


def test_power_law_fit_extrapolates_a_known_curve():
    steps = [10, 20, 40, 80, 160]
    losses = [0.5 + 2.0 * s**-0.7 for s in steps]
    assert power_law_at(steps, losses, 2000) == pytest.approx(0.5 + 2.0 * 2000**-0.7, rel=1e-3)
    assert power_law_at(steps[:2], losses[:2], 2000) is None


@pytest.fixture(scope="module")
def teacher() -> torch.nn.Module:
    return load_unet()


def test_heldout_batches_are_fixed_and_spread_over_the_schedule(teacher):
    data = ShapesScenes(4, 0, WORLD.device)
    a, b = heldout_batches(data, 6, chunk=4), heldout_batches(data, 6, chunk=4)
    assert [len(x["x_t"]) for x in a] == [4, 2]
    t = torch.cat([x["t"] for x in a])
    assert t[0] == 0 and t[-1] == data.schedule.steps - 1 and bool((t.diff() > 0).all())
    assert all(torch.equal(x["x_t"], y["x_t"]) for x, y in zip(a, b, strict=True))
    assert not torch.equal(a[0]["x_t"], data.batch(0, WORLD)["x_t"])


def test_probe_measures_without_changing_the_recovery(teacher, tmp_path):
    data = ShapesScenes(4, 0, WORLD.device)
    heldout = heldout_batches(data, 4, chunk=2)
    method = RecoveryDistillation(teacher, REMOVED, data, RecoveryLoss())
    score = adherence_score(prompts=2, steps=2)
    measures = {"adherence": lambda unet: 1.0 - score(unet, WORLD.device),
                "heldout": lambda unet: heldout_parts(method.loss, unet, heldout)}
    probe = recovery_probe(method, OPTIONS, [1, 3], tmp_path / "probe", world=WORLD,
                           measures=measures, by="steps")
    doc = json.loads(json.dumps(probe.to_json()))
    assert [p["step"] for p in doc["points"]] == [0, 1, 3]
    assert [sorted(p["measures"]) for p in doc["points"]] == [["start"], ["ema", "raw"],
                                                             ["ema", "raw"]]
    last = doc["points"][-1]["measures"]
    assert sorted(last["ema"]["heldout"]["value"]) == ["feature_kd", "loss", "output_kd", "task"]
    assert all(m["seconds"] >= 0 for p in doc["points"] for w in p["measures"].values()
               for m in w.values())
    assert last["ema"]["heldout"]["value"] != last["raw"]["heldout"]["value"]
    assert [h["step"] for h in doc["history"]] == [1, 2, 3]
    # the same run uninterrupted and unmeasured ends with the same EMA weights
    plain = RecoveryDistillation(teacher, REMOVED, data, RecoveryLoss())
    train(plain, replace(OPTIONS, steps=3), tmp_path / "plain", world=WORLD)
    for (name, a), b in zip(method.student.state_dict().items(),
                            plain.student.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    with pytest.raises(ValueError, match="lr_decay 'constant'"):
        recovery_probe(plain, replace(OPTIONS, lr_decay="cosine"), [1], tmp_path / "cosine",
                       world=WORLD, measures=measures, by="steps")
    names = probe_estimates(doc, horizon_steps=100)
    assert {"adherence@0steps", "heldout_output_kd@0steps", "adherence_ema@3steps",
            "heldout_raw@3steps", "train_loss@3steps", "train_slope@3steps",
            "train_extrap@3steps", "heldout_extrap_ema@3steps"} <= set(names)
    assert names["heldout_raw@3steps"].value == last["raw"]["heldout"]["value"]["loss"]
    assert names["adherence_ema@3steps"].higher_is_better
    assert not names["heldout_raw@3steps"].higher_is_better
    assert names["adherence_ema@3steps"].cost_s == pytest.approx(
        doc["points"][-1]["train_seconds"] + last["ema"]["adherence"]["seconds"])


def _study(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "bench" / "screening_study.py"), *args],
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_bench_writes_skips_and_reports(tmp_path):
    row = {"budget": 0.5, "method": "random", "adherence_before": 0.3, "fd": 9.0,
           "latency_ms": 5.0, "steps": 1000, "gpu_minutes": 2.0}
    rows = [{**row, "seed": 0, "adherence": 0.90, "removed": REMOVED},
            {**row, "seed": 1, "adherence": 0.92, "removed": REMOVED[:2]},
            {**row, "budget": 0.7, "seed": 0, "adherence": 0.93, "removed": REMOVED[:1]}]
    (tmp_path / "rows.json").write_text(json.dumps({"rows": rows}))
    out = tmp_path / "study.json"
    small = ["--rows", str(tmp_path / "rows.json"), "--out", str(out), "--budgets", "0.5",
             "--steps", "2", "--at", "1", "--batch", "2", "--heldout", "2", "--prompts", "2",
             "--sampling-steps", "1", "--weights", "ema", "--device", "cpu"]
    first = _study(*small)
    assert first.returncode == 0, first.stderr
    study = json.loads(out.read_text())
    assert [s["label"] for s in study["sets"]] == ["random#0@0.5", "random#1@0.5"]
    entry = study["sets"][0]
    assert entry["adherence"] == 0.90 and entry["horizon_steps"] == 1000
    assert entry["structure"]["blocks_removed"] == 3 and entry["structure"]["params_kept"] < 1
    assert [p["step"] for p in entry["probe"]["points"]] == [0, 1, 2]
    assert "heldout_output_kd_ema@2steps" in entry["estimators"]
    again = _study(*small)
    assert again.returncode == 0 and "2 already in" in again.stdout, again.stderr
    shown = _study("--out", str(out), "--report", "--plot", str(tmp_path / "best.png"))
    assert shown.returncode == 0, shown.stderr
    assert "| estimator | GPU s / candidate |" in shown.stdout
    assert (tmp_path / "best.png").stat().st_size > 0
    assert "budgets [0.9]" in one_error_line(_study(*small, "--budgets", "0.9"))
    assert "another protocol" in one_error_line(_study(*small, "--steps", "3"))
