"""Read a scene code back from its caption: the inverse of :func:`snapc.shapes.data.caption`."""

from __future__ import annotations

from snapc.shapes.data import COLOURS, N_OBJECTS, POSITIONS, SHAPES, SIZES

__all__ = ["parse_caption"]


def _object(words: list[str], text: str) -> int:
    """Return the object index of 'a SIZE COLOUR SHAPE at the POSITION'."""
    if len(words) < 6 or words[0] != "a" or words[4:6] != ["at", "the"]:
        raise ValueError(f"not a shapes caption: {text!r} (e.g. 'a small red circle at the "
                         "top left')")
    size, colour, shape, position = words[1], words[2], words[3], " ".join(words[6:])
    for value, names, what in ((size, SIZES, "size"), (colour, COLOURS, "colour"),
                               (shape, SHAPES, "shape"), (position, POSITIONS, "position")):
        if value not in names:
            raise ValueError(f"unknown {what} {value!r} in {text!r}; valid: {', '.join(names)}")
    return (((COLOURS.index(colour) * len(SHAPES) + SHAPES.index(shape)) * len(SIZES)
             + SIZES.index(size)) * len(POSITIONS) + POSITIONS.index(position))


def parse_caption(text: str) -> int:
    """Return the scene code whose caption is ``text``; ``caption(parse_caption(t)) == t``.

    Every code in [0, N_CODES) round-trips, including two-object layouts the data set never
    draws (out of reading order, neighbouring cells). Raises ValueError when ``text`` is not
    of the form 'a SIZE COLOUR SHAPE at the POSITION [and a ...]' (one or two objects).
    """
    words = text.split()
    parts: list[list[str]] = [[]]
    for w in words:
        if w == "and":
            parts.append([])
        else:
            parts[-1].append(w)
    if len(parts) > 2:
        raise ValueError(f"a shapes scene has one or two objects, not {len(parts)}: {text!r}")
    objects = [_object(p, text) for p in parts]
    if len(objects) == 1:
        return objects[0]
    first, second = objects
    return N_OBJECTS + first * N_OBJECTS + second
