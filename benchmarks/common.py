"""What every benchmark records about the machine, and how it writes its results."""

from __future__ import annotations

import json
import os
import platform
import sys
from datetime import datetime, timezone
from pathlib import Path

import torch


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_details() -> dict:
    """/proc/cpuinfo's vendor, family and model (a VM's model name can be as short as "AMD EPYC"), the ISA
    extensions the kernels depend on, and the instruction set torch dispatches to."""
    info: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            info.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    flags = set(info.get("flags", "").split())
    return {"vendor": info.get("vendor_id"), "family": info.get("cpu family"), "model": info.get("model"),
            "isa": sorted(flags & {"avx2", "avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_tile"}),
            "torch_cpu_capability": torch.backends.cpu.get_cpu_capability()}


# An older CPU's instruction set on this one: torch's, oneDNN's and OpenCV's documented dispatch caps, read at import
# (so set before torch and cv2 load: `with_dispatch`). Other kernels, other summation order and speed.
DISPATCH_KINDS = {
    "native": {},
    "avx2": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2",
             "OPENCV_CPU_DISABLE": "AVX512F,AVX512-SKX,AVX512-CLX"},
    "no-avx": {"ATEN_CPU_CAPABILITY": "default", "ONEDNN_MAX_CPU_ISA": "SSE41",
               "OPENCV_CPU_DISABLE": "AVX,FP16,AVX2,AVX512F,AVX512-SKX,AVX512-CLX"},
    "avx-only": {"ATEN_CPU_CAPABILITY": "default", "ONEDNN_MAX_CPU_ISA": "AVX",
                 "OPENCV_CPU_DISABLE": "AVX2,AVX512F,AVX512-SKX,AVX512-CLX"},
}
DISPATCH_ENV = tuple(dict.fromkeys(k for env in DISPATCH_KINDS.values() for k in env))


def with_dispatch(kind: str) -> None:
    """Re-run this script under ``DISPATCH_KINDS[kind]`` unless its environment already holds it."""
    env = DISPATCH_KINDS[kind]
    if any(os.environ.get(k) != v for k, v in env.items()):
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **env})


def machine(load_before: float) -> dict:
    """CPU, threads and versions; the 1-minute load before and after (other processes slow
    every compared path alike, so the ratios are the result)."""
    return {"cpu": cpu_model(), **cpu_details(), "cpu_count": os.cpu_count(),
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
            "load_average_1min": [load_before, os.getloadavg()[0]],
            "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
            "torch": torch.__version__,
            "dispatch_env": {k: os.environ[k] for k in DISPATCH_ENV if k in os.environ}}


def write_record(out: Path, record: dict) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"machine: {record['machine']}")
    print(f"wrote {out}")
