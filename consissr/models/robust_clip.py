"""Robust CLIP (paper §3.3, Eq. 3): a CLIP image encoder fine-tuned to see through degradations.

    L_robust = || E_student(I_LQ) - E_teacher(I_HQ) ||²            (Eq. 3)

Both visual towers come from open_clip's ``create_model_and_transforms`` (the one place this
project imports open_clip): ``ViT-H-14`` / ``laion2b_s32b_b79k``, the tiny ``consissr-tiny-vit``
from ``clip_configs/``, a checkpoint file or ``local-dir:<folder>``. The trained student is saved
as ``robust_clip.safetensors`` + ``config.json``; inference (``with_teacher=False``) needs no
pretrained CLIP weights.

A weights file as ``pretrained`` (the authors' ``open_clip_pytorch_model.bin``, ViT-H-14
laion2b_s32b_b79k; ``config.is_clip_weights_file`` tells a path from a tag) is read here, not by
open_clip — ``read_clip_weights``, the one place: safetensors or ``torch.load(weights_only=True)``
— then matched key for key and shape for shape against the model open_clip built, and recorded
with its sha256 (``pretrained_sha256`` in the saved config). No network is involved.
"""

from __future__ import annotations

import copy
import json
import os
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import open_clip
import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from safetensors.torch import load_file, save_file
from torch import nn

from consissr.config import is_clip_weights_file
from consissr.errors import InputError
from consissr.io import atomic_path, file_sha256, key_mismatch, load_weights_file, write_json

if TYPE_CHECKING:
    from consissr.config import ClipParams

CLIP_CONFIG_DIR = Path(__file__).parent / "clip_configs"
WEIGHTS_NAME = "robust_clip.safetensors"
CONFIG_NAME = "config.json"
PAPER_CLIP = ("ViT-H-14", "laion2b_s32b_b79k")  # paper §4.1

_LOCAL_DIR = "local-dir:"
_HF_HUB = "hf-hub:"
_PRECISION = {torch.float32: "fp32", torch.bfloat16: "pure_bf16", torch.float16: "pure_fp16"}
_INTERPOLATION = {
    "bicubic": TF.InterpolationMode.BICUBIC,
    "bilinear": TF.InterpolationMode.BILINEAR,
    "nearest": TF.InterpolationMode.NEAREST,
}


class ClipWeightsError(InputError):
    """A CLIP weights file (``clip.pretrained``) that cannot be used; the message names the file."""


def _register_configs() -> None:
    """Make ``consissr-tiny-vit`` (and any other json in clip_configs/) an open_clip model name."""
    if "consissr-tiny-vit" not in open_clip.list_models():
        open_clip.add_model_config(CLIP_CONFIG_DIR)


_register_configs()


def _has_schema(model_name: str) -> bool:
    return model_name.startswith((_LOCAL_DIR, _HF_HUB))


def _load_visual(
    model_name: str,
    pretrained: str | None,
    *,
    image_size: int,
    device: torch.device,
    dtype: torch.dtype,
    load_weights: bool,
    preprocess_cfg: dict[str, Any] | None,
) -> tuple[nn.Module, dict[str, Any]]:
    """Build an open_clip model; return its visual tower (text tower dropped) + preprocess cfg.

    A weights file is loaded by ``load_clip_weights`` into the model open_clip built without
    weights; a tag goes to open_clip (which downloads it).
    """
    force = preprocess_cfg or {}
    weights_file = load_weights and is_clip_weights_file(pretrained)
    if load_weights and pretrained is not None and not weights_file:
        _check_tag(model_name, pretrained)
    model, _, _ = open_clip.create_model_and_transforms(
        model_name,
        # a tag would be downloaded even unused; a file open_clip would read itself (see read_clip_weights)
        pretrained=pretrained if load_weights and not weights_file else None,
        load_weights=load_weights,  # for "local-dir:" the folder's weights are skipped
        precision=_PRECISION[dtype],
        device=device,
        force_image_size=image_size,
        image_mean=force.get("mean"),
        image_std=force.get("std"),
        image_interpolation=force.get("interpolation"),
        image_resize_mode=force.get("resize_mode"),
    )
    if weights_file:
        load_clip_weights(model, pretrained, model_name=model_name)
    visual = model.visual
    cfg = dict(open_clip.get_model_preprocess_cfg(model))
    del model  # the text tower (ViT-H-14: 354M parameters) goes with it
    return visual, cfg


