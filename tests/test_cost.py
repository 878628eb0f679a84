"""Cost model: device profiles, roofline per node, estimates, tables, fitting, bad input."""

from __future__ import annotations

import dataclasses
import json
import warnings

import pytest
import torch
import typer
from typer.testing import CliRunner

from snapc.cli_profile import cost_command
from snapc.cost import (
    ANALYTIC,
    FITTED,
    MEASURED,
    BlockEntry,
    CostModel,
    DeviceError,
    LatencyTable,
    TableError,
    TableMismatchWarning,
    block_work,
    builtin_devices,
    fit,
    graph_signature,
    load_device,
    summarize,
)
from snapc.cost.roofline import node_seconds, roofline
from snapc.cost.work import ATTENTION, OP_CLASSES, node_work
from snapc.errors import UnknownNameError

BUILT_INS = ["adreno740", "h100", "iphone14pro-ane", "local-cpu", "mali-g715"]


def test_builtin_profiles_load_with_every_field():
    assert builtin_devices() == BUILT_INS
    for name in BUILT_INS:
        device = load_device(name)
        assert device.name == name
        assert device.peak_flops("fp32") > 0 and device.bandwidth() > 0
        assert set(device.efficiency) == set(OP_CLASSES)
    assert load_device("iphone14pro-ane").peak_flops("fp16") == 17e12


def test_every_builtin_field_has_a_source_comment():
    from snapc.cost.device import DEVICES_DIR

    for path in DEVICES_DIR.glob("*.toml"):
        lines = path.read_text().splitlines()
        section_sourced = False
        for i, line in enumerate(lines):
            code = line.split("#", 1)[0].strip()
            above = any(x.lstrip().startswith("#") for x in lines[max(0, i - 4):i])
            if code.startswith("["):
                section_sourced = above
            elif "=" in code and not code.startswith(("name", "description")):
                assert "#" in line or above or section_sourced, f"{path.name}: {line}"


def test_unknown_device_name_lists_the_valid_ones():
    with pytest.raises(UnknownNameError, match="unknown device 'pixel9'.*adreno740"):
        load_device("pixel9")


def test_user_profile_file_loads_and_bad_files_fail_with_one_line(tmp_path):
    good = tmp_path / "mine.toml"
    good.write_text('name = "mine"\nmemory_gbps = 10\nlaunch_us = 1\n[peak_tflops]\nfp32 = 1\n'
                    "[efficiency]\n" + "".join(f"{c} = 0.5\n" for c in OP_CLASSES))
    assert load_device(good).memory_gbps == 10
    as_json = tmp_path / "mine.json"
    as_json.write_text(json.dumps(load_device(good).to_json()))
    assert load_device(as_json).efficiency == load_device(good).efficiency
    broken = tmp_path / "broken.toml"
    broken.write_text("name = \n")
    with pytest.raises(DeviceError, match="cannot read device profile"):
        load_device(broken)
    missing = tmp_path / "missing.toml"
    missing.write_text('memory_gbps = 10\n[peak_tflops]\nfp32 = 1\n[efficiency]\nconv = 1\n')
    with pytest.raises(DeviceError, match="efficiency misses"):
        load_device(missing)
    with pytest.raises(DeviceError, match="not found"):
        load_device(tmp_path / "absent.toml")


def _sdpa_node(tokens: int, heads: int = 8, dim: int = 40) -> torch.fx.Node:
    class Attention(torch.nn.Module):
        def forward(self, q, k, v):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v)

    shape = (1, heads, tokens, dim)
    qkv = tuple(torch.empty(shape, device="meta") for _ in range(3))
    program = torch.export.export(Attention(), qkv)
    return next(n for n in program.graph.nodes if "scaled_dot_product" in str(n.target))


def test_unfused_attention_at_64x64_is_memory_bound_on_phones():
    node = _sdpa_node(4096)  # SD-1.5 self-attention at a 64x64 latent
    work = node_work(node, "fp16")
    assert work.op_class == ATTENTION and work.attention_scores == 8 * 4096 * 4096
    adreno = load_device("adreno740")
    assert roofline(work, adreno, "fp16").memory_bound
    fused = dataclasses.replace(adreno, fused_attention=True)
    assert not roofline(work, fused, "fp16").memory_bound
    # the score matrix: 4 passes x 134 M elements x 2 B through 64 GB/s
    assert roofline(work, adreno, "fp16").memory_s == pytest.approx(
        (work.bytes + 4 * 8 * 4096**2 * 2) / 64e9)
    assert node_seconds(work, adreno, "fp16") > node_seconds(work, fused, "fp16")


