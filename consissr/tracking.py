"""MLflow at the edge: the one module that imports mlflow.

A stage opens one run with :func:`start_run` (named by :func:`run_name`; params once, flattened to
dotted keys; tags: git commit, ``git_dirty`` ignoring ``dvc.lock``, source, the DVC hash of each
input; each input also an MLflow dataset) and hands the yielded :class:`Run` — a :class:`Tracker` —
to the training loop. Metrics go in batches with an explicit ``step``. The store is
``MLFLOW_TRACKING_URI``, else ``sqlite:///<repo>/mlflow.db`` with artifacts in ``mlartifacts/``
beside it. Only the main process (``RANK`` 0) logs; other ranks get a :class:`NullRun`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol

import yaml

from consissr.io import file_sha256

log = logging.getLogger(__name__)
# MLflow logs "Creating initial MLflow database tables..." at INFO to stderr the first time a
# sqlite store is opened: noise before a stage's own one-line error or progress.
logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)

DB_NAME = "mlflow.db"
ARTIFACTS_NAME = "mlartifacts"
_MAX_BATCH = 1000  # MLflow's log_batch limit on metrics per call
_MAX_PARAMS = 100  # ... and on params per call
_MAX_PARAM_CHARS = 6000
_MAX_DIGEST_CHARS = 36  # the width of MLflow's datasets.digest column (a DVC folder md5 + ".dir")
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"  # the UI's "Machine learning" kind (not GenAI)


# --------------------------------------------------------------------------------------------
# where
# --------------------------------------------------------------------------------------------
def repo_root(start: str | os.PathLike | None = None) -> Path:
    """The nearest folder at or above ``start`` (default: cwd) holding dvc.yaml or .git."""
    here = Path(start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        if (folder / "dvc.yaml").is_file() or (folder / ".git").exists():
            return folder
    return here


def tracking_uri() -> str:
    """``MLFLOW_TRACKING_URI``, else ``sqlite:///<repo>/mlflow.db``."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{repo_root() / DB_NAME}"


def artifact_location(uri: str, experiment: str) -> str | None:
    """Where a new experiment keeps its artifacts: ``<db folder>/mlartifacts/<experiment>``.

    Only for a sqlite store (MLflow would otherwise write to ./mlruns of the working directory); a
    tracking server decides itself.
    """
    prefix = "sqlite:///"
    if not uri.startswith(prefix):
        return None
    db = Path(uri[len(prefix):])
    return (db.parent / ARTIFACTS_NAME / experiment).resolve().as_uri()


def is_main_process() -> bool:
    """True unless this is a non-zero rank of a distributed launch (``RANK`` env var)."""
    return int(os.environ.get("RANK", "0")) == 0


# --------------------------------------------------------------------------------------------
# provenance
# --------------------------------------------------------------------------------------------
def git_commit(root: Path | None = None) -> tuple[str, bool] | None:
    """(commit, dirty) of the repository at ``root``, or None outside git."""
    root = root or repo_root()
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                                text=True, timeout=10, check=True).stdout.strip()
        # dvc.lock is left out: `dvc repro` itself rewrites it while the stages run
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".",
                                 ":(exclude)dvc.lock", ":(exclude)*/dvc.lock"], cwd=root,
                                capture_output=True, text=True, timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return commit, bool(status.strip())


def data_hash(path: str | os.PathLike) -> str | None:
    """A content id for an input folder or file: ``md5:<dvc hash>`` or ``sha256:<hex>``.

    The DVC hash comes from the ``outs`` entry for ``path`` in the nearest ``dvc.lock`` above it
    (what ``dvc repro`` last recorded); without one, the sha256 of the folder's
    ``manifest.json`` or ``index.json`` (which list every file with its checksum / id), or of
    the file itself. None when there is nothing to hash.
    """
    path = Path(os.path.abspath(path))  # not resolve(): a symlinked output is looked up where it is linked
    for folder in path.parents:
        lock = folder / "dvc.lock"
        if lock.is_file():
            try:
                stages = (yaml.safe_load(lock.read_text()) or {}).get("stages", {})
            except yaml.YAMLError:
                break
            for stage in stages.values():
                for out in stage.get("outs", []) or []:
                    if (folder / out.get("path", "")).resolve() == path.resolve() and out.get("md5"):
                        return f"md5:{out['md5']}"
            break
    if path.is_dir():
        for name in ("manifest.json", "index.json"):
            if (path / name).is_file():
                return f"sha256:{file_sha256(path / name)}"
        return None
    return f"sha256:{file_sha256(path)}" if path.is_file() else None


