"""The frozen Stable Diffusion backbone: one loader for SD 2.1-base and the embedded tiny twin.

Both faces of the project go through the same ``from_pretrained(source, subfolder=...)`` calls:
``source`` is a diffusers directory or hub id (paper: ``stabilityai/stable-diffusion-2-1-base``)
or the directory that ``build_tiny_backbone`` wrote with ``save_pretrained`` — the SD layout
(``unet/ vae/ text_encoder/ tokenizer/ scheduler/ model_index.json``) at a tiny scale, randomly
initialised from a fixed seed except the VAE, which stage ``train_vae`` trained on photos.
``source`` may also be one ``.ckpt``/``.safetensors`` file in the original LDM layout (SD 2.1's
``v2-1_512-ema-pruned``): ``consissr.models.single_file`` loads it with the packaged SD 2.1-base
configs (``SD21_BASE_CONFIG_DIR``), offline.
"""

from __future__ import annotations

import gzip
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from consissr.errors import MissingInputError
from consissr.io import atomic_dir, write_json

EMBEDDED = "embedded"
EMBEDDED_DIR = Path("data/models/backbone")
PAPER_BACKBONE = "stabilityai/stable-diffusion-2-1-base"
# SD 2.1-base's component configs, copied from the hub (unet/, vae/, text_encoder/ config.json): the
# paper profile builds from them offline (models/info.py) and a single-file checkpoint loads with them
SD21_BASE_CONFIG_DIR = Path(__file__).parent / "sd_configs" / "stable-diffusion-2-1-base"
TINY_CROP_SIZE = 128  # prepare.crop_size of the embedded default: the tiny UNet's sample_size in pixels

# SD 2.1-base's own noise schedule (scheduler/scheduler_config.json of the hub repo).
SD_SCHEDULE = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    clip_sample=False, steps_offset=1, prediction_type="epsilon")


def tiny_unet_config(latent_channels: int = 8, sample_size: int = 32) -> dict[str, Any]:
    """SD 2.1's UNet shape (cross-attn down/up blocks, linear projections) at 0.8M parameters, on
    the VAE's latent (``latent_channels``; ``sample_size`` = 128² crops / the VAE's factor)."""
    return dict(
        sample_size=sample_size, in_channels=latent_channels, out_channels=latent_channels, layers_per_block=1,
        block_out_channels=(32, 64), norm_num_groups=8,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        mid_block_type="UNetMidBlock2DCrossAttn",
        cross_attention_dim=64, attention_head_dim=(4, 4), use_linear_projection=True)


def tiny_vae_config() -> dict[str, Any]:
    """SD's AutoencoderKL at 4x downsampling with 8 latent channels and no attention (stage
    ``train_vae`` trains it; ``scaling_factor`` is then set from its latents' std).

    One GroupNorm group: GroupNorm removes each group's per-image mean and scale, and with SD's
    groups at these widths (2 channels a group at the decoder's output) a crop's colour could not
    pass — reconstructions came back grey (benchmarks/bench_vae.py ``f4c8_g1``)."""
    return dict(
        in_channels=3, out_channels=3, latent_channels=8, layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(16, 32, 32), norm_num_groups=1, sample_size=128,
        mid_block_add_attention=False, scaling_factor=1.0)


def tiny_text_config() -> dict[str, Any]:
    """A 2-layer CLIP text transformer over the real CLIP BPE vocabulary (49408 tokens)."""
    return dict(
        vocab_size=49408, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=77, projection_dim=64, hidden_act="gelu")


def _clip_tokenizer_files(folder: Path) -> tuple[Path, Path]:
    """Write CLIP's vocab.json/merges.txt from the BPE table that ships inside open_clip.

    It is the same BPE as SD 2.1's tokenizer (OpenCLIP's), so the tiny backbone tokenises
    exactly as the real one does, without a download.
    """
    import open_clip.tokenizer as oct

    lines = gzip.open(oct.default_bpe(), "rt", encoding="utf-8").read().split("\n")
    merges = [tuple(m.split()) for m in lines[1:49152 - 256 - 2 + 1]]
    units = list(oct.bytes_to_unicode().values())
    vocab = units + [u + "</w>" for u in units] + ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    vocab_file, merges_file = folder / "vocab.json", folder / "merges.txt"
    vocab_file.write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}))
    merges_file.write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    return vocab_file, merges_file


def openclip_tokenizer():
    """SD 2.1's tokenizer (OpenCLIP's BPE, pad ``!``, 77 tokens) as a ``CLIPTokenizer``, without a download."""
    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        _clip_tokenizer_files(Path(tmp))
        # from_pretrained on vocab.json + merges.txt: the same call SD's tokenizer/ folder takes
        return CLIPTokenizer.from_pretrained(tmp, pad_token="!", model_max_length=77, local_files_only=True)


