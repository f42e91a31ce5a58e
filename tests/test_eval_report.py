"""Evaluation report: the Rank(avg) rule, the metrics JSON schema, the 95% interval, tables, Fig. 10, grids."""

import json

import numpy as np
import pytest
import yaml

from consissr.evaluation.report import (
    PAPER_RESULTS,
    dataset_metrics,
    fig10_rows,
    image_grid,
    markdown_table,
    rank_avg,
    summarise,
    validate_metrics,
    write_fig10,
)

HIGHER = {"psnr": True, "lpips": False, "niqe": False, "clipiqa": True}


def test_rank_rule_on_a_hand_made_table():
    table = {
        "A": {"psnr": 25.0, "lpips": 0.30, "niqe": 6.0, "clipiqa": None},
        "B": {"psnr": 24.0, "lpips": 0.20, "niqe": 6.0, "clipiqa": None},
        "C": {"psnr": 26.0, "lpips": 0.40, "niqe": 5.0, "clipiqa": None},
    }
    # psnr ↑: C 1, A 2, B 3.  lpips ↓: B 1, A 2, C 3.  niqe ↓: C 1, A and B tie -> both 2.
    # clipiqa is unavailable: not counted.  A (2+2+2)/3 = 2, B (3+1+2)/3 = 2, C (1+3+1)/3 = 5/3
    assert rank_avg(table, HIGHER) == pytest.approx({"A": 2.0, "B": 2.0, "C": 5 / 3})


def test_rank_rule_reproduces_the_papers_table_1():
    results = yaml.safe_load(PAPER_RESULTS.read_text())
    for dataset, rows in results["table1_full_scale"].items():
        table = {m: {k: v for k, v in row.items() if k != "rank_avg"} for m, row in rows.items()}
        ours = rank_avg(table, results["higher_is_better"])
        assert {m: round(r, 2) for m, r in ours.items()} == {m: row["rank_avg"] for m, row in rows.items()}, dataset


def test_summarise_gives_the_student_t_interval():
    s = summarise([1.0, 2.0, 3.0])
    # sd 1, t(0.975, 2 dof) = 4.302653
    assert s["mean"] == 2.0 and s["n"] == 3
    assert s["ci95"] == pytest.approx(4.302653 / 3 ** 0.5, rel=1e-5)
    assert summarise([4.0]) == {"mean": 4.0, "ci95": None, "n": 1}


def info(available=True, higher=True, **kw):
    return {"available": available, "higher_is_better": higher, "full_reference": False, **kw}


def sample_doc():
    per_image = [
        {"id": "x", "method": "bicubic", "psnr": 20.0, "niqe": 7.0},
        {"id": "y", "method": "bicubic", "psnr": 23.0, "niqe": 8.0},
        {"id": "x", "method": "full", "psnr": 21.0, "niqe": 5.0},
        {"id": "y", "method": "full", "psnr": 21.5, "niqe": 6.0},
    ]
    sweep = [{"id": i, "t_max": t, "steps": s, "psnr": 20.0 + t / 1000 + s, "niqe": 5.0}
             for t in (600, 1000) for s in (5, 10) for i in ("x", "y")]
    metrics = {"psnr": info(), "niqe": info(higher=False),
               "maniqa": info(available=False, needs=["/w/pyiqa/MANIQA_PIPAL-ae6d356b.pth"], reason="weights absent")}
    return dataset_metrics(
        dataset={"name": "embedded", "kind": "embedded", "paper": None, "images": 2, "skipped": []},
        metric_info=metrics, per_image=per_image, sweep=sweep,
        settings={"bicubic": {}, "full": {"steps": 50}})


def test_metrics_document_schema(tmp_path):
    doc = sample_doc()
    validate_metrics(json.loads(json.dumps(doc)))
    assert doc["methods"]["bicubic"]["psnr"]["mean"] == 21.5
    assert doc["methods"]["full"]["niqe"]["n"] == 2
    assert "maniqa" not in doc["methods"]["full"]
    # psnr: bicubic 1, full 2; niqe ↓: full 1, bicubic 2
    assert doc["methods"]["bicubic"]["rank_avg"] == doc["methods"]["full"]["rank_avg"] == 1.5
    assert [(e["t_max"], e["steps"]) for e in doc["sweep"]] == [(600, 5), (600, 10), (1000, 5), (1000, 10)]
    broken = json.loads(json.dumps(doc))
    broken["methods"]["full"]["maniqa"] = {"mean": 0.5, "ci95": None, "n": 1}
    with pytest.raises(ValueError, match="unavailable metric has a value"):
        validate_metrics(broken)
    broken = json.loads(json.dumps(doc))
    broken["methods"]["full"]["psnr"]["n"] = 3
    with pytest.raises(ValueError, match="per_image has 2"):
        validate_metrics(broken)


def test_markdown_table_layout():
    text = markdown_table(sample_doc(), {"Ours [T1] (paper)": {"psnr": 23.95, "niqe": 4.8323, "rank_avg": 2.0},
                                         "Bicubic (published: x)": {"psnr": 21.0, "niqe": 7.0}},
                          beside={"bicubic": "Bicubic"})
    lines = text.splitlines()
    assert lines[2] == "| Method | PSNR↑ | NIQE↓ | MANIQA↑ | Rank(avg)↓ |"
    assert lines[4] == "| bicubic | **21.50** | 7.5000 | n/a | **1.50** |"
    assert lines[5] == "| full | 21.25 | **5.5000** | n/a | **1.50** |"
    assert lines[6] == "| *Ours [T1] (paper)* | *23.95* | *4.8323* | *n/a* | *2.00* |"
    assert lines[7] == "| *Bicubic (published: x)* | *21.00* | *7.0000* | *n/a* | *n/a* |"
    assert "- bicubic − Bicubic (published: x): PSNR +0.50, NIQE +0.5000" in text  # ours 21.50 / 7.5 (sample_doc)
    assert "maniqa: n/a — needs /w/pyiqa/MANIQA_PIPAL-ae6d356b.pth" in text
    doc = sample_doc()
    doc["metrics"]["niqe"]["failures"] = "some images have no value, e.g. 96x96: ..."
    assert "- niqe: some images have no value, e.g. 96x96" in markdown_table(doc)


def test_fig10_files(tmp_path):
    rows = fig10_rows(sample_doc(), "niqe")
    assert rows[0] == {"t_max": 600, "steps": 5, "psnr": 25.6, "no_reference": 5.0, "no_reference_metric": "niqe"}
    paths = write_fig10(tmp_path, rows)
    assert json.loads(paths[0].read_text()) == rows
    assert paths[1].read_text().splitlines()[0] == "t_max,steps,psnr,no_reference,no_reference_metric"
    assert paths[2].read_bytes()[:4] == b"\x89PNG"


def test_grid_puts_columns_in_the_papers_order():
    lq = np.zeros((8, 8, 3), np.uint8)
    cols = {"HQ": np.full((32, 32, 3), 200, np.uint8), "LQ": lq, "full": np.full((32, 32, 3), 100, np.uint8)}
    grid = image_grid(cols)
    assert grid.shape == (32 + 14, 3 * 32 + 2 * 2, 3)
    assert (grid[20, :32] == 0).all() and (grid[20, 34:66] == 100).all() and (grid[20, 68:] == 200).all()
