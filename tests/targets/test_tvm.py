"""TVM target: x86 matches PyTorch, Mali/Adreno kernels compile and run on PoCL, RPC timing.

The builds use a micro SD-shaped UNet (one cross-attention stage, 8x8 latent) so the file stays
near two minutes on two cores; each artifact is built once per module and shared.
"""

from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch

tvm = pytest.importorskip("tvm", reason="apache-tvm not installed: pip install 'snapc[tvm]'")

from snapc.errors import ToolMissingError  # noqa: E402
from snapc.frontend import trace  # noqa: E402
from snapc.graph import Graph, ModelInfo  # noqa: E402
from snapc.manifest import Manifest  # noqa: E402
from snapc.targets import tvm_targets  # noqa: E402
from snapc.targets.tvm import TvmOptions, export  # noqa: E402

MICRO_UNET = {
    "sample_size": 8, "in_channels": 4, "out_channels": 4, "layers_per_block": 1,
    "block_out_channels": [32, 64], "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"], "cross_attention_dim": 32,
    "attention_head_dim": 8, "norm_num_groups": 8,
}
EM_AARCH64, EM_X86_64 = 183, 62


def _elf_machine(path: Path) -> int:
    head = path.read_bytes()[:20]
    assert head[:4] == b"\x7fELF", f"{path} is not an ELF file"
    return int.from_bytes(head[18:20], "little")


def _opencl_ready() -> str | None:
    try:
        from snapc.targets.tvm_opencl_check import opencl_device

        opencl_device()
    except ToolMissingError as exc:
        return str(exc)
    if shutil.which("aarch64-linux-gnu-g++") is None:
        return "aarch64-linux-gnu-g++ missing: run scripts/setup_tvm.sh"
    return None


needs_opencl = pytest.mark.skipif(_opencl_ready() is not None,
                                  reason=_opencl_ready() or "OpenCL ready")


@pytest.fixture(scope="module")
def graph() -> Graph:
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    net = UNet2DConditionModel(**MICRO_UNET).eval()
    gen = torch.Generator().manual_seed(0)
    inputs = (torch.randn(1, 4, 8, 8, generator=gen), torch.full((1,), 500.0),
              torch.randn(1, 6, 32, generator=gen))
    return trace(net, inputs, ModelInfo(name="micro", random_weights=True))


def _build(graph: Graph, folder: Path, **options: object) -> tuple[Manifest, list[str]]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", RuntimeWarning)
        manifest = export(graph, folder, TvmOptions(**options))
    manifest.write(folder)
    return manifest, [str(w.message) for w in caught if w.category is RuntimeWarning]


@pytest.fixture(scope="module")
def x86(graph: Graph, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Manifest]:
    folder = tmp_path_factory.mktemp("x86")
    return folder, _build(graph, folder, target="x86")[0]


def test_every_snapc_target_maps_to_a_tvm_target() -> None:
    assert set(tvm_targets.TVM_TARGETS) == {"adreno", "mali", "arm-cpu", "x86", "cuda"}
    adreno = tvm.target.Target(tvm_targets.TVM_TARGETS["adreno"].tvm_tag)
    assert "adreno" in adreno.keys and adreno.kind.name == "opencl"
    mali = tvm.target.Target(tvm_targets.TVM_TARGETS["mali"].tvm_dict)
    assert "mali" in mali.keys and mali.kind.name == "opencl"
    with pytest.raises(Exception, match="valid TVM targets: adreno, arm-cpu, cuda, mali, x86"):
        tvm_targets.target_spec("vulkan")


