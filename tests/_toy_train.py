"""A toy run of consissr.training.loop for the infrastructure tests (run as a script / under torchrun).

The loss draws on every RNG the checkpoint must restore (dropout and noise from torch, numpy,
python ``random``), so a resume that misses one of them changes the losses.
Every step's loss goes to ``--losses`` (JSON lines, ``repr`` floats); ``--kill-at-step N``
SIGKILLs the process after step N's update, before its checkpoint; ``--kill-in-checkpoint N``
SIGKILLs it half-way through writing checkpoint N; each rank writes its final trainable weights
to ``<out>/weights-rank<r>.safetensors`` and the indices it trained on to ``<out>/indices-rank<r>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from torch import nn

from consissr.training import checkpoint, loop


class Toy(nn.Module):
    def __init__(self, dropout: float) -> None:
        super().__init__()
        self.frozen = nn.Linear(8, 8)
        self.frozen.requires_grad_(False)
        self.body = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Dropout(dropout), nn.Linear(16, 1))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.mean((self.body(self.frozen(x)).squeeze(-1) - y) ** 2)


class ToyData(torch.utils.data.Dataset):
    def __init__(self, n: int) -> None:
        g = torch.Generator().manual_seed(123)
        self.x = torch.randn(n, 8, generator=g)
        self.y = self.x.sum(-1).sin()

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict:
        return {"i": i, "x": self.x[i], "y": self.y[i]}


class LossFile:
    def __init__(self, path: Path | None, kill_at: int | None) -> None:
        self.path, self.kill_at = path, kill_at

    def log_metrics(self, metrics, step):
        if self.path is not None:
            with open(self.path, "a") as f:
                f.write(json.dumps({"step": step, "loss": repr(metrics["loss"])}) + "\n")
                f.flush()
                os.fsync(f.fileno())
        if step == self.kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    def log_image(self, image, name, step=None): ...
    def set_tags(self, tags): ...


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--iterations", type=int, default=12)
    p.add_argument("--batch", type=int, default=3)
    p.add_argument("--accum", type=int, default=2)
    p.add_argument("--n", type=int, default=10)
    p.add_argument("--checkpoint-every", type=int, default=3)
    p.add_argument("--keep", type=int, default=2)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--deterministic", action="store_true", help="no dropout, no noise")
    p.add_argument("--losses", type=Path)
    p.add_argument("--kill-at-step", type=int)
    p.add_argument("--kill-in-checkpoint", type=int)
    args = p.parse_args()
    rank = int(os.environ.get("RANK", "0"))

    if args.kill_in_checkpoint is not None:
        real_save = checkpoint.save_file

        def save_then_die(tensors, filename, metadata=None):
            real_save(tensors, filename, metadata=metadata)
            if metadata and metadata.get("step") == str(args.kill_in_checkpoint):
                os.kill(os.getpid(), signal.SIGKILL)  # the weights are written, state.pt is not

        checkpoint.save_file = save_then_die

    seen: list[int] = []

    def loss_fn(model, batch):
        seen.extend(int(i) for i in batch["i"])
        if args.deterministic:
            return model(batch["x"], batch["y"])
        x = batch["x"] + 0.05 * torch.randn_like(batch["x"]) + float(np.random.normal(0, 0.01))
        return model(x, batch["y"]) + 1e-3 * random.random()

    torch.manual_seed(0)
    model = Toy(0.0 if args.deterministic else 0.3)
    settings = loop.LoopSettings(iterations=args.iterations, batch_size_per_device=args.batch, lr=args.lr, betas=(0.9, 0.99),
                                 gradient_accumulation=args.accum, checkpoint_every=args.checkpoint_every,
                                 keep_checkpoints=args.keep, seed=7, device="cpu")
    result = loop.train(model=model, loss_fn=loss_fn, dataset=ToyData(args.n), settings=settings, out_dir=args.out,
                        tracker=LossFile(args.losses if rank == 0 else None, args.kill_at_step))
    save_file(checkpoint.trainable_state(result.model), str(args.out / f"weights-rank{rank}.safetensors"))
    (args.out / f"indices-rank{rank}.json").write_text(json.dumps(seen))


if __name__ == "__main__":
    main()
