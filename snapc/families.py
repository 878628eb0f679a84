"""Which model family a model (or base) name belongs to: pure name rules, no imports.

``shapes`` (pixel space) and ``shapes-latent`` (the latent pipeline) are the trained reference
families: they come with training data and a full quality metric. A model derived from one (a
pruned or distilled folder, a shipped variant such as ``shapes-small``) records the family's
name as its base.
"""

from __future__ import annotations

__all__ = ["LATENT_BASE", "is_shapes_family", "is_latent_family", "is_trained_family"]

LATENT_BASE = "shapes-latent"


def is_latent_family(name: str | None) -> bool:
    """Return whether a model (or base) name is ``shapes-latent`` or derived from it."""
    return bool(name) and (name == LATENT_BASE or str(name).startswith(LATENT_BASE + "/"))


def is_shapes_family(name: str) -> bool:
    """Return whether a model (or base) name is the pixel-space shapes model or one derived
    from it (``shapes-latent``, the latent pipeline, is another family: snapc.evaluation_latent).
    """
    if is_latent_family(name):
        return False
    return name == "shapes" or name.startswith("shapes-")


def is_trained_family(name: str | None) -> bool:
    """Return whether a model (or base) name is of a trained reference family (``shapes``
    or ``shapes-latent``): the families with training data and a full quality metric."""
    return bool(name) and (is_shapes_family(str(name)) or is_latent_family(name))