def test_missing_linker_error_names_both(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TVM_NDK_CC", raising=False)
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(ToolMissingError, match="TVM_NDK_CC.*aarch64-linux-gnu-g\\+\\+"):
        tvm_targets.find_toolchain()


def test_ndk_compiler_wins_and_sets_android_triple(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TVM_NDK_CC", sys.executable)  # any executable stands in for the NDK
    chain = tvm_targets.find_toolchain()
    assert (chain.compiler, chain.triple, chain.os) == (sys.executable, "aarch64-linux-android",
                                                        "android")


def test_x86_matches_pytorch_and_writes_a_complete_folder(x86: tuple[Path, Manifest]) -> None:
    from safetensors.numpy import load_file

    folder, manifest = x86
    assert manifest.verification["passed"] is True
    assert manifest.verification["psnr_db"] >= 60.0
    assert _elf_machine(folder / "model.so") == EM_X86_64
    info = json.loads((folder / "manifest.json").read_text())["extra"]["tvm"]
    assert info["entry"] == "main" and info["version"] == tvm.__version__
    assert info["inputs"] == ["sample", "timestep", "encoder_hidden_states"]
    assert list(load_file(str(folder / "params.safetensors"))) == sorted(info["param_order"])
    assert set(info["param_dtypes"].values()) == {"float32"}
    assert [s.name for s in manifest.outputs] == ["noise_pred"]
    assert (folder / "run_on_device.py").read_text().startswith('"""Upload a TVM artifact')


@pytest.mark.parametrize("scheme", ["w8", "w4", "palette4"])
def test_quantized_weights_are_stored_as_codes_and_dequantized_in_the_graph(
        graph: Graph, scheme: str) -> None:
    from snapc.numerics import compare
    from snapc.passes.quantize import Quantize, apply_records_to_module
    from snapc.pipeline import PassContext
    from snapc.targets.tvm_quant import dequantizing_graph

    quantized = Quantize(scheme=scheme).run(graph, PassContext()).graph
    stored, summary = dequantizing_graph(quantized, quantized.quant)
    assert summary and all(s["scheme"] == scheme for s in summary.values())
    codes = [t for n, t in stored.program.state_dict.items() if n.endswith("_codes")]
    assert len(codes) == len(summary)
    assert {t.dtype for t in codes} == {torch.uint8 if scheme == "palette4" else torch.int8}
    fake = apply_records_to_module(quantized, activations=False)  # the pass's own reference
    assert compare(fake.run(), stored.run()).psnr_db > 100
    assert compare(graph.run(), stored.run()).psnr_db < 100  # really quantized


def test_x86_w8_build_stores_int8_weights_and_matches(graph: Graph, tmp_path: Path) -> None:
    from safetensors.numpy import load_file

    from snapc.passes.quantize import Quantize
    from snapc.pipeline import PassContext

    quantized = Quantize(scheme="w8").run(graph, PassContext()).graph
    manifest, _ = _build(quantized, tmp_path, target="x86")
    assert manifest.verification["passed"] and manifest.verification["psnr_db"] >= 60
    weights = load_file(str(tmp_path / "params.safetensors"))
    info = json.loads((tmp_path / "manifest.json").read_text())["extra"]["tvm"]
    int8 = [n for n, w in weights.items() if str(w.dtype) == "int8"]
    assert len(int8) == len(info["quantized_weights"]) > 0
    assert "dequantized" in manifest.verification["reference"]
    assert 20 < manifest.verification["vs_fp32"]["psnr_db"] < manifest.verification["psnr_db"]
    assert manifest.quantization["realised"]["realised"] == {"w8": len(int8)}


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc (CUDA toolkit) not on PATH")
def test_cuda_kernels_are_compiled_ahead_and_served_only_for_their_source(
        graph: Graph, tmp_path: Path) -> None:
    from snapc.targets.tvm_cuda import CALLBACK, use_precompiled_kernels

    manifest, _ = _build(graph, tmp_path, target="cuda")
    kernels = json.loads((tmp_path / "manifest.json").read_text())["extra"]["tvm"]["cuda_kernels"]
    cubin = (tmp_path / kernels["file"]).read_bytes()
    assert cubin[:4] == b"\x7fELF" and kernels["arch"] == "sm_90" and kernels["kernels"] > 0
    assert manifest.files["cuda_kernels"] == kernels["file"]
    if not tvm.cuda(0).exist:
        assert manifest.verification["passed"] is None
        assert "nvcc" in manifest.verification["compiled"]
    assert use_precompiled_kernels(tmp_path) == tmp_path / kernels["file"]
    callback = tvm.get_global_func(CALLBACK)
    with pytest.raises(Exception, match="built from another CUDA source"):
        callback("extern \"C\" __global__ void edited() {}")


@pytest.fixture(scope="module")
def mlp() -> Graph:
    """Two 128x128 Linear layers on 128 tokens: big enough (> 64 on every matmul axis) for
    dlight's tensor-core rule, small enough to build in seconds."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(128, 128), torch.nn.GELU(),
                              torch.nn.Linear(128, 128)).eval()
    return trace(net, (torch.randn(1, 128, 128),), ModelInfo(name="mlp", random_weights=True))


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc (CUDA toolkit) not on PATH")
def test_cuda_fp16_tensor_cores_put_matmuls_on_wmma_and_simt_is_the_default(
        mlp: Graph, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from snapc.targets import tvm_probe
    from snapc.targets.tvm import TENSOR_CORES_OFF

    # The child process would import TVM's tensor intrinsics again (~20 s); the fallback
    # test below covers what happens when it crashes, the adreno test runs a real child.
    monkeypatch.setattr(tvm_probe, "probe_isolated",
                        lambda *_a, **_k: tvm_probe.LoweringProbe(True, "ok", 0.0))

    (tmp_path / "simt").mkdir()
    (tmp_path / "tc").mkdir()
    simt, _ = _build(mlp, tmp_path / "simt", target="cuda", precision="fp16")
    assert simt.extra["tvm"]["cuda_kernels"]["tensor_core_kernels"] == 0
    assert simt.extra["tvm"]["tensor_cores"] is False and TENSOR_CORES_OFF in simt.notes
    tensor, warned = _build(mlp, tmp_path / "tc", target="cuda", precision="fp16",
                            tensor_cores=True)
    kernels = tensor.extra["tvm"]["cuda_kernels"]
    assert kernels["kernels"] > kernels["tensor_core_kernels"] >= 1, kernels  # GELU: SIMT
    assert tensor.extra["tvm"]["tensor_cores"] is True and not warned
    assert "wmma::mma_sync" not in (tmp_path / "simt" / "model.so").read_bytes().decode("latin1")


def test_kernel_counts_skip_declarations_and_find_the_mma_kernels() -> None:
    from snapc.targets.tvm_cuda import kernel_counts

    source = ('extern "C" __global__ void __launch_bounds__(64) a_kernel(float* x);\n'
              'extern "C" __global__ void __launch_bounds__(64) b_kernel(half* y);\n'
              'extern "C" __global__ void __launch_bounds__(64) a_kernel(float* x) {\n'
              '  x[0] = 1.0f;\n}\n'
              'extern "C" __global__ void __launch_bounds__(64) b_kernel(half* y) {\n'
              '  nvcuda::wmma::mma_sync(c, a, b, c);\n}\n')
    assert kernel_counts(source) == {"kernels": 2, "tensor_core_kernels": 1}


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc (CUDA toolkit) not on PATH")
def test_a_crashing_tensor_core_lowering_falls_back_to_simt_with_a_warning(
        mlp: Graph, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from snapc.targets import tvm_probe

    probed = []

    def crashed(program: object, precision: str, target: object,
                tensor_cores: bool = False) -> tvm_probe.LoweringProbe:
        probed.append((precision, tensor_cores))
        return tvm_probe.LoweringProbe(False, "crashed the process with SIGSEGV in TVM pass "
                                       "ApplyDefaultSchedule", 1.0)

    monkeypatch.setattr(tvm_probe, "probe_isolated", crashed)
    manifest, warned = _build(mlp, tmp_path, target="cuda", precision="fp16", tensor_cores=True)
    assert probed == [("fp16", True)]
    message = ("dlight's tensor-core (MMA) schedules crashed the process with SIGSEGV in TVM "
               "pass ApplyDefaultSchedule; built SIMT matmuls instead")
    assert warned == [message] and message in manifest.notes
    assert manifest.extra["tvm"]["cuda_kernels"]["tensor_core_kernels"] == 0
    assert manifest.extra["tvm"]["tensor_cores"] is False


@pytest.mark.parametrize(("options", "message"), [
    ({"target": "x86", "tensor_cores": True}, "tensor cores apply to the cuda target, not x86"),
    ({"target": "cuda", "tensor_cores": True}, "tensor cores need fp16 compute: add --precision"),
    ({"target": "cuda", "precision": "bf16"}, "precision must be fp16 or fp32, got 'bf16'"),
])
def test_tensor_core_and_precision_options_are_checked_up_front(options: dict,
                                                                message: str) -> None:
    from snapc.errors import SnapcError

    with pytest.raises(SnapcError, match=message):
        TvmOptions(**options).check()


def test_the_cuda_callback_serves_the_cubin_for_its_own_source() -> None:
    from snapc.targets.tvm_cuda import CALLBACK, register_kernels, source_digest

    source = "extern \"C\" __global__ void k(float* x) { x[0] = 1.0f; }"
    register_kernels(b"\x7fELF-cubin", source_digest(source))
    callback = tvm.get_global_func(CALLBACK)
    assert bytes(callback(source)) == b"\x7fELF-cubin"
    with pytest.raises(Exception, match="built from another CUDA source"):
        callback(source + " ")


@needs_opencl
def test_mali_fp16_builds_for_aarch64_and_its_twin_kernels_compile_and_match(
        graph: Graph, tmp_path: Path) -> None:
    manifest, warned = _build(graph, tmp_path, target="mali")
    info, check = manifest.extra["tvm"], manifest.verification
    assert _elf_machine(tmp_path / "model.so") == EM_AARCH64
    assert info["precision"] == "fp16" and set(info["param_dtypes"].values()) == {"float16"}
    assert "mali" in info["target"]["keys"] and "aarch64" in info["target"]["host"]["mtriple"]
    assert check["passed"] is True and not warned
    assert "fp32 twin" in check["checked_build"]  # PoCL has no cl_khr_fp16
    assert check["compile"]["kernels"] == check["compile"]["compiled"] > 10
    runs = [r for r in check["kernel_runs"] if "psnr_db" in r]
    assert len(runs) >= 3 and all(r["psnr_db"] >= 60.0 for r in runs)
    assert any("conv2d" in r["kernel"] for r in runs)


@needs_opencl
def test_adreno_falls_back_to_buffers_with_the_reason_and_compiles(
        graph: Graph, tmp_path: Path) -> None:
    manifest, warned = _build(graph, tmp_path, target="adreno", precision="fp32")
    target = manifest.extra["tvm"]["target"]
    assert _elf_machine(tmp_path / "model.so") == EM_AARCH64
    assert "adreno" in target["keys"]
    if "texture" not in target["keys"]:  # 0.27: ConvertLayout fails in the texture pipeline
        # (a segfault with apache-tvm-ffi 0.1.15, a ValueError on relax.nn.group_norm with the
        # pinned 0.1.14): either way the fallback names the pass and how it failed.
        assert len(warned) == 1 and "qcom/adreno-opencl-texture" in warned[0]
        assert "ConvertLayout" in warned[0]
        assert ("crashed the process with SIG" in warned[0]
                or "failed (exit status 1)" in warned[0])
        assert warned[0] in manifest.notes
    check = manifest.verification
    assert check["checked_build"] == "the artifact's own kernels"
    assert check["compile"]["kernels"] == check["compile"]["compiled"] > 10


@needs_opencl
def test_a_kernel_that_does_not_compile_is_named() -> None:
    from snapc.targets.tvm_opencl_check import compile_kernels, opencl_device

    source = ("__kernel void good_kernel(__global float* restrict a) { a[0] = 1.0f; }\n"
              "__kernel void bad_kernel(__global float* restrict a) {\n"
              "  a[0] = undeclared_value;\n}\n")
    report, program = compile_kernels(source, opencl_device())
    assert program is None and not report.ok
    assert list(report.failures) == ["bad_kernel"] and "undeclared" in report.failures["bad_kernel"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_rpc_profile_times_the_x86_artifact_on_a_local_server(
        x86: tuple[Path, Manifest]) -> None:
    pytest.importorskip("cloudpickle", reason="TVM's RPC server needs cloudpickle")
    from snapc.targets.tvm_rpc import profile

    port = _free_port()
    server = subprocess.Popen([sys.executable, "-m", "tvm.exec.rpc_server", "--host",
                               "127.0.0.1", "--port", str(port), "--port-end", str(port + 1)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.5)
        timing = profile(x86[0], f"127.0.0.1:{port}", repeat=2)
    finally:
        server.send_signal(signal.SIGINT)  # SIGTERM would leave the server's worker behind
        server.wait(timeout=30)
    assert timing.mean_ms > 0 and timing.output_shape == (1, 4, 8, 8)
    assert timing.target == "x86" and timing.repeat == 2
