"""`dvc repro evaluate` on the embedded default in a temporary copy, then `dvc metrics diff` after a param change."""

import csv
import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import SHORT_TRAINING, copy_tracked_files, set_params

SMALL = {  # the embedded default made smaller still, so the whole chain runs in minutes on 2 cores
    **SHORT_TRAINING, "train_clip.iterations": 2, "train_sdsr.iterations": 2,
    "evaluate.lr_crop": 24, "evaluate.full_steps": 2, "evaluate.rec_steps": 2, "evaluate.gen_steps": 2,
    "evaluate.sweep_t_max": [600, 1000], "evaluate.sweep_steps": [1], "evaluate.sweep_nr_metric": "ssim",
    "evaluate.grid_images": 1,
}


def _run(cwd, *args, env):
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout + proc.stderr


def _set(params_path, values):
    set_params(params_path, values)
    raw = yaml.safe_load(params_path.read_text())
    raw["evaluate"]["datasets"][0]["count"] = 2
    params_path.write_text(yaml.safe_dump(raw, sort_keys=False))


@pytest.mark.slow
def test_dvc_repro_evaluate_then_metrics_diff(tmp_path, dvc_cache, user_photos):
    copy_tracked_files(tmp_path)
    bin_dir = Path(sys.executable).parent
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", DVC_NO_ANALYTICS="1",
               HF_HUB_OFFLINE="1", GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@example.com",
               GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@example.com")
    env.pop("MLFLOW_TRACKING_URI", None)
    dvc = str(bin_dir / "dvc")
    # the user's folder of photos (3 of them broken) as the only change to the sources
    small = {**SMALL, "prepare.sources": [str(user_photos)]}
    _set(tmp_path / "params.yaml", small)
    _run(tmp_path, "git", "init", "-q", env=env)
    _run(tmp_path, dvc, "cache", "dir", "--local", str(dvc_cache), env=env)  # data stages: test_dvc_pipeline's runs
    out = _run(tmp_path, dvc, "repro", "evaluate", env=env)
    assert "Running stage 'evaluate'" in out

    prepared = json.loads((tmp_path / "data" / "prepared" / "report.json").read_text())
    assert sorted(Path(s["path"]).name for s in prepared["skipped"]) == ["cut off.jpg", "empty.jpg", "notes.png"]
    assert prepared["images_used"] == 7
    vae = json.loads((tmp_path / "data" / "models" / "vae" / "vae_metrics.json").read_text())
    assert len(vae["holdout"]) == 1 and not vae["holdout"][0].startswith("embedded"), vae  # one of the user's

    doc = json.loads((tmp_path / "metrics" / "embedded.json").read_text())
    from consissr.evaluation.report import validate_metrics
    validate_metrics(doc)
    assert list(doc["methods"]) == ["bicubic", "gan", "ganemb-rec", "ganemb-gen", "full"]
    assert all(doc["methods"][m]["psnr"]["n"] == 2 for m in doc["methods"])
    table = (tmp_path / "reports" / "evaluate" / "table.md").read_text()
    assert "| Method | PSNR↑ | SSIM↑ | LPIPS↓ | NIQE↓ | MANIQA↑ | MUSIQ↑ | CLIPIQA↑ | Rank(avg)↓ |" in table
    assert len(list((tmp_path / "reports" / "evaluate" / "grids" / "embedded").glob("*.png"))) == 1
    rows = json.loads((tmp_path / "plots" / "evaluate" / "fig10.json").read_text())
    assert {(r["t_max"], r["steps"]) for r in rows} == {(600, 1), (1000, 1)}
    rendered = _run(tmp_path, dvc, "plots", "show", "--json", env=env)
    assert "fig10_psnr" in rendered and '"steps"' in rendered

    from mlflow import MlflowClient
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = [r for r in client.search_runs([client.get_experiment_by_name("consissr").experiment_id])
            if r.data.tags.get("stage") == "evaluate"]
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert runs[0].data.metrics["embedded/full/psnr"] == pytest.approx(doc["methods"]["full"]["psnr"]["mean"])

    # a second configuration: only `evaluate` reruns, and `dvc metrics diff` shows the change
    _run(tmp_path, "git", "add", "-A", env=env)
    _run(tmp_path, "git", "commit", "-qm", "first evaluation", env=env)
    _set(tmp_path / "params.yaml", {**small, "evaluate.full_steps": 3})
    again = _run(tmp_path, dvc, "repro", "evaluate", env=env)
    assert re.findall(r"Running stage '(\w+)'", again) == ["evaluate"]
    diff = _run(tmp_path, dvc, "metrics", "diff", "--json", env=env)
    # the JSON first; DVC may add a line on metrics files it cannot read at HEAD (e.g. a stage never run there)
    changed = json.JSONDecoder().raw_decode(diff)[0]["metrics/embedded.json"]
    assert changed["methods.full.settings.steps"] == {"old": 2, "new": 3, "diff": 1}
    assert "methods.full.psnr.mean" in changed and "methods.bicubic.psnr.mean" not in changed

    # Table 4's DDPM row as a DVC experiment (docs/orchestration.md's second experiment): train_sdsr and evaluate rerun only
    _run(tmp_path, "git", "commit", "-qam", "full_steps 3", env=env)
    ran = _run(tmp_path, dvc, "exp", "run", "-S", "train_sdsr.gamma=10", "-S", "train_sdsr.tala=false", env=env)
    stages = set(re.findall(r"Running stage '(\w+)'", ran))  # (vae_ceiling once: `repro evaluate` skipped it)
    assert stages - {"vae_ceiling"} == {"train_sdsr", "evaluate"}, ran[-2000:]
    shown = _run(tmp_path, dvc, "exp", "show", "--csv", env=env)
    rows = list(csv.DictReader(io.StringIO(shown[shown.index("Experiment,"):])))
    psnr = next(c for c in rows[0] if c.endswith("methods.full.psnr.mean"))
    assert [(r["train_sdsr.gamma"], r["train_sdsr.tala"]) for r in rows if r["Experiment"]] == [("10", "False")], rows
    commit = [r for r in rows if r["typ"] == "baseline" and r["rev"] != "workspace"]
    assert [(r["train_sdsr.gamma"], r["train_sdsr.tala"]) for r in commit] == [("10.0", "True")], rows
    assert all(r[psnr] for r in rows), rows  # the experiment carries its own evaluation
