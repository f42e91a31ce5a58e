"""What every benchmark records about the machine, and how it writes its results."""

from __future__ import annotations

import json
import os
import platform
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


def machine(load_before: float) -> dict:
    """CPU, threads and versions; the 1-minute load before and after (other processes slow
    every compared path alike, so the ratios are the result)."""
    return {"cpu": cpu_model(), "cpu_count": os.cpu_count(), "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
            "load_average_1min": [load_before, os.getloadavg()[0]],
            "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
            "torch": torch.__version__}


def write_record(out: Path, record: dict) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"machine: {record['machine']}")
    print(f"wrote {out}")
