"""Tables 1–2 and Fig. 10 from per-image metric values: metrics JSON, Markdown report, plots, grids.

``metrics/<dataset>.json`` (schema ``SCHEMA``; DVC metrics) holds, per method, each available
metric's mean over the images, the half-width of its 95% Student-t interval and n, the method's
Rank(avg) — the mean over available metrics of its rank within the dataset, 1 = best, ties
sharing the best rank (the rule the paper's Table 1 follows) — the Fig. 10 sweep, and every
per-image value. Unavailable metrics carry the files they need, never a number.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from consissr.io import write_bytes, write_json

SCHEMA = "consissr-evaluate-metrics/1"
# the paper's Tables 1–4 (results.yaml of the seed document), shipped for the paper rows of the report
PAPER_RESULTS = Path(__file__).with_name("paper_results.yaml")
# other methods' published rows on the same test sets (StableSR's crops), with their sources
PUBLISHED_RESULTS = Path(__file__).with_name("published_results.yaml")
# column order and printed precision of the paper's tables
COLUMNS = {"rank_avg": ("Rank(avg)", 2), "psnr": ("PSNR", 2), "ssim": ("SSIM", 4), "lpips": ("LPIPS", 4), "niqe": ("NIQE", 4),
           "maniqa": ("MANIQA", 4), "musiq": ("MUSIQ", 2), "clipiqa": ("CLIPIQA", 4)}


# --------------------------------------------------------------------------------------------
# statistics
# --------------------------------------------------------------------------------------------
def summarise(values: Sequence[float]) -> dict:
    """``{"mean", "ci95", "n"}``: the interval is mean ± ci95 (Student t, n−1 dof); None for n < 2."""
    from scipy import stats

    arr = np.asarray(values, dtype=np.float64)
    n = int(arr.size)
    if n == 0:
        return {"mean": None, "ci95": None, "n": 0}
    mean = float(arr.mean())
    if n < 2:
        return {"mean": mean, "ci95": None, "n": n}
    half = float(stats.t.ppf(0.975, n - 1) * arr.std(ddof=1) / math.sqrt(n))
    return {"mean": mean, "ci95": half, "n": n}


def ranks(values: Mapping[str, float], higher_is_better: bool) -> dict[str, int]:
    """Rank of each method for one metric, 1 = best; equal values share the best of their ranks."""
    out = {}
    for method, v in values.items():
        better = sum(1 for o in values.values() if (o > v if higher_is_better else o < v))
        out[method] = better + 1
    return out


def rank_avg(table: Mapping[str, Mapping[str, float | None]], higher_is_better: Mapping[str, bool]) -> dict[str, float]:
    """Rank(avg) per method: mean of its ranks over the metrics it has a value for.

    ``table[method][metric]`` is a mean or None (unavailable); a metric no method has is ignored.
    """
    sums: dict[str, list[int]] = {m: [] for m in table}
    metrics = {k for row in table.values() for k, v in row.items() if v is not None}
    for metric in metrics:
        values = {m: row[metric] for m, row in table.items() if row.get(metric) is not None}
        for method, r in ranks(values, higher_is_better[metric]).items():
            sums[method].append(r)
    return {m: (sum(r) / len(r) if r else None) for m, r in sums.items()}


# --------------------------------------------------------------------------------------------
# metrics/<dataset>.json
# --------------------------------------------------------------------------------------------
def dataset_metrics(*, dataset: Mapping, metric_info: Mapping[str, Mapping], per_image: Sequence[Mapping],
                    settings: Mapping[str, Mapping], sweep: Sequence[Mapping] = ()) -> dict:
    """Assemble the metrics document of one dataset.

    Args:
        dataset: ``{"name", "kind", "paper", "images", "skipped"}``.
        metric_info: metric → ``MetricInfo.to_dict()`` (``available``, ``higher_is_better``, ``needs``...).
        per_image: ``{"id", "method", <metric>: value, ...}`` rows (available metrics only).
        settings: method → its sampler settings (steps, t_max, ...), in table order.
        sweep: Fig. 10 rows ``{"t_max", "steps", "id", <metric>: value}`` (per image).
    """
    available = [m for m, info in metric_info.items() if info["available"]]
    methods: dict[str, dict] = {}
    for method, cfg in settings.items():
        rows = [r for r in per_image if r["method"] == method]
        methods[method] = {"settings": dict(cfg)}
        for metric in available:
            stats = summarise([r[metric] for r in rows if metric in r])
            if stats["n"]:
                methods[method][metric] = stats
    table = {m: {k: methods[m].get(k, {}).get("mean") for k in available} for m in methods}
    higher = {m: info["higher_is_better"] for m, info in metric_info.items()}
    ranked = rank_avg(table, higher)
    for method in methods:
        methods[method]["rank_avg"] = ranked[method]
    sweep_summary = []
    for t_max, steps in dict.fromkeys((r["t_max"], r["steps"]) for r in sweep):
        rows = [r for r in sweep if (r["t_max"], r["steps"]) == (t_max, steps)]
        entry = {"t_max": t_max, "steps": steps}
        for metric in available:
            stats = summarise([r[metric] for r in rows if metric in r])
            if stats["n"]:
                entry[metric] = stats
        sweep_summary.append(entry)
    return {"schema": SCHEMA, "dataset": dict(dataset), "metrics": {k: dict(v) for k, v in metric_info.items()},
            "methods": methods, "sweep": sweep_summary, "per_image": list(per_image), "sweep_per_image": list(sweep)}


def validate_metrics(doc: Mapping) -> None:
    """Raise ``ValueError`` naming the first place ``doc`` breaks the schema (tests and readers use it)."""
    def need(cond, where):
        if not cond:
            raise ValueError(f"metrics document: {where}")
    need(doc.get("schema") == SCHEMA, f"schema is {doc.get('schema')!r}, expected {SCHEMA!r}")
    for key in ("dataset", "metrics", "methods", "sweep", "per_image"):
        need(key in doc, f"missing {key!r}")
    for name, info in doc["metrics"].items():
        need(isinstance(info.get("available"), bool), f"metrics.{name}.available is not a boolean")
        need(isinstance(info.get("higher_is_better"), bool), f"metrics.{name}.higher_is_better is not a boolean")
        if not info["available"]:
            for method, row in doc["methods"].items():
                need(name not in row, f"methods.{method}.{name}: an unavailable metric has a value")
            for row in doc["per_image"]:
                need(name not in row, f"per_image {row.get('id')}: an unavailable metric has a value")
    for method, row in doc["methods"].items():
        for name, stats in row.items():
            if name in ("settings", "rank_avg"):
                continue
            need(name in doc["metrics"], f"methods.{method}.{name}: not a known metric")
            need(set(stats) == {"mean", "ci95", "n"}, f"methods.{method}.{name}: keys {sorted(stats)}")
            need(isinstance(stats["mean"], float) and math.isfinite(stats["mean"]), f"methods.{method}.{name}.mean")
            need(stats["ci95"] is None or stats["ci95"] >= 0, f"methods.{method}.{name}.ci95")
            n = sum(1 for r in doc["per_image"] if r["method"] == method and name in r)
            need(stats["n"] == n, f"methods.{method}.{name}.n is {stats['n']}, per_image has {n}")


# --------------------------------------------------------------------------------------------
# Markdown: one table per dataset, the paper's layout
# --------------------------------------------------------------------------------------------
def _fmt(metric: str, value: float | None) -> str:
    return "n/a" if value is None else f"{value:.{COLUMNS.get(metric, ('', 4))[1]}f}"


def markdown_table(doc: Mapping, paper_rows: Mapping[str, Mapping[str, float]] | None = None,
                   beside: Mapping[str, str] | None = None) -> str:
    """The dataset's table: a row per method, a column per metric with ↑/↓, the best of our rows in
    bold, Rank(avg); ``paper_rows`` (label → metrics and printed rank_avg) follow, italic, unranked.
    ``beside`` maps one of our methods to a printed row's method name: a line gives ours minus theirs."""
    metrics = [m for m in COLUMNS if m in doc["metrics"]] + [m for m in doc["metrics"] if m not in COLUMNS]
    info = doc["metrics"]
    arrow = {m: "↑" if info[m]["higher_is_better"] else "↓" for m in metrics}
    head = ["Method"] + [f"{COLUMNS.get(m, (m.upper(),))[0]}{arrow[m]}" for m in metrics] + ["Rank(avg)↓"]
    ds = doc["dataset"]
    lines = [f"### {ds['name']} ({ds['kind']}, {ds['images']} images)", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    means = {meth: {m: row.get(m, {}).get("mean") for m in metrics} for meth, row in doc["methods"].items()}
    best = {}
    for m in metrics:
        values = [v[m] for v in means.values() if v[m] is not None]
        if values:
            best[m] = max(values) if info[m]["higher_is_better"] else min(values)
    ranked = {meth: row.get("rank_avg") for meth, row in doc["methods"].items()}
    best_rank = min((r for r in ranked.values() if r is not None), default=None)
    for meth, row in means.items():
        cells = []
        for m in metrics:
            text = _fmt(m, row[m])
            cells.append(f"**{text}**" if row[m] is not None and row[m] == best.get(m) else text)
        r = ranked[meth]
        rank_text = "n/a" if r is None else f"{r:.2f}"
        cells.append(f"**{rank_text}**" if r is not None and r == best_rank else rank_text)
        lines.append(f"| {meth} | " + " | ".join(cells) + " |")
    for name, row in (paper_rows or {}).items():
        cells = [_fmt(m, row.get(m)) for m in metrics] + [_fmt("rank_avg", row.get("rank_avg"))]
        lines.append(f"| *{name}* | " + " | ".join(f"*{c}*" for c in cells) + " |")
    unavailable = {m: info[m] for m in metrics if not info[m]["available"]}
    if unavailable:
        lines += [""] + [f"- {m}: n/a — " + (f"needs {', '.join(i['needs'])}" if i.get("needs") else i.get("reason", ""))
                         for m, i in unavailable.items()]
    notes = [f"- {m}: {info[m]['source']}" for m in metrics if info[m]["available"] and "basicsr" in info[m].get("source", "")]
    notes += [f"- {m}: {info[m]['failures']}" for m in metrics if info[m].get("failures")]
    for ours, theirs in (beside or {}).items():
        label = next((k for k in (paper_rows or {}) if k.startswith(f"{theirs} (published")), None)
        if ours in means and label:
            diffs = [f"{COLUMNS.get(m, (m,))[0]} {means[ours][m] - paper_rows[label][m]:+.{COLUMNS.get(m, ('', 4))[1]}f}"
                     for m in metrics if means[ours][m] is not None and paper_rows[label].get(m) is not None]
            notes.append(f"- {ours} − {label}: " + ", ".join(diffs))
    if ds.get("skipped"):
        notes.append(f"- {len(ds['skipped'])} file(s) skipped (see metrics JSON `dataset.skipped`)")
    return "\n".join(lines + notes) + "\n"


def paper_rows(results: Mapping, dataset: str) -> dict[str, dict]:
    """The paper's Table 1 and Table 2 rows for ``dataset`` (a results.yaml dataset name)."""
    out = {}
    for table in ("table1_full_scale", "table2_accelerated"):
        for method, row in results.get(table, {}).get(dataset, {}).items():
            out[f"{method} [{'T1' if table.startswith('table1') else 'T2'}] (paper)"] = row
    return out


def published_rows(published: Mapping, dataset: str) -> dict[str, dict]:
    """Other methods' printed rows for ``dataset`` (published_results.yaml), labelled with their sources."""
    return {f"{method} (published: {', '.join(row.get('source', []))})": row
            for method, row in published.get(dataset, {}).items()}


def write_report(path: str | Path, docs: Sequence[Mapping], paper: Mapping[str, Mapping[str, Mapping]] | None = None,
                 *, preamble: str = "", beside: Mapping[str, str] | None = None) -> Path:
    """``reports/...md``: one table per dataset; ``paper`` maps a dataset name to its printed rows."""
    parts = ["# Evaluation", "", preamble, ""] if preamble else ["# Evaluation", ""]
    for doc in docs:
        parts.append(markdown_table(doc, (paper or {}).get(doc["dataset"]["name"]), beside))
    write_bytes(path, "\n".join(parts).encode())
    return Path(path)


# --------------------------------------------------------------------------------------------
# Fig. 10: PSNR and a no-reference metric against t_max, a line per step count
# --------------------------------------------------------------------------------------------
def fig10_rows(doc: Mapping, nr_metric: str) -> list[dict]:
    """One row per (t_max, steps) of the sweep: ``{"t_max", "steps", "psnr", "no_reference", "no_reference_metric"}``."""
    rows = []
    for entry in doc["sweep"]:
        rows.append({"t_max": entry["t_max"], "steps": entry["steps"],
                     "psnr": entry.get("psnr", {}).get("mean"),
                     "no_reference": entry.get(nr_metric, {}).get("mean"), "no_reference_metric": nr_metric})
    return rows


def write_fig10(out_dir: str | Path, rows: Sequence[Mapping], *, title: str = "") -> list[Path]:
    """``fig10.json`` (DVC plots), ``fig10.csv`` and ``fig10.png`` in ``out_dir``."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    write_json(out_dir / "fig10.json", list(rows))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=["t_max", "steps", "psnr", "no_reference", "no_reference_metric"])
    writer.writeheader()
    writer.writerows(rows)
    write_bytes(out_dir / "fig10.csv", buf.getvalue().encode())
    nr = rows[0]["no_reference_metric"] if rows else ""
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5), dpi=100)
    for ax, key, label in ((axes[0], "psnr", "PSNR (dB)"), (axes[1], "no_reference", nr.upper())):
        for steps in sorted({r["steps"] for r in rows}):
            pts = sorted((r["t_max"], r[key]) for r in rows if r["steps"] == steps and r[key] is not None)
            if pts:
                ax.plot(*zip(*pts), marker="o", label=f"{steps} steps")
        ax.set_xlabel("t_max")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend()
        else:
            ax.text(0.5, 0.5, "n/a", ha="center", va="center", transform=ax.transAxes)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png")
    plt.close(fig)
    write_bytes(out_dir / "fig10.png", png.getvalue())
    return [out_dir / "fig10.json", out_dir / "fig10.csv", out_dir / "fig10.png"]


# --------------------------------------------------------------------------------------------
# image grids: LQ | bicubic | GAN | ganemb-rec | full | HQ
# --------------------------------------------------------------------------------------------
GRID_COLUMNS = ("LQ", "bicubic", "gan", "ganemb-rec", "full", "HQ")


def image_grid(columns: Mapping[str, np.ndarray], *, order: Sequence[str] = GRID_COLUMNS) -> np.ndarray:
    """Panels (uint8 HxWx3; the LQ is enlarged by nearest neighbour to the HQ size) side by side with
    a label strip; a column absent from ``columns`` is left out."""
    from PIL import Image, ImageDraw

    names = [n for n in order if n in columns]
    size = max(columns[n].shape[0] for n in names), max(columns[n].shape[1] for n in names)
    panels = []
    for name in names:
        img = Image.fromarray(columns[name])
        if img.size != (size[1], size[0]):
            img = img.resize((size[1], size[0]), Image.NEAREST)
        canvas = Image.new("RGB", (size[1], size[0] + 14), "white")
        canvas.paste(img, (0, 14))
        ImageDraw.Draw(canvas).text((2, 1), name, fill="black")
        panels.append(np.asarray(canvas))
    gap = np.full((size[0] + 14, 2, 3), 255, np.uint8)
    return np.concatenate([p for panel in panels for p in (panel, gap)][:-1], axis=1)
