"""CLIP text encoders of Stable Diffusion pipelines: an offline tokenizer, prompt checks, tracing.

:func:`build_tokenizer` makes a transformers ``CLIPTokenizer`` without downloading anything:
CLIP's byte-level alphabet (every text tokenizes) plus BPE merges, learnt here, that spell a
few hundred common prompt words as single tokens. It is the tokenizer of
snapc's random-weight pipelines (``sd15-pipeline``, ``tiny-pipeline``); pipeline folders bring
their own ``tokenizer/``. :func:`tokenize` pads prompts to the encoder's length and refuses one that
does not fit. :func:`trace_text_encoder` traces a ``CLIPTextModel`` to a Graph whose output is
the last hidden state, the UNet's ``encoder_hidden_states``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from snapc.errors import SnapcError
from snapc.graph import Graph, ModelInfo

__all__ = ["PROMPT_WORDS", "build_tokenizer", "tokenize", "trace_text_encoder",
           "calibration_prompts", "calibration_tokens", "TEXT_INPUT", "BOS", "EOS"]

TEXT_INPUT = "input_ids"
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
# Words spelled as one token each by the offline tokenizer (anything else is split into
# smaller pieces, down to single bytes, so every prompt tokenizes).
PROMPT_WORDS = (
    "a an the of in on at with and or to from by for over under near behind next front back "
    "top bottom left right center middle above below inside outside "
    "photo picture painting drawing sketch render illustration portrait landscape closeup "
    "close up view shot scene image art style digital oil watercolor pencil detailed "
    "high quality realistic photorealistic cinematic lighting sunset sunrise night day "
    "morning evening light dark bright soft warm cold colorful vibrant "
    "red green blue yellow orange purple pink brown black white gray grey gold silver "
    "small large big tiny huge tall short old young new little beautiful cute happy sad "
    "cat dog horse bird fish cow sheep lion tiger bear fox wolf rabbit mouse owl eagle "
    "man woman boy girl person people child king queen knight robot astronaut wizard "
    "house castle city street road bridge tower building room kitchen garden forest tree "
    "trees flower flowers grass field mountain mountains river lake sea ocean beach sky "
    "cloud clouds sun moon star stars snow rain fire water stone wood glass metal "
    "car train boat ship plane bicycle table chair book cup bottle hat "
    "riding sitting standing walking running flying eating reading playing holding "
    "wearing looking circle square triangle cross shape shapes"
).split()


def _train_merges(words: Sequence[str]) -> list[tuple[str, str]]:
    """Return BPE merges learnt from ``words`` (each counted once, CLIP's ``</w>`` word ends)
    until every word is one token: the most frequent adjacent pair first, ties broken by the
    pair's text.

    Hand-written (a dozen lines of textbook BPE) because tokenizers' BpeTrainer breaks ties
    in hash order, so its merges, and the token ids, change from run to run; a compiled
    text encoder and the tokenizer saved beside it must agree every time.
    """
    pieces = {w: [*w[:-1], w[-1] + "</w>"] for w in dict.fromkeys(words)}
    merges: list[tuple[str, str]] = []
    while True:
        counts: dict[tuple[str, str], int] = {}
        for parts in pieces.values():
            for pair in zip(parts, parts[1:], strict=False):
                counts[pair] = counts.get(pair, 0) + 1
        if not counts:
            return merges
        best = min(counts, key=lambda pair: (-counts[pair], pair))
        merges.append(best)
        for word, parts in pieces.items():
            merged, i = [], 0
            while i < len(parts):
                if i + 1 < len(parts) and (parts[i], parts[i + 1]) == best:
                    merged.append(parts[i] + parts[i + 1])
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            pieces[word] = merged


def build_tokenizer(max_length: int = 77) -> Any:
    """Return an offline ``transformers.CLIPTokenizer`` for ``max_length`` tokens (start and
    end tokens included): CLIP's byte-level alphabet (with and without ``</w>``) plus merges
    learnt from :data:`PROMPT_WORDS`, so those are one token each and any text tokenizes.

    Built here rather than loaded because snapc downloads nothing; the ids are small (< 2000)
    and fit any CLIP vocabulary. Pipeline folders bring their own ``tokenizer/`` instead.
    """
    from transformers import CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    alphabet = list(bytes_to_unicode().values())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    vocab.update({ch + "</w>": len(alphabet) + i for i, ch in enumerate(alphabet)})
    merges = _train_merges(PROMPT_WORDS)
    for left, right in merges:
        vocab.setdefault(left + right, len(vocab))
    vocab[BOS] = len(vocab)
    vocab[EOS] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=max_length)


def tokenize(tokenizer: Any, prompts: Sequence[str], max_length: int) -> torch.Tensor:
    """Return (N, max_length) token ids of ``prompts``, padded as the tokenizer pads.

    Raises SnapcError naming the prompt and its length when one takes more than
    ``max_length`` tokens (start and end included): it would be cut, so it is refused.
    """
    for i, text in enumerate(prompts, 1):
        n = len(tokenizer(text, truncation=False, verbose=False).input_ids)
        if n > max_length:
            raise SnapcError(f"prompt {i} takes {n} tokens; the text encoder takes at most "
                             f"{max_length} (start and end included): shorten {text[:60]!r}")
    ids = tokenizer(list(prompts), padding="max_length", max_length=max_length,
                    truncation=True, return_tensors="pt").input_ids
    return ids.long()


def calibration_prompts(n: int, max_words: int, seed: int = 0) -> list[str]:
    """Return ``n`` seeded prompts of 1 to ``max_words`` words of :data:`PROMPT_WORDS`.

    Their lengths are spread over the range so the calibration set sees short prompts (mostly
    padding) and long ones, as a text encoder does at generation time.
    """
    gen = torch.Generator().manual_seed(seed)
    prompts = []
    for _ in range(n):
        count = int(torch.randint(1, max(1, max_words) + 1, (1,), generator=gen))
        picks = torch.randint(len(PROMPT_WORDS), (count,), generator=gen).tolist()
        prompts.append(" ".join(PROMPT_WORDS[i] for i in picks))
    return prompts


def calibration_tokens(tokenizer: Any, n: int, max_length: int, seed: int = 0) -> torch.Tensor:
    """Return (n, max_length) token ids of :func:`calibration_prompts` for quantizing a CLIP
    text encoder (the observers of w8a8, fp16 islands, mixed-precision sensitivity).

    Prompts are cut to what fits: at most ``max_length - 2`` words (start and end tokens), and
    a prompt some tokenizer spells in more pieces loses its last words.
    """
    prompts = calibration_prompts(n, min(max_length - 2, 30), seed)
    return tokenizer(prompts, padding="max_length", max_length=max_length, truncation=True,
                     return_tensors="pt").input_ids.long()


class _LastHiddenState(nn.Module):
    """Calls a transformers CLIP text model on token ids; returns its last hidden state."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.net(input_ids, return_dict=False)[0]


def trace_text_encoder(module: nn.Module, input_ids: torch.Tensor,
                       source: ModelInfo | None = None) -> Graph:
    """Trace a transformers ``CLIPTextModel`` on (B, L) ``input_ids`` and return its Graph:
    input ``input_ids``, output the (B, L, D) last hidden state. ``module`` is not edited.

    The Graph's root is ``net.net`` (the CLIP model inside snapc's wrappers), so weight names
    are the model's own; a CLIP text model has no ResNet or transformer blocks in snapc's
    sense (its layers are not removable here). Raises TraceError when export fails.
    """
    import dataclasses

    from snapc.frontend import trace

    info = source or ModelInfo(name=f"{type(module).__name__}", random_weights=False)
    graph = trace(_LastHiddenState(module.eval()), (input_ids.long(),), info,
                  input_names=[TEXT_INPUT])
    return dataclasses.replace(graph, root="net.net")
