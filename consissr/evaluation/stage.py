"""Stage ``evaluate``: every registry dataset × the paper's methods → metrics, report, Fig. 10, grids.

Methods (names as in the paper's tables): ``bicubic``; ``gan`` (the Real-ESRGAN stage alone);
``ganemb-rec`` / ``ganemb-gen`` (GAN-Embedding, Algorithm 2, from t_max 600 / 1000 in 10
steps, Table 2); ``full`` (sampling from noise, 50 steps, Table 1); and ``evaluate.folders``:
outputs made elsewhere, scored alike. The GAN alone, the pipeline and the metric networks are
loaded once, when first needed; each dataset is materialised once (LQ/HQ PNGs) and every method
reads it. Fig. 10 sweeps GANEmb's t_max × steps on one dataset. One MLflow run records it all.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from tqdm import tqdm

from consissr.config import DegradeParams, EvalFolderParams, EvaluateParams, InferenceParams
from consissr.data.layout import item_seed, read_rgb_array, write_rgb_png
from consissr.data.sources import ContaminationError
from consissr.errors import InputError, ParamsError
from consissr.evaluation.datasets import EvalSet, build_set, folder_outputs, read_folder_output
from consissr.evaluation.metrics import MetricSuite, resolve_protocol
from consissr.evaluation.report import (
    GRID_COLUMNS,
    PAPER_RESULTS,
    PUBLISHED_RESULTS,
    dataset_metrics,
    fig10_rows,
    image_grid,
    paper_rows,
    published_rows,
    write_fig10,
    write_report,
)
from consissr.io import atomic_dir, write_json

log = logging.getLogger(__name__)

KNOWN_METHODS = ("bicubic", "gan", "ganemb-rec", "ganemb-gen", "full")


class SRPipeline(Protocol):
    """What the stage needs of ``consissr.inference.pipeline.ConsisSRPipeline`` (contracts.md item 3)."""

    def __call__(self, image: np.ndarray, **kwargs: Any) -> Any: ...
    def gan_upscale(self, image: np.ndarray) -> np.ndarray: ...


def method_settings(ev: EvaluateParams) -> dict[str, dict]:
    """The sampler settings of each requested method, in table order."""
    table = {"bicubic": {}, "gan": {},
             "ganemb-rec": {"mode": "ganemb", "t_max": ev.rec_t_max, "steps": ev.rec_steps},
             "ganemb-gen": {"mode": "ganemb", "t_max": ev.gen_t_max, "steps": ev.gen_steps},
             "full": {"mode": "full", "steps": ev.full_steps}}
    unknown = [m for m in ev.methods if m not in table]
    if unknown:
        raise ParamsError(f"evaluate.methods: unknown method {unknown[0]!r}; known: {', '.join(KNOWN_METHODS)}")
    seen = set()
    for i, f in enumerate(ev.folders):  # a folder method's outputs go to <work>/<dataset>/<method>/
        if f.method in (*KNOWN_METHODS, "lq", "hq", "LQ", "HQ") or not re.fullmatch(r"[A-Za-z0-9][\w.\- ]*", f.method):
            raise ParamsError(f"evaluate.folders[{i}].method: {f.method!r} is reserved or not a plain name "
                              f"(letters, digits, _ . - and spaces; not {', '.join(KNOWN_METHODS)}, lq, hq)")
        if (f.method, f.dataset) in seen:
            raise ParamsError(f"evaluate.folders[{i}]: {f.method!r} on {f.dataset!r} is named twice")
        seen.add((f.method, f.dataset))
    return {m: table[m] for m in KNOWN_METHODS if m in ev.methods}


def bicubic(lq: np.ndarray, scale: int) -> np.ndarray:
    """×scale bicubic (torch, as ``degrade``'s ``lq_up``), clamped to [0, 1]; float HxWx3 in and out."""
    t = torch.from_numpy(np.ascontiguousarray(lq, np.float32)).permute(2, 0, 1).unsqueeze(0)
    up = torch.nn.functional.interpolate(t, scale_factor=scale, mode="bicubic", align_corners=False)
    return up.clamp(0, 1)[0].permute(1, 2, 0).numpy()


class Upscalers:
    """Runs one method on one LQ image; the pipeline (or, for ``gan`` alone, just the GAN) is loaded on
    first need, once."""

    def __init__(self, load_pipeline: Callable[[], SRPipeline], *, scale: int,
                 load_gan: Callable[[], Callable[[np.ndarray], np.ndarray]] | None = None) -> None:
        self._load = load_pipeline
        self._load_gan = load_gan
        self._pipe: SRPipeline | None = None
        self._gan: Callable[[np.ndarray], np.ndarray] | None = None
        self.scale = scale

    @property
    def pipe(self) -> SRPipeline:
        if self._pipe is None:
            self._pipe = self._load()
            if hasattr(self._pipe, "set_progress_bar_config"):
                self._pipe.set_progress_bar_config(disable=True)  # one bar per dataset and method instead
        return self._pipe

    def __call__(self, method: str, settings: Mapping, lq: np.ndarray, seed: int) -> np.ndarray:
        if method == "bicubic":
            return bicubic(lq, self.scale)
        if method == "gan":
            if self._load_gan is not None:  # the GAN folder alone: no diffusion model needed
                self._gan = self._gan or self._load_gan()
                return np.asarray(self._gan(lq), np.float32)
            return np.asarray(self.pipe.gan_upscale(lq), np.float32)
        out = self.pipe(lq, mode=settings["mode"], t_max=settings.get("t_max"),
                        num_inference_steps=settings["steps"], seed=seed, output_type="np")
        return np.asarray(out.images[0], np.float32)


def to_uint8(img: np.ndarray) -> np.ndarray:
    """Float [0, 1] → uint8 with rounding: outputs are scored as the PNGs the authors' scripts read."""
    return (np.clip(img, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def materialise(eval_set: EvalSet, folder: Path) -> list[str]:
    """Write ``folder/{lq,hq}/<id>.png`` and ``index.json`` for one set; returns the ids."""
    (folder / "lq").mkdir(parents=True)
    (folder / "hq").mkdir()
    ids = []
    for item in tqdm(eval_set.items, desc=f"evaluate {eval_set.name}: LQ/HQ pairs", unit="img"):
        lq, hq = item.load()
        write_rgb_png(folder / "lq" / f"{item.id}.png", lq)
        write_rgb_png(folder / "hq" / f"{item.id}.png", hq)
        ids.append(item.id)
    write_json(folder / "index.json", {"name": eval_set.name, "kind": eval_set.kind,
                                       "items": [{"id": i.id, "source": i.source} for i in eval_set.items],
                                       "skipped": eval_set.skipped})
    return ids


def check_contamination(sets: list[EvalSet], prepared_index: Path) -> None:
    """Fail when an evaluation image's whole HR source is a training source (``prepare``'s index)."""
    if not prepared_index.is_file():
        log.warning("evaluate: %s absent: training sources not checked against evaluation images", prepared_index)
        return
    train = {it["source_sha256"]: it["source"] for it in json.loads(prepared_index.read_text()).get("items", [])
             if "source_sha256" in it}
    for s in sets:
        for item in s.items:
            digest = item.source_sha256()
            if digest in train:
                raise ContaminationError(f"evaluation image {item.source} ({s.name}) has the same pixels as "
                                         f"training source {train[digest]} ({prepared_index})")


def _mlflow_key(*parts: str) -> str:
    return "/".join(re.sub(r"[^A-Za-z0-9_.\- ]", "_", p) for p in parts)


def evaluate(ev: EvaluateParams, *, degrade: DegradeParams, inference: InferenceParams, seed: int, device: str,
             metrics_dir: str | Path,
             plots_dir: str | Path, report_dir: str | Path, work_dir: str | Path,
             prepared_dir: str | Path | None = None, pipeline_dir: str | Path | None = None,
             load_pipeline: Callable[[], SRPipeline] | None = None) -> dict[str, dict]:
    """Evaluate every dataset of ``ev.datasets`` in one MLflow run; returns dataset name → metrics document.

    Writes ``metrics_dir/<dataset>.json``, ``plots_dir/fig10.{json,csv,png}``,
    ``report_dir/table.md`` and ``report_dir/grids/<dataset>/<id>.png``, and the LQ/HQ pairs and
    grid outputs under ``work_dir/<dataset>/``; each folder is built beside and swapped in whole.
    The pipeline comes from ``load_pipeline()`` (default: ``consissr.inference.pipeline.load_pipeline``
    on ``pipeline_dir``, None: the default stage outputs, with ``inference`` as its sampling defaults
    — prompt, guidance, colour fix, tiles), loaded only if a method needs it.
    """
    from consissr import tracking

    load_gan, gan_source = None, {}
    gan_dir = Path(pipeline_dir) / "gan" if pipeline_dir else Path("data/models/gan")
    if load_pipeline is None:
        def load_pipeline():
            from consissr.inference.pipeline import load_pipeline as load
            from consissr.models.gan import GanMemo

            # scores in fp32 on every machine (gan_precision auto would pick bf16 on some CPUs)
            pipe = load(pipeline_dir, device=device, defaults=dataclasses.replace(inference, gan_precision="fp32"))
            pipe.gan_memo = GanMemo()  # one GAN run per image for gan, ganemb-* and the Fig. 10 sweep
            return pipe
        if "gan" in ev.methods and (gan_dir / "gan_config.json").is_file():
            from consissr.models.gan import describe_source, read_gan_config

            gan_source = describe_source(read_gan_config(gan_dir))
            if not needs_pipeline(ev):  # else the pipeline's own GAN serves `gan` too: one copy, loaded once
                load_gan = _gan_loader(gan_dir, device, inference.tile_size)
    params = {"base.seed": seed, "base.device": device, "degrade": degrade, "inference": inference, "evaluate": ev}
    inputs = {"pipeline": Path(pipeline_dir)} if pipeline_dir else {
        name: Path("data/models") / name for name in ("backbone", "robust_clip", "consissr", "gan")}
    with tracking.start_run("evaluate", params=params, inputs=inputs) as run:
        run.set_tags({f"gan.{k}": v for k, v in gan_source.items()})
        return _evaluate(ev, degrade=degrade, seed=seed, device=device, load_pipeline=load_pipeline,
                         load_gan=load_gan, gan_source=gan_source,
                         metrics_dir=metrics_dir, plots_dir=plots_dir, report_dir=report_dir, work_dir=work_dir,
                         prepared_dir=prepared_dir, run=run)


def needs_pipeline(ev: EvaluateParams) -> bool:
    """Whether a requested method or the Fig. 10 sweep runs the diffusion model."""
    return any(m not in ("bicubic", "gan") for m in ev.methods) or bool(ev.sweep_steps and ev.sweep_t_max)


def _gan_loader(gan_dir: Path, device: str, tile_size: int) -> Callable[[], Callable[[np.ndarray], np.ndarray]]:
    """The ``gan`` method without the diffusion pipeline: the GAN folder alone, tiled as the pipeline tiles it."""
    def load() -> Callable[[np.ndarray], np.ndarray]:
        from consissr.inference.pipeline import resolve_device
        from consissr.models.gan import gan_upscale, load_gan, tile_for

        upsampler = load_gan(gan_dir, device=resolve_device(device))

        def run(lq: np.ndarray) -> np.ndarray:
            upsampler.tile_size = tile_for(lq.shape, upsampler.scale, tile_size)
            return gan_upscale(upsampler, lq)
        return run
    return load


def _evaluate(ev: EvaluateParams, *, degrade: DegradeParams, seed: int, device: str,
              load_pipeline: Callable[[], SRPipeline], metrics_dir: str | Path, plots_dir: str | Path,
              report_dir: str | Path, work_dir: str | Path, prepared_dir: str | Path | None, run: Any,
              load_gan: Callable[[], Callable[[np.ndarray], np.ndarray]] | None = None,
              gan_source: Mapping[str, str] | None = None) -> dict[str, dict]:
    settings = method_settings(ev)
    names = [d.name for d in ev.datasets]
    if len(set(names)) != len(names) or not names:
        raise ParamsError(f"evaluate.datasets: names must be unique and at least one: {names}")
    sweep_name = ev.sweep_dataset or names[0]
    if sweep_name not in names:
        raise ParamsError(f"evaluate.sweep_dataset {sweep_name!r} is not one of {names}")
    sets = [build_set(entry, ev, degrade, seed) for entry in ev.datasets]
    if prepared_dir is not None:
        check_contamination(sets, Path(prepared_dir) / "index.json")
    if sweep_name and ev.sweep_steps and ev.sweep_nr_metric not in ev.metrics:
        raise ParamsError(f"evaluate.sweep_nr_metric {ev.sweep_nr_metric!r} is not one of evaluate.metrics")
    from consissr.inference.pipeline import resolve_device

    protocol = resolve_protocol(ev.protocol, crop_border=ev.crop_border, psnr_ssim=ev.psnr_ssim, niqe=ev.niqe)
    suite = MetricSuite(ev.metrics, protocol=protocol, weights_dir=ev.weights_dir, device=resolve_device(device))
    run.set_tags({"evaluate.protocol": protocol.name})
    upscale = Upscalers(load_pipeline, scale=ev.scale, load_gan=load_gan)
    results, published = yaml_load(PAPER_RESULTS), yaml_load(PUBLISHED_RESULTS)
    docs: dict[str, dict] = {}
    with atomic_dir(work_dir) as work, atomic_dir(metrics_dir) as metrics_out, \
            atomic_dir(plots_dir) as plots_out, atomic_dir(report_dir) as report_out:
        for s in sets:
            suite.failures.clear()  # per dataset
            folder = work / s.name
            ids = materialise(s, folder)
            grid_ids = ids[:ev.grid_images]
            per_image: list[dict] = []
            for method, cfg in settings.items():
                for image_id in tqdm(ids, desc=f"evaluate {s.name}: {method}", unit="img"):
                    lq, hq = read_rgb_array(folder / "lq" / f"{image_id}.png"), read_rgb_array(folder / "hq" / f"{image_id}.png")
                    sr = to_uint8(upscale(method, cfg, lq.astype(np.float32) / 255.0, item_seed(seed, image_id)))
                    if sr.shape != hq.shape:
                        raise RuntimeError(f"{method} returned {sr.shape} for LQ {lq.shape}; expected {hq.shape}")
                    per_image.append({"id": image_id, "method": method, **suite.score(sr, hq)})
                    if image_id in grid_ids or ev.save_outputs:
                        (folder / method).mkdir(exist_ok=True)
                        write_rgb_png(folder / method / f"{image_id}.png", sr)
            folders = [f for f in ev.folders if f.dataset == s.name]
            for entry in folders:
                per_image += score_folder(entry, s, folder, ids, grid_ids, ev, suite)
            sweep = fig10_sweep(s.name, folder, ids, ev, upscale, suite, seed) if s.name == sweep_name else []
            info = {k: v.to_dict() for k, v in suite.info.items()}
            for name, failure in suite.failures.items():
                info[name]["failures"] = f"some images have no value, e.g. {failure}"
            doc = dataset_metrics(
                dataset={"name": s.name, "kind": s.kind, "paper": s.paper, "images": len(ids), "skipped": s.skipped,
                         "protocol": dataclasses.asdict(protocol)},
                metric_info=info, per_image=per_image, sweep=sweep,
                settings={**settings, **{f.method: {"folder": f.path, "suffix": f.suffix} for f in folders}})
            write_json(metrics_out / f"{s.name}.json", doc)
            docs[s.name] = doc
            _write_grids(report_out / "grids" / s.name, folder, grid_ids, [*settings, *(f.method for f in folders)])
            _log_dataset(run, s.name, doc)
            if s.name == sweep_name and sweep:
                rows = fig10_rows(doc, ev.sweep_nr_metric)
                write_fig10(plots_out, rows, title=f"Fig. 10 on {s.name}: GAN-Embedding t_max × steps")
                for r in rows:
                    run.log_metrics({_mlflow_key("fig10", f"steps{r['steps']}", k): r[k]
                                     for k in ("psnr", "no_reference") if r[k] is not None}, step=r["t_max"])
        # published rows were scored on StableSR's released crops: only a paired set can be those
        paper = {s.name: {**paper_rows(results, s.paper), **(published_rows(published, s.paper) if s.kind == "paired"
                                                             else {})} for s in sets if s.paper}
        beside = {f.method: f.method for f in ev.folders}
        gan_text = ""
        if gan_source:
            from consissr.models.ncnn_rrdb import SOURCE_NAME as X4PLUS_EXPORT

            gan_text = f" GAN: {gan_source['source']}."
            if gan_source["source"] == X4PLUS_EXPORT:
                beside["gan"] = "Real-ESRGAN"  # the published rows ran the same network (Wang et al. 2021)
        write_report(report_out / "table.md", list(docs.values()), paper, beside=beside,
                     preamble=(f"Protocol: {protocol.name} (PSNR/SSIM: {protocol.psnr_ssim}, Y channel, crop border "
                               f"{protocol.crop_border}; NIQE: {protocol.niqe}).{gan_text} Our rows are ranked among "
                               "themselves; the paper's and the published rows (italic) are printed numbers, unranked; "
                               "a difference line is ours minus the published row under this run's protocol."))
    run.flush()
    for path in (report_dir, metrics_dir, plots_dir):
        run.log_artifact(path, Path(path).name)
    return docs


def yaml_load(path: Path) -> dict:
    import yaml

    return yaml.safe_load(path.read_text()) or {}


def score_folder(entry: EvalFolderParams, s: EvalSet, folder: Path, ids: list[str], grid_ids: list[str],
                 ev: EvaluateParams, suite: MetricSuite) -> list[dict]:
    """Per-image rows of one ``evaluate.folders`` entry; a missing or misfit file is a recorded skip."""
    rows = []
    lr_sizes = {item.id: item.lr_size for item in s.items}
    for image_id, path in tqdm(folder_outputs(entry, ids, s.skipped).items(),
                               desc=f"evaluate {s.name}: {entry.method} (folder)", unit="img"):
        hq = read_rgb_array(folder / "hq" / f"{image_id}.png")
        try:
            sr = read_folder_output(path, hq.shape, lr_crop=ev.lr_crop, scale=ev.scale, lr_size=lr_sizes.get(image_id))
        except InputError as exc:
            s.skipped.append({"path": str(path), "method": entry.method, "reason": str(exc).removeprefix(f"{path}: ")})
            continue
        rows.append({"id": image_id, "method": entry.method, **suite.score(sr, hq)})
        if image_id in grid_ids or ev.save_outputs:
            (folder / entry.method).mkdir(exist_ok=True)
            write_rgb_png(folder / entry.method / f"{image_id}.png", sr)
    for skip in (x for x in s.skipped if x.get("method") == entry.method):
        log.warning("evaluate %s: %s: skip %s: %s", s.name, entry.method, skip["path"], skip["reason"])
    return rows


def fig10_sweep(name: str, folder: Path, ids: list[str], ev: EvaluateParams, upscale: Upscalers, suite: MetricSuite,
           seed: int) -> list[dict]:
    rows = []
    for steps in ev.sweep_steps:
        for t_max in ev.sweep_t_max:
            cfg = {"mode": "ganemb", "t_max": t_max, "steps": steps}
            for image_id in tqdm(ids, desc=f"evaluate {name}: Fig. 10 t_max={t_max} steps={steps}", unit="img"):
                lq, hq = read_rgb_array(folder / "lq" / f"{image_id}.png"), read_rgb_array(folder / "hq" / f"{image_id}.png")
                sr = to_uint8(upscale("ganemb", cfg, lq.astype(np.float32) / 255.0, item_seed(seed, image_id)))
                rows.append({"id": image_id, "t_max": t_max, "steps": steps, **suite.score(sr, hq)})
    return rows


def _write_grids(out: Path, folder: Path, ids: list[str], methods: list[str]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for image_id in ids:
        cols = {"LQ": read_rgb_array(folder / "lq" / f"{image_id}.png"), "HQ": read_rgb_array(folder / "hq" / f"{image_id}.png")}
        cols.update({m: read_rgb_array(folder / m / f"{image_id}.png") for m in methods if (folder / m / f"{image_id}.png").is_file()})
        order = [*GRID_COLUMNS[:-1], *(m for m in methods if m not in KNOWN_METHODS), GRID_COLUMNS[-1]]  # + folders
        write_rgb_png(out / f"{image_id}.png", image_grid(cols, order=order))


def _log_dataset(run: Any, name: str, doc: Mapping) -> None:
    values = {}
    for method, row in doc["methods"].items():
        for metric, stats in row.items():
            if metric == "rank_avg" and stats is not None:
                values[_mlflow_key(name, method, "rank_avg")] = stats
            elif isinstance(stats, dict) and stats.get("mean") is not None:
                values[_mlflow_key(name, method, metric)] = stats["mean"]
    run.log_metrics(values, step=0)
