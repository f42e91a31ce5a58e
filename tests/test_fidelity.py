"""Issue 12's experiment (consissr/experiments/fidelity.py) on its ``test`` budget: every phase on a few
embedded crops, a tiny random backbone and a tiny robust CLIP. One run, stopped after ``data`` and
resumed, serves every test: the resume rule is read from the recorded state, not from timings."""

from __future__ import annotations

import dataclasses
import json

import pytest

from consissr.errors import InputError
from consissr.experiments.fidelity import BUDGETS, run_fidelity

BUDGET = BUDGETS["test"]


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


def test_resume_skips_the_finished_phase(run):
    first, final = run["first"], run["final"]
    assert list(first["phases"]) == ["data"] and first["invocations"] == 1
    assert final["invocations"] == 2
    assert final["phases"]["data"] == first["phases"]["data"]  # not redone: still written by invocation 1
    later = {k: v["invocation"] for k, v in final["phases"].items() if k != "data"}
    assert later and set(later.values()) == {2}
    for phase in ("base", "fig8", "fig10", "finetune/ddpm-s1", "table4/tala-g5-s0"):
        assert final["phases"][phase]["done"], phase


def test_a_finished_run_resumes_to_nothing_and_refuses_without_resume(run):
    again = run_fidelity(BUDGET, run["out"], resume=True, **run["kw"])
    assert again["invocations"] == 3
    assert {v["invocation"] for v in again["phases"].values()} == {1, 2}  # no phase rewritten
    with pytest.raises(InputError, match="--resume"):
        run_fidelity(BUDGET, run["out"], **run["kw"])
    with pytest.raises(InputError, match="same --budget"):
        run_fidelity(dataclasses.replace(BUDGET, finetune_steps=3), run["out"], resume=True, **run["kw"])


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
            for stats in curve[key]:
                assert stats["n"] == (n if curve is not doc["paired_difference"] else n // 2)
                assert stats["ci95"] is not None and stats["ci95"] >= 0
    assert (run["out"] / "fig8.png").stat().st_size > 1000
    base = run["final"]["phases"]["base"]
    assert base["curve"] and base["bicubic_psnr"] > 0 and base["stop_reason"] in ("max_steps", "beat_bicubic")


def test_table4_and_fig10(run):
    table = json.loads((run["out"] / "table4.json").read_text())["rows"]
    assert set(table) == {"ddpm", "tala-g10", "tala-g5", "bicubic"}
    for row in table.values():
        assert row["psnr"]["mean"] > 0 and row[BUDGET.nr_metric]["n"] > 0
    fig10 = json.loads((run["out"] / "fig10" / "fig10.json").read_text())
    assert sorted((r["t_max"], r["steps"]) for r in fig10) == sorted(
        (t, s) for t in BUDGET.sweep_t_max for s in BUDGET.sweep_steps)
    assert all(r["psnr"] is not None and r["no_reference"] is not None for r in fig10)


def test_the_arms_differ_only_in_the_tala_switch(run):
    from consissr.training.checkpoint import diff, latest_checkpoint, read_meta

    def recorded(name):
        meta = read_meta(latest_checkpoint(run["out"] / "finetune" / name))
        return meta["fingerprint_data"]

    assert [d.split(":")[0] for d in diff(recorded("ddpm-s0"), recorded("tala-g10-s0"))] == ["extra.tala"]
    assert [d.split(":")[0] for d in diff(recorded("tala-g10-s0"), recorded("tala-g10-s1"))] == ["settings.seed"]
