"""Procedural text-to-image data: one or two coloured shapes on black, with captions.

A scene is an integer *code*. One object is ``o = ((colour * 4 + shape) * 2 + size) * 9 + position``
(504 objects); a scene of one object has code ``o``, a scene of two has code
``504 + o1 * 504 + o2`` with ``position(o1) < position(o2)``, so every scene has one code and one
caption. Two objects never sit in neighbouring cells of the 3x3 grid (Chebyshev distance >= 2),
so they never touch. Images are 32x32 RGB in [-1, 1]; everything is vectorised in torch and
deterministic given a seed. The train / validation split is a fixed hash of the code.

:func:`decode` reads the objects back from pixels exactly (the data set knows how it draws):
pixels are thresholded per channel at mid-grey, so the 7 colours are the 7 non-black RGB corner
colours and a background colour cast below 0.5 does not change the result.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from itertools import permutations

import torch
import torch.nn.functional as F

__all__ = [
    "COLOURS",
    "SHAPES",
    "SIZES",
    "POSITIONS",
    "IMAGE_SIZE",
    "N_OBJECTS",
    "N_CODES",
    "SceneObject",
    "objects_of",
    "caption",
    "is_validation",
    "sample_codes",
    "render",
    "decode",
    "match_score",
]

COLOURS = ("red", "green", "blue", "yellow", "magenta", "cyan", "white")
_RGB = ((1, 0, 0), (0, 1, 0), (0, 0, 1), (1, 1, 0), (1, 0, 1), (0, 1, 1), (1, 1, 1))
SHAPES = ("circle", "square", "triangle", "cross")
SIZES = ("small", "large")
POSITIONS = (
    "top left", "top", "top right",
    "left", "center", "right",
    "bottom left", "bottom", "bottom right",
)
IMAGE_SIZE = 32
N_OBJECTS = len(COLOURS) * len(SHAPES) * len(SIZES) * len(POSITIONS)  # 504
N_CODES = N_OBJECTS + N_OBJECTS * N_OBJECTS
_CENTRES = (5.5, 15.5, 25.5)  # pixel centres of the grid cells, on both axes
_HALF = (3.0, 5.0)  # half extent of small / large shapes, pixels
_MIN_AREA = 8  # decoded components smaller than this are noise
_VAL_BUCKETS = 10  # one code in ten is validation


@dataclass(frozen=True)
class SceneObject:
    """One object of a scene: indices into COLOURS, SHAPES, SIZES, POSITIONS."""

    colour: int
    shape: int
    size: int
    position: int

    def attributes(self) -> tuple[int, int, int, int]:
        """Return (colour, shape, size, position)."""
        return (self.colour, self.shape, self.size, self.position)


@cache
def _on(device: torch.device) -> dict[str, torch.Tensor]:
    """Return the drawing constants on a device, made once (no host-device copy per batch)."""
    return {
        "pairs": _FAR_PAIRS.to(device),
        "half": torch.tensor(_HALF, device=device),
        "centres": torch.tensor(_CENTRES, device=device),
        "rgb": torch.tensor(_RGB, dtype=torch.float32, device=device),
    }


def _split_object(o: torch.Tensor) -> tuple[torch.Tensor, ...]:
    pos = o % 9
    size = (o // 9) % 2
    shape = (o // 18) % 4
    colour = o // 72
    return colour, shape, size, pos


def objects_of(code: int) -> list[SceneObject]:
    """Return the objects of a scene code, in caption order."""
    if not 0 <= code < N_CODES:
        raise ValueError(f"scene code {code} outside [0, {N_CODES})")
    parts = [code] if code < N_OBJECTS else [(code - N_OBJECTS) // N_OBJECTS,
                                             (code - N_OBJECTS) % N_OBJECTS]
    return [SceneObject(*(int(v) for v in _split_object(torch.tensor(o)))) for o in parts]


def caption(code: int) -> str:
    """Return the caption of a scene code, e.g. 'a small red circle at the top left'."""
    return " and ".join(
        f"a {SIZES[o.size]} {COLOURS[o.colour]} {SHAPES[o.shape]} at the {POSITIONS[o.position]}"
        for o in objects_of(code)
    )


def is_validation(codes: torch.Tensor) -> torch.Tensor:
    """Return a bool tensor: which scene codes belong to the validation split."""
    mixed = (codes.long() * 2654435761) % (1 << 32)
    return (mixed >> 12) % _VAL_BUCKETS == 0


# Ordered position pairs two cells or more apart on either axis: the 16 two-object layouts.
_FAR_PAIRS = torch.tensor([
    (p, q) for p in range(9) for q in range(p + 1, 9)
    if max(abs(p // 3 - q // 3), abs(p % 3 - q % 3)) >= 2
])


def _random_codes(n: int, gen: torch.Generator, device: torch.device) -> torch.Tensor:
    def rint(high: int) -> torch.Tensor:
        return torch.randint(high, (n,), generator=gen, device=device)

    pairs = _on(device)["pairs"][rint(len(_FAR_PAIRS))]
    first = rint(N_OBJECTS // 9) * 9 + pairs[:, 0]
    second = rint(N_OBJECTS // 9) * 9 + pairs[:, 1]
    two = rint(2).bool()
    return torch.where(two, N_OBJECTS + first * N_OBJECTS + second, rint(N_OBJECTS))


def sample_codes(
    n: int, *, split: str, generator: torch.Generator, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """Return n random scene codes (int64, on device) from the 'train' or 'val' split.

    About half of the scenes hold two objects. Deterministic given the generator state.
    """
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', not {split!r}")
    device = torch.device(device)
    found: list[torch.Tensor] = []
    have = 0
    while have < n:
        codes = _random_codes(max(4 * n, 64) * (8 if split == "val" else 1), generator, device)
        keep = is_validation(codes) == (split == "val")
        found.append(codes[keep])
        have += int(keep.sum())
    return torch.cat(found)[:n]


def _object_table(codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (B, 2) object ids and a (B, 2) presence mask for scene codes."""
    two = codes >= N_OBJECTS
    rest = (codes - N_OBJECTS).clamp(min=0)
    first = torch.where(two, rest // N_OBJECTS, codes)
    second = torch.where(two, rest % N_OBJECTS, torch.zeros_like(codes))
    return torch.stack([first, second], 1), torch.stack([torch.ones_like(two), two], 1)


def _shape_masks(dx: torch.Tensor, dy: torch.Tensor, half: torch.Tensor) -> torch.Tensor:
    """Return (4, ...) bool masks of the four shapes for offsets from the centre."""
    adx, ady = dx.abs(), dy.abs()
    inside = (adx <= half) & (ady <= half)
    circle = dx * dx + dy * dy <= half * half
    triangle = inside & (adx <= (dy + half) / 2 + 0.5)  # apex at the top
    arm = torch.floor(half / 4)  # arms 1 px wide when small, 3 px when large
    cross = inside & ((adx <= arm) | (ady <= arm))
    return torch.stack([circle, inside, triangle, cross])


def _draw(shape: torch.Tensor, size: torch.Tensor, cx: torch.Tensor, cy: torch.Tensor,
          grid: int = IMAGE_SIZE) -> torch.Tensor:
    """Return (N, H, W) bool masks of shapes with float centres (pixel-centre coordinates)."""
    coords = torch.arange(grid, device=cx.device, dtype=torch.float32) + 0.5
    dx = coords.view(1, 1, -1) - cx.view(-1, 1, 1)
    dy = coords.view(1, -1, 1) - cy.view(-1, 1, 1)
    half = _on(cx.device)["half"][size].view(-1, 1, 1)
    masks = _shape_masks(dx, dy, half)  # (4, N, H, W)
    return masks.gather(0, shape.view(1, -1, 1, 1).expand(1, *masks.shape[1:]))[0]


def render(codes: torch.Tensor) -> torch.Tensor:
    """Return the (B, 3, 32, 32) float32 images in [-1, 1] of scene codes (on their device)."""
    objs, present = _object_table(codes.long())
    colour, shape, size, pos = _split_object(objs.flatten())
    centres = _on(codes.device)["centres"]
    masks = _draw(shape, size, centres[pos % 3], centres[pos // 3])
    masks = masks.view(*objs.shape, IMAGE_SIZE, IMAGE_SIZE) & present.view(*objs.shape, 1, 1)
    rgb = _on(codes.device)["rgb"][colour]
    rgb = rgb.view(*objs.shape, 3, 1, 1)
    image = (masks.unsqueeze(2).float() * rgb).sum(1).clamp(max=1.0)
    return image * 2 - 1


def _components(fg: torch.Tensor) -> torch.Tensor:
    """Return (B, H, W) int64 labels of 8-connected components of fg (0 = background)."""
    b, h, w = fg.shape
    ids = torch.arange(1, h * w + 1, device=fg.device, dtype=torch.float32).view(1, h, w)
    labels = torch.where(fg, ids.expand(b, h, w), torch.zeros(()))
    while True:
        grown = F.max_pool2d(labels.unsqueeze(1), 3, stride=1, padding=1).squeeze(1)
        grown = torch.where(fg, grown, torch.zeros(()))
        if torch.equal(grown, labels):
            return labels.long()
        labels = grown


_CODE_OF_BITS = {(r, g, b): i for i, (r, g, b) in enumerate(_RGB)}
_BITS_TO_COLOUR = torch.tensor(
    [_CODE_OF_BITS.get(((v >> 2) & 1, (v >> 1) & 1, v & 1), -1) for v in range(8)]
)


@cache
def _template_bank() -> torch.Tensor:
    """Return (65, 65, 8, H, W) masks of every (shape, size), at every half-pixel centre.

    Index [2 * cy, 2 * cx, shape * 2 + size]; centres run from 0 to 32 in steps of 0.5.
    """
    shape = torch.arange(4).repeat_interleave(2)
    size = torch.arange(2).repeat(4)
    steps = torch.arange(2 * IMAGE_SIZE + 1, dtype=torch.float32) / 2
    rows = []
    for cy in steps.tolist():
        cx = steps.repeat_interleave(8)
        n = len(steps)
        masks = _draw(shape.repeat(n), size.repeat(n), cx, torch.full_like(cx, cy))
        rows.append(masks.view(len(steps), 8, IMAGE_SIZE, IMAGE_SIZE))
    return torch.stack(rows)


def _read_object(mask: torch.Tensor, colours: torch.Tensor) -> SceneObject:
    """Decode one component: majority colour, best template (IoU), nearest grid cell."""
    colour = int(torch.bincount(colours[mask], minlength=7).argmax())
    ys, xs = torch.nonzero(mask, as_tuple=True)
    cx = (float(xs.min()) + float(xs.max())) / 2 + 0.5
    cy = (float(ys.min()) + float(ys.max())) / 2 + 0.5
    ix, iy = round(2 * cx), round(2 * cy)
    last = 2 * IMAGE_SIZE + 1
    rows, cols = slice(max(iy - 1, 0), min(iy + 2, last)), slice(max(ix - 1, 0), min(ix + 2, last))
    bank = _template_bank()[rows, cols]
    bank = bank.reshape(-1, IMAGE_SIZE * IMAGE_SIZE).float()
    flat = mask.flatten().float()
    inter = bank @ flat
    iou = inter / (bank.sum(1) + flat.sum() - inter)
    best = int(iou.argmax()) % 8
    centres = torch.tensor(_CENTRES)
    col = int((centres - cx).abs().argmin())
    row = int((centres - cy).abs().argmin())
    return SceneObject(colour, best // 2, best % 2, row * 3 + col)


def decode(images: torch.Tensor) -> list[list[SceneObject]]:
    """Return the objects read from (B, 3, 32, 32) images in [-1, 1], left-to-right by position.

    A pixel belongs to an object when any channel exceeds 0; its colour is the RGB corner it
    rounds to. Components under 8 pixels are ignored as noise.
    """
    images = images.detach().float().cpu()
    bits = images > 0
    fg = bits.any(1)
    labels = _components(fg)
    value = bits[:, 0].long() * 4 + bits[:, 1].long() * 2 + bits[:, 2].long()
    colours = _BITS_TO_COLOUR[value]
    result: list[list[SceneObject]] = []
    for i in range(images.shape[0]):
        ids, counts = torch.unique(labels[i], return_counts=True)
        objs = [
            _read_object(labels[i] == j, colours[i])
            for j, c in zip(ids.tolist(), counts.tolist(), strict=True)
            if j != 0 and c >= _MIN_AREA
        ]
        result.append(sorted(objs, key=lambda o: o.position))
    return result


def match_score(expected: list[SceneObject], found: list[SceneObject]) -> tuple[int, int]:
    """Return (matching attributes, attributes counted) under the best object pairing.

    Each expected object has 4 attributes; extra or missing objects count 4 misses each, so the
    ratio is 1.0 only for an exact scene.
    """
    total = 4 * max(len(expected), len(found))
    if not expected or not found:
        return 0, total
    small, large = sorted((expected, found), key=len)
    best = 0
    for perm in permutations(large, len(small)):
        hits = sum(
            a == b
            for x, y in zip(small, perm, strict=True)
            for a, b in zip(x.attributes(), y.attributes(), strict=True)
        )
        best = max(best, hits)
    return best, total