def test_fused_attention_pays_for_idle_compute_units_on_the_h100():
    h100 = load_device("h100")  # 132 SMs, 64 query rows per fp32 tile
    small, large = node_work(_sdpa_node(64), "fp32"), node_work(_sdpa_node(1024), "fp32")
    assert small.rows == 8 * 64 and large.rows == 8 * 1024
    flat = dataclasses.replace(h100, compute_units=0)

    def per_flop(work, device):
        line = roofline(work, device, "fp32")
        return line.base_s / work.flops

    # 8x8 latent: 8 tiles on 132 SMs -> 16.5x its roofline; 32x32: 128 tiles -> 1.03x
    assert per_flop(small, h100) == pytest.approx(per_flop(small, flat) * 132 / 8)
    assert per_flop(large, h100) == pytest.approx(per_flop(large, flat) * 132 / 128)
    # 264 tiles: exactly two full waves, no loss; 265: a third, nearly empty wave
    full, ragged = node_work(_sdpa_node(2112), "fp32"), node_work(_sdpa_node(2120), "fp32")
    assert per_flop(full, h100) == pytest.approx(per_flop(full, flat))
    assert per_flop(ragged, h100) == pytest.approx(per_flop(ragged, flat) * 3 * 132 / 265)
    # the fp16 kernel (FlashAttention-2) takes 128-row tiles; unfused attention is not tiled
    assert roofline(small, h100, "fp16").base_s == pytest.approx(
        roofline(small, flat, "fp16").base_s * 132 / 4)
    unfused = dataclasses.replace(h100, fused_attention=False)
    assert roofline(small, unfused, "fp32") == roofline(
        small, dataclasses.replace(unfused, compute_units=0), "fp32")


def test_compute_unit_fields_are_validated(tmp_path):
    base = ('memory_gbps = 10\n{extra}[peak_tflops]\nfp32 = 1\n[efficiency]\n'
            + "".join(f"{c} = 0.5\n" for c in OP_CLASSES) + "{table}")
    path = tmp_path / "gpu.toml"
    path.write_text(base.format(extra="compute_units = 4\n",
                                table="[attention_query_tile]\nfp16 = 128\n"))
    device = load_device(path)
    assert device.compute_units == 4 and device.attention_query_tile == {"fp16": 128}
    assert load_device(path).to_json()["attention_query_tile"] == {"fp16": 128}
    path.write_text(base.format(extra="compute_units = -1\n", table=""))
    with pytest.raises(DeviceError, match="'compute_units' must be a whole number"):
        load_device(path)
    path.write_text(base.format(extra="", table="[attention_query_tile]\nfp64 = 64\n"))
    with pytest.raises(DeviceError, match="unknown dtype.*attention_query_tile"):
        load_device(path)


def test_estimates_are_pure_and_sum_up(tiny_graph):
    before = (len(tiny_graph.fx.nodes), tiny_graph.program.graph_module.code)
    model = CostModel("adreno740", dtype="fp16")
    estimate = model.estimate_graph(tiny_graph)
    assert (len(tiny_graph.fx.nodes), tiny_graph.program.graph_module.code) == before
    assert set(estimate.per_block) == {b.name for b in tiny_graph.blocks}
    assert all(e.source == ANALYTIC for e in estimate.per_block.values())
    assert estimate.total_ms == pytest.approx(estimate.blocks_ms() + estimate.non_block_ms)
    node_total = sum(model.estimate_node(n, "fp16") for n in tiny_graph.fx.nodes)
    assert node_total == pytest.approx(estimate.total_ms, rel=1e-9)
    fp32 = CostModel("adreno740", dtype="fp32").estimate_graph(tiny_graph)
    assert fp32.total_ms > estimate.total_ms


def test_saving_subtracts_the_surviving_shortcut(tiny_graph):
    model = CostModel("local-cpu")
    with_shortcut = tiny_graph.blocks["up_blocks.0.resnets.0"]  # 128 -> 64: conv_shortcut
    assert with_shortcut.shortcut is not None
    saving = model.saving_ms(tiny_graph, with_shortcut.name)
    assert 0 < saving < model.estimate_block(with_shortcut, tiny_graph).ms
    attention = "mid_block.attentions.0"
    assert model.saving_ms(tiny_graph, attention) == pytest.approx(
        model.estimate_block(attention, tiny_graph).ms)


