"""Issue 12's experiment (consissr/experiments/fidelity.py). Fast: the run-state rules and the Fig. 8
statistics on hand-made scores. Slow (one end-to-end run of the ``test`` budget, a few minutes on 2
cores): every phase on a few embedded crops, a tiny random backbone and a tiny robust CLIP; the run is
stopped after ``data`` and resumed, and the resume rule is read from the recorded state, not timings."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
from scipy import stats

from consissr.errors import InputError
from consissr.experiments.fidelity import BUDGETS, RunState, curves, run_fidelity

BUDGET = BUDGETS["test"]


# --------------------------------------------------------------------------------------------
# fast
# --------------------------------------------------------------------------------------------
def test_run_state_refuses_to_overwrite_and_to_mix_budgets(tmp_path):
    state = RunState(tmp_path, BUDGET, resume=False)
    state.set("data", {"done": True})
    with pytest.raises(InputError, match="--resume"):
        RunState(tmp_path, BUDGET, resume=False)
    with pytest.raises(InputError, match="same --budget"):
        RunState(tmp_path, BUDGETS["cpu"], resume=True)
    again = RunState(tmp_path, BUDGET, resume=True)
    assert again.done("data") == {"done": True, "invocation": 1} and again.data["invocations"] == 2
    assert again.done("base") is None


def _rows(psnr_by_t: list[list[float]]) -> list[dict]:
    """One sample per column: x̂0 PSNR at t = 3, 2, 1 (rows of ``psnr_by_t``); SSIM = PSNR / 100."""
    return [{"x0": [{"t": t, "psnr": col[i], "ssim": col[i] / 100} for i, t in enumerate((3, 2, 1))]}
            for col in zip(*psnr_by_t)]


def test_fig8_statistics_pool_seeds_and_pair_the_arms():
    per_model = {"tala-s0": _rows([[10, 12], [20, 21], [30, 30]]), "tala-s1": _rows([[11, 13], [20, 22], [31, 29]]),
                 "ddpm-s0": _rows([[9, 10], [20, 21], [30, 31]]), "ddpm-s1": _rows([[10, 10], [19, 22], [30, 30]])}
    doc = curves(per_model, {"tala": ["tala-s0", "tala-s1"], "ddpm": ["ddpm-s0", "ddpm-s1"]})
    tala_t3 = np.array([10, 12, 11, 13.0])
    half = stats.t.ppf(0.975, 3) * tala_t3.std(ddof=1) / 2
    first = doc["arms"]["tala"]["psnr"][0]
    assert doc["arms"]["tala"]["t"] == [3, 2, 1] and first["n"] == 4
    assert math.isclose(first["mean"], 11.5) and math.isclose(first["ci95"], half)
    assert math.isclose(doc["arms"]["ddpm"]["ssim"][2]["mean"], 0.3025)
    diff_t3 = doc["paired_difference"]["psnr"][0]  # (10-9, 12-10, 11-10, 13-10): paired by seed and sample
    assert diff_t3["n"] == 4 and math.isclose(diff_t3["mean"], 1.75)


# --------------------------------------------------------------------------------------------
# slow: one end-to-end run of the test budget
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def run(tiny_backbone, tmp_path_factory):
    from consissr.config import ClipParams
    from consissr.models.robust_clip import RobustCLIP

    root = tmp_path_factory.mktemp("fidelity")
    mp = pytest.MonkeyPatch()
    mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
    clip_dir = RobustCLIP.from_params(ClipParams()).save_pretrained(root / "robust_clip")
    kw = dict(backbone_dir=tiny_backbone, robust_clip_dir=clip_dir)
    out = root / "run"
    first = json.loads(json.dumps(run_fidelity(BUDGET, out, stop_after="data", **kw)))  # "killed" after phase 1
    final = run_fidelity(BUDGET, out, resume=True, **kw)
    yield {"out": out, "first": first, "final": final, "kw": kw}
    mp.undo()


@pytest.mark.slow
def test_resume_skips_the_finished_phase(run):
    first, final = run["first"], run["final"]
    assert list(first["phases"]) == ["data"] and first["invocations"] == 1
    assert final["invocations"] == 2
    assert final["phases"]["data"] == first["phases"]["data"]  # not redone: still written by invocation 1
    later = {k: v["invocation"] for k, v in final["phases"].items() if k != "data"}
    assert later and set(later.values()) == {2}
    for phase in ("base", "fig8", "fig10", "finetune/ddpm-s1", "table4/tala-g5-s0"):
        assert final["phases"][phase]["done"], phase


@pytest.mark.slow
def test_a_finished_run_resumes_to_nothing_and_refuses_without_resume(run):
    again = run_fidelity(BUDGET, run["out"], resume=True, **run["kw"])
    assert again["invocations"] == 3
    assert {v["invocation"] for v in again["phases"].values()} == {1, 2}  # no phase rewritten
    with pytest.raises(InputError, match="--resume"):
        run_fidelity(BUDGET, run["out"], **run["kw"])
    with pytest.raises(InputError, match="same --budget"):
        run_fidelity(dataclasses.replace(BUDGET, finetune_steps=3), run["out"], resume=True, **run["kw"])


@pytest.mark.slow
def test_resume_refuses_another_vae(run, tmp_path):
    import shutil

    other = shutil.copytree(run["kw"]["backbone_dir"], tmp_path / "backbone")
    weights = other / "vae" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes() + b" ")  # any change of the file
    with pytest.raises(InputError, match="VAE differs"):
        run_fidelity(BUDGET, run["out"], resume=True, **dict(run["kw"], backbone_dir=other))


@pytest.mark.slow
def test_fig8_curves_have_a_point_per_step_and_intervals(run):
    doc = json.loads((run["out"] / "fig8.json").read_text())
    crops = run["final"]["phases"]["data"]["test_sets"]
    n = len(BUDGET.train_seeds) * sum(len(ids) for ids in crops.values()) * len(BUDGET.sample_seeds)
    assert set(doc["arms"]) == {"tala", "ddpm"}
    for curve in [*doc["arms"].values(), doc["paired_difference"]]:
        assert len(curve["t"]) == BUDGET.sample_steps
        assert curve["t"] == sorted(curve["t"], reverse=True) and curve["t"][0] == 1000 and curve["t"][-1] == 1
        for key in ("psnr", "ssim"):
            assert len(curve[key]) == BUDGET.sample_steps
            for entry in curve[key]:
                assert entry["n"] == n  # the paired difference: one pair per sample of an arm
                assert entry["ci95"] is not None and entry["ci95"] >= 0
    assert (run["out"] / "fig8.png").stat().st_size > 1000
    base = run["final"]["phases"]["base"]
    assert base["curve"] and base["bicubic_psnr"] > 0 and base["stop_reason"] in ("max_steps", "beat_bicubic")


@pytest.mark.slow
def test_table4_and_fig10(run):
    table = json.loads((run["out"] / "table4.json").read_text())["rows"]
    assert set(table) == {"ddpm", "tala-g10", "tala-g5", "bicubic"}
    for row in table.values():
        assert row["psnr"]["mean"] > 0 and row[BUDGET.nr_metric]["n"] > 0
    fig10 = json.loads((run["out"] / "fig10" / "fig10.json").read_text())
    assert sorted((r["t_max"], r["steps"]) for r in fig10) == sorted(
        (t, s) for t in BUDGET.sweep_t_max for s in BUDGET.sweep_steps)
    assert all(r["psnr"] is not None and r["no_reference"] is not None for r in fig10)


@pytest.mark.slow
def test_the_arms_differ_only_in_the_tala_switch(run):
    from consissr.training.checkpoint import diff, latest_checkpoint, read_meta

    def recorded(name):
        meta = read_meta(latest_checkpoint(run["out"] / "finetune" / name))
        return meta["fingerprint_data"]

    assert [d.split(":")[0] for d in diff(recorded("ddpm-s0"), recorded("tala-g10-s0"))] == ["extra.tala"]
    assert [d.split(":")[0] for d in diff(recorded("tala-g10-s0"), recorded("tala-g10-s1"))] == ["settings.seed"]
