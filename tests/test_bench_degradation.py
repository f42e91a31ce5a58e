"""benchmarks/bench_degradation.py: a small run, natively and under an older CPU's instruction set (--dispatch)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from conftest import REPO


def bench(tmp_path, *extra: str) -> dict:
    out = tmp_path / "degradation.json"
    done = subprocess.run([sys.executable, "benchmarks/bench_degradation.py", "--sizes", "64", "--images", "1",
                           "--repeats", "1", "--out", str(out), *extra], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(out.read_text())


def test_degrade_outruns_the_reference_and_records_the_cpu(tmp_path):
    record = bench(tmp_path)
    (row,) = record["results"]
    assert row["size"] == 64 and row["speedup"] > 1.0
    assert record["machine"]["torch_cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert record["machine"]["dispatch_env"] == {}


def test_dispatch_runs_torch_on_the_older_instruction_set(tmp_path):
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        pytest.skip("this CPU has no AVX2 to cap at")
    machine = bench(tmp_path, "--dispatch", "avx2")["machine"]
    assert machine["torch_cpu_capability"] == "AVX2"  # torch's own report, read in the re-run process
    assert machine["dispatch_env"]["ONEDNN_MAX_CPU_ISA"] == "AVX2"
