"""Quality of a shapes-family model as it ships: prompt adherence and Fréchet distance.

What `snapc evaluate MODEL` scores, with the protocol of :mod:`snapc.quality` (validation
prompts, start noise seeded per prompt index, FD against renders of the same prompts in the
shipped classifier's features). MODEL is any of

* a registered shapes-family name (``shapes``, and the ``shapes-*`` models derived from it,
  whether built in code or shipped as pruned-UNet folders);
* a pruned-UNet folder (:mod:`snapc.pruned`) whose record's base is shapes-family;
* an ONNX artifact folder (``manifest.json`` + ``model.onnx``) compiled from one of those, run
  by onnxruntime on the CPU at the batch its inputs were traced with.

The sampler is the model's own (the pruned record's or the manifest's ``model.sampler``), else
the shapes protocol (25 linspace DDIM steps, CFG 3); explicit arguments override it field by
field. Anything else (``tiny``, ``sd15``, a folder of another base) is a SnapcError naming
what works: the metric decodes shapes scenes from pixels and means nothing for other models.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from snapc.errors import SnapcError, ToolMissingError, WeightsError
from snapc.shapes.sampler import SPACINGS, Denoiser, SamplerSpec

__all__ = ["LoadedDenoiser", "check_device", "check_request", "load_denoiser",
           "resolve_sampler", "sampler_of", "evaluate_model", "EVALUABLE"]

EVALUABLE = ("a shapes-family name (shapes, shapes-*), a pruned-UNet folder of a shapes base "
             "(snapc distill -o DIR), or an ONNX artifact compiled from one "
             "(snapc compile MODEL --target onnx -o DIR)")
_SHAPES_INPUTS = {"sample": [3, 32, 32], "timestep": [], "encoder_hidden_states": [20, 128]}


@dataclass(frozen=True)
class LoadedDenoiser:
    """A shapes-family model ready to sample.

    ``denoiser(sample, timestep, encoder_hidden_states)`` returns the noise prediction;
    ``sampler`` is the recipe stored with the model (the protocol's when none is);
    ``batch`` is the fixed batch the denoiser must be called at (ONNX artifacts), None for
    any; ``device`` is where it runs ("cpu", "cuda"; an artifact: "cpu").
    """

    name: str
    base: str
    denoiser: Denoiser
    sampler: SamplerSpec
    kind: str  # "torch" or "onnx"
    device: str
    batch: int | None = None
    random_weights: bool = False


def _not_evaluable(what: str) -> SnapcError:
    return SnapcError(f"snapc evaluate scores shapes-family models only: {what}; "
                      f"give {EVALUABLE}")


def sampler_of(data: Any, where: str) -> SamplerSpec:
    """Return the SamplerSpec of a stored sampler record; WeightsError names ``where``."""
    try:
        return SamplerSpec.from_json(data)
    except (TypeError, ValueError) as exc:
        raise WeightsError(f"bad sampler record in {where}: {exc}; re-run snapc distill "
                           "(or snapc compile) to rewrite it") from exc


def check_device(device: str) -> None:
    """Raise SnapcError unless ``device`` is "cpu", or "cuda" with a CUDA device present."""
    if device not in ("cpu", "cuda"):
        raise SnapcError(f"unknown evaluation device '{device}'; valid: cpu, cuda")
    if device == "cuda" and not torch.cuda.is_available():
        raise ToolMissingError("no CUDA device here (torch.cuda.is_available() is False); "
                               "use --eval-device cpu")


def _registered(name: str, device: str) -> LoadedDenoiser:
    from snapc.families import is_shapes_family
    from snapc.models import MODELS, load_model
    from snapc.pruned import skip_blocks

    if not is_shapes_family(name):
        raise _not_evaluable(f"'{name}' is another model ({MODELS[name].description})")
    loaded = load_model(name)
    module = loaded.module
    if loaded.removed:  # a registered pruned folder loads as the full net + blocks to skip
        module = skip_blocks(module, loaded.removed, in_place=True)
    info = loaded.info
    return LoadedDenoiser(name=name, base=info.base or name,
                          denoiser=module.eval().requires_grad_(False).to(device),
                          sampler=sampler_of(info.sampler, f"model '{name}'"), kind="torch",
                          device=device, random_weights=info.random_weights)


def _pruned_folder(folder: Path, device: str) -> LoadedDenoiser:
    from snapc.families import is_shapes_family
    from snapc.pruned import RECORD_FILE, load_pruned_unet, read_record

    record = read_record(folder)
    if not is_shapes_family(record.base):
        raise _not_evaluable(f"{folder} is a pruned '{record.base}' model")
    module = load_pruned_unet(folder).requires_grad_(False).to(device)
    return LoadedDenoiser(name=record.name, base=record.base, denoiser=module,
                          sampler=sampler_of(record.sampler, str(folder / RECORD_FILE)),
                          kind="torch", device=device, random_weights=record.random_weights)


class _OnnxDenoiser:
    """An ONNX UNet artifact as a denoiser (float32 inputs) at the artifact's fixed batch."""

    def __init__(self, path: Path, batch: int, names: tuple[str, ...]) -> None:
        from snapc.runtime import OnnxFunction

        self.function = OnnxFunction(path, names, batch)
        self.batch = batch

    def __call__(self, sample: torch.Tensor, timestep: torch.Tensor,
                 context: torch.Tensor) -> torch.Tensor:
        """Return the (N, 3, 32, 32) noise prediction for N rows."""
        return self.function(sample.float(), timestep.float(), context.float())


def _artifact(folder: Path, device: str) -> LoadedDenoiser:
    from snapc.families import is_shapes_family
    from snapc.manifest import MANIFEST_NAME

    path = folder / MANIFEST_NAME
    try:
        manifest = json.loads(path.read_text())
        model, inputs = manifest["model"], manifest["inputs"]
        name = str(model["name"])
        base = str(model.get("base") or name)
        specs = {str(i["name"]): [int(d) for d in i["shape"]] for i in inputs}
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise WeightsError(f"corrupt {path} ({exc}); re-run snapc compile") from exc
    if not is_shapes_family(base):
        raise _not_evaluable(f"{folder} is an artifact of '{base}'")
    onnx_path = folder / "model.onnx"
    if not onnx_path.is_file():
        raise SnapcError(f"{folder} is a '{manifest.get('target')}' artifact without model.onnx;"
                         " snapc evaluate runs ONNX artifacts: snapc compile "
                         f"{name} --target onnx -o DIR")
    if device != "cpu":
        raise SnapcError(f"{folder} is an ONNX artifact, evaluated on onnxruntime CPU; "
                         "drop --eval-device cuda")
    batches = {s[0] for s in specs.values() if s}
    if set(specs) != set(_SHAPES_INPUTS) or len(batches) != 1 or any(
            specs[k][1:] != v for k, v in _SHAPES_INPUTS.items()):
        raise WeightsError(f"{path}: inputs {specs} are not a shapes UNet's (sample B x 3 x 32 "
                           "x 32, timestep B, encoder_hidden_states B x 20 x 128)")
    try:
        import onnxruntime  # noqa: F401
    except ImportError as exc:
        raise ToolMissingError(f"evaluating an ONNX artifact needs onnxruntime ({exc}); "
                               "pip install onnxruntime") from exc
    batch = batches.pop()
    denoiser = _OnnxDenoiser(onnx_path, batch, tuple(_SHAPES_INPUTS))
    return LoadedDenoiser(name=name, base=base, denoiser=denoiser,
                          sampler=sampler_of(model.get("sampler"), str(path)), kind="onnx",
                          device="cpu", batch=batch,
                          random_weights=bool(model.get("random_weights", False)))


def load_denoiser(model: str, device: str = "cpu") -> LoadedDenoiser:
    """Return MODEL (a shapes-family name, pruned-UNet folder or ONNX artifact folder) as a
    denoiser with its stored sampler, the torch ones on ``device``.

    Raises SnapcError (one line, naming what works) for anything else; the check reads names,
    records and manifests only, so a wrong model costs no weight loading.
    """
    from snapc.manifest import MANIFEST_NAME
    from snapc.models import MODELS
    from snapc.pruned import is_pruned_folder

    check_device(device)
    path = Path(model)
    if model in MODELS:
        return _registered(model, device)
    if path.is_dir() and (path / MANIFEST_NAME).is_file():
        return _artifact(path, device)
    if path.is_dir() and is_pruned_folder(path):
        return _pruned_folder(path, device)
    if path.is_dir():
        raise _not_evaluable(f"{path} has neither a {MANIFEST_NAME} (artifact) nor a snapc "
                             "pruned-UNet record, so its base model is unknown")
    if path.exists():
        raise _not_evaluable(f"{path} is a bare file whose base model is unknown")
    raise _not_evaluable(f"'{model}' is no registered name or folder (registered: "
                         f"{', '.join(MODELS)})")


def check_request(*, prompts: int, steps: int | None = None, spacing: str | None = None,
                  batch: int | None = None, device: str | None = None,
                  alpha_floor: float | None = None) -> None:
    """Raise SnapcError for a request no model can satisfy (prompts < 2, steps or batch < 1,
    an unknown spacing, an alpha floor outside [0, 1), a device not here); callers run it
    before loading anything."""
    if device is not None:
        check_device(device)
    if prompts < 2:
        raise SnapcError(f"--prompts must be >= 2 (the Fréchet distance fits a covariance to "
                         f"the images), not {prompts}")
    if batch is not None and batch < 1:
        raise SnapcError(f"--batch must be >= 1, not {batch}")
    _check_sampler_flags(steps, spacing, alpha_floor)


def _check_sampler_flags(steps: int | None, spacing: str | None,
                         alpha_floor: float | None = None) -> None:
    if steps is not None and steps < 1:
        raise SnapcError(f"--steps must be >= 1, not {steps}")
    if spacing is not None and spacing not in SPACINGS:
        raise SnapcError(f"unknown spacing '{spacing}'; valid: {', '.join(SPACINGS)}")
    if alpha_floor is not None and not 0.0 <= alpha_floor < 1.0:
        raise SnapcError(f"--alpha-floor must be in [0, 1) (0: none), not {alpha_floor:g}")


def resolve_sampler(stored: SamplerSpec, *, steps: int | None = None,
                    guidance: float | None = None, spacing: str | None = None,
                    alpha_floor: float | None = None) -> SamplerSpec:
    """Return ``stored`` with the given fields overridden.

    A model with guidance built in cannot be sampled at another guidance scale: asking for
    one raises SnapcError.
    """
    _check_sampler_flags(steps, spacing, alpha_floor)
    if guidance is not None and stored.guidance_embedded and guidance != stored.guidance:
        raise SnapcError(f"the model has guidance {stored.guidance:g} built in (one conditional "
                         f"UNet call per step); drop --guidance {guidance:g}")
    changes = {k: v for k, v in (("steps", steps), ("guidance", guidance),
                                 ("spacing", spacing), ("alpha_floor", alpha_floor))
               if v is not None}
    return replace(stored, **changes)


def evaluate_model(
    model: str | LoadedDenoiser,
    *,
    prompts: int = 200,
    steps: int | None = None,
    guidance: float | None = None,
    spacing: str | None = None,
    alpha_floor: float | None = None,
    device: str = "cpu",
    batch: int | None = None,
    seed: int = 0,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Return the prompt adherence and FD of MODEL on ``validation_codes(prompts)``.

    ``model`` is what :func:`load_denoiser` takes (loaded on ``device``), or its result.
    steps / guidance / spacing / alpha_floor override the model's stored sampler (None keeps
    it).
    ``batch``: prompts per sampling chunk (default 250; an ONNX artifact runs at its own batch
    and refuses another). ``seed`` seeds the start noise. progress(done, total) follows the
    images. The result has the keys model, base, prompts, steps, guidance, spacing,
    guidance_embedded, unet_calls_per_image, adherence, exact, count, colour, shape, size,
    position, fd, seconds and device. Raises SnapcError for a bad request or a model that is
    not shapes-family.
    """
    from snapc.quality import evaluate, load_feature_classifier, validation_codes
    from snapc.shapes.model import load_text_encoder

    check_request(prompts=prompts, steps=steps, spacing=spacing, batch=batch, device=device,
                  alpha_floor=alpha_floor)
    if isinstance(model, LoadedDenoiser):
        loaded, label = model, model.name
    else:
        loaded, label = load_denoiser(model, device), model
    spec = resolve_sampler(loaded.sampler, steps=steps, guidance=guidance, spacing=spacing,
                           alpha_floor=alpha_floor)
    if loaded.batch is not None and batch not in (None, loaded.batch):
        raise SnapcError(f"the ONNX artifact of '{loaded.name}' runs at batch {loaded.batch} "
                         f"(fixed by its inputs); drop --batch {batch}")
    chunk = loaded.batch or batch or 250
    text = load_text_encoder().to(loaded.device)
    classifier = load_feature_classifier().to(loaded.device)
    codes = validation_codes(prompts)
    start = time.perf_counter()
    scores = evaluate(loaded.denoiser, text, classifier, codes=codes, steps=spec.steps,
                      guidance=spec.guidance, device=loaded.device, spacing=spec.spacing,
                      guidance_embedded=spec.guidance_embedded,
                      alpha_floor=spec.alpha_floor, batch=chunk,
                      batch_cfg=loaded.batch is None, seed=seed, progress=progress)
    seconds = time.perf_counter() - start
    where = "onnxruntime-cpu" if loaded.kind == "onnx" else loaded.device
    return {"model": label, "base": loaded.base, "prompts": prompts, **spec.to_json(),
            "unet_calls_per_image": spec.unet_calls_per_image, **scores,
            "seconds": seconds, "device": where}