def _check_tag(model_name: str, tag: str) -> None:
    """A ``pretrained`` that is not a file path must be an open_clip tag of ``model_name``
    (else open_clip would fall back to reading a file of that name itself)."""
    if _has_schema(model_name) or open_clip.get_pretrained_cfg(model_name, tag):
        return
    raise ClipWeightsError(
        f"clip.pretrained {tag!r} is neither an open_clip tag of {model_name!r} "
        f"(tags: {open_clip.list_pretrained_tags_by_model(model_name)}) nor a weights file path "
        "(a path has a '/' or ends in .bin, .pt, .pth or .safetensors)")


def read_clip_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The state dict in a CLIP weights file — the one place this project reads one.

    ``.safetensors`` through safetensors; anything else (``open_clip_pytorch_model.bin``, .pt,
    .pth) through ``torch.load(weights_only=True)`` only. open_clip's own ``load_state_dict``
    also asks for ``weights_only=True`` but, on a ``TypeError`` (which a crafted pickle raises
    inside torch's weights-only unpickler), retries with a plain ``torch.load`` — full unpickling,
    code included, under ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1`` or torch < 2.6 — so files never
    go through it. A pickled
    object other than tensors and plain containers is refused, naming its type and the file, and
    its code never runs. Open_clip's training checkpoints (``{"state_dict": ...}``) and DDP's
    ``module.`` prefix are unwrapped as open_clip does.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise ClipWeightsError(f"{path}: CLIP weights file not found (clip.pretrained)")
    # mmap: a 3.9 GB ViT-H-14 file is not copied into memory before load_state_dict
    checkpoint = load_weights_file(path, mmap=zipfile.is_zipfile(path))
    if isinstance(checkpoint, dict) and isinstance(checkpoint.get("state_dict"), dict):
        checkpoint = checkpoint["state_dict"]
    if not isinstance(checkpoint, dict) or not checkpoint:
        raise ClipWeightsError(f"{path}: expected a state dict (name → tensor), got {type(checkpoint).__name__}")
    not_tensors = [str(k) for k, v in checkpoint.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise ClipWeightsError(f"{path}: not a state dict: {not_tensors[:3]} are not tensors")
    if all(str(k).startswith("module.") for k in checkpoint):
        checkpoint = {k[len("module."):]: v for k, v in checkpoint.items()}
    return checkpoint


def load_clip_weights(model: nn.Module, path: str | os.PathLike, *, model_name: str) -> None:
    """``read_clip_weights(path)`` into the open_clip ``model`` (both towers), strictly.

    The same adjustments as open_clip's ``load_checkpoint`` (third-party layouts, old text-tower
    keys, scalar logit_scale, positional embeddings resized to ``force_image_size``), then every
    key and shape must match: a file for another model fails naming the file and the keys.
    """
    from open_clip.convert import convert_state_dict
    from open_clip.model import convert_to_custom_text_state_dict, resize_pos_embed, resize_text_pos_embed

    state = read_clip_weights(path)
    state = convert_state_dict(model, state)
    if "positional_embedding" in state and not hasattr(model, "positional_embedding"):
        state = convert_to_custom_text_state_dict(state)
    for key in ("logit_scale", "logit_bias"):
        own = getattr(model, key, None)
        if key in state and own is not None and own.ndim != state[key].ndim:
            state[key] = state[key].reshape(own.shape)
    if "logit_bias" not in state and getattr(model, "logit_bias", None) is not None and "logit_scale" in state:
        state["logit_bias"] = torch.zeros_like(state["logit_scale"])
    state.pop("text.transformer.embeddings.position_ids", None)
    for resize in (resize_pos_embed, resize_text_pos_embed):
        try:
            resize(state, model)
        except Exception:  # noqa: BLE001, S110  (a table of another width: a shape mismatch, reported below)
            pass

    mismatch = key_mismatch(state, model.state_dict())
    if mismatch:
        raise ClipWeightsError(f"{Path(path)}: does not fit open_clip {model_name!r} (weights of another "
                               f"model?): keys {mismatch}")
    model.load_state_dict(state, strict=True)


class RobustCLIP(nn.Module):
    """Frozen teacher + trainable student CLIP visual towers (paper §3.3, Eq. 3).

    Args:
        model_name: an open_clip model name (paper: ``"ViT-H-14"``; tiny: ``"consissr-tiny-vit"``)
            or ``"local-dir:<folder>"`` / ``"hf-hub:<repo>"``, which carry their own weights.
        pretrained: open_clip pretrained tag (paper: ``"laion2b_s32b_b79k"``) or a weights
            file path (the authors' ``open_clip_pytorch_model.bin``; a ``.safetensors`` too; read
            offline by ``read_clip_weights`` and recorded with its sha256 as
            ``pretrained_sha256``); ``None`` = random init. Must be ``None`` with a
            ``local-dir:``/``hf-hub:`` name.
        image_size: CLIP input resolution (open_clip's ``force_image_size``; 224 for ViT-H-14).
        device: where both towers live.
        dtype: parameter dtype of both towers (float32, bfloat16 or float16).
        with_teacher: ``False`` builds only the student *architecture*, randomly initialised and
            without touching pretrained weights — what ``from_pretrained`` uses for inference.
        preprocess_cfg: overrides open_clip's preprocessing cfg (mean, std, interpolation,
            resize_mode); ``from_pretrained`` passes the saved one so that it does not depend on
            the tag.

    Images given to ``preprocess`` / ``*_embeds`` / ``forward`` are (B, 3, H, W) in [0, 1],
    any H, W: they are resized and centre-cropped to ``image_size`` and normalised exactly as
    open_clip's own inference transform does for PIL images.
    """

    def __init__(
        self,
        *,
        model_name: str,
        pretrained: str | None = None,
        image_size: int = 224,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        with_teacher: bool = True,
        preprocess_cfg: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if _has_schema(model_name) and pretrained is not None:
            raise ValueError(
                f"model_name={model_name!r} carries its own weights; pretrained must be None, "
                f"got {pretrained!r}")
        if dtype not in _PRECISION:
            raise ValueError(f"dtype must be one of {list(_PRECISION)}, got {dtype}")
        self.model_name = model_name
        self.pretrained = pretrained
        self.image_size = int(image_size)
        # the weights file's sha256 (hashed before it is read): which weights the towers started from
        self.pretrained_sha256: str | None = None
        if with_teacher and is_clip_weights_file(pretrained):
            if not Path(pretrained).expanduser().is_file():
                raise ClipWeightsError(f"{Path(pretrained).expanduser()}: CLIP weights file not found "
                                       "(clip.pretrained)")
            self.pretrained_sha256 = file_sha256(Path(pretrained).expanduser())

        # 1. the CLIP visual tower, through open_clip's own create path
        visual, cfg = _load_visual(
            model_name, pretrained, image_size=self.image_size, device=torch.device(device),
            dtype=dtype, load_weights=with_teacher, preprocess_cfg=preprocess_cfg)
        self.preprocess_cfg = _plain_preprocess_cfg(cfg)

        # 2. the frozen teacher E and the trainable student E' (initialised as E)
        self.student = copy.deepcopy(visual) if with_teacher else visual
        self.student.requires_grad_(True)
        self.teacher: nn.Module | None = visual if with_teacher else None
        if self.teacher is not None:
            self.teacher.requires_grad_(False)
            self.teacher.eval()

        # 3. normalisation constants as buffers, so they follow .to(device)
        mean = torch.tensor(self.preprocess_cfg["mean"], dtype=torch.float32).view(1, -1, 1, 1)
        std = torch.tensor(self.preprocess_cfg["std"], dtype=torch.float32).view(1, -1, 1, 1)
        self.register_buffer("pixel_mean", mean.to(device), persistent=False)
        self.register_buffer("pixel_std", std.to(device), persistent=False)

        self._embed_dim = int(getattr(visual, "output_dim", 0)) or int(
            open_clip.get_model_config(model_name)["embed_dim"])

    # ----------------------------------------------------------------------------------------
    # alternative constructors
    # ----------------------------------------------------------------------------------------
    @classmethod
    def from_params(
        cls, params: ClipParams, *, device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> RobustCLIP:
        """Build teacher + student from the ``clip:`` section of params.yaml."""
        return cls(model_name=params.model_name, pretrained=params.pretrained,
                   image_size=params.image_size, device=device, dtype=dtype)

    @classmethod
    def from_pretrained(
        cls,
        directory: str | os.PathLike,
        *,
        with_teacher: bool = False,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | None = None,
    ) -> RobustCLIP:
        """Restore a saved student (bit-exactly when ``dtype`` is the saved one, the default).

        ``with_teacher=False`` (inference) builds the student architecture without pretrained
        weights; ``with_teacher=True`` also reloads the frozen teacher from model_name/pretrained.
        """
        directory = Path(directory)
        config = json.loads((directory / CONFIG_NAME).read_text())
        state = load_file(directory / WEIGHTS_NAME, device="cpu")
        if dtype is None:
            dtype = next(t.dtype for t in state.values() if t.is_floating_point())
        model = cls(
            model_name=config["model_name"], pretrained=config["pretrained"],
            image_size=config["image_size"], device=device, dtype=dtype,
            with_teacher=with_teacher, preprocess_cfg=config["preprocess_cfg"])
        model.student.load_state_dict(state, strict=True)
        recorded = config.get("pretrained_sha256")
        if model.pretrained_sha256 is not None and recorded is not None and model.pretrained_sha256 != recorded:
            raise ClipWeightsError(
                f"{config['pretrained']}: sha256 {model.pretrained_sha256} is not the {recorded} the student in "
                f"{directory} started from (the teacher's weights file changed)")
        model.pretrained_sha256 = model.pretrained_sha256 or recorded
        if model.embed_dim != config["embed_dim"]:
            raise InputError(
                f"{directory}: embed_dim {model.embed_dim} != saved {config['embed_dim']}")
        return model

    # ----------------------------------------------------------------------------------------
    # save
    # ----------------------------------------------------------------------------------------
    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        """Write the student tower (``robust_clip.safetensors``) and ``config.json`` atomically."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().to("cpu").contiguous() for k, v in self.student.state_dict().items()}
        config = {"model_name": self.model_name, "pretrained": self.pretrained,
                  "pretrained_sha256": self.pretrained_sha256, "image_size": self.image_size, "embed_dim": self.embed_dim,
                  "preprocess_cfg": self.preprocess_cfg}
        # weights first: config.json appearing marks a complete save
        with atomic_path(directory / WEIGHTS_NAME) as tmp:
            save_file(state, str(tmp), metadata={"format": "pt"})
        write_json(directory / CONFIG_NAME, config, sort_keys=True)
        return directory

    # ----------------------------------------------------------------------------------------
    # model
    # ----------------------------------------------------------------------------------------
    @property
    def embed_dim(self) -> int:
        """Width of the CLIP image embedding (ViT-H-14: 1024; consissr-tiny-vit: 64)."""
        return self._embed_dim

    def train(self, mode: bool = True) -> RobustCLIP:
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()  # the teacher never leaves eval mode
        return self

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """open_clip's inference transform on a (B, 3, H, W) batch in [0, 1] → (B, 3, S, S).

        Resize (``resize_mode``, antialiased ``interpolation``) and centre-crop/pad to
        ``image_size``, clamp to [0, 1] as PIL's uint8 output does, then (x - mean) / std.
        Computed in float32 whatever the input dtype.
        """
        return self._finish(self._resize(images, self.resized_size(*images.shape[-2:])))

    def resized_size(self, height: int, width: int) -> list[int]:
        """(h, w) that ``preprocess`` resizes a height × width image to, before the centre crop."""
        target = self._target
        mode = self.preprocess_cfg["resize_mode"]
        if mode == "squash":
            return list(target)
        if mode == "shortest" and target[0] == target[1]:  # torchvision's shortest-edge Resize(int)
            short, long = sorted((height, width))
            new_long = int(target[0] * long / short)
            return [target[0], new_long] if height <= width else [new_long, target[0]]
        if mode in ("shortest", "longest"):  # open_clip's ResizeKeepRatio
            ratios = (height / target[0], width / target[1])
            ratio = max(ratios) if mode == "longest" else min(ratios)
            return [round(height / ratio), round(width / ratio)]
        raise ValueError(f"unknown open_clip resize_mode {mode!r}")

    def preprocess_rows(self, rows: Callable[[int, int], torch.Tensor], height: int, width: int,
                        strip: int) -> torch.Tensor:
        """``preprocess`` of a (1, 3, height, width) image read ``strip`` rows at a time.

        ``rows(r0, r1)`` gives rows r0:r1. torch's antialiased resize is separable and resizes the
        width first (an unchanged side is skipped), so resizing each strip's width, then the
        stacked band's height gives the whole-image numbers (on the CPU; within rounding on CUDA)
        with one strip and a height × new-width band in memory instead of the image.
        """
        size = self.resized_size(height, width)
        band = torch.cat([self._resize(rows(r0, min(height, r0 + strip)), [min(height, r0 + strip) - r0, size[1]])
                          for r0 in range(0, height, strip)], dim=2)
        return self._finish(self._resize(band, size))

    @property
    def _target(self) -> tuple[int, int]:
        size = self.preprocess_cfg["size"]
        return tuple(size) if isinstance(size, (list, tuple)) else (size, size)

    def _resize(self, images: torch.Tensor, size: list[int]) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"expected (B, 3, H, W) images in [0, 1], got shape {tuple(images.shape)}")
        x = images.float().to(self.pixel_mean.device)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)  # open_clip converts every PIL mode to RGB
        interpolation = _INTERPOLATION[self.preprocess_cfg["interpolation"]]
        return TF.resize(x, size, interpolation=interpolation, antialias=interpolation != TF.InterpolationMode.NEAREST)

    def _finish(self, x: torch.Tensor) -> torch.Tensor:
        """Clamp to [0, 1] as PIL's uint8 output does, centre-crop/pad, normalise."""
        x = _center_crop_or_pad(x.clamp(0.0, 1.0), self._target, fill=self.preprocess_cfg.get("fill_color", 0) / 255.0)
        return (x - self.pixel_mean.float()) / self.pixel_std.float()

    def teacher_embeds(self, hq: torch.Tensor) -> torch.Tensor:
        """E(I_HQ): frozen teacher image embeddings (B, embed_dim), no graph."""
        if self.teacher is None:
            raise RuntimeError("this RobustCLIP was restored with with_teacher=False")
        with torch.no_grad():
            return _encode(self.teacher, self.preprocess(hq))

    def student_embeds(self, lq: torch.Tensor) -> torch.Tensor:
        """E'(I_LQ): student image embeddings (B, embed_dim).

        Unnormalised, like open_clip's ``encode_image(normalize=False)``: Eq. 3 matches the
        embeddings themselves, and they are what conditions the diffusion model downstream.
        """
        return _encode(self.student, self.preprocess(lq))

    def student_embeds_rows(self, rows: Callable[[int, int], torch.Tensor], height: int, width: int,
                            strip: int) -> torch.Tensor:
        """``student_embeds`` of one large image read in strips of rows (``preprocess_rows``)."""
        return _encode(self.student, self.preprocess_rows(rows, height, width, strip))

    def forward(self, lq: torch.Tensor, hq: torch.Tensor) -> torch.Tensor:
        """The Robust CLIP training loss on a batch of degraded / clean images (Eq. 3)."""
        return robust_clip_loss(self.student_embeds(lq), self.teacher_embeds(hq))


def robust_clip_loss(student_lq: torch.Tensor, teacher_hq: torch.Tensor) -> torch.Tensor:
    """Eq. 3: L_robust = MSE(E'(I_LQ), E(I_HQ)), mean over batch and embedding, in float32."""
    return F.mse_loss(student_lq.float(), teacher_hq.detach().float())


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------
def _encode(tower: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    dtype = next(tower.parameters()).dtype
    return tower(pixels.to(dtype))  # = open_clip CLIP.encode_image(normalize=False)


def _center_crop_or_pad(x: torch.Tensor, target: tuple[int, int], fill: float) -> torch.Tensor:
    """open_clip's CenterCrop / CenterCropOrPad (same offsets as torchvision's center_crop)."""
    th, tw = target
    h, w = x.shape[-2:]
    if h < th or w < tw:
        pad_w, pad_h = max(tw - w, 0), max(th - h, 0)
        x = TF.pad(x, [pad_w // 2, pad_h // 2, (pad_w + 1) // 2, (pad_h + 1) // 2], fill=fill)
    return TF.center_crop(x, [th, tw])


def _plain_preprocess_cfg(cfg: dict[str, Any]) -> dict[str, Any]:
    """JSON-friendly copy of open_clip's preprocess cfg (tuples → lists)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()}


__all__ = ["CLIP_CONFIG_DIR", "PAPER_CLIP", "ClipWeightsError", "RobustCLIP", "load_clip_weights",
           "read_clip_weights", "robust_clip_loss"]
