"""The procedural shapes data set: determinism, splits, captions, and the exact decoder."""

import pytest
import torch

from snapc.shapes.data import (
    N_CODES,
    N_OBJECTS,
    SceneObject,
    caption,
    decode,
    is_validation,
    match_score,
    objects_of,
    render,
    sample_codes,
)
from snapc.shapes.text import caption_tokens, tokenize


def _codes(n: int, seed: int, split: str = "train") -> torch.Tensor:
    return sample_codes(n, split=split, generator=torch.Generator().manual_seed(seed))


def test_generator_is_deterministic():
    a, b = _codes(200, 7), _codes(200, 7)
    assert torch.equal(a, b)
    assert torch.equal(render(a), render(b))
    assert [caption(int(c)) for c in a] == [caption(int(c)) for c in b]
    assert not torch.equal(a, _codes(200, 8))


def test_scenes_hold_one_or_two_objects_in_range():
    codes = _codes(400, 0)
    assert int(codes.min()) >= 0 and int(codes.max()) < N_CODES
    two = (codes >= N_OBJECTS).float().mean()
    assert 0.3 < float(two) < 0.7
    images = render(codes)
    assert images.shape == (400, 3, 32, 32) and images.dtype == torch.float32
    assert set(images.unique().tolist()) <= {-1.0, 1.0}


def test_train_and_validation_prompts_differ():
    train, val = _codes(2000, 1, "train"), _codes(300, 1, "val")
    assert not is_validation(train).any() and is_validation(val).all()
    assert not {caption(int(c)) for c in train} & {caption(int(c)) for c in val}


def test_caption_format_and_tokens():
    code = N_OBJECTS + 0 * N_OBJECTS + 8  # small red circles at the top left and bottom right
    assert caption(code) == (
        "a small red circle at the top left and a small red circle at the bottom right")
    codes = _codes(300, 2)
    assert torch.equal(caption_tokens(codes), tokenize([caption(int(c)) for c in codes]))
    with pytest.raises(ValueError, match="unknown"):
        tokenize(["a purple circle"])


@pytest.mark.parametrize("split", ["train", "val"])
def test_decoder_recovers_ground_truth(split):
    codes = _codes(400, 3, split)
    found = decode(render(codes))
    accuracy = sum(objects_of(int(c)) == f for c, f in zip(codes, found, strict=True)) / len(codes)
    assert accuracy >= 0.99


def test_decoder_is_robust_to_a_background_cast_and_noise():
    codes = _codes(200, 4)
    gen = torch.Generator().manual_seed(0)
    images = (render(codes) + 1) / 2 * 0.6 + 0.3 * torch.rand(len(codes), 3, 1, 1, generator=gen)
    images = images + 0.03 * torch.randn(images.shape, generator=gen)
    found = decode(images * 2 - 1)
    accuracy = sum(objects_of(int(c)) == f for c, f in zip(codes, found, strict=True)) / len(codes)
    assert accuracy >= 0.99


def test_decoder_sees_a_wrong_colour_and_a_missing_object():
    code = N_OBJECTS + 0 * N_OBJECTS + 8
    image = render(torch.tensor([code]))
    recoloured = image.clone()
    recoloured[:, 2] = torch.where(image[:, 0] > 0, 1.0, -1.0)  # red -> magenta
    expected = objects_of(code)
    assert match_score(expected, decode(recoloured)[0]) == (6, 8)
    half = image.clone()
    half[..., 16:, :] = -1  # wipe the bottom object
    assert match_score(expected, decode(half)[0]) == (4, 8)


def test_match_score_counts_extra_objects():
    a = SceneObject(0, 0, 0, 0)
    b = SceneObject(1, 1, 1, 8)
    assert match_score([a], [a]) == (4, 4)
    assert match_score([a], [b, a]) == (4, 8)
    assert match_score([a, b], [b, a]) == (8, 8)
    assert match_score([a], []) == (0, 4)
