"""The benchmark's CPU path on the tiny model: the same code the GPU run uses, so it cannot rot.

Asserts the structure of the report and its files, never timings (CI machines vary).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"

from benchmarks.bench_engine import VARIANTS, kernel_summary, markdown_table, run  # noqa: E402


def test_cpu_benchmark_writes_json_and_markdown(tmp_path: Path) -> None:
    out = tmp_path / "results"
    report = run(
        ["--tiny", "--device", "cpu", "--size", "64", "--frames", "4", "--steps", "2",
         "--repeats", "1", "--warmup", "0", "--variants", "stock,auto,dpm25", "--profile", "auto",
         "--model-cache", str(tmp_path / "models"), "--out", str(out)],
        log=lambda _line: None,
    )
    names = [v["name"] for v in report["variants"]]
    assert names == ["stock", "auto", "dpm25"]
    for variant in report["variants"]:
        assert variant["status"] == "ok", variant["error"]
        assert variant["median_seconds"] > 0 and variant["first_call_seconds"] > 0
        assert variant["tflops"] is not None and variant["peak_gib"] is None  # CPU: no GPU peak
        assert variant["drift_rel_l2"] is not None and variant["nonfinite"] is False
    stock, auto, dpm = report["variants"]
    assert stock["drift_rel_l2"] == 0.0
    # On a CPU the engine changes nothing: its frames equal stock's, bit for bit.
    assert auto["drift_rel_l2"] == 0.0
    # A quality trade is reported with how far it drifts from stock.
    assert dpm["drift_rel_l2"] > 0 and dpm["speed"]["scheduler"] == "dpm++"
    assert auto["speed"]["preset"] == "stock" and auto["speed"]["compile"] == "off"
    assert report["flops_per_video_tflop"] is not None
    files = sorted(p.name for p in out.iterdir())
    assert files == ["engine-cpu-64x4.json", "engine-cpu-64x4.md", "profile-auto.json", "profile-auto.txt"]
    assert "aten::" in (out / "profile-auto.txt").read_text()  # the CPU ops of one render
    assert json.loads((out / "profile-auto.json").read_text())["gpu_seconds"] == 0  # no GPU kernels on a CPU
    saved = json.loads((out / "engine-cpu-64x4.json").read_text())
    assert saved["environment"]["device"] == "cpu" and saved["config"]["size"] == 64
    table = (out / "engine-cpu-64x4.md").read_text()
    assert "| stock |" in table and "| auto |" in table
    # Each engine variant records whether AOT packages fell back to torch.compile, and the table says so:
    # otherwise a package that failed to build would be timed and reported as the packaged path.
    assert auto["speed"]["aot_fallbacks"] == [] and "fell back" not in table
    auto["speed"]["aot_fallbacks"] = ["unet: RuntimeError: no kernel"]
    assert "**aot fell back to torch.compile**: unet: RuntimeError: no kernel" in markdown_table(report)


def test_every_variant_is_engine_options() -> None:
    from infra.engine.loader import EngineOptions

    for name, fields in VARIANTS.items():
        if fields is not None:
            EngineOptions(**fields).check()  # raises on a bad lever name or value
        else:
            assert name == "stock"


def test_kernel_summary_sorts_kernels_by_kind() -> None:
    # Kernel names as the profile of an H100 render lists them (benchmarks/results/profile-*.txt).
    kernels = [
        ("sm90_xmma_fprop_implicit_gemm_f16f16_f16f32_f32_nhwckrsc_nhwc_tilesize128x128x64", 0.30, 1771),
        ("nvjet_sm90_hsh_128x256_64x4_2x1_v_bz_coopA_bias_TNN", 0.31, 850),
        ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_7_64x128x64", 0.54, 1648),
        ("_short_attention_kernel", 0.125, 1700),
        ("triton_poi_fused_gelu_mul_split_view_44", 0.167, 500),
        ("triton_per_fused_add_native_group_norm_12", 0.074, 800),
        ("triton_poi_fused_clone_convolution_native_group_norm_silu_33", 0.074, 750),  # not a convolution
        ("void at::native::elementwise_kernel<128, 4>", 0.01, 10),
    ]
    summary = kernel_summary(kernels)
    kinds = summary["by_kind"]
    assert kinds["convolution"]["seconds"] == 0.3 and kinds["matmul"]["calls"] == 850
    assert kinds["attention"]["seconds"] == 0.54  # cuDNN's flash SDPA is attention, not a convolution
    assert kinds["short attention (Triton)"]["seconds"] == 0.125
    assert kinds["triton pointwise"]["seconds"] == 0.241 and kinds["triton reduction (norms)"]["calls"] == 800
    assert kinds["other"]["seconds"] == 0.01
    assert list(kinds)[0] == "attention"  # most expensive first
    assert summary["gpu_seconds"] == 1.6
    assert [k["kernel"] for k in summary["top_generated"]] == [
        "triton_poi_fused_gelu_mul_split_view_44", "triton_per_fused_add_native_group_norm_12",
        "triton_poi_fused_clone_convolution_native_group_norm_silu_33"]
