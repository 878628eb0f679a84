"""Quality metrics: prompt adherence, Fréchet distance, the proxy, and Spearman correlation."""

import math

import pytest
import torch

from snapc.quality import (
    calibration_triples,
    cell_targets,
    frechet_distance,
    load_feature_classifier,
    prompt_adherence,
    proxy_fidelity,
    spearman,
    validation_codes,
)
from snapc.shapes.data import render


def test_ground_truth_scores_the_ceiling():
    codes = validation_codes(100)
    scores = prompt_adherence(render(codes), codes)
    assert scores["adherence"] == 1.0 and scores["exact"] == 1.0 and scores["colour"] == 1.0


def test_adherence_punishes_wrong_images():
    codes = validation_codes(100)
    shuffled = prompt_adherence(render(codes.roll(1)), codes)["adherence"]
    assert shuffled < 0.6
    assert prompt_adherence(-torch.ones(100, 3, 32, 32), codes)["adherence"] == 0.0


def test_validation_codes_are_fixed():
    assert torch.equal(validation_codes(50), validation_codes(50))
    assert not torch.equal(validation_codes(50), validation_codes(50, seed=1))


def test_frechet_distance():
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(4000, 8, generator=gen)
    b = torch.randn(4000, 8, generator=gen)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    # N(0, I) vs N(1, 4I) in 8 dims: |mu|^2 + tr(I + 4I - 2 * 2I) = 8 + 8 = 16
    assert frechet_distance(a, 2 * b + 1) == pytest.approx(16.0, rel=0.1)
    assert frechet_distance(a, b) < 0.1


def test_shipped_classifier_names_the_cells():
    classifier = load_feature_classifier()
    codes = validation_codes(200)
    with torch.no_grad():
        logits = classifier(render(codes))
        features = classifier.features(render(codes))
    assert (logits.argmax(-1) == cell_targets(codes)).float().mean() > 0.97
    assert features.shape == (200, 128)


def test_proxy_fidelity():
    triples = calibration_triples(4, seed=0)
    assert len(triples) == 4 and triples[0][0].shape == (1, 3, 32, 32)
    assert all(torch.equal(x, y) for x, y in zip(triples[1], calibration_triples(4, 0)[1],
                                                 strict=True))

    def reference(x, t, c):
        return x * 0.5 + c.mean() + t.view(-1, 1, 1, 1) / 1000

    def candidate(x, t, c):
        return reference(x, t, c) * 1.1

    same = proxy_fidelity(reference, reference, triples)
    assert same["nmse"] == 0.0 and math.isinf(same["psnr_db"])
    off = proxy_fidelity(reference, candidate, triples)
    assert off["nmse"] == pytest.approx(0.01, rel=1e-6)
    assert 0 < off["psnr_db"] < 60


def test_spearman():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 1, 2], [1, 1, 2]) == pytest.approx(1.0)
    with pytest.raises(ValueError):
        spearman([1], [1])