def _synthetic_table(graph, device, signature=None, whole_ms=None) -> LatencyTable:
    """A table whose timings are exactly ``device``'s roofline for each block."""
    model = CostModel(device)
    entries = []
    for block in graph.blocks:
        ms = model.estimate_block(block, graph).ms
        entries.append(BlockEntry(block.name, block.stage, block.signature("float32"),
                                  summarize([ms, ms * 1.01, ms * 0.99]), block.macs,
                                  tuple(block_work(graph, block))))
    whole = summarize([whole_ms]) if whole_ms else None
    return LatencyTable(device.name, "torch", graph.source.name,
                        signature or graph_signature(graph), "float32", tuple(entries), whole)


def test_fit_recovers_known_efficiencies(tiny_graph):
    prior = load_device("h100")
    truth = prior.with_fit({"conv": 0.3, "matmul": 0.2, "attention": 0.1, "norm": 0.05,
                            "elementwise": 0.4}, 20.0, {})
    table = _synthetic_table(tiny_graph, dataclasses.replace(truth, fit=None))
    fitted = fit(prior, table)
    truth_model, fitted_model = CostModel(truth), CostModel(fitted)
    for block in tiny_graph.blocks:
        assert fitted_model.estimate_block(block, tiny_graph).ms == pytest.approx(
            truth_model.estimate_block(block, tiny_graph).ms, rel=0.05)
    assert fitted.launch_us == pytest.approx(20.0, rel=0.1)
    assert fitted.fit["blocks"] == len(tiny_graph.blocks)
    assert prior.efficiency["conv"] == 1.2  # the prior profile is unchanged


def test_fit_recovers_a_small_gemm_penalty(tiny_graph):
    # efficiency falling with the GEMM size (small-spatial convs): a per-class efficiency
    # alone cannot fit it, the size term can
    prior = load_device("local-cpu")
    truth = dataclasses.replace(prior.with_fit(
        {"conv": 0.5, "matmul": 0.3, "attention": 0.2, "norm": 0.2, "elementwise": 0.2},
        10.0, {}, small_gemm_rows={"conv": 400.0, "matmul": 50.0}), fit=None)
    table = _synthetic_table(tiny_graph, truth)
    fitted = fit(prior, table)
    assert fitted.small_gemm_rows["conv"] == pytest.approx(400.0, rel=0.3)  # few sizes in tiny
    truth_model, fitted_model = CostModel(truth), CostModel(fitted)
    for block in tiny_graph.blocks:
        assert fitted_model.estimate_block(block, tiny_graph).ms == pytest.approx(
            truth_model.estimate_block(block, tiny_graph).ms, rel=0.05)
    without = dataclasses.replace(truth, small_gemm_rows={})
    assert CostModel(without).estimate_graph(tiny_graph).total_ms < \
        truth_model.estimate_graph(tiny_graph).total_ms


def test_quantized_weights_cost_their_stored_bytes(tiny_graph):
    from snapc.passes.quantize import Quantize
    from snapc.pipeline import PassContext

    phone = CostModel("adreno740", dtype="fp16")  # bandwidth-bound: weight bytes show up
    plain = phone.estimate_graph(tiny_graph).total_ms
    w8 = Quantize(scheme="w8").run(tiny_graph, PassContext()).graph
    palette4 = Quantize(scheme="palette4").run(tiny_graph, PassContext()).graph
    assert phone.estimate_graph(palette4).total_ms < phone.estimate_graph(w8).total_ms < plain
    conv = "down_blocks.0.resnets.0"
    bytes_fp16 = sum(w.bytes for w in block_work(tiny_graph, tiny_graph.blocks[conv], "fp16"))
    bytes_w8 = sum(w.bytes for w in block_work(w8, w8.blocks[conv], "fp16"))
    weights = sum(p.numel() for n, p in tiny_graph.program.state_dict.items()
                  if n.startswith(f"net.{conv}.") and n.endswith("weight") and p.dim() > 1)
    assert bytes_fp16 - bytes_w8 == pytest.approx(weights * (2 - 1), rel=0.01)


