"""The onnxruntime session config an ONNX artifact needs, carried in the model itself.

onnxruntime (1.2x on) rewrites a weight ``DequantizeLinear`` feeding a ``MatMul`` into its
``MatMulNBits`` kernel, whose default accuracy level 4 quantizes the MatMul's *activations* to
int8 at run time (one dynamic scale per row). A weight-only artifact (``w8``, ``w4``, ``mixed``:
int8/int4 weights, fp32 compute) then computes dynamic w8a8 instead of what it stores and was
checked against. Measured on the random-weight CLIP text encoders: ``tiny-pipeline`` w8 50.3 dB
against its fake-quantized graph under the default session, 138.6 dB with the config below;
``sd15-pipeline`` 51.0 dB between the two sessions.

``session.disable_quant_qdq = 1`` turns onnxruntime's QDQ rewrites off, so the DequantizeLinear
of each weight is an ordinary op on constant inputs: the artifact stores int8 and computes fp32,
as fast as the fp32 model (``session.qdq_matmulnbits_accuracy_level = 1`` is exact too, but its
8-bit MatMulNBits with fp32 compute ran about 2x slower than the fp32 model on this CPU).
Artifacts with quantized activations (``w8a8``) need the QDQ rewrites (they are what becomes
QLinearConv / MatMulIntegerToFloat) and get no config.

The config is written into the model's ``metadata_props`` under :data:`METADATA_KEY` (JSON), so
the artifact carries it for any consumer; the ONNX target verifies under it and records it
(``verification.session_config``), and snapc's runtime (:class:`snapc.runtime.OnnxFunction`)
reads it back through :func:`session_options`.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

__all__ = ["METADATA_KEY", "WEIGHT_ONLY_CONFIG", "config_for", "write_config", "read_config",
           "session_options"]

METADATA_KEY = "snapc.onnxruntime_session_config"
WEIGHT_ONLY_CONFIG = {"session.disable_quant_qdq": "1"}
_DEQUANTIZED = {"w8", "w4"}  # schemes realised as a weight DequantizeLinear


def config_for(schemes: Iterable[str]) -> dict[str, str]:
    """Return the session config an artifact realising records of ``schemes`` needs: the
    weight-only config when a weight is DequantizeLinear'd and no activation is quantized."""
    schemes = set(schemes)
    if "w8a8" in schemes or not schemes & _DEQUANTIZED:
        return {}
    return dict(WEIGHT_ONLY_CONFIG)


def write_config(model: Any, config: dict[str, str]) -> None:
    """Record ``config`` in the ONNX ``model``'s metadata (replacing an earlier record); an
    empty config removes the record."""
    kept = [p for p in model.metadata_props if p.key != METADATA_KEY]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    if config:
        entry = model.metadata_props.add()
        entry.key, entry.value = METADATA_KEY, json.dumps(config, sort_keys=True)


def read_config(path: Path | str) -> dict[str, str]:
    """Return the session config recorded in the ONNX model at ``path`` ({} when none); the
    weights are not read (``load_external_data=False``)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    for prop in model.metadata_props:
        if prop.key == METADATA_KEY:
            return {str(k): str(v) for k, v in json.loads(prop.value).items()}
    return {}


def session_options(path: Path | str, threads: int = 0) -> Any:
    """Return onnxruntime SessionOptions for the model at ``path``: its recorded session
    config (:func:`read_config`) and ``threads`` intra-op threads (0: onnxruntime's choice)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    for key, value in read_config(path).items():
        options.add_session_config_entry(key, value)
    return options