def _leaves(params: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    """(dotted key, value) of each leaf of nested mappings / dataclasses; lists are leaves."""
    for key, value in params.items():
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            value = dataclasses.asdict(value)
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            yield from _leaves(value, name + ".")
        else:
            yield name, value


def flatten(params: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested mappings / dataclasses → ``{"a.b.c": "value"}`` (lists as JSON)."""
    return {name: json.dumps(list(value)) if isinstance(value, (list, tuple)) else "null" if value is None
            else str(value) for name, value in _leaves(params, prefix)}


# the params that tell a stage's runs apart in the runs table, with their short labels
RUN_NAME_PARAMS: dict[str, tuple[tuple[str, str], ...]] = {
    "prepare": (("prepare.sources", "sources"), ("prepare.crop_size", "crop")),
    "degrade": (("degrade.scale", "x"), ("degrade.variants", "variants")),
    "train_vae": (("train_vae.steps", "steps"),),
    "backbone": (("backbone.pretrained", "from"),),
    "vae_ceiling": (("backbone.pretrained", "from"),),
    "encode": (("backbone.pretrained", "from"), ("encode.dtype", "dtype")),
    "train_clip": (("clip.model_name", "clip"), ("train_clip.iterations", "iters")),
    "embed_clip": (("embed_clip.dtype", "dtype"),),
    "train_sdsr": (("train_sdsr.gamma", "γ"), ("train_sdsr.tala", "tala"), ("train_sdsr.iterations", "iters")),
    "train_gan": (("gan.pretrained", "from"), ("train_gan.iterations", "iters")),
    "evaluate": (("evaluate.methods", "methods"), ("evaluate.protocol", "protocol")),
    "fidelity": (("fidelity.name", "budget"),),
    "promote": (("promote.model_name", "model"), ("promote.alias", "alias")),
}
_MAX_VALUE_CHARS = 48


def _short(value: Any) -> str:
    """A param value as a run name shows it: 5.0 → 5, True → on, a path → its last part, lists joined by commas."""
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, tuple)):
        return ",".join(_short(v) for v in value)
    if value is None:
        return "none"
    text = str(value)
    text = Path(text).name if "/" in text.rstrip("/") else text
    return text if len(text) <= _MAX_VALUE_CHARS else text[:_MAX_VALUE_CHARS - 1] + "…"


def run_name(stage: str, params: Mapping[str, Any], commit: tuple[str, bool] | None = None) -> str:
    """``<stage> <label>=<value>... @<short commit>[-dirty]``, e.g. ``train_sdsr γ=5 tala=on iters=20 @abc1234``.

    The labelled params are the stage's :data:`RUN_NAME_PARAMS` found in ``params`` (the sections
    :func:`start_run` logs); ``commit`` is :func:`git_commit`'s (commit, dirty), absent outside git.
    """
    values = dict(_leaves(params))
    parts = [stage] + [f"{label}={_short(values[key])}" for key, label in RUN_NAME_PARAMS.get(stage, ())
                       if key in values]
    if commit is not None:
        parts.append(f"@{commit[0][:7]}" + ("-dirty" if commit[1] else ""))
    return " ".join(parts)


# --------------------------------------------------------------------------------------------
# runs
# --------------------------------------------------------------------------------------------
class Tracker(Protocol):
    """What the training loop and stages call on a run (``Run`` and ``NullRun`` implement it)."""

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None: ...
    def log_image(self, image: Any, name: str, step: int | None = None) -> None: ...
    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None: ...
    def log_plot(self, name: str, steps: Sequence[int], series: Mapping[str, Sequence[float]],
                 *, logy: bool = False) -> None: ...
    def set_tags(self, tags: Mapping[str, Any]) -> None: ...


class NullRun:
    """The do-nothing run of non-main ranks (and of ``start_run(enabled=False)``)."""

    run_id: str | None = None
    tracking_uri: str | None = None

    def log_params(self, params: Mapping[str, Any]) -> None: ...
    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None: ...
    def log_image(self, image: Any, name: str, step: int | None = None) -> None: ...
    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None: ...
    def log_plot(self, name: str, steps: Sequence[int], series: Mapping[str, Sequence[float]],
                 *, logy: bool = False) -> None: ...
    def set_tags(self, tags: Mapping[str, Any]) -> None: ...
    def flush(self) -> None: ...


class Run(NullRun):
    """One MLflow run (main process). Created by :func:`start_run`; the loop's tracker.

    Metrics are buffered and sent with ``log_batch`` every ``flush_every`` values or
    ``flush_seconds``, and at :meth:`flush` / the end of the run.
    """

    def __init__(self, client: Any, run_id: str, tracking_uri: str, *, flush_every: int = 200,
                 flush_seconds: float = 30.0) -> None:
        self._client = client
        self.run_id = run_id
        self.tracking_uri = tracking_uri
        self._buffer: list[Any] = []
        self._flush_every = flush_every
        self._flush_seconds = flush_seconds
        self._last_flush = time.monotonic()

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Log (nested) params once, flattened to dotted keys."""
        from mlflow.entities import Param

        flat = flatten(params)
        items = [Param(k, v[:_MAX_PARAM_CHARS]) for k, v in sorted(flat.items())]
        for i in range(0, len(items), _MAX_PARAMS):
            self._client.log_batch(self.run_id, params=items[i:i + _MAX_PARAMS])

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        from mlflow.entities import RunTag

        items = [RunTag(k, str(v)) for k, v in tags.items() if v is not None]
        if items:
            self._client.log_batch(self.run_id, tags=items)

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """Queue ``metrics`` at ``step``; non-finite values are logged as they are (MLflow keeps NaN)."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self._buffer += [Metric(k, float(v), now, int(step)) for k, v in metrics.items()]
        if len(self._buffer) >= self._flush_every or time.monotonic() - self._last_flush > self._flush_seconds:
            self.flush()

    def flush(self) -> None:
        while self._buffer:
            chunk, self._buffer = self._buffer[:_MAX_BATCH], self._buffer[_MAX_BATCH:]
            self._client.log_batch(self.run_id, metrics=chunk)
        self._last_flush = time.monotonic()

    def log_image(self, image: Any, name: str, step: int | None = None) -> None:
        """A PIL image or (H, W[, C]) numpy array (uint8, or float in [0, 1]) as artifact ``name``."""
        import numpy as np

        if isinstance(image, np.ndarray) and image.dtype != np.uint8:
            image = (np.clip(image, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
        self._client.log_image(self.run_id, image, artifact_file=name)

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        """A file, or a whole folder (its contents go under ``artifact_path``)."""
        path = Path(path)
        if path.is_dir():
            self._client.log_artifacts(self.run_id, str(path), artifact_path)
        else:
            self._client.log_artifact(self.run_id, str(path), artifact_path)

    def log_plot(self, name: str, steps: Sequence[int], series: Mapping[str, Sequence[float]],
                 *, logy: bool = False) -> None:
        """A line plot PNG of ``series`` against ``steps`` as artifact ``name`` (e.g. ``plots/loss.png``)."""
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / Path(name).name
            line_plot(out, steps, series, logy=logy)
            parent = str(Path(name).parent)
            self._client.log_artifact(self.run_id, str(out), None if parent == "." else parent)


def line_plot(path: str | os.PathLike, steps: Sequence[int], series: Mapping[str, Sequence[float]],
              *, logy: bool = False) -> Path:
    """Write a PNG line plot (matplotlib, Agg backend) of each series against ``steps``."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    for label, values in series.items():
        finite = [(s, v) for s, v in zip(steps, values) if math.isfinite(v)]
        if finite:
            ax.plot(*zip(*finite), label=label, linewidth=1.2)
    ax.set_xlabel("step")
    if logy:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)
    return Path(path)


