"""The shared training loop: accelerate, exact resume, atomic checkpoints, divergence stop.

One code path for CPU, one GPU and several GPUs (DDP under ``accelerate launch`` / ``torchrun``),
with bf16/fp16 mixed precision, gradient accumulation and optional gradient checkpointing.
A stage (``clip_stage.py``: Eq. 3; ``sdsr_stage.py``: Algorithm 1) brings only what is its own:

* ``model`` — an ``nn.Module`` holding everything the loss needs. Its parameters with
  ``requires_grad=True`` are what Adam trains and what a checkpoint stores; frozen parts
  (a teacher, the VAE) must be rebuilt identically by the stage (seeded or pretrained).
* ``loss_fn(model, batch) -> loss`` or ``(loss, {name: value})`` — one micro-batch's scalar loss.
  ``model`` is the prepared (under DDP: ``DistributedDataParallel``-wrapped) module, so the loss
  must go through ``model(...)`` (its ``forward``) for gradients to be all-reduced; reach other
  attributes through ``unwrap(model)``. Randomness (noise, timesteps, TALA's coin) should come
  from the global torch RNG, which the checkpoint saves and restores per rank.
* ``dataset`` — a map-style ``Dataset`` whose item ``i`` depends only on ``i`` (randomness goes
  in ``loss_fn``); batches are collated (default or ``collate_fn``) and moved to the device.
* optionally ``sample_fn(model, step) -> {name: image}`` — called on the main process every
  ``sample_every`` steps with the unwrapped model in eval mode under ``torch.no_grad``, inside a
  forked RNG (sampling never changes the training trajectory); each image (PIL, or HWC numpy)
  is logged as ``samples/step-XXXXXXXX/<name>.png``.
* optionally a ``tracker`` (``consissr.tracking.Run``; anything with ``log_metrics(metrics, step)``,
  ``log_image(image, name)`` and ``set_tags(tags)``): this module never imports mlflow, and only
  the main process calls it.

Data order
    Samples are drawn from an endless stream of per-epoch permutations,
    ``numpy.random.default_rng([seed, epoch]).permutation(len(dataset))``; each micro-batch takes
    the next ``batch_size × num_processes`` of them and rank ``r`` keeps the ``r``-th slice. The
    position in the stream (``epoch``, ``index``) is part of the checkpoint.

Checkpoints (``out_dir/checkpoints/step-XXXXXXXX/``, every ``checkpoint_every`` steps and at the end)
    ``trainable.safetensors`` (the trainable weights), ``state.pt`` (optimizer, LR scheduler,
    grad scaler, every rank's RNG states — python, numpy, torch, cuda —, step, data position,
    loss/lr history, settings fingerprint) and ``meta.json`` (the same, human-readable, minus
    tensors). A checkpoint is written into a hidden folder beside and renamed into place, so a
    kill at any moment leaves only complete checkpoints; the last ``keep_checkpoints`` are kept.
    ``state.pt`` holds only tensors and plain Python values and is read with
    ``torch.load(weights_only=True)``. (accelerate's ``save_state``/``load_state`` were not
    used: they write in place rather than atomically, store frozen weights too, and
    ``load_state`` silently continues when RNG states fail to load.)

Resume
    ``train`` continues from the latest checkpoint in ``out_dir/checkpoints`` when its
    fingerprint (the settings that shape the trajectory — everything but ``iterations`` and the
    logging/checkpoint cadence —, the number of processes and the caller's ``fingerprint``) equals
    this run's; a resumed run then reproduces the uninterrupted one exactly (same losses, same
    weights, on the same hardware). Checkpoints of other settings are removed with a warning,
    as DVC would have removed the whole output. Raising ``iterations`` continues a finished run.

Divergence
    A NaN or infinite loss on any rank stops every rank with :class:`TrainingDiverged`, naming
    the step and the last good checkpoint.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import random
import re
import shutil
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm.auto import tqdm

log = logging.getLogger(__name__)

STALE = "stale"
CHECKPOINTS = "checkpoints"
WEIGHTS_FILE = "trainable.safetensors"
STATE_FILE = "state.pt"
META_FILE = "meta.json"
CHECKPOINT_VERSION = 1
_STEP_DIR = re.compile(r"^step-(\d{8})$")

LossOutput = torch.Tensor | tuple[torch.Tensor, Mapping[str, Any]]
LossFn = Callable[[nn.Module, Any], LossOutput]
SampleFn = Callable[[nn.Module, int], Mapping[str, Any]]


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the message names the step and the last good checkpoint."""


