"""Training checkpoints: atomic writes, RNG states, fingerprints and the resume rules.

``<out>/checkpoints/step-XXXXXXXX/`` holds ``trainable.safetensors``, ``state.pt`` (optimizer,
scheduler, scaler, every rank's RNG states, step, data position, history; read with
``weights_only=True``) and ``meta.json`` (human-readable; ``complete: true`` on the final step of
a finished run). Resume rules (``prepare_resume``): a finished run is not resumed (a rerun starts
fresh); an interrupted one is resumed when its fingerprint — the trajectory settings, the number
of processes, the trainable parameters' names and shapes, the caller's params and data hashes —
matches; a change of the training-path code since is a warning (``resume: strict`` refuses it).
Checkpoints not resumed are moved to ``checkpoints/stale/<fingerprint>/``, never deleted here.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import random
import re
import shutil
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from consissr.io import atomic_dir, write_json

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
STALE = "stale"
WEIGHTS_FILE = "trainable.safetensors"
STATE_FILE = "state.pt"
META_FILE = "meta.json"
CHECKPOINT_VERSION = 2
_STEP_DIR = re.compile(r"^step-(\d{8})$")

PACKAGE_ROOT = Path(__file__).resolve().parents[1]
# the code that shapes a training trajectory; an edit elsewhere (CLI, tracking, inference) is ignored
TRAINING_PATH = ("training/", "models/", "data/pairs.py", "data/latent_cache.py", "data/layout.py", "compat.py")


# --------------------------------------------------------------------------------------------
# RNG states as tensors and plain values (loadable with weights_only=True)
# --------------------------------------------------------------------------------------------
def rng_state() -> dict[str, Any]:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()  # this process's device only (not every GPU's)
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    random.setstate(_as_tuples(state["python"]))
    npst = state["numpy"]
    np.random.set_state((npst["kind"], npst["keys"].numpy().astype(np.uint32), npst["pos"],
                         npst["has_gauss"], npst["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _as_tuples(value: Any) -> Any:
    return tuple(_as_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every CUDA device


# --------------------------------------------------------------------------------------------
# fingerprints
# --------------------------------------------------------------------------------------------
def training_code(root: Path | None = None) -> dict[str, str]:
    """sha256 (16 hex) of each source file on the training path, by path relative to the package."""
    root = root or PACKAGE_ROOT
    out = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if path.suffix in (".py", ".json") and "__pycache__" not in path.parts and rel.startswith(TRAINING_PATH):
            out[rel] = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    return out


@dataclass(frozen=True)
class Fingerprint:
    """What a checkpoint must match to be resumed (``digest`` of ``data``), and the code it was written by."""

    digest: str
    data: dict[str, Any]
    code: dict[str, str]

    @classmethod
    def of(cls, *, trajectory: Mapping[str, Any], num_processes: int, model: nn.Module,
           extra: Mapping[str, Any] | None) -> Fingerprint:
        trainable = {n: list(p.shape) for n, p in model.named_parameters() if p.requires_grad}
        data = {"settings": dict(trajectory), "num_processes": num_processes, "trainable": trainable,
                "extra": extra or {}}
        text = json.dumps(data, sort_keys=True, default=_jsonable)
        return cls(hashlib.sha256(text.encode()).hexdigest()[:16], json.loads(text), training_code())


def _jsonable(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    if isinstance(value, (Path, torch.dtype, torch.device)):
        return str(value)
    raise TypeError(f"fingerprint: {type(value).__name__} is not JSON-serialisable")


def diff(old: Any, new: Any, prefix: str = "") -> list[str]:
    """``key: old → new`` for every leaf that differs between two JSON-like values."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for k in sorted(set(old) | set(new)):
            out += diff(old.get(k), new.get(k), f"{prefix}{k}.")
        return out
    return [] if old == new else [f"{prefix.rstrip('.')}: {old!r} → {new!r}"]


# --------------------------------------------------------------------------------------------
# reading and writing
# --------------------------------------------------------------------------------------------
def checkpoint_dirs(out_dir: str | Path) -> list[Path]:
    """Complete checkpoints under ``out_dir/checkpoints``, oldest first."""
    root = Path(out_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _STEP_DIR.match(p.name) and (p / META_FILE).is_file()]
    return sorted(found, key=_step_of)


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    dirs = checkpoint_dirs(out_dir)
    return dirs[-1] if dirs else None


def read_meta(path: str | Path) -> dict[str, Any]:
    return json.loads((Path(path) / META_FILE).read_text())


