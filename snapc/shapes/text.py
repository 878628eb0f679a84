"""Word tokenizer and a small transformer text encoder for the shapes captions."""

from __future__ import annotations

from collections.abc import Sequence
from functools import cache

import torch
from torch import nn

from snapc.shapes.data import COLOURS, N_OBJECTS, POSITIONS, SHAPES, SIZES, caption

__all__ = ["VOCAB", "MAX_TOKENS", "TEXT_DIM", "tokenize", "caption_tokens", "TextEncoder"]

_WORDS = ("a", "at", "the", "and", *SIZES, *COLOURS, *SHAPES,
          *sorted({w for p in POSITIONS for w in p.split()}))
VOCAB = ("<pad>", *dict.fromkeys(_WORDS))  # index 0 pads; the empty caption is all padding
MAX_TOKENS = 20
TEXT_DIM = 128
_INDEX = {w: i for i, w in enumerate(VOCAB)}


def tokenize(captions: Sequence[str]) -> torch.Tensor:
    """Return (B, MAX_TOKENS) int64 word ids of captions, right-padded with 0.

    Raises ValueError for an unknown word or a caption longer than MAX_TOKENS words.
    """
    out = torch.zeros(len(captions), MAX_TOKENS, dtype=torch.long)
    for i, text in enumerate(captions):
        words = text.split()
        if len(words) > MAX_TOKENS:
            raise ValueError(f"caption has {len(words)} words, at most {MAX_TOKENS}: {text!r}")
        unknown = [w for w in words if w not in _INDEX]
        if unknown:
            raise ValueError(f"unknown words {unknown} in caption {text!r}")
        out[i, : len(words)] = torch.tensor([_INDEX[w] for w in words], dtype=torch.long)
    return out


class TextEncoder(nn.Module):
    """Token + position embeddings, a few pre-norm transformer layers, a final LayerNorm.

    ``forward(tokens)`` returns (B, MAX_TOKENS, TEXT_DIM) float encoder_hidden_states.
    """

    def __init__(self, dim: int = TEXT_DIM, layers: int = 2, heads: int = 4) -> None:
        super().__init__()
        self.tokens = nn.Embedding(len(VOCAB), dim)
        self.positions = nn.Parameter(torch.zeros(MAX_TOKENS, dim))
        layer = nn.TransformerEncoderLayer(
            dim, heads, dim_feedforward=2 * dim, dropout=0.0, batch_first=True, norm_first=True
        )
        self.layers = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        nn.init.normal_(self.positions, std=0.02)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Return (B, L, dim) hidden states of (B, L) token ids."""
        return self.norm(self.layers(self.tokens(tokens) + self.positions[: tokens.shape[1]]))


@cache
def _phrase_table(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    phrases = [caption(o) for o in range(N_OBJECTS)]
    lengths = torch.tensor([len(p.split()) for p in phrases])
    return tokenize(phrases)[:, : int(lengths.max())].to(device), lengths.to(device)


def caption_tokens(codes: torch.Tensor) -> torch.Tensor:
    """Return (B, MAX_TOKENS) token ids of the captions of scene codes, on the codes' device.

    Vectorised; equal to ``tokenize([caption(c) for c in codes])``.
    """
    table, lengths = _phrase_table(codes.device)
    codes = codes.long()
    two = codes >= N_OBJECTS
    rest = (codes - N_OBJECTS).clamp(min=0)
    first = torch.where(two, rest // N_OBJECTS, codes)
    out = torch.zeros(len(codes), MAX_TOKENS, dtype=torch.long, device=codes.device)
    out[:, : table.shape[1]] = table[first]
    start = lengths[first].unsqueeze(1)
    second = torch.where(two, _INDEX["and"], 0).unsqueeze(1)
    out.scatter_(1, start, torch.where(two.unsqueeze(1), second, out.gather(1, start)))
    cols = start + 1 + torch.arange(table.shape[1], device=codes.device)
    rows = torch.where(two.unsqueeze(1), table[rest % N_OBJECTS], out.gather(1, cols))
    return out.scatter(1, cols, rows)
