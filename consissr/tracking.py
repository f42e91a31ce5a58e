"""MLflow at the edge: the one module that imports mlflow.

A stage opens one run with :func:`start_run` (params once, flattened to dotted keys; tags: git
commit, ``git_dirty`` ignoring ``dvc.lock``, and the DVC hash of each input) and hands the
yielded :class:`Run` — a :class:`Tracker` — to the training loop. Metrics go in batches with an
explicit ``step``. The store is ``MLFLOW_TRACKING_URI``, else ``sqlite:///<repo>/mlflow.db`` with
artifacts in ``mlartifacts/`` beside it. Only the main process (``RANK`` 0) logs; other ranks get
a :class:`NullRun`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import subprocess
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


def flatten(params: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested mappings / dataclasses → ``{"a.b.c": "value"}`` (lists as JSON)."""
    out: dict[str, str] = {}
    for key, value in params.items():
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            value = dataclasses.asdict(value)
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, name + "."))
        elif isinstance(value, (list, tuple)):
            out[name] = json.dumps(list(value))
        else:
            out[name] = "null" if value is None else str(value)
    return out


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
        stage: the stage name; the run's name and its ``stage`` tag.
        params: params sections (dataclasses or mappings) keyed by their dotted prefix, e.g.
            ``{"base.seed": 2024, "train_clip": params.train_clip}``; logged once, flattened.
        inputs: input data folders/files by name; each is tagged ``input.<name>.path`` and
            ``input.<name>.hash`` (:func:`data_hash`).
        tags: extra tags.
        experiment: experiment name (default ``MLFLOW_EXPERIMENT_NAME``, else ``consissr``).
        uri: tracking URI (default :func:`tracking_uri`).
        enabled: log at all (default: only on the main process).
        parent_run_id: nest the run under this one (tag ``mlflow.parentRunId``); default
            ``MLFLOW_PARENT_RUN_ID`` (set by the Prefect flow for its ``dvc repro`` subprocesses).
        root: the repository whose git commit is tagged (default: :func:`repo_root` of cwd).

    Tags ``profile`` from ``CONSISSR_PROFILE`` (the flow's parameter; the CLI sets it from params).
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
    found = client.get_experiment_by_name(experiment)
    experiment_id = (found.experiment_id if found is not None
                     else client.create_experiment(experiment, artifact_location=artifact_location(uri, experiment)))

    all_tags: dict[str, Any] = {"stage": stage}
    commit = git_commit(Path(root) if root is not None else None)
    if commit is not None:
        all_tags.update({"mlflow.source.git.commit": commit[0], "git_commit": commit[0],
                         "git_dirty": str(commit[1]).lower()})
    for name, path in (inputs or {}).items():
        all_tags[f"input.{name}.path"] = str(path)
        all_tags[f"input.{name}.hash"] = data_hash(path) or "missing"
    parent_run_id = parent_run_id or os.environ.get("MLFLOW_PARENT_RUN_ID")
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    if os.environ.get("CONSISSR_PROFILE"):  # embedded | paper: the flow's parameter, else the CLI's params
        all_tags["profile"] = os.environ["CONSISSR_PROFILE"]
    all_tags.update(tags or {})

    created = client.create_run(experiment_id, tags={k: str(v) for k, v in all_tags.items() if v is not None},
                                run_name=stage)
    run = Run(client, created.info.run_id, uri)
    log.info("mlflow: run %s in experiment %r at %s", run.run_id, experiment, uri)
    status = "FAILED"
    try:
        run.log_params(params)
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


__all__ = ["NullRun", "Run", "Tracker", "alias_version", "artifact_location", "data_hash", "flatten", "git_commit",
           "is_main_process", "line_plot", "log_pipeline_model", "repo_root", "set_alias", "start_run", "tag_version",
           "tracking_uri"]
