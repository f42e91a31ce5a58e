"""One Stable Diffusion 2.1 checkpoint file in the original LDM layout → the project's ``Backbone``.

SD 2.1's own release (the file the ConsisSR authors' README names, ``v2-1_512-ema-pruned.ckpt``, or
its ``.safetensors`` twin) is one state dict in CompVis' LDM naming: the UNet under
``model.diffusion_model.``, the VAE under ``first_stage_model.``, the OpenCLIP text tower under
``cond_stage_model.model.``. ``backbone.pretrained`` may name such a file; then:

- ``read_checkpoint`` reads it once: a ``.ckpt`` only through ``torch.load(weights_only=True)`` (a
  pickle's code never runs; any other object is refused with its type named), a Lightning
  ``{"state_dict": ...}`` wrapper unwrapped; a ``.safetensors`` through ``safetensors``;
- the three prefixes must be there (``check_prefixes``);
- the one dict goes to diffusers' single-file converters (``from_single_file`` for the UNet and the
  VAE, ``create_diffusers_clip_model_from_ldm`` for the text encoder) with SD 2.1-base's component
  configs packaged in ``sd_configs/`` (``backbone.SD21_BASE_CONFIG_DIR``): no hub, no original yaml;
- the tokenizer is OpenCLIP's BPE (``backbone.openclip_tokenizer``), the scheduler ``SD_SCHEDULE``.

The 512 base model is what the configs describe (epsilon prediction); a 768-v file has the same
shapes and would load, but with the wrong prediction type: not supported.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Callable

import torch

from consissr.config import SINGLE_FILE_SUFFIXES
from consissr.errors import InputError, MissingInputError, UnsafeCheckpointError
from consissr.io import load_weights_file
from consissr.models import backbone as _backbone

# LDM key prefix → the part it holds
LDM_PREFIXES = {
    "model.diffusion_model.": "UNet",
    "first_stage_model.": "VAE",
    "cond_stage_model.model.": "OpenCLIP text encoder",
}
UNET_PREFIX, VAE_PREFIX, TEXT_PREFIX = LDM_PREFIXES


def is_single_file(source: str | Path) -> bool:
    """``backbone.pretrained`` names one checkpoint file (by its suffix) rather than a folder or hub id."""
    return Path(str(source)).suffix.lower() in SINGLE_FILE_SUFFIXES


def default_config_dir() -> Path:
    """The diffusers configs (unet/, vae/, text_encoder/) a single file is loaded with; looked up at
    call time so a test can point ``backbone.SD21_BASE_CONFIG_DIR`` at a tiny twin."""
    return Path(_backbone.SD21_BASE_CONFIG_DIR)


def _checked_path(path: str | Path) -> Path:
    path = Path(path)
    if path.suffix.lower() not in SINGLE_FILE_SUFFIXES:
        raise InputError(f"{path}: a single-file checkpoint must end in {' or '.join(SINGLE_FILE_SUFFIXES)}, "
                         f"got {path.suffix or 'no suffix'!r}")
    if not path.is_file():
        raise MissingInputError(f"{path}: no such checkpoint file")
    return path


def read_checkpoint(path: str | Path, *, mmap: bool = False) -> dict[str, torch.Tensor]:
    """The tensors of a ``.ckpt`` or ``.safetensors`` file, safely, on the CPU.

    ``.ckpt``: ``torch.load(map_location="cpu", weights_only=True)``; a Lightning-style
    ``{"state_dict": {...}, ...}`` is unwrapped; entries that are not tensors are dropped.
    ``mmap``: map a (zip-format) ``.ckpt``'s storages instead of reading them (cheap checks).
    ``.safetensors``: ``safetensors.torch.load_file``. Fails (``consissr.errors``) naming the file:
    a wrong suffix, a missing file, an object weights-only loading refuses
    (``UnsafeCheckpointError``, naming its type), an unreadable file, no tensors.
    """
    path = _checked_path(path)
    obj: Any = load_weights_file(path, mmap=mmap)
    if path.suffix.lower() != ".safetensors":
        if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
            obj = obj["state_dict"]
        if not isinstance(obj, Mapping):
            raise InputError(f"{path}: holds a {type(obj).__name__}, not a state dict")
    state = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not state:
        raise InputError(f"{path}: no tensors in the checkpoint")
    return state


def check_prefixes(keys, path: str | Path, prefixes: tuple[str, ...] = tuple(LDM_PREFIXES)) -> None:
    """Every prefix has at least one key, else ``InputError`` naming the file and what is missing."""
    keys = list(keys)
    missing = [p for p in prefixes if not any(k.startswith(p) for k in keys)]
    if missing:
        seen = sorted({".".join(k.split(".")[:2]) + "." for k in keys})
        raise InputError(
            f"{path}: no {', '.join(f'{p} keys ({LDM_PREFIXES.get(p, p)})' for p in missing)}: not a Stable "
            f"Diffusion 2.x checkpoint in the LDM layout (its keys start with {', '.join(seen[:6]) or 'nothing'})")


def check_checkpoint(path: str | Path) -> None:
    """What stage ``backbone`` checks before recording a single file: it exists, loads safely and holds
    the UNet, VAE and text encoder prefixes (a ``.safetensors`` header, a ``.ckpt`` memory-mapped)."""
    path = _checked_path(path)
    if path.suffix.lower() == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                keys = list(f.keys())
        except Exception as e:  # noqa: BLE001
            raise InputError(f"{path}: not a readable safetensors file ({e})") from None
    else:
        try:
            keys = list(read_checkpoint(path, mmap=True))
        except UnsafeCheckpointError:
            raise
        except InputError:  # a legacy (non-zip) .ckpt cannot be memory-mapped: read it
            keys = list(read_checkpoint(path))
    check_prefixes(keys, path)


def _missing_weights(cls, state: dict, configs: Path, subfolder: str) -> list[str]:
    """The model's weights that diffusers' converter does not produce from ``state`` (the error path only)."""
    from accelerate import init_empty_weights
    from diffusers.loaders.single_file_model import SINGLE_FILE_LOADABLE_CLASSES

    config = cls.load_config(str(configs), subfolder=subfolder, local_files_only=True)
    with init_empty_weights():
        wanted = set(cls.from_config(config).state_dict())
    converted = SINGLE_FILE_LOADABLE_CLASSES[cls.__name__]["checkpoint_mapping_fn"](config=config, checkpoint=state)
    return sorted(wanted - set(converted))


def _loaded(path: Path, part: str, subfolder: str, configs: Path, build: Callable[[], Any],
            missing: Callable[[], list[str]] | None = None) -> Any:
    """``build()`` (a diffusers converter) with its failures named by file and part, and no weight left
    unloaded (diffusers' low-memory loading leaves a weight the file lacks on the meta device)."""
    from diffusers.loaders.single_file_utils import SingleFileComponentError

    config = configs / subfolder / "config.json"
    try:
        model = build()
        lacking = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    except (ValueError, KeyError, SingleFileComponentError) as e:
        raise InputError(f"{path}: the {part} weights do not fit {config} ({getattr(e, 'message', None) or e})") from None
    except NotImplementedError as e:
        # Workaround: from_single_file ends with accelerate's dispatch_model, which cannot move a weight
        # the file lacked off the meta device ("Cannot copy out of meta tensor") - name those weights
        lacking = missing() if missing is not None and "meta" in str(e) else []
        if not lacking:
            raise
    if lacking:
        raise InputError(f"{path}: the {part} lacks {len(lacking)} weights of {config} (e.g. {', '.join(lacking[:3])})")
    return model


def _unet(state: dict, path: Path, configs: Path, torch_dtype: torch.dtype | None):
    from diffusers import UNet2DConditionModel

    return _loaded(path, "UNet", "unet", configs, lambda: UNet2DConditionModel.from_single_file(
        state, config=str(configs), subfolder="unet", local_files_only=True, torch_dtype=torch_dtype),
        lambda: _missing_weights(UNet2DConditionModel, state, configs, "unet"))


def _vae(state: dict, path: Path, configs: Path, torch_dtype: torch.dtype | None):
    from diffusers import AutoencoderKL

    return _loaded(path, "VAE", "vae", configs, lambda: AutoencoderKL.from_single_file(
        state, config=str(configs), subfolder="vae", local_files_only=True, torch_dtype=torch_dtype),
        lambda: _missing_weights(AutoencoderKL, state, configs, "vae"))


def _text_encoder(state: dict, path: Path, configs: Path, torch_dtype: torch.dtype | None):
    from diffusers.loaders.single_file_utils import create_diffusers_clip_model_from_ldm
    from transformers import CLIPTextModel

    return _loaded(path, "text encoder", "text_encoder", configs, lambda: create_diffusers_clip_model_from_ldm(
        CLIPTextModel, state, subfolder="text_encoder", config=str(configs), torch_dtype=torch_dtype,
        local_files_only=True))


def load_vae(path: str | Path, *, torch_dtype: torch.dtype | None = None, config_dir: str | Path | None = None):
    """The VAE alone from a single file (stages that only encode or decode)."""
    path = Path(path)
    state = read_checkpoint(path)
    check_prefixes(state, path, (VAE_PREFIX,))
    return _vae(state, path, Path(config_dir or default_config_dir()), torch_dtype).requires_grad_(False).eval()


def load_backbone(path: str | Path, *, torch_dtype: torch.dtype | None = None,
                  config_dir: str | Path | None = None) -> _backbone.Backbone:
    """UNet, VAE, text encoder (from the one dict, read once), OpenCLIP tokenizer and DDPM scheduler."""
    from diffusers import DDPMScheduler

    path = Path(path)
    configs = Path(config_dir or default_config_dir())
    state = read_checkpoint(path)
    check_prefixes(state, path)
    unet = _unet(state, path, configs, torch_dtype)
    vae = _vae(state, path, configs, torch_dtype)
    text_encoder = _text_encoder(state, path, configs, torch_dtype)
    del state
    for module in (unet, vae, text_encoder):
        module.requires_grad_(False).eval()
    return _backbone.Backbone(unet, vae, text_encoder, _backbone.openclip_tokenizer(),
                              DDPMScheduler(**_backbone.SD_SCHEDULE), str(path))


__all__ = ["LDM_PREFIXES", "UnsafeCheckpointError", "check_checkpoint", "check_prefixes", "default_config_dir",
           "is_single_file", "load_backbone", "load_vae", "read_checkpoint"]
