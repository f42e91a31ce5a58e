"""The text half of the hybrid prompt for training: captions, the prompt table, text encoding.

``train_sdsr.prompt`` is ``empty``, ``fixed`` (``prompt_text``) or ``captions`` (``caption_file``:
JSON ``{id: caption}`` or TSV ``id<TAB>caption``; a missing id gets ""). Each unique prompt is
embedded once by the frozen text encoder, as diffusers' SD pipelines embed a prompt; row
``EMPTY_PROMPT`` of the table is "" (the classifier-free-guidance drop target).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from consissr.config import TrainSdsrParams
from consissr.errors import InputError, MissingInputError

log = logging.getLogger(__name__)

EMPTY_PROMPT = 0  # row of the prompt table holding the empty prompt ""


def read_captions(path: str | os.PathLike) -> dict[str, str]:
    """``id → caption`` from a JSON object or a TSV file (``id<TAB>caption`` a line; ``#`` comments)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise MissingInputError(f"{path}: caption file not found (train_sdsr.caption_file)") from None
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise InputError(f"{path}: not valid JSON: {exc}") from None
        if not isinstance(data, dict) or not all(isinstance(v, str) for v in data.values()):
            raise InputError(f"{path}: expected a JSON object {{id: caption}}")
        return {str(k): v for k, v in data.items()}
    captions = {}
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        key, sep, caption = line.partition("\t")
        if not sep:
            raise InputError(f"{path}:{n}: expected 'id<TAB>caption', got {line[:80]!r}")
        captions[key.strip()] = caption.strip()
    return captions


def prompt_table(train: TrainSdsrParams, ids: Sequence[str]) -> tuple[list[str], torch.Tensor, list[str]]:
    """(unique prompts with "" first, each id's row, ids without a caption) for ``train.prompt``."""
    if train.prompt == "empty":
        per_id = [""] * len(ids)
        missing: list[str] = []
    elif train.prompt == "fixed":
        per_id, missing = [train.prompt_text] * len(ids), []
    else:
        captions = read_captions(train.caption_file)
        missing = [i for i in ids if i not in captions]
        if missing:
            log.warning("train_sdsr: %d of %d images have no caption in %s (e.g. %s); they get the empty prompt",
                        len(missing), len(ids), train.caption_file, ", ".join(missing[:5]))
        per_id = [captions.get(i, "") for i in ids]
    texts = [""] + sorted(set(per_id) - {""})
    row = {text: n for n, text in enumerate(texts)}
    return texts, torch.tensor([row[p] for p in per_id], dtype=torch.long), missing


@torch.no_grad()
def encode_prompts(tokenizer: Any, text_encoder: nn.Module, texts: Sequence[str], *, device: torch.device,
                   batch_size: int = 64) -> torch.Tensor:
    """The frozen text encoder's last hidden state for each prompt, (P, L, C) float32 on CPU
    (as diffusers' Stable Diffusion pipelines embed a prompt)."""
    text_encoder.to(device).eval()
    out = []
    for start in range(0, len(texts), batch_size):
        tokens = tokenizer(list(texts[start:start + batch_size]), padding="max_length",
                           max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt")
        out.append(text_encoder(tokens.input_ids.to(device))[0].float().cpu())
    return torch.cat(out)


__all__ = ["EMPTY_PROMPT", "encode_prompts", "prompt_table", "read_captions"]