def experiment_id(client: Any, name: str, uri: str) -> str:
    """The id of experiment ``name``, created when missing; tagged with :data:`EXPERIMENT_KIND` unless it has a kind.

    The kind says that the runs, not traces, are the experiment's content. MLflow 3.17's UI opens an
    experiment by the browser's GenAI / Model training switch instead (the docs say to switch
    once); its later UI follows the kind.
    """
    found = client.get_experiment_by_name(name)
    if found is None:
        return client.create_experiment(name, artifact_location=artifact_location(uri, name),
                                        tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
    if EXPERIMENT_KIND_TAG not in found.tags:
        client.set_experiment_tag(found.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
    return found.experiment_id


def source_name(argv: Sequence[str] | None = None) -> str:
    """The command a run came from, for the runs table's Source column: ``consissr <subcommand>``, else the script."""
    argv = list(sys.argv if argv is None else argv)
    program = Path(argv[0]).name if argv and argv[0] else "python"
    if program in ("consissr", "cli.py") and len(argv) > 1:  # the console script, or `python -m consissr.cli`
        return f"consissr {argv[1]}"
    return program


def input_context(stage: str) -> str:
    """How a stage uses its inputs (the datasets' ``mlflow.data.context``)."""
    if stage.startswith("train_"):
        return "training"
    if stage in ("evaluate", "vae_ceiling", "fidelity", "promote"):
        return "evaluation"
    return "preprocessing"


def dataset_input(name: str, path: str | os.PathLike, digest: str, context: str) -> Any:
    """An MLflow dataset input: ``name`` (the path as the stage names it), the local ``path`` as its source.

    ``digest`` is :func:`data_hash`'s ``md5:<dvc hash>`` or ``sha256:<hex>``: the dataset's digest is
    the DVC md5 as ``dvc.lock`` has it, or the sha256 cut to the width MLflow stores.
    """
    from mlflow.data.dataset_source_registry import get_dataset_source_from_json
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.entities import Dataset, DatasetInput, InputTag

    # by its type: resolving a local path warns that two registered "local" sources could read it
    source = get_dataset_source_from_json(json.dumps({"uri": os.path.abspath(path)}), source_type="local")
    meta = MetaDataset(source, name=name, digest=digest.partition(":")[2][:_MAX_DIGEST_CHARS])
    return DatasetInput(Dataset(**meta.to_dict()), tags=[InputTag("mlflow.data.context", context)])


def _display_path(path: str | os.PathLike, root: Path) -> str:
    """``path`` relative to the repository when it lies inside (``data/latents``), else as absolute."""
    absolute = Path(os.path.abspath(path))
    try:
        return absolute.relative_to(root.resolve()).as_posix()
    except ValueError:
        return str(absolute)


@contextmanager
def start_run(
    stage: str,
    *,
    params: Mapping[str, Any],
    inputs: Mapping[str, str | os.PathLike] | None = None,
    tags: Mapping[str, Any] | None = None,
    experiment: str | None = None,
    uri: str | None = None,
    enabled: bool | None = None,
    parent_run_id: str | None = None,
    root: str | os.PathLike | None = None,
) -> Iterator[NullRun]:
    """Open an MLflow run for one stage; yield a :class:`Run` (or :class:`NullRun`).

    Args:
        stage: the stage name: its ``stage`` tag, and the start of its name (:func:`run_name`).
        params: params sections (dataclasses or mappings) keyed by their dotted prefix, e.g.
            ``{"base.seed": 2024, "train_clip": params.train_clip}``; logged once, flattened.
        inputs: input data folders/files by name; each is tagged ``input.<name>.path`` and
            ``input.<name>.hash`` (:func:`data_hash`), and logged as a dataset (:func:`dataset_input`)
            when it has a hash.
        tags: extra tags.
        experiment: experiment name (default ``MLFLOW_EXPERIMENT_NAME``, else ``consissr``), created
            with its kind (:func:`experiment_id`).
        uri: tracking URI (default :func:`tracking_uri`).
        enabled: log at all (default: only on the main process).
        parent_run_id: nest the run under this one (tag ``mlflow.parentRunId``); default
            ``MLFLOW_PARENT_RUN_ID`` (set by the Prefect flow for its ``dvc repro`` subprocesses).
        root: the repository whose git commit is tagged (default: :func:`repo_root` of cwd).

    Tags ``profile`` from ``CONSISSR_PROFILE`` (the flow's parameter; the CLI sets it from params),
    and ``mlflow.source.name`` / ``.type`` / ``.git.commit``: the UI's Source and Version columns.
    The run ends FINISHED, or FAILED when the body raises (KILLED on KeyboardInterrupt); the
    exception propagates.
    """
    if enabled is None:
        enabled = is_main_process()
    if not enabled:
        yield NullRun()
        return

    from mlflow import MlflowClient

    uri = uri or tracking_uri()
    experiment = experiment or os.environ.get("MLFLOW_EXPERIMENT_NAME") or "consissr"
    client = MlflowClient(tracking_uri=uri)
    exp_id = experiment_id(client, experiment, uri)

    root = Path(root) if root is not None else repo_root()
    all_tags: dict[str, Any] = {"stage": stage, "mlflow.source.name": source_name(), "mlflow.source.type": "LOCAL"}
    commit = git_commit(root)
    if commit is not None:
        all_tags.update({"mlflow.source.git.commit": commit[0], "git_commit": commit[0],
                         "git_dirty": str(commit[1]).lower()})
    hashes = {name: data_hash(path) for name, path in (inputs or {}).items()}
    for name, path in (inputs or {}).items():
        all_tags[f"input.{name}.path"] = str(path)
        all_tags[f"input.{name}.hash"] = hashes[name] or "missing"
    parent_run_id = parent_run_id or os.environ.get("MLFLOW_PARENT_RUN_ID")
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    if os.environ.get("CONSISSR_PROFILE"):  # embedded | paper: the flow's parameter, else the CLI's params
        all_tags["profile"] = os.environ["CONSISSR_PROFILE"]
    all_tags.update(tags or {})

    created = client.create_run(exp_id, tags={k: str(v) for k, v in all_tags.items() if v is not None},
                                run_name=run_name(stage, params, commit))
    run = Run(client, created.info.run_id, uri)
    log.info("mlflow: run %s in experiment %r at %s", run.run_id, experiment, uri)
    status = "FAILED"
    try:
        run.log_params(params)
        datasets = [dataset_input(_display_path(path, root), path, hashes[name], input_context(stage))
                    for name, path in (inputs or {}).items() if hashes[name]]
        if datasets:
            client.log_inputs(run.run_id, datasets=datasets)
        yield run
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        try:
            run.flush()
        finally:
            client.set_terminated(run.run_id, status)


# --------------------------------------------------------------------------------------------
# model registry
# --------------------------------------------------------------------------------------------
# the pipeline's knobs that ``predict(..., params=...)`` passes on (None: the saved pipeline's default)
PREDICT_PARAMS = {"mode": "string", "preset": "string", "num_inference_steps": "long", "t_max": "long",
                  "seed": "long", "guidance_scale": "double", "prompt": "string", "color_fix": "string"}


def _pipeline_model():
    """The pyfunc wrapper class, built lazily (mlflow imports only when a model is logged)."""
    import mlflow.pyfunc

    class ConsisSRPyfunc(mlflow.pyfunc.PythonModel):
        """``predict``: images (np float HxWx3 in [0, 1], or a list / NxHxWx3 batch) -> upscaled images."""

        def load_context(self, context):
            from consissr.inference.pipeline import load_pipeline

            self.pipe = load_pipeline(context.artifacts["pipeline"], device="cpu")

        def predict(self, context, model_input, params=None):
            import numpy as np

            knobs = {k: v for k, v in (params or {}).items() if v is not None}
            images = [model_input] if isinstance(model_input, np.ndarray) and model_input.ndim == 3 else model_input
            return [self.pipe(np.asarray(img, dtype=np.float32), output_type="np", **knobs).images[0]
                    for img in images]

    return ConsisSRPyfunc()


def _predict_signature():
    """A params-only signature: MLflow passes ``predict``'s params through only when they are declared."""
    from mlflow.models.signature import ModelSignature
    from mlflow.types.schema import ParamSchema, ParamSpec

    return ModelSignature(params=ParamSchema([ParamSpec(k, t, None) for k, t in PREDICT_PARAMS.items()]))


def log_pipeline_model(run: NullRun, pipeline_dir: str | os.PathLike, model_name: str) -> str | None:
    """Log a saved pipeline folder as an MLflow pyfunc model of ``run`` and register it; returns the version."""
    if run.run_id is None:
        return None
    import mlflow

    mlflow.set_tracking_uri(run.tracking_uri)
    mlflow.set_registry_uri(run.tracking_uri)
    with mlflow.start_run(run_id=run.run_id):
        info = mlflow.pyfunc.log_model(name="pipeline", python_model=_pipeline_model(),
                                       artifacts={"pipeline": str(pipeline_dir)},
                                       pip_requirements=["consissr"], registered_model_name=model_name,
                                       signature=_predict_signature())
    return str(info.registered_model_version)


def alias_version(uri: str, model_name: str, alias: str) -> tuple[str, dict[str, str]] | None:
    """(version, its tags) of ``model_name@alias``, or None when the alias (or the model) does not exist."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    try:
        mv = MlflowClient(tracking_uri=uri, registry_uri=uri).get_model_version_by_alias(model_name, alias)
    except MlflowException:
        return None
    return str(mv.version), dict(mv.tags or {})


def tag_version(uri: str, model_name: str, version: str, tags: Mapping[str, Any]) -> None:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    for key, value in tags.items():
        client.set_model_version_tag(model_name, version, key, str(value))


def set_alias(uri: str, model_name: str, alias: str, version: str) -> None:
    """Point ``model_name@alias`` at ``version`` (moving it from the previous one)."""
    from mlflow import MlflowClient

    MlflowClient(tracking_uri=uri, registry_uri=uri).set_registered_model_alias(model_name, alias, version)


__all__ = ["EXPERIMENT_KIND", "RUN_NAME_PARAMS", "NullRun", "Run", "Tracker", "alias_version", "artifact_location",
           "data_hash", "dataset_input", "experiment_id", "flatten", "git_commit", "input_context", "is_main_process",
           "line_plot", "log_pipeline_model", "repo_root", "run_name", "set_alias", "source_name", "start_run",
           "tag_version", "tracking_uri"]