def build_tiny_backbone(out_dir: str | Path, *, seed: int, vae_dir: str | Path | None = None) -> Path:
    """Create the embedded backbone from configs with a fixed seed and save it in SD's layout.

    ``vae_dir``: the AutoencoderKL that stage ``train_vae`` trained (``save_pretrained`` folder);
    without it the VAE is random (tests that only need shapes). The UNet is sized to its latent.
    """
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    out_dir = Path(out_dir)
    torch.manual_seed(seed)
    vae = AutoencoderKL.from_pretrained(vae_dir) if vae_dir is not None else AutoencoderKL(**tiny_vae_config())
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    unet = UNet2DConditionModel(**tiny_unet_config(vae.config.latent_channels, TINY_CROP_SIZE // factor))
    text_encoder = CLIPTextModel(CLIPTextConfig(**tiny_text_config()))
    tokenizer = openclip_tokenizer()
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
        scheduler=DDPMScheduler(**SD_SCHEDULE), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)
    with atomic_dir(out_dir) as tmp:  # an interrupted build leaves no half backbone
        pipe.save_pretrained(tmp, safe_serialization=True)
    return out_dir


def resolve_source(pretrained: str, embedded_dir: str | Path = EMBEDDED_DIR) -> str:
    """``embedded`` → the saved tiny backbone's folder; anything else (a diffusers folder, a hub id,
    a single ``.ckpt``/``.safetensors`` file) passes through."""
    if pretrained == EMBEDDED:
        path = Path(embedded_dir)
        if not (path / "model_index.json").is_file():
            raise MissingInputError(
                f"{path}: the embedded backbone is missing; run `consissr backbone` (or `dvc repro backbone`)")
        return str(path)
    return pretrained


@dataclass
class Backbone:
    """The frozen SD parts that ConsisSR builds on (paper §3.1)."""

    unet: Any
    vae: Any
    text_encoder: Any
    tokenizer: Any
    noise_scheduler: Any
    source: str


def load_vae(source: str, *, revision: str | None = None, torch_dtype: torch.dtype | None = None):
    """The backbone's AutoencoderKL: ``from_pretrained(source, subfolder="vae")``, or from a single file."""
    from diffusers import AutoencoderKL

    from consissr.models import single_file

    if single_file.is_single_file(source):
        return single_file.load_vae(source, torch_dtype=torch_dtype)
    return AutoencoderKL.from_pretrained(source, subfolder="vae", revision=revision, torch_dtype=torch_dtype)


def load_vae_config(source: str, *, revision: str | None = None) -> dict[str, Any]:
    """The VAE's config as the model is built from it: the file's entries over AutoencoderKL's defaults
    (SD 2.1's vae/config.json has no ``scaling_factor``: the default 0.18215 is its value)."""
    import inspect

    from diffusers import AutoencoderKL

    from consissr.models import single_file

    if single_file.is_single_file(source):
        source, revision = str(single_file.default_config_dir()), None
    config = AutoencoderKL.load_config(source, subfolder="vae", revision=revision)
    defaults = {name: p.default for name, p in inspect.signature(AutoencoderKL.__init__).parameters.items()
                if p.default is not inspect.Parameter.empty}
    return {**defaults, **config}


def load_backbone(
    pretrained: str = EMBEDDED,
    *,
    revision: str | None = None,
    torch_dtype: torch.dtype | None = None,
    embedded_dir: str | Path = EMBEDDED_DIR,
) -> Backbone:
    """Load UNet, VAE, text encoder, tokenizer and DDPM scheduler through ``from_pretrained``.

    ``pretrained``: ``embedded``, a diffusers folder or hub id, or one ``.ckpt``/``.safetensors``
    file in the LDM layout (read once, converted by diffusers' single-file loaders with the
    packaged SD 2.1-base configs; ``consissr.models.single_file``).
    """
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    from consissr.models import single_file

    source = resolve_source(pretrained, embedded_dir)
    if single_file.is_single_file(source):
        return single_file.load_backbone(source, torch_dtype=torch_dtype)
    kw = dict(revision=revision)
    unet = UNet2DConditionModel.from_pretrained(source, subfolder="unet", torch_dtype=torch_dtype, **kw)
    vae = load_vae(source, revision=revision, torch_dtype=torch_dtype)
    text_encoder = CLIPTextModel.from_pretrained(source, subfolder="text_encoder", torch_dtype=torch_dtype, **kw)
    tokenizer = CLIPTokenizer.from_pretrained(source, subfolder="tokenizer", **kw)
    # the model's own schedule (SD 2.1 ships a PNDM config; DDPM reads the same betas)
    noise_scheduler = DDPMScheduler.from_pretrained(source, subfolder="scheduler", **kw)
    for module in (unet, vae, text_encoder):
        module.requires_grad_(False).eval()
    return Backbone(unet, vae, text_encoder, tokenizer, noise_scheduler, source)


def write_backbone(params, *, out_dir: str | Path = EMBEDDED_DIR, seed: int,
                   vae_dir: str | Path | None = None) -> Path:
    """Stage ``backbone``: build the embedded backbone, or record which real one to load.

    ``params`` is ``config.BackboneParams``. The embedded backbone takes the VAE trained by stage
    ``train_vae`` from ``vae_dir``. For a real backbone the folder holds
    ``source.json`` only: the weights stay where the user keeps them (a local directory, the hub
    cache or a single LDM checkpoint file) and every later stage loads them by that name. A single
    file is checked first (it exists, loads safely, holds the UNet, VAE and text encoder keys).
    """
    from consissr.models import single_file

    out_dir = Path(out_dir)
    if params.pretrained == EMBEDDED:
        if vae_dir is None or not (Path(vae_dir) / "config.json").is_file():
            raise MissingInputError(f"{vae_dir}: no trained VAE for the embedded backbone; run `consissr train-vae` "
                                    "(or `dvc repro train_vae`)")
        return build_tiny_backbone(out_dir, seed=seed, vae_dir=vae_dir)
    if single_file.is_single_file(params.pretrained):
        single_file.check_checkpoint(params.pretrained)
    with atomic_dir(out_dir) as tmp:
        write_json(tmp / "source.json", {"pretrained": params.pretrained, "revision": params.revision})
    return out_dir
