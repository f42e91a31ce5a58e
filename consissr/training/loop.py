"""The shared training loop: accelerate, exact resume, divergence stop.

One code path for CPU, one GPU and several GPUs (DDP under ``accelerate launch`` / ``torchrun``),
bf16/fp16, gradient accumulation and checkpointing. A stage brings ``model`` (its
``requires_grad`` parameters are what Adam trains and a checkpoint stores), ``loss_fn(model,
batch)`` (through ``model(...)`` so DDP all-reduces; randomness from the global torch RNG, which
checkpoints restore per rank), a map-style ``dataset`` whose item ``i`` depends only on ``i``, and
optionally ``sample_fn`` and a ``tracking.Tracker``. Data order: an endless stream of seeded
per-epoch permutations, rank ``r`` taking the ``r``-th slice of each global micro-batch.
Checkpoints and the resume rules: ``checkpoint.py``.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import random
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm.auto import tqdm

from consissr.errors import ParamsError
from consissr.tracking import NullRun, Tracker
from consissr.training import checkpoint as ckpt

log = logging.getLogger(__name__)

LossOutput = torch.Tensor | tuple[torch.Tensor, Mapping[str, Any]]
LossFn = Callable[[nn.Module, Any], LossOutput]
SampleFn = Callable[[nn.Module, int], Mapping[str, Any]]


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the message names the step and the last good checkpoint."""


