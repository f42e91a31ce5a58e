"""``consissr promote``: register the trained pipeline in MLflow and move the ``champion`` alias by a rule.

The rule (configs/retrain.yaml ``promote.rules``) names, per dataset, a metric in the evaluate stage's
metrics document and its direction; the new version takes the alias only when it beats the champion on
every rule (a tie keeps the champion; no champion yet: it wins). Each version carries its metric values as
``metric.<dataset>`` tags, so the next decision needs no old files. The decision is logged on the run.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from consissr import tracking
from consissr.errors import ParamsError

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Rule:
    dataset: str
    file: str
    key: str
    direction: str  # max | min

    def __post_init__(self) -> None:
        if self.direction not in ("max", "min"):
            raise ParamsError(f"promote rule for {self.dataset!r}: direction must be max or min, not {self.direction!r}")


@dataclasses.dataclass(frozen=True)
class Decision:
    promote: bool
    reasons: tuple[str, ...]
    version: str | None = None  # the registered version (set by :func:`promote`)
    previous: str | None = None  # the champion's version before the decision (None: no champion yet)
    metrics: dict[str, float] = dataclasses.field(default_factory=dict)  # the new version's, per dataset


def load_rules(config: str | os.PathLike) -> tuple[dict[str, Any], list[Rule]]:
    """The ``promote`` section of the flow config and its rules (a clear error naming the file)."""
    section = (yaml.safe_load(Path(config).read_text()) or {}).get("promote")
    if not isinstance(section, dict) or not section.get("rules"):
        raise ParamsError(f"{config}: no promote.rules (a list of dataset/file/key/direction)")
    try:
        rules = [Rule(**r) for r in section["rules"]]
    except TypeError as exc:
        raise ParamsError(f"{config}: promote.rules: {exc}") from exc
    return section, rules


def read_metrics(rules: Sequence[Rule], root: Path = Path(".")) -> dict[str, float]:
    """dataset -> value of its rule's metric, from the metrics documents."""
    out = {}
    for rule in rules:
        path = root / rule.file
        try:
            node: Any = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise ParamsError(f"{path}: cannot read the metrics of promote rule {rule.dataset!r}: {exc}") from exc
        for part in rule.key.split("."):
            if not isinstance(node, Mapping) or part not in node:
                raise ParamsError(f"{path}: no {rule.key!r} (promote rule for {rule.dataset!r})")
            node = node[part]
        out[rule.dataset] = float(node)
    return out


def decide(rules: Sequence[Rule], new: Mapping[str, float], champion: Mapping[str, float] | None) -> Decision:
    """Promote when ``new`` beats ``champion`` on every rule's dataset (strictly; a tie keeps the champion)."""
    if champion is None:
        return Decision(True, ("no champion yet",))
    reasons, better = [], True
    for rule in rules:
        old = champion.get(rule.dataset)
        if old is None:
            reasons.append(f"{rule.dataset}: champion has no {rule.key}; new {new[rule.dataset]:.4g}")
            continue
        wins = new[rule.dataset] > old if rule.direction == "max" else new[rule.dataset] < old
        better &= wins
        reasons.append(f"{rule.dataset}: {rule.key} new {new[rule.dataset]:.4g} vs champion {old:.4g} "
                       f"({rule.direction}): {'better' if wins else 'not better'}")
    return Decision(better, tuple(reasons))


def promote(config: str | os.PathLike, *, model_dir: str | os.PathLike | None = None, profile: str | None = None,
            root: str | os.PathLike = ".", uri: str | None = None, parent_run_id: str | None = None) -> Decision:
    """Log + register the pipeline (``model_dir`` or one assembled from the stage outputs); apply the rule.

    ``root``: the project (metrics files, ``data/models``, git commit); ``uri``: the MLflow store (default
    :func:`tracking.tracking_uri`); ``parent_run_id``: nest the run (the Prefect flow's run).
    The ``consissr promote`` command and the flow's ``promote`` task both call this.
    """
    from consissr.inference.pipeline import STAGE_DIRS

    root = Path(root)
    section, rules = load_rules(config)
    name, alias = section.get("model_name", "consissr"), section.get("alias", "champion")
    new = read_metrics(rules, root)
    stage_dirs = {k: root / v for k, v in STAGE_DIRS.items()}
    inputs = ({"pipeline": Path(model_dir)} if model_dir is not None else dict(stage_dirs)) | {
        f"metrics.{r.dataset}": root / r.file for r in rules}
    with tracking.start_run("promote", params={"promote": section}, inputs=inputs, tags={"profile": profile} if profile else None,
                            uri=uri, parent_run_id=parent_run_id, root=root) as run, \
            tempfile.TemporaryDirectory() as tmp:
        if model_dir is None:
            from consissr.inference.pipeline import load_pipeline

            model_dir = Path(tmp) / "pipeline"
            load_pipeline(None, device="cpu", stage_dirs=stage_dirs).save_pretrained(model_dir)
        version = tracking.log_pipeline_model(run, model_dir, name)
        if version is None:  # not the main process
            return Decision(False, ("not the main process",))
        tracking.tag_version(run.tracking_uri, name, version, {f"metric.{k}": v for k, v in new.items()})
        current = tracking.alias_version(run.tracking_uri, name, alias)
        champion = None if current is None else {k[len("metric."):]: float(v) for k, v in current[1].items()
                                                 if k.startswith("metric.")}
        decision = dataclasses.replace(decide(rules, new, champion), version=version,
                                       previous=current[0] if current else None, metrics=dict(new))
        if decision.promote:
            tracking.set_alias(run.tracking_uri, name, alias, version)
        summary = (f"version {version} {'becomes' if decision.promote else 'does not become'} {name}@{alias}"
                   f" (was {current[0] if current else 'none'}): " + "; ".join(decision.reasons))
        log.info("promote: %s", summary)
        run.set_tags({"promote.version": version, "promote.decision": "promoted" if decision.promote else "kept",
                      "promote.reason": summary[:5000]})
        run.log_metrics({f"promote.{k}": v for k, v in new.items()}, step=0)
    return decision


__all__ = ["Decision", "Rule", "decide", "load_rules", "promote", "read_metrics"]