def load_checkpoint_state(path: str | Path) -> dict[str, Any]:
    """``state.pt`` of a checkpoint folder, read with ``weights_only=True``."""
    return torch.load(Path(path) / STATE_FILE, map_location="cpu", weights_only=True)


def load_trainable(path: str | Path, model: nn.Module) -> None:
    """Copy ``trainable.safetensors`` into ``model``'s trainable parameters (the names must match)."""
    weights = load_file(Path(path) / WEIGHTS_FILE, device="cpu")
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    missing, unexpected = sorted(set(names) - set(weights)), sorted(set(weights) - set(names))
    if missing or unexpected:
        raise RuntimeError(f"{path}: trainable weights do not match the model "
                           f"(missing {missing[:5]}, unexpected {unexpected[:5]})")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name in weights:
                p.copy_(weights[name].to(p.dtype))


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The parameters that require grad, detached, contiguous, on CPU."""
    return {name: p.detach().to("cpu").contiguous() for name, p in model.named_parameters() if p.requires_grad}


def write_checkpoint(out_dir: Path, step: int, weights: dict[str, torch.Tensor], state: dict[str, Any],
                     meta: dict[str, Any], keep: int) -> Path:
    """Write ``checkpoints/step-XXXXXXXX`` atomically (``io.atomic_dir``, fsynced); keep the newest ``keep``."""
    final = Path(out_dir) / CHECKPOINTS / f"step-{step:08d}"
    with atomic_dir(final, fsync=True) as tmp:
        save_file(weights, str(tmp / WEIGHTS_FILE), metadata={"step": str(step)})
        torch.save(state, tmp / STATE_FILE)
        write_json(tmp / META_FILE, dict(meta, version=CHECKPOINT_VERSION, step=step, time=time.time()),
                   sort_keys=True)
    for old in checkpoint_dirs(out_dir)[:-keep]:
        shutil.rmtree(old)
    return final


# --------------------------------------------------------------------------------------------
# resume rules
# --------------------------------------------------------------------------------------------
def prepare_resume(out_dir: Path, fp: Fingerprint, *, strict: bool) -> None:
    """Leave in ``out_dir/checkpoints`` only what this run may resume (main process, before training).

    Removes unfinished temp folders; moves aside the checkpoints of a finished run, of other
    settings (the warning names what changed), and — with ``strict`` — of other training code.
    A code change without ``strict`` is a warning naming the files.
    """
    root = Path(out_dir) / CHECKPOINTS
    if not root.is_dir():
        return
    for p in root.iterdir():
        if p.is_dir() and p.name.startswith(".step-"):
            shutil.rmtree(p)
    ckpts = checkpoint_dirs(out_dir)
    if ckpts and read_meta(ckpts[-1]).get("complete"):
        for ckpt in ckpts:
            _set_aside(root, ckpt, read_meta(ckpt))
        log.info("the run in %s finished at step %s; starting afresh (its checkpoints are in %s)",
                 out_dir, _step_of(ckpts[-1]), root / STALE)
        return
    for ckpt in ckpts:
        meta = read_meta(ckpt)
        why = []
        if meta.get("fingerprint") != fp.digest:
            why = diff(meta.get("fingerprint_data", {}), fp.data) or ["an unknown difference"]
        changed_code = diff(meta.get("code", {}), fp.code)
        if not why and changed_code and strict:
            why = ["training code (resume: strict): " + "; ".join(changed_code)]
        if why:
            target = _set_aside(root, ckpt, meta)
            log.warning("not resuming checkpoint %s: %s; moved to %s, starting afresh",
                        ckpt.name, ", ".join(why), target)
        elif changed_code and ckpt == ckpts[-1]:
            log.warning("resuming %s although the training code changed since it was written (%s); "
                        "set resume: strict to start afresh instead", ckpt.name, "; ".join(changed_code))


def _step_of(path: Path) -> int:
    return int(_STEP_DIR.match(path.name).group(1))


def _set_aside(root: Path, ckpt: Path, meta: Mapping[str, Any]) -> Path:
    target = root / STALE / str(meta.get("fingerprint", "unknown")) / ckpt.name
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists():
        shutil.rmtree(target)
    ckpt.rename(target)
    return target


__all__ = ["CHECKPOINTS", "META_FILE", "STALE", "STATE_FILE", "WEIGHTS_FILE", "Fingerprint", "checkpoint_dirs",
           "diff", "latest_checkpoint", "load_checkpoint_state", "load_trainable", "prepare_resume", "read_meta",
           "rng_state", "seed_everything", "set_rng_state", "trainable_state", "training_code", "write_checkpoint"]