@dataclass(frozen=True)
class LoopSettings:
    """Everything the loop needs to know about optimisation and bookkeeping (ranges: ``config.py``).

    Args:
        iterations: optimizer steps in total (a resumed run counts from its checkpoint).
        batch_size_per_device / global_batch_size: exactly one; the global batch is the
            per-process micro-batch × processes × ``gradient_accumulation``.
        lr, betas, eps, weight_decay: Adam (paper §4.1: β = (0.9, 0.99)).
        lr_warmup_steps: linear warm-up from 0 to ``lr`` over this many steps, then constant.
        mixed_precision: ``no`` | ``bf16`` | ``fp16`` (fp16 needs a GPU; it uses a grad scaler).
        gradient_checkpointing: call the model's own switch (or each trainable submodule's).
        max_grad_norm: clip the global gradient norm (None: no clipping).
        checkpoint_every / keep_checkpoints: steps between checkpoints (0: only the final one) / how many kept.
        log_every / sample_every: steps between tracker metric writes / ``sample_fn`` calls (0: never).
        seed: seeds the data order and, on a fresh start, every RNG (``seed + rank``).
        device: ``auto`` | ``cpu`` | ``cuda`` | ``cuda:N``.
        resume: ``auto`` | ``strict`` (see ``checkpoint.prepare_resume``).
    """

    iterations: int
    lr: float
    batch_size_per_device: int | None = None
    global_batch_size: int | None = None
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    lr_warmup_steps: int = 0
    gradient_accumulation: int = 1
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
    resume: str = "auto"

    # fields that do not change the trajectory, so a run may resume across a change of them
    _CADENCE = ("iterations", "checkpoint_every", "keep_checkpoints", "log_every", "sample_every",
                "num_workers", "device", "resume")

    @classmethod
    def from_params(cls, train: Any, *, seed: int, device: str, **batch_and_sampling: Any) -> LoopSettings:
        """From a training section (``TrainClipParams``, ``TrainSdsrParams``), field by field: a renamed
        field fails here instead of silently taking a default. ``batch_and_sampling``: the section's
        batch (``batch_size_per_device=`` or ``global_batch_size=``) and ``sample_every=``."""
        return cls(iterations=train.iterations, lr=train.lr, betas=tuple(train.betas),
                   lr_warmup_steps=train.lr_warmup_steps, gradient_accumulation=train.gradient_accumulation,
                   mixed_precision=train.mixed_precision, gradient_checkpointing=train.gradient_checkpointing,
                   max_grad_norm=train.max_grad_norm, checkpoint_every=train.checkpoint_every,
                   keep_checkpoints=train.keep_checkpoints, log_every=train.log_every, num_workers=train.num_workers,
                   resume=train.resume, seed=seed, device=device, **batch_and_sampling)

    def micro_batch(self, world: int) -> int:
        """The per-process micro-batch for ``world`` processes."""
        if (self.batch_size_per_device is None) == (self.global_batch_size is None):
            raise ValueError(f"LoopSettings needs exactly one of batch_size_per_device and global_batch_size: {self}")
        if self.batch_size_per_device is not None:
            return self.batch_size_per_device
        per = world * self.gradient_accumulation
        if self.global_batch_size % per:
            raise ParamsError(f"global_batch_size {self.global_batch_size} is not divisible by {world} processes × "
                              f"{self.gradient_accumulation} accumulation steps")
        return self.global_batch_size // per

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

    Starts at ``cursor`` (samples already drawn from the stream by all ranks together). With
    ``epoch_indexed`` the index of item ``i`` in epoch ``e`` is ``e·n + i`` (a dataset that draws
    per epoch, e.g. a degradation variant, reads both from it).
    """

    def __init__(self, n: int, *, seed: int, cursor: int, batch_size: int, rank: int, world: int,
                 epoch_indexed: bool = False) -> None:
        if n < 1:
            raise ValueError("the training dataset is empty")
        self.n, self.seed, self.cursor = n, seed, cursor
        self.batch_size, self.rank, self.world = batch_size, rank, world
        self.epoch_indexed = epoch_indexed

    def __iter__(self) -> Iterator[list[int]]:
        cursor = self.cursor
        epoch, perm = -1, None
        while True:
            indices = []
            for pos in range(cursor + self.rank * self.batch_size, cursor + (self.rank + 1) * self.batch_size):
                if pos // self.n != epoch:
                    epoch = pos // self.n
                    perm = epoch_permutation(self.n, self.seed, epoch)
                indices.append(int(perm[pos % self.n]) + (epoch * self.n if self.epoch_indexed else 0))
            cursor += self.batch_size * self.world
            yield indices

    def __len__(self) -> int:  # endless; DataLoader only needs it for len(loader)
        return 2**62


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
        raise ParamsError("mixed_precision fp16 needs a GPU; use bf16 or no on CPU")
    if settings.device.startswith("cuda:"):
        if "LOCAL_RANK" in os.environ:  # a launcher assigns one GPU per process
            raise ParamsError(f"base.device {settings.device!r} names one GPU; under accelerate launch / "
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
    checkpoint must match to be resumed (params sections, input data hashes).
    """
    tracker = tracker or NullRun()
    out_dir = Path(out_dir)

    # 1. processes, devices, precision
    accelerator = _new_accelerator(settings)
    world, rank, main = accelerator.num_processes, accelerator.process_index, accelerator.is_main_process
    micro = settings.micro_batch(world)
    fp = ckpt.Fingerprint.of(trajectory=settings.trajectory(), num_processes=world, model=model, extra=fingerprint)

    # 2. optimiser (Adam, paper §4.1) and a linear warm-up, then constant, LR
    if settings.gradient_checkpointing:
        enable_gradient_checkpointing(model)
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

    # 3. resume from the latest checkpoint this run may resume (checkpoint.prepare_resume), or start fresh
    if main:
        ckpt.prepare_resume(out_dir, fp, strict=settings.resume == "strict")
    accelerator.wait_for_everyone()
    latest = ckpt.latest_checkpoint(out_dir)
    history: dict[str, list[float]] = {"step": [], "loss": [], "lr": []}
    step, cursor, resumed_from = 0, 0, None
    if latest is not None:
        state = ckpt.load_checkpoint_state(latest)
        ckpt.load_trainable(latest, inner)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if accelerator.scaler is not None and state.get("scaler") is not None:
            accelerator.scaler.load_state_dict(state["scaler"])
        step, cursor = int(state["step"]), int(state["cursor"])
        history = {k: v.tolist() for k, v in state["history"].items()}
        ckpt.set_rng_state(state["rng"][rank])
        resumed_from = step
        if main:
            log.info("resuming from %s (step %d, epoch %d, index %d)", latest, step, state["epoch"], state["index"])
            tracker.set_tags({"resumed_from_step": step, "resumed_from": str(latest)})
    else:
        ckpt.seed_everything(settings.seed + rank)
    last_checkpoint = latest

    # 4. data: this rank's slice of the seeded stream, from the saved position
    global_micro = micro * world
    sampler = StreamBatchSampler(len(dataset), seed=settings.seed, cursor=cursor, batch_size=micro,
                                 rank=rank, world=world, epoch_indexed=getattr(dataset, "epoch_indexed", False))
    loader = DataLoader(dataset, batch_sampler=sampler, num_workers=settings.num_workers, collate_fn=collate_fn,
                        pin_memory=accelerator.device.type == "cuda",
                        generator=torch.Generator().manual_seed(settings.seed))  # keeps the global RNG untouched
    batches = iter(loader)

    def save(at_step: int) -> Path:
        rngs = _gather_objects(accelerator, ckpt.rng_state())
        path = out_dir / ckpt.CHECKPOINTS / f"step-{at_step:08d}"
        if main:
            state = {
                "step": at_step, "cursor": cursor, "epoch": cursor // len(dataset), "index": cursor % len(dataset),
                "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "scaler": accelerator.scaler.state_dict() if accelerator.scaler is not None else None,
                "rng": rngs, "fingerprint": fp.digest,
                "history": {"step": torch.tensor(history["step"], dtype=torch.int64),
                            "loss": torch.tensor(history["loss"], dtype=torch.float64),
                            "lr": torch.tensor(history["lr"], dtype=torch.float64)},
            }
            meta = {"epoch": state["epoch"], "index": state["index"], "cursor": cursor, "num_processes": world,
                    "fingerprint": fp.digest, "fingerprint_data": fp.data, "code": fp.code,
                    "complete": at_step >= settings.iterations,  # the completion marker: never resumed
                    "loss": history["loss"][-1] if history["loss"] else None}
            path = ckpt.write_checkpoint(out_dir, at_step, ckpt.trainable_state(inner), state, meta,
                                         settings.keep_checkpoints)
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


__all__ = ["LoopSettings", "StreamBatchSampler", "TrainResult", "TrainingDiverged", "enable_gradient_checkpointing",
           "epoch_permutation", "train", "unwrap"]