class Tracker(Protocol):
    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None: ...
    def log_image(self, image: Any, name: str, step: int | None = None) -> None: ...
    def set_tags(self, tags: Mapping[str, Any]) -> None: ...


class _NoTracker:
    def log_metrics(self, metrics, step): ...
    def log_image(self, image, name, step=None): ...
    def set_tags(self, tags): ...


@dataclass(frozen=True)
class LoopSettings:
    """Everything the loop needs to know about optimisation and bookkeeping.

    Args:
        iterations: optimizer steps in total (a resumed run counts from its checkpoint).
        batch_size: micro-batch per process, or, with ``global_batch``, the effective batch
            (``batch_size = per-process micro-batch × num_processes × gradient_accumulation``).
        lr, betas, eps, weight_decay: Adam (paper §4.1: β = (0.9, 0.99)).
        lr_warmup_steps: linear warm-up from 0 to ``lr`` over this many steps, then constant.
        gradient_accumulation: micro-batches per optimizer step.
        mixed_precision: ``no`` | ``bf16`` | ``fp16`` (fp16 needs a GPU; it uses a grad scaler).
        gradient_checkpointing: call the model's own switch (diffusers
            ``enable_gradient_checkpointing``, transformers ``gradient_checkpointing_enable``,
            open_clip ``set_grad_checkpointing``) — the model, or each submodule that has one.
        max_grad_norm: clip the global gradient norm (None: no clipping).
        checkpoint_every: steps between checkpoints (0: only the final one).
        keep_checkpoints: how many of the newest checkpoints to keep (≥ 1).
        log_every: steps between tracker metric writes (the mean loss since the last write).
        sample_every: steps between ``sample_fn`` calls (0: never).
        num_workers: DataLoader worker processes.
        seed: seeds the data order and, on a fresh start, every RNG (``seed + rank``).
        device: ``auto`` (accelerate's choice: CUDA when present, else CPU) | ``cpu`` | ``cuda``.
    """

    iterations: int
    batch_size: int
    lr: float
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    lr_warmup_steps: int = 0
    gradient_accumulation: int = 1
    global_batch: bool = False
    mixed_precision: str = "no"
    gradient_checkpointing: bool = False
    max_grad_norm: float | None = None
    checkpoint_every: int = 0
    keep_checkpoints: int = 2
    log_every: int = 1
    sample_every: int = 0
    num_workers: int = 0
    seed: int = 0
    device: str = "auto"

    def __post_init__(self) -> None:
        if self.iterations < 0 or self.batch_size < 1 or self.gradient_accumulation < 1:
            raise ValueError(f"iterations ≥ 0, batch_size ≥ 1 and gradient_accumulation ≥ 1 needed: {self}")
        if self.keep_checkpoints < 1:
            raise ValueError(f"keep_checkpoints must be ≥ 1, got {self.keep_checkpoints}")
        if self.mixed_precision not in ("no", "bf16", "fp16"):
            raise ValueError(f"mixed_precision must be no, bf16 or fp16, got {self.mixed_precision!r}")

    # fields that do not change the trajectory, so a run may resume across a change of them
    _CADENCE = ("iterations", "checkpoint_every", "keep_checkpoints", "log_every", "sample_every",
                "num_workers", "device")

    @classmethod
    def from_params(cls, train: Any, *, global_batch: bool, seed: int, device: str) -> "LoopSettings":
        """From a stage's params section (``TrainClipParams``, ``TrainSdsrParams``): every field of
        the same name, plus what the section does not hold."""
        names = {f.name for f in dataclasses.fields(cls)} - {"global_batch", "seed", "device"}
        return cls(**{n: getattr(train, n) for n in names if hasattr(train, n)},
                   global_batch=global_batch, seed=seed, device=device)

    def trajectory(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in self._CADENCE}


