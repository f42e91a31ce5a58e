"""A quiet console: the project's commands print no other package's warning and no traceback on stderr.

Each command runs as a user runs it (the `consissr` and `dvc` executables, in a subprocess); the
project's own log lines (``<time> WARNING consissr.<module>: ...``) may warn, nothing else may.
"""

import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, copy_tracked_files
from PIL import Image
from test_inference import parts  # noqa: F401  (the tiny stage folders: backbone, net, robust CLIP, GAN)

BIN = Path(sys.executable).parent
# the CLI's logging format (cli.main): "<date> <time> <LEVEL> <logger>: <message>"
OWN_LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\d [\d:,]+ [A-Z]+ (consissr|pipelines)(\.[\w.]+)?: ")


def foreign_noise(stderr: str) -> list[str]:
    """The lines of ``stderr`` that trace back, or warn without being one of the project's log lines."""
    return [line for line in stderr.splitlines()
            if "Traceback" in line or (re.search(r"warning", line, re.IGNORECASE) and not OWN_LOG_LINE.match(line))]


def run(cmd: list[str], cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}", HF_HUB_OFFLINE="1", DVC_NO_ANALYTICS="1",
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_the_noise_filter_tells_foreign_warnings_from_the_projects_own():
    own = "2026-12-05 10:00:00,123 WARNING consissr.inference.upscale: this diffusion model is a briefly trained one"
    bnb = ("2026-12-05 10:00:00,123 WARNING bitsandbytes.backends.cpu.ops: Failed to load CPU gemm_4bit_forward "
           "from kernels-community")
    future = "/venv/lib/python3.11/site-packages/timm/models/layers/__init__.py:48: FutureWarning: Importing from"
    assert foreign_noise("\n".join([own, "upscale: 100%|##########| 1/1", "INFO consissr: done"])) == []
    assert foreign_noise("\n".join([own, bnb, future, "Traceback (most recent call last):"])) == [
        bnb, future, "Traceback (most recent call last):"]


def _record(name: str, level: int, message: str, pathname: str) -> logging.LogRecord:
    return logging.LogRecord(name, level, pathname, 1, message, None, None)


def test_the_compat_filters_drop_exactly_the_known_third_party_records():
    from consissr.compat import THIRD_PARTY_NOISE

    bnb, root = THIRD_PARTY_NOISE["bitsandbytes.backends.cpu.ops"], THIRD_PARTY_NOISE["root"]
    ops = "/venv/site-packages/bitsandbytes/backends/cpu/ops.py"
    assert not bnb.filter(_record("bitsandbytes.backends.cpu.ops", logging.WARNING,
                                  "Failed to load CPU gemm_4bit_forward from kernels-community: offline", ops))
    assert bnb.filter(_record("bitsandbytes.backends.cpu.ops", logging.WARNING, "some other problem", ops))
    factory = f"/venv/site-packages/open_clip{os.sep}factory.py"
    assert not root.filter(_record("root", logging.INFO, "Instantiating model architecture: CLIP", factory))
    assert not root.filter(_record("root", logging.WARNING, "No pretrained weights loaded for model 'x'. Model "
                                   "initialized randomly.", factory))
    assert root.filter(_record("root", logging.WARNING, "Model x initialized partially.", factory))
    assert root.filter(_record("root", logging.INFO, "Instantiating model architecture: CLIP", "/elsewhere/mine.py"))
    pyiqa, api = THIRD_PARTY_NOISE["pyiqa"], "/venv/site-packages/pyiqa/api_helpers.py"
    assert not pyiqa.filter(_record("pyiqa", logging.INFO, "Metric [NIQE] is created.", api))
    assert pyiqa.filter(_record("pyiqa", logging.WARNING, "weights not found", api))


def test_help_is_quiet(tmp_path):
    proc = run([str(BIN / "consissr"), "--help"], tmp_path, timeout=120)
    assert "upscale" in proc.stdout
    assert foreign_noise(proc.stderr) == [], proc.stderr


@pytest.mark.slow  # prepare and degrade once (an MLflow run with an input dataset), then the no-op
def test_dvc_repro_is_quiet_when_it_runs_a_stage_and_when_nothing_changed(tmp_path):
    copy_tracked_files(tmp_path)
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    first = run([str(BIN / "dvc"), "repro", "degrade"], tmp_path)
    assert "Running stage 'degrade'" in first.stdout
    assert foreign_noise(first.stderr) == [], first.stderr
    noop = run([str(BIN / "dvc"), "repro", "degrade"], tmp_path)
    assert "Running stage" not in noop.stdout + noop.stderr and "didn't change" in noop.stdout + noop.stderr
    assert foreign_noise(noop.stderr) == [], noop.stderr


@pytest.mark.slow  # builds the tiny stage folders and saves the pipeline
def test_upscale_of_a_small_image_is_quiet(parts, tmp_path):  # noqa: F811
    from consissr.inference.pipeline import load_pipeline

    load_pipeline(None, device="cpu", stage_dirs=parts).save_pretrained(tmp_path / "model")
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (16, 20, 3), dtype=np.uint8)).save(tmp_path / "in.png")
    proc = run([str(BIN / "consissr"), "upscale", "in.png", "-o", "out", "--model", "model", "--device", "cpu",
                "--mode", "ganemb", "--steps", "2"], tmp_path)
    with Image.open(tmp_path / "out" / "in.png") as img:
        assert img.size == (80, 64)
    assert foreign_noise(proc.stderr) == [], proc.stderr