def test_measured_entries_win_and_the_rest_is_fitted(tiny_graph):
    device = load_device("h100")
    table = _synthetic_table(tiny_graph, device, whole_ms=50.0)
    keep = ["down_blocks.0.resnets.0", "mid_block.attentions.0"]
    model = CostModel(device, table=table.subset(keep))
    estimate = model.estimate_graph(tiny_graph)
    sources = {n: e.source for n, e in estimate.per_block.items()}
    assert sources["mid_block.attentions.0"] == MEASURED
    assert sources["down_blocks.0.resnets.0"] == MEASURED
    assert sources["down_blocks.0.resnets.1"] == MEASURED  # same signature as resnets.0
    assert sources["up_blocks.0.resnets.0"] == FITTED
    assert estimate.non_block_source == FITTED  # the subset has no whole-model figure
    full = CostModel(device, table=table).estimate_graph(tiny_graph)
    assert full.non_block_source == MEASURED
    assert full.non_block_ms == pytest.approx(50.0 - table.sum_blocks_ms())


def test_table_for_another_model_warns_and_uses_only_matching_blocks(tiny_graph):
    device = load_device("h100")
    table = _synthetic_table(tiny_graph, device, signature="0123456789abcdef", whole_ms=50.0)
    model = CostModel(device, table=table)
    with pytest.warns(TableMismatchWarning, match="another model signature"):
        estimate = model.estimate_graph(tiny_graph)
    assert estimate.per_block["mid_block.attentions.0"].source == MEASURED
    assert estimate.non_block_source == FITTED  # whole-model figure is for another model
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once per graph, not on every call
        model.estimate_block("mid_block.attentions.0", tiny_graph)


def test_table_for_another_device_is_refused(tiny_graph):
    table = _synthetic_table(tiny_graph, load_device("h100"))
    with pytest.raises(TableError, match="measured on 'h100', not 'adreno740'"):
        CostModel("adreno740", table=table)


def test_table_round_trips_and_malformed_files_fail(tiny_graph, tmp_path):
    table = _synthetic_table(tiny_graph, load_device("h100"), whole_ms=40.0)
    path = table.write(tmp_path / "t.json")
    again = LatencyTable.read(path)
    assert again.to_json() == table.to_json()
    (tmp_path / "garbage.json").write_text("{not json")
    with pytest.raises(TableError, match="malformed latency table"):
        LatencyTable.read(tmp_path / "garbage.json")
    (tmp_path / "other.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(TableError, match="not a snapc latency table"):
        LatencyTable.read(tmp_path / "other.json")
    data = table.to_json()
    del data["blocks"][0]["signature"]
    (tmp_path / "field.json").write_text(json.dumps(data))
    with pytest.raises(TableError, match="malformed latency table.*signature"):
        LatencyTable.read(tmp_path / "field.json")
    with pytest.raises(TableError, match="not found"):
        LatencyTable.read(tmp_path / "absent.json")


def test_a_failed_table_write_keeps_the_old_file_and_leaves_nothing_behind(tiny_graph,
                                                                             tmp_path):
    table = _synthetic_table(tiny_graph, load_device("h100"), whole_ms=40.0)
    path = table.write(tmp_path / "t.json")
    before = path.read_text()
    broken = dataclasses.replace(table, meta={"not json": object()})
    with pytest.raises(TypeError):
        broken.write(path)
    assert path.read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.json"]


def _cost_app() -> typer.Typer:
    app = typer.Typer()
    app.command("cost")(cost_command)
    app.command("noop")(lambda: None)  # two commands: typer keeps the subcommand name
    return app


def test_cost_cli_reports_bad_input_with_exit_2(tmp_path):
    runner = CliRunner()
    result = runner.invoke(_cost_app(), ["cost", "tiny", "--device", "pixel9"])
    assert result.exit_code == 2 and "unknown device 'pixel9'" in result.output
    (tmp_path / "bad.json").write_text("[]")
    result = runner.invoke(_cost_app(), ["cost", "tiny", "--device", "h100", "--table",
                                         str(tmp_path / "bad.json")])
    assert result.exit_code == 2 and "not a snapc latency table" in result.output


def test_cost_cli_prints_json_with_savings():
    result = CliRunner().invoke(_cost_app(), ["cost", "tiny", "--device", "mali-g715",
                                              "--dtype", "fp16", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output[result.output.index("{"):])
    assert data["device"] == "mali-g715" and data["dtype"] == "fp16"
    assert set(data["saving_ms"]) == set(data["per_block"])