@dataclass
class TrainResult:
    """What ``train`` hands back. ``model`` is unwrapped (no DDP), on the training device."""

    model: nn.Module
    step: int
    history: dict[str, list[float]]  # "step", "loss", "lr": one entry per step since step 1
    last_checkpoint: Path | None
    resumed_from: int | None  # the checkpoint step this invocation started from
    is_main_process: bool
    num_processes: int
    seconds: float  # wall time of this invocation's steps
    steps_run: int  # steps this invocation ran
    extra: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------
# data order
# --------------------------------------------------------------------------------------------
def epoch_permutation(n: int, seed: int, epoch: int) -> np.ndarray:
    """The seeded order of epoch ``epoch`` over ``n`` samples."""
    return np.random.default_rng([seed, epoch]).permutation(n)


class StreamBatchSampler(Sampler[list[int]]):
    """Endless per-rank micro-batches from the stream of per-epoch permutations.

    Starts at ``cursor`` (samples already drawn from the stream by all ranks together).
    """

    def __init__(self, n: int, *, seed: int, cursor: int, batch_size: int, rank: int, world: int) -> None:
        if n < 1:
            raise ValueError("the training dataset is empty")
        self.n, self.seed, self.cursor = n, seed, cursor
        self.batch_size, self.rank, self.world = batch_size, rank, world

    def __iter__(self) -> Iterator[list[int]]:
        cursor = self.cursor
        epoch, perm = -1, None
        while True:
            indices = []
            for pos in range(cursor + self.rank * self.batch_size, cursor + (self.rank + 1) * self.batch_size):
                if pos // self.n != epoch:
                    epoch = pos // self.n
                    perm = epoch_permutation(self.n, self.seed, epoch)
                indices.append(int(perm[pos % self.n]))
            cursor += self.batch_size * self.world
            yield indices

    def __len__(self) -> int:  # endless; DataLoader only needs it for len(loader)
        return 2**62


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
# checkpoints
# --------------------------------------------------------------------------------------------
def checkpoint_dirs(out_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints under ``out_dir/checkpoints``, oldest first."""
    root = Path(out_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _STEP_DIR.match(p.name) and (p / META_FILE).is_file()]
    return sorted(found, key=lambda p: int(_STEP_DIR.match(p.name).group(1)))


def latest_checkpoint(out_dir: str | os.PathLike) -> Path | None:
    dirs = checkpoint_dirs(out_dir)
    return dirs[-1] if dirs else None


def load_checkpoint_state(path: str | os.PathLike) -> dict[str, Any]:
    """``state.pt`` of a checkpoint folder, read with ``weights_only=True``."""
    return torch.load(Path(path) / STATE_FILE, map_location="cpu", weights_only=True)


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The parameters that require grad, detached, contiguous, on CPU."""
    return {name: p.detach().to("cpu").contiguous() for name, p in model.named_parameters() if p.requires_grad}


def code_fingerprint() -> str:
    """Hash of this package's source: a checkpoint written by other code is not resumed.

    DVC reruns a training stage when its code changes; as its output persists (for resuming),
    the code must be part of what a checkpoint has to match, or the rerun would pick up the old
    run's final checkpoint and train nothing.
    """
    root = Path(__file__).resolve().parents[1]
    h = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        if path.suffix in (".py", ".json") and "__pycache__" not in path.parts:
            h.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def _fingerprint(settings: LoopSettings, world: int, extra: Mapping[str, Any] | None) -> tuple[str, dict]:
    data = {"settings": settings.trajectory(), "num_processes": world, "code": code_fingerprint(),
            "extra": extra or {}}
    text = json.dumps(data, sort_keys=True, default=_jsonable)
    return hashlib.sha256(text.encode()).hexdigest()[:16], json.loads(text)


def _jsonable(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    if isinstance(value, (Path, torch.dtype, torch.device)):
        return str(value)
    raise TypeError(f"fingerprint: {type(value).__name__} is not JSON-serialisable")


def _write_checkpoint(ckpt_root: Path, step: int, weights: dict[str, torch.Tensor], state: dict[str, Any],
                      meta: dict[str, Any], keep: int) -> Path:
    """Write ``step-XXXXXXXX`` atomically (hidden folder, then rename); prune to the newest ``keep``."""
    final = ckpt_root / f"step-{step:08d}"
    tmp = ckpt_root / f".step-{step:08d}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        save_file(weights, str(tmp / WEIGHTS_FILE), metadata={"step": str(step)})
        torch.save(state, tmp / STATE_FILE)
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")  # last: marks complete
        for f in tmp.iterdir():
            _fsync(f)
        if final.exists():  # a re-run of the same step (e.g. the final one) replaces it
            shutil.rmtree(final)
        os.rename(tmp, final)
        _fsync(ckpt_root)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    for old in checkpoint_dirs(ckpt_root.parent)[:-keep]:
        shutil.rmtree(old)
    return final


def _fsync(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _clear_stale(ckpt_root: Path, fingerprint: str, fingerprint_data: dict) -> None:
    """Remove unfinished temp folders; move checkpoints written with other settings or code aside.

    They go to ``checkpoints/stale/<their fingerprint>/`` (never resumed, never deleted here: a
    long run is not lost to an edited log line; delete them once you are sure).
    """
    if not ckpt_root.is_dir():
        return
    for p in ckpt_root.iterdir():
        if p.is_dir() and p.name.startswith(".step-"):
            shutil.rmtree(p)
    for ckpt in checkpoint_dirs(ckpt_root.parent):
        meta = json.loads((ckpt / META_FILE).read_text())
        if meta.get("fingerprint") != fingerprint:
            changed = _diff(meta.get("fingerprint_data", {}), fingerprint_data)
            target = ckpt_root / STALE / str(meta.get("fingerprint", "unknown")) / ckpt.name
            target.parent.mkdir(parents=True, exist_ok=True)
            if target.exists():
                shutil.rmtree(target)
            ckpt.rename(target)
            log.warning("not resuming checkpoint %s: written with other settings (%s); moved to %s, "
                        "starting afresh", ckpt.name, ", ".join(changed) or "unknown difference", target)


def _diff(old: Any, new: Any, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for k in sorted(set(old) | set(new)):
            out += _diff(old.get(k), new.get(k), f"{prefix}{k}.")
        return out
    return [] if old == new else [f"{prefix.rstrip('.')}: {old!r} → {new!r}"]


# --------------------------------------------------------------------------------------------
# model helpers
# --------------------------------------------------------------------------------------------
_GC_SWITCHES = (("enable_gradient_checkpointing", ()), ("gradient_checkpointing_enable", ()),
                ("set_grad_checkpointing", (True,)))


def enable_gradient_checkpointing(model: nn.Module) -> list[str]:
    """Switch on gradient checkpointing on the model, else on each top-level submodule that can."""
    def switch(m: nn.Module) -> bool:
        for name, args in _GC_SWITCHES:
            if callable(getattr(m, name, None)):
                getattr(m, name)(*args)
                return True
        return False

    if switch(model):
        return [type(model).__name__]
    done = [name for name, child in model.named_children()
            if any(p.requires_grad for p in child.parameters()) and switch(child)]
    if not done:
        raise ValueError(f"gradient_checkpointing: {type(model).__name__} and its trainable submodules have "
                         f"no gradient-checkpointing switch ({', '.join(n for n, _ in _GC_SWITCHES)})")
    return done


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside DDP / DataParallel / torch.compile wrappers (only those: a model's own
    submodule that happens to be called ``module`` is left alone)."""
    from torch.nn.parallel import DataParallel, DistributedDataParallel

    while True:
        if isinstance(model, (DistributedDataParallel, DataParallel)):
            model = model.module
        elif isinstance(model, getattr(torch._dynamo, "OptimizedModule", ())):
            model = model._orig_mod
        else:
            return model


def _new_accelerator(settings: LoopSettings):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    # accelerate keeps mixed precision in a process-wide singleton; clear it (not the
    # distributed state) so that successive train() calls in one process may differ.
    AcceleratorState._reset_state(reset_partial_state=False)
    cpu = settings.device == "cpu" or (settings.device == "auto" and not torch.cuda.is_available())
    if settings.mixed_precision == "fp16" and cpu:
        raise ValueError("mixed_precision fp16 needs a GPU; use bf16 or no on CPU")
    if settings.device.startswith("cuda:"):
        if "LOCAL_RANK" in os.environ:  # a launcher assigns one GPU per process
            raise ValueError(f"base.device {settings.device!r} names one GPU; under accelerate launch / "
                             "torchrun use 'auto' or 'cuda' (CUDA_VISIBLE_DEVICES picks the GPUs)")
        torch.cuda.set_device(torch.device(settings.device))  # accelerate then uses that GPU
    # cpu=True also makes a torchrun/accelerate launch on a CPU machine a gloo DDP run
    return Accelerator(cpu=cpu, mixed_precision=settings.mixed_precision, gradient_accumulation_steps=1)


# --------------------------------------------------------------------------------------------
# the loop
# --------------------------------------------------------------------------------------------
def train(
    *,
    model: nn.Module,
    loss_fn: LossFn,
    dataset: Dataset,
    settings: LoopSettings,
    out_dir: str | os.PathLike,
    tracker: Tracker | None = None,
    collate_fn: Callable | None = None,
    sample_fn: SampleFn | None = None,
    fingerprint: Mapping[str, Any] | None = None,
) -> TrainResult:
    """Train ``model``'s trainable parameters on ``dataset`` with ``loss_fn``; see the module doc.

    ``out_dir`` receives ``checkpoints/``; the caller saves the final model from the returned
    ``TrainResult.model`` (on the main process). ``fingerprint`` is the caller's part of what a
    checkpoint must match to be resumed (model config, data identity, ...).
    """
    tracker = tracker or _NoTracker()
    out_dir = Path(out_dir)
    ckpt_root = out_dir / CHECKPOINTS

    # 1. processes, devices, precision
    accelerator = _new_accelerator(settings)
    world, rank, main = accelerator.num_processes, accelerator.process_index, accelerator.is_main_process
    micro = settings.batch_size
    if settings.global_batch:
        per = world * settings.gradient_accumulation
        if settings.batch_size % per:
            raise ValueError(f"batch_size {settings.batch_size} (global) is not divisible by "
                             f"{world} processes × {settings.gradient_accumulation} accumulation steps")
        micro = settings.batch_size // per
    fp, fp_data = _fingerprint(settings, world, fingerprint)

    # 2. optimiser (Adam, paper §4.1) and a linear warm-up, then constant, LR
    if settings.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError(f"{type(model).__name__} has no parameter with requires_grad=True")
    optimizer = torch.optim.Adam(params, lr=settings.lr, betas=tuple(settings.betas), eps=settings.eps,
                                 weight_decay=settings.weight_decay)
    warmup = settings.lr_warmup_steps
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) if warmup > 0 else 1.0)
    model.train()
    model, optimizer = accelerator.prepare(model, optimizer)  # the scheduler is stepped by hand, once per step
    inner = unwrap(model)

    # 3. resume from the latest checkpoint with this fingerprint, or start fresh
    if main:
        _clear_stale(ckpt_root, fp, fp_data)
    accelerator.wait_for_everyone()
    latest = latest_checkpoint(out_dir)
    history: dict[str, list[float]] = {"step": [], "loss": [], "lr": []}
    step, cursor, resumed_from = 0, 0, None
    if latest is not None:
        state = load_checkpoint_state(latest)
        weights = load_file(latest / WEIGHTS_FILE, device="cpu")
        missing = sorted(set(names) - set(weights))
        unexpected = sorted(set(weights) - set(names))
        if missing or unexpected:
            raise RuntimeError(f"{latest}: trainable weights do not match the model "
                               f"(missing {missing[:5]}, unexpected {unexpected[:5]})")
        with torch.no_grad():
            for name, p in inner.named_parameters():
                if name in weights:
                    p.copy_(weights[name].to(p.dtype))
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if accelerator.scaler is not None and state.get("scaler") is not None:
            accelerator.scaler.load_state_dict(state["scaler"])
        step, cursor = int(state["step"]), int(state["cursor"])
        history = {k: v.tolist() for k, v in state["history"].items()}
        set_rng_state(state["rng"][rank])
        resumed_from = step
        if main:
            log.info("resuming from %s (step %d, epoch %d, index %d)", latest, step, state["epoch"], state["index"])
            tracker.set_tags({"resumed_from_step": step, "resumed_from": str(latest)})
    else:
        seed_everything(settings.seed + rank)
    last_checkpoint = latest

    # 4. data: this rank's slice of the seeded stream, from the saved position
    global_micro = micro * world
    sampler = StreamBatchSampler(len(dataset), seed=settings.seed, cursor=cursor, batch_size=micro,
                                 rank=rank, world=world)
    loader = DataLoader(dataset, batch_sampler=sampler, num_workers=settings.num_workers, collate_fn=collate_fn,
                        pin_memory=accelerator.device.type == "cuda",
                        generator=torch.Generator().manual_seed(settings.seed))  # keeps the global RNG untouched
    batches = iter(loader)

    def save(at_step: int) -> Path:
        rngs = _gather_objects(accelerator, rng_state())
        path = ckpt_root / f"step-{at_step:08d}"
        if main:
            state = {
                "version": CHECKPOINT_VERSION, "step": at_step, "cursor": cursor,
                "epoch": cursor // len(dataset), "index": cursor % len(dataset),
                "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "scaler": accelerator.scaler.state_dict() if accelerator.scaler is not None else None,
                "rng": rngs, "fingerprint": fp,
                "history": {"step": torch.tensor(history["step"], dtype=torch.int64),
                            "loss": torch.tensor(history["loss"], dtype=torch.float64),
                            "lr": torch.tensor(history["lr"], dtype=torch.float64)},
            }
            meta = {"version": CHECKPOINT_VERSION, "step": at_step, "epoch": state["epoch"], "index": state["index"],
                    "cursor": cursor, "num_processes": world, "fingerprint": fp, "fingerprint_data": fp_data,
                    "loss": history["loss"][-1] if history["loss"] else None, "time": time.time()}
            path = _write_checkpoint(ckpt_root, at_step, trainable_state(inner), state, meta, settings.keep_checkpoints)
        accelerator.wait_for_everyone()
        return path

    # 5. steps
    bar = tqdm(total=settings.iterations, initial=min(step, settings.iterations), desc="train", unit="it",
               disable=not main, dynamic_ncols=True)
    window: list[float] = []
    extras_window: dict[str, list[float]] = {}
    t0, start_step = time.perf_counter(), step
    try:
        while step < settings.iterations:
            step += 1
            micro_losses = []
            for i in range(settings.gradient_accumulation):
                batch = _to_device(next(batches), accelerator.device)
                sync = i == settings.gradient_accumulation - 1
                with (nullcontext() if sync else accelerator.no_sync(model)):
                    with accelerator.autocast():
                        out = loss_fn(model, batch)
                    loss, extras = (out if isinstance(out, tuple) else (out, {}))
                    losses = accelerator.gather(loss.detach().float().reshape(1))
                    if not bool(torch.isfinite(losses).all()):
                        bad = [f"{v:g}" for v in losses.tolist()]
                        raise TrainingDiverged(
                            f"loss is not finite at step {step} (micro-batch {i + 1}/{settings.gradient_accumulation}, "
                            f"per-process losses {bad}); last good checkpoint: "
                            f"{last_checkpoint if last_checkpoint is not None else 'none (no checkpoint written yet)'}")
                    accelerator.backward(loss / settings.gradient_accumulation)
                micro_losses.append(losses.mean().item())
                for k, v in extras.items():
                    extras_window.setdefault(k, []).append(float(v))
                cursor += global_micro
            if settings.max_grad_norm is not None:
                accelerator.clip_grad_norm_(params, settings.max_grad_norm)
            lr = scheduler.get_last_lr()[0]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)

            step_loss = sum(micro_losses) / len(micro_losses)
            history["step"].append(step)
            history["loss"].append(step_loss)
            history["lr"].append(lr)
            window.append(step_loss)
            if main:
                bar.update(1)
                bar.set_postfix(loss=f"{step_loss:.4g}", lr=f"{lr:.2e}")
                if step % settings.log_every == 0 or step == settings.iterations:
                    metrics = {"loss": sum(window) / len(window), "lr": lr}
                    metrics.update({k: sum(v) / len(v) for k, v in extras_window.items()})
                    tracker.log_metrics(metrics, step)
                    window, extras_window = [], {}
                if sample_fn is not None and settings.sample_every and step % settings.sample_every == 0:
                    _sample(sample_fn, inner, step, tracker, accelerator.device)
            if (settings.checkpoint_every and step % settings.checkpoint_every == 0) or step == settings.iterations:
                last_checkpoint = save(step)
    finally:
        bar.close()
    seconds = time.perf_counter() - t0
    accelerator.wait_for_everyone()
    if main and step > start_step:
        log.info("trained steps %d–%d in %.1f s (%.2f it/s)", start_step + 1, step, seconds,
                 (step - start_step) / max(seconds, 1e-9))
    return TrainResult(model=inner, step=step, history=history, last_checkpoint=last_checkpoint,
                       resumed_from=resumed_from, is_main_process=main, num_processes=world,
                       seconds=seconds, steps_run=step - start_step)


TRAIN_LOG = "train_log.json"


def report(result: TrainResult, out_dir: Path, run, *, artifacts: list[tuple[Path, str | None]],
           loss_label: str) -> None:
    """End of a training stage (main process): ``train_log.json``, the weights and a loss curve to MLflow.

    ``train_log.json`` records this invocation (resumed from, steps run, seconds), so it is
    kept out of the stage's DVC hash by ``.dvcignore``: the same training gives the same hash.
    """
    from consissr.io import write_json

    history = result.history
    write_json(out_dir / TRAIN_LOG, {
        "steps": result.step, "resumed_from": result.resumed_from, "steps_run": result.steps_run,
        "seconds": round(result.seconds, 3), "num_processes": result.num_processes,
        "final_loss": history["loss"][-1] if history["loss"] else None,
        "history": [{"step": s, "loss": l, "lr": r}
                    for s, l, r in zip(history["step"], history["loss"], history["lr"])]})
    run.log_metrics({"steps_per_second": result.steps_run / max(result.seconds, 1e-9)}, result.step)
    for path, artifact_path in artifacts:
        run.log_artifact(path, artifact_path)
    run.log_artifact(out_dir / TRAIN_LOG)
    if history["step"]:
        run.log_plot("plots/loss_curve.png", history["step"], {loss_label: history["loss"]})
    log.info("%s: %d steps, final loss %s → %s", loss_label, result.step,
             history["loss"][-1] if history["loss"] else None, out_dir)


def _sample(sample_fn: SampleFn, model: nn.Module, step: int, tracker: Tracker, device: torch.device) -> None:
    """Run ``sample_fn`` in eval mode, without grad, in a forked RNG; log its images."""
    py, npst = random.getstate(), np.random.get_state()
    devices = [device.index or 0] if device.type == "cuda" else []
    was_training = model.training
    try:
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            model.eval()
            images = sample_fn(model, step) or {}
    finally:
        model.train(was_training)
        random.setstate(py)
        np.random.set_state(npst)
    for name, image in images.items():
        tracker.log_image(image, f"samples/step-{step:08d}/{name}.png", step=step)


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        return {k: _to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(v, device) for v in batch)
    return batch


def _gather_objects(accelerator, obj: Any) -> list[Any]:
    """``obj`` from every rank, in rank order (on every rank)."""
    if accelerator.num_processes == 1:
        return [obj]
    gathered: list[Any] = [None] * accelerator.num_processes
    torch.distributed.all_gather_object(gathered, obj)
    return gathered


__all__ = ["LoopSettings", "StreamBatchSampler", "TrainResult", "TrainingDiverged", "checkpoint_dirs",
           "enable_gradient_checkpointing", "epoch_permutation", "latest_checkpoint", "load_checkpoint_state",
           "train", "trainable_state", "unwrap"]
