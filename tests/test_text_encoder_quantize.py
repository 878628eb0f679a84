"""Quantized text encoders through `--components text_encoder --quantize`: the CLIP encoder of
tiny-pipeline and shapes' own are stored quantized in the ONNX artifact (int8 initializers,
DequantizeLinear / QuantizeLinear nodes, one per record), verify at the ONNX gate against
their fake-quantized graphs, say what stayed float, and run the same through snapc's
runtime."""

from __future__ import annotations

import json
from collections import Counter

import onnx
import pytest
import torch
from onnx import numpy_helper

from snapc.clip_text import calibration_tokens
from snapc.compiler import CompileOptions
from snapc.components import compile_components
from snapc.pipeline_models import load_text_encoder
from snapc.runtime import OnnxFunction
from snapc.targets.onnx import OnnxOptions
from snapc.targets.onnx_session import METADATA_KEY, WEIGHT_ONLY_CONFIG, read_config

GATE = OnnxOptions().min_psnr_db  # 60 dB: weight-only artifacts vs the fake-quantized graph


def _compile(tmp_path, model: str, scheme: str) -> tuple[dict, onnx.ModelProto]:
    out = tmp_path / scheme
    compile_components(CompileOptions(model=model, target="onnx", out=out,
                                      quantize={"scheme": scheme, "calibration": 4}),
                       ["text_encoder"])
    manifest = json.loads((out / "text_encoder" / "manifest.json").read_text())
    return manifest, onnx.load(str(out / "text_encoder" / "model.onnx"))


def _int8_weights(model: onnx.ModelProto) -> int:
    return sum(numpy_helper.to_array(i).dtype == "int8" for i in model.graph.initializer)


@pytest.fixture(scope="module")
def clip_w8(tmp_path_factory):
    return _compile(tmp_path_factory.mktemp("te"), "tiny-pipeline", "w8")


def test_clip_w8_is_stored_int8_and_verifies_at_the_gate(clip_w8):
    manifest, model = clip_w8
    records = manifest["quantization"]["counts"]["w8"]
    assert records == 4  # fc1/fc2 of both layers; the 32x32 projections are under 2048 values
    ops = Counter(n.op_type for n in model.graph.node)
    assert ops["DequantizeLinear"] == records and _int8_weights(model) == records
    verification = manifest["verification"]
    assert verification["min_psnr_db"] == GATE and verification["psnr_db"] >= GATE
    assert verification["reference"].startswith("torch fake-quantized graph")
    assert verification["session_config"] == WEIGHT_ONLY_CONFIG
    assert {p.key for p in model.metadata_props} >= {METADATA_KEY}


def test_clip_w8_says_what_stayed_float(clip_w8):
    kept = clip_w8[0]["quantization"]["kept_float"]
    assert kept["min_elements"] == 2048
    assert sorted(kept["embeddings"]) == ["embeddings.position_embedding.weight",
                                          "embeddings.token_embedding.weight"]
    assert len(kept["small_layers"]) == 8  # q/k/v/out projections, 32x32 each
    assert all(n < 2048 for n in kept["small_layers"].values())


def test_runtime_computes_what_was_verified(clip_w8, tmp_path):
    """OnnxFunction runs under the artifact's recorded session config; onnxruntime's default
    would quantize the MatMul activations at run time (50 dB from the fake-quantized graph)."""
    from snapc.clip_text import tokenize, trace_text_encoder
    from snapc.passes import Quantize
    from snapc.passes.quantize import apply_records_to_module
    from snapc.pipeline import PassContext, Pipeline

    parts = load_text_encoder("tiny-pipeline")
    tokens = tokenize(parts.tokenizer, ["a photo of a cat"], parts.max_length)
    graph = Pipeline([Quantize("w8")]).run(trace_text_encoder(parts.module, tokens),
                                           PassContext()).graph
    want = apply_records_to_module(graph, activations=False).example_output
    path = tmp_path / "model.onnx"
    onnx.save(clip_w8[1], str(path))
    assert read_config(path) == WEIGHT_ONLY_CONFIG
    got = OnnxFunction(path, ["input_ids"], 1)(tokens)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_clip_w8a8_calibrates_on_prompts_and_verifies(tmp_path):
    manifest, model = _compile(tmp_path, "tiny-pipeline", "w8a8")
    records = manifest["quantization"]["counts"]["w8a8"]
    ops = Counter(n.op_type for n in model.graph.node)
    assert records == 4 and ops["QuantizeLinear"] == records and _int8_weights(model) == records
    verification = manifest["verification"]
    assert verification["passed"] and verification["psnr_db"] >= verification["min_psnr_db"]
    assert verification["session_config"] == {}  # onnxruntime's QDQ fusions are the point
    quantize = next(p for p in manifest["passes"] if p["name"] == "quantize")
    assert quantize["info"]["calibration_samples"] == 4 and "inputs" not in quantize["params"]


def test_shapes_text_encoder_w8_verifies(tmp_path):
    manifest, model = _compile(tmp_path, "shapes", "w8")
    records = manifest["quantization"]["counts"]["w8"]
    assert records > 0 and _int8_weights(model) == records
    assert manifest["verification"]["psnr_db"] >= GATE


def test_calibration_tokens_fit_and_vary():
    parts = load_text_encoder("tiny-pipeline")
    tokens = calibration_tokens(parts.tokenizer, 8, parts.max_length, seed=3)
    assert tokens.shape == (8, parts.max_length)
    assert torch.equal(tokens, calibration_tokens(parts.tokenizer, 8, parts.max_length, seed=3))
    eos = parts.tokenizer.convert_tokens_to_ids("<|endoftext|>")
    lengths = {int((row != eos).sum()) for row in tokens}
    assert len(lengths) > 2  # short and long prompts alike


def test_calibrating_a_bare_text_encoder_graph_names_the_fix():
    from snapc.calibration import calibration_inputs
    from snapc.clip_text import tokenize, trace_text_encoder
    from snapc.errors import SnapcError

    parts = load_text_encoder("tiny-pipeline")
    graph = trace_text_encoder(parts.module, tokenize(parts.tokenizer, ["a cat"], 16))
    with pytest.raises(SnapcError, match="calibration_tokens"):
        calibration_inputs(graph, 2)
