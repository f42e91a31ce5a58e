"""``consissr convert-checkpoint``: the authors' released ``ConsisSR.ckpt`` → this project's saved pipeline.

Their checkpoint (github.com/Gujojo/ConsisSR, ``configs/model/cldm.yaml``: ``model.cldm.ControlLDM``)
is one PyTorch-Lightning state dict. Key groups and where each goes:

=====================================================  ==========================================================
``model.diffusion_model.*``                            SD 2.1 UNet → ``unet/`` (diffusers' ``convert_ldm_unet_checkpoint``)
``control_model.*``                                    ControlNet → ``consissr/controlnet/`` (``convert_controlnet_checkpoint``;
                                                       its 8-conv ``input_hint_block`` → ``controlnet_conditioning:
                                                       latent_authors``)
``first_stage_model.*``                                VAE → ``vae/`` (``convert_ldm_vae_checkpoint``)
``cond_stage_model.model.{token_embedding,...}``       OpenCLIP text tower → ``text_encoder/`` (``convert_open_clip_checkpoint``)
``cond_stage_model.model.visual.*``                    robust CLIP image tower → ``robust_clip/`` (open_clip names as is)
``cond_stage_model.ft_layers_4.{0,1,4,6}.*``           image-token head → ``image_proj`` (``image_tokens: authors_mlp``)
``*.transformer_blocks.K.attn1.position_emb``          → ``self_attention[...].pos_embed`` (transposed to (1, d, G, G))
``*.transformer_blocks.K.attnT.*`` + ``normT.*``       → ``self_attention[...].transposed`` (``transposed_attention_form:
                                                       authors``)
``*.transformer_blocks.K.attn2.to_out_ip.0.*``         → ``hpa_*[...].to_out_image``
=====================================================  ==========================================================

Dropped, each for a reason (``DROPPED``): the DDPM schedule buffers (checked against the scheduler),
``logvar``, ``scale_factor`` (checked against the VAE's), the text tower's last layer and its
``text_projection``/``logit_scale``/``attn_mask`` (SD 2.1 reads the penultimate layer), EMA copies,
``cond_encoder.*`` (checked to be the VAE encoder), ``attn2.to_k_ip``/``to_v_ip`` (checked to equal
the layer's own ``to_k``/``to_v``, which this project's HPA reads the image token with). Any other
key, any key of ours left without a weight, and any check that fails raise ``InputError`` naming
the key.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from consissr.errors import InputError

# the authors' inference defaults (README "Inference": --cfg_scale 5.0; inference.py: --steps 50,
# --color_fix_type adain, the positive / negative prompts of ``process``); InferenceParams fields
AUTHORS_DEFAULTS: dict[str, Any] = {
    "mode": "full", "num_inference_steps": 50, "guidance_scale": 5.0, "color_fix": "adain",
    "prompt": "clean, high-resolution, 8k", "negative_prompt": "dotted, noise, blur, lowres, smooth",
}

UNET, CONTROL, VAE, COND_ENCODER = "model.diffusion_model.", "control_model.", "first_stage_model.", "cond_encoder."
OPEN_CLIP, VISUAL, HEAD = "cond_stage_model.model.", "cond_stage_model.model.visual.", "cond_stage_model.ft_layers_4."
# their ft_layers_4: Sequential(LayerNorm, Linear, GELU, Reshape, Linear, GELU, zero Linear)
HEAD_MAP = {"0": "norm", "1": "proj", "4": "hidden", "6": "out"}
_SCHEDULE_BUFFERS = ("betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
                     "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
                     "sqrt_recipm1_alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped",
                     "posterior_mean_coef1", "posterior_mean_coef2")
DROPPED: dict[str, str] = {
    **{name: "the DDPM schedule: the pipeline's scheduler recomputes it (betas checked against it)"
       for name in _SCHEDULE_BUFFERS},
    "logvar": "the training loss's per-timestep log-variance; unused at inference",
    "scale_factor": "the VAE latent scale: the VAE config's scaling_factor (checked equal)",
    OPEN_CLIP + "text_projection": "the text tower's pooled projection; SD 2.1 reads hidden states",
    OPEN_CLIP + "logit_scale": "CLIP's contrastive temperature; unused",
    OPEN_CLIP + "attn_mask": "the causal mask buffer; the text encoder builds its own",
}
DROPPED_PREFIXES: dict[str, str] = {
    "model_ema.": "an EMA copy (their config: use_ema False); the trained weights are model.*",
    "cond_stage_model.model.v_fix.": "the frozen teacher copy of their stage-1 distillation; unused at inference",
    "preprocess_model.": "their SwinIR pre-restoration, disabled at inference (ignore_keys)",
}
_EXTRA = re.compile(r"^(?P<block>.+\.transformer_blocks\.\d+)\.(?P<name>attn1\.position_emb|attnT\..+|normT\..+|"
                    r"attn2\.to_k_ip\.weight|attn2\.to_v_ip\.weight|attn2\.to_out_ip\.0\.(weight|bias))$")
_TRANSPOSED = {"attnT.to_qkv.weight": "qkv.weight", "attnT.qkv_dwconv.weight": "qkv_dwconv.weight",
               "attnT.to_out.0.weight": "to_out.weight", "attnT.to_out.0.bias": "to_out.bias",
               "normT.weight": "norm.weight", "normT.bias": "norm.bias"}


# TODO: use consissr.models.single_file.read_checkpoint
def _read_ckpt(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of their Lightning checkpoint: ``single_file.read_checkpoint`` (weights only, the
    ``state_dict`` unwrapped; a refused object named with the file), DDP's ``module.`` dropped."""
    from consissr.models.single_file import read_checkpoint

    return {k.removeprefix("module."): v for k, v in read_checkpoint(path).items()}


# --------------------------------------------------------------------------------------------
# layer names: LDM block index → diffusers module path
# --------------------------------------------------------------------------------------------
def _diffusers_block(ldm_block: str, layers_per_block: int) -> str:
    """``input_blocks.1.1.transformer_blocks.0`` → ``down_blocks.0.attentions.0.transformer_blocks.0``."""
    match = re.match(r"^(input_blocks|output_blocks)\.(\d+)\.1\.(transformer_blocks\.\d+)$|^middle_block\.1\."
                     r"(transformer_blocks\.\d+)$", ldm_block)
    if match is None:
        raise InputError(f"{ldm_block}: a transformer block at a place SD 2.1's UNet has none")
    if match.group(4):
        return f"mid_block.attentions.0.{match.group(4)}"
    index, per = int(match.group(2)), layers_per_block + 1
    if match.group(1) == "input_blocks":
        return f"down_blocks.{(index - 1) // per}.attentions.{(index - 1) % per}.{match.group(3)}"
    return f"up_blocks.{index // per}.attentions.{index % per}.{match.group(3)}"


def _key(layer: str) -> str:
    return layer.replace(".", "-")  # hpa.module_key


# --------------------------------------------------------------------------------------------
# the conversion
# --------------------------------------------------------------------------------------------
class _Ledger:
    """Which source keys are used or dropped; an unused one is an error naming it."""

    def __init__(self, state: dict[str, torch.Tensor], source: str) -> None:
        self.state, self.source, self.used = state, source, set()

    def take(self, key: str) -> torch.Tensor:
        if key not in self.state:
            raise InputError(f"{self.source}: missing key {key}")
        self.used.add(key)
        return self.state[key]

    def group(self, prefix: str) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self.state.items() if k.startswith(prefix) and k not in self.used}

    def check_all_used(self) -> None:
        unknown = sorted(set(self.state) - self.used)
        if unknown:
            raise InputError(f"{self.source}: unknown key {unknown[0]} ({len(unknown)} unknown in all: "
                             f"{', '.join(unknown[:5])}{' ...' if len(unknown) > 5 else ''})")


def _storage(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def _convert_part(ledger: _Ledger, part: str, prefix: str, model: torch.nn.Module,
                  convert: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]],
                  by_name: Callable[[str], bool] = lambda key: False) -> None:
    """Run one of diffusers' own LDM converters on a key group and load the result strictly.

    A source key counts as used when its tensor (its storage) reached the converted dict, or
    ``by_name`` says diffusers split it (OpenCLIP's fused ``in_proj``); a key of ``model`` that the
    converted dict does not fill is an error naming it.
    """
    group = ledger.group(prefix)
    converted = {k: v for k, v in convert(group).items() if v is not None}
    reached = {_storage(v) for v in converted.values()}
    for key, value in group.items():
        if _storage(value) in reached or by_name(key):
            ledger.used.add(key)
    expected = set(model.state_dict())
    missing, unexpected = sorted(expected - set(converted)), sorted(set(converted) - expected)
    if missing:
        raise InputError(f"{ledger.source}: missing key for the {part}: nothing under {prefix} gives its "
                         f"{missing[0]} ({len(missing)} missing)")
    if unexpected:
        tensor = converted[unexpected[0]]
        source = next((k for k, v in group.items() if _storage(v) == _storage(tensor)), f"a key under {prefix}")
        raise InputError(f"{ledger.source}: unknown key {source}: it converts to {unexpected[0]}, which the {part} "
                         f"does not have")
    for key, value in converted.items():
        if value.shape != model.state_dict()[key].shape:
            raise InputError(f"{ledger.source}: {part} weight {key} has shape {tuple(value.shape)}, the config "
                             f"wants {tuple(model.state_dict()[key].shape)}")
    model.load_state_dict(converted, strict=True)


def _extras(ledger: _Ledger, prefix: str) -> dict[str, dict[str, torch.Tensor]]:
    """Their additions inside ``prefix``'s transformer blocks, by LDM block path; taken from the ledger."""
    found: dict[str, dict[str, torch.Tensor]] = {}
    for key in list(ledger.group(prefix)):
        match = _EXTRA.match(key[len(prefix):])
        if match:
            found.setdefault(match.group("block"), {})[match.group("name")] = ledger.take(key)
    return found


def _map_extras(ledger: _Ledger, prefix: str, extras: dict[str, dict[str, torch.Tensor]], model: torch.nn.Module,
                self_attention: torch.nn.ModuleDict, hpa: torch.nn.ModuleDict, layers_per_block: int) -> None:
    """Positional tables, transposed attentions and HPA output layers onto our additions."""
    expected = {name: False for name in list(self_attention) + list(hpa)}
    for block, weights in extras.items():
        layer = _diffusers_block(block, layers_per_block)
        source = f"{prefix}{block}"
        # 1. the image K/V: this project's HPA reads the image token with the layer's own to_k/to_v
        for ip, own in (("attn2.to_k_ip.weight", "to_k"), ("attn2.to_v_ip.weight", "to_v")):
            if ip not in weights:
                raise InputError(f"{ledger.source}: missing key {source}.{ip}")
            frozen = getattr(model.get_submodule(f"{layer}.attn2"), own).weight
            if not torch.equal(weights.pop(ip), frozen.detach()):
                raise InputError(
                    f"{ledger.source}: {source}.{ip} differs from {source}.attn2.{own}.weight: their HPA gives "
                    f"the image token its own {own} projection, which this project's HPA (the layer's frozen "
                    f"{own}, paper §3.3) cannot hold")
        # 2. the HPA output layer (per head)
        adapter_key = _key(f"{layer}.attn2")
        if adapter_key not in hpa:
            raise InputError(f"{ledger.source}: {source}.attn2.to_out_ip: no cross-attention {layer}.attn2 here")
        adapter = hpa[adapter_key].to_out_image
        for name in ("weight", "bias"):
            value = weights.pop(f"attn2.to_out_ip.0.{name}", None)
            if value is None:
                raise InputError(f"{ledger.source}: missing key {source}.attn2.to_out_ip.0.{name}")
            _copy(ledger, f"{source}.attn2.to_out_ip.0.{name}", getattr(adapter, name), value)
        expected[adapter_key] = True
        # 3. positional table + transposed attention on attn1
        addition_key = _key(f"{layer}.attn1")
        if addition_key not in self_attention:
            raise InputError(f"{ledger.source}: {source}.attn1.position_emb: no self-attention additions at {layer}")
        addition = self_attention[addition_key]
        position = weights.pop("attn1.position_emb", None)
        if position is None:
            raise InputError(f"{ledger.source}: missing key {source}.attn1.position_emb")
        d, gh, gw = addition.pos_embed.shape[1:]
        if tuple(position.shape) != (gh * gw, d):
            raise InputError(f"{ledger.source}: {source}.attn1.position_emb has shape {tuple(position.shape)}, "
                             f"expected ({gh * gw}, {d}): a {gh}×{gw} grid of head width {d}")
        # theirs: (h·w, d), tokens row-major; ours: (1, d, h, w)
        _copy(ledger, f"{source}.attn1.position_emb", addition.pos_embed, position.T.reshape(1, d, gh, gw))
        for theirs, ours in _TRANSPOSED.items():
            value = weights.pop(theirs, None)
            if value is None:
                raise InputError(f"{ledger.source}: missing key {source}.{theirs}")
            _copy(ledger, f"{source}.{theirs}", addition.transposed.get_parameter(ours), value)
        expected[addition_key] = True
        if weights:
            raise InputError(f"{ledger.source}: unknown key {source}.{sorted(weights)[0]}")
    missing = sorted(k for k, done in expected.items() if not done)
    if missing:
        block = missing[0].replace("-", ".")
        raise InputError(f"{ledger.source}: missing keys under {prefix}: no position_emb / attnT / to_out_ip for "
                         f"{block}")


def _copy(ledger: _Ledger, source: str, target: torch.nn.Parameter, value: torch.Tensor) -> None:
    if target.shape != value.shape:
        raise InputError(f"{ledger.source}: {source} has shape {tuple(value.shape)}, expected {tuple(target.shape)}")
    with torch.no_grad():
        target.copy_(value.to(target.dtype))


def _check_same(ledger: _Ledger, copy_prefix: str, of_prefix: str, what: str) -> None:
    """Drop a group that must be a copy of another (``cond_encoder`` = the VAE encoder)."""
    for key, value in ledger.group(copy_prefix).items():
        original = of_prefix + key[len(copy_prefix):]
        if original not in ledger.state or not torch.equal(value, ledger.state[original]):
            raise InputError(f"{ledger.source}: {key} differs from {original}: their {what} was trained apart from "
                             f"the VAE, and this pipeline encodes the LQ with its VAE")
        ledger.used.add(key)


def convert_authors_checkpoint(
    checkpoint: str | Path,
    out_dir: str | Path,
    *,
    config_dir: str | Path | None = None,
    clip_model_name: str = "ViT-H-14",
    defaults: dict[str, Any] | None = None,
) -> Path:
    """Convert ``ConsisSR.ckpt`` (the authors' ControlLDM) into a saved ``ConsisSRPipeline`` at ``out_dir``.

    Args:
        checkpoint: their Lightning checkpoint (``{"state_dict": ...}`` or a bare state dict).
        out_dir: the pipeline folder to write (``consissr upscale --model out_dir``).
        config_dir: SD-layout configs (``unet/``, ``vae/``, ``text_encoder/`` ``config.json``);
            default: the packaged SD 2.1-base ones.
        clip_model_name: the open_clip architecture of their image tower (ViT-H-14).
        defaults: InferenceParams fields over ``AUTHORS_DEFAULTS``.
    """
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import (
        convert_controlnet_checkpoint,
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
        convert_open_clip_checkpoint,
    )
    from transformers import CLIPTextConfig, CLIPTextModel

    from consissr.inference.pipeline import ConsisSRPipeline
    from consissr.models.backbone import SD21_BASE_CONFIG_DIR, SD_SCHEDULE, load_vae_config
    from consissr.models.consissr import ConsisSRNet, build_controlnet
    from consissr.models.robust_clip import RobustCLIP

    checkpoint, config_dir = Path(checkpoint), Path(config_dir or SD21_BASE_CONFIG_DIR)
    ledger = _Ledger(_read_ckpt(checkpoint), str(checkpoint))
    state = ledger.state

    # 0. what is dropped, and the checks behind dropping it
    unet_config = UNet2DConditionModel.load_config(config_dir, subfolder="unet")
    vae_config = load_vae_config(str(config_dir))  # AutoencoderKL's defaults filled in (scaling_factor)
    text_config = CLIPTextConfig.from_pretrained(config_dir / "text_encoder")
    scheduler = DDPMScheduler(**SD_SCHEDULE)
    if "betas" in state and not torch.allclose(state["betas"].double(), scheduler.betas.double(), atol=1e-6):
        raise InputError(f"{checkpoint}: betas is not SD 2.1's schedule (linear 0.00085 → 0.012 in √β, 1000 steps)")
    if "scale_factor" in state and abs(float(state["scale_factor"]) - vae_config["scaling_factor"]) > 1e-6:
        raise InputError(f"{checkpoint}: scale_factor {float(state['scale_factor'])} != the VAE config's "
                         f"scaling_factor {vae_config['scaling_factor']}")
    for key in state:
        if key in DROPPED or key.startswith(tuple(DROPPED_PREFIXES)):
            ledger.used.add(key)
    last = f"{OPEN_CLIP}transformer.resblocks.{text_config.num_hidden_layers}."
    for key in ledger.group(last):  # SD 2.1 reads the penultimate layer: the last is unused
        ledger.used.add(key)
    _check_same(ledger, COND_ENCODER + "encoder.", VAE + "encoder.", "condition encoder")
    _check_same(ledger, COND_ENCODER + "quant_conv.", VAE + "quant_conv.", "condition encoder")

    # 1. SD parts through diffusers' own LDM converters
    unet = UNet2DConditionModel.from_config(unet_config)
    layers = unet.config.layers_per_block
    unet_extras, control_extras = _extras(ledger, UNET), _extras(ledger, CONTROL)
    _convert_part(ledger, "UNet", UNET, unet, lambda g: convert_ldm_unet_checkpoint(g, unet.config))
    vae = AutoencoderKL.from_config(vae_config)
    _convert_part(ledger, "VAE", VAE, vae, lambda g: convert_ldm_vae_checkpoint(g, vae.config))
    text_encoder = CLIPTextModel(text_config)
    bare = not any(k.startswith("text_model.") for k in text_encoder.state_dict())  # transformers 5: no wrapper
    _convert_part(ledger, "text encoder", OPEN_CLIP, text_encoder,
                  lambda g: {k[len("text_model."):] if bare and k.startswith("text_model.") else k: v
                             for k, v in convert_open_clip_checkpoint(
                                 text_encoder, {k: v for k, v in g.items() if not k.startswith(VISUAL)}).items()},
                  by_name=lambda k: k.startswith(OPEN_CLIP + "transformer.") and ".attn.in_proj_" in k)
    controlnet = build_controlnet(unet, "latent_authors")
    _convert_part(ledger, "ControlNet", CONTROL, controlnet,
                  lambda g: convert_controlnet_checkpoint(g, {"layers_per_block": layers}))

    # 2. the robust CLIP image tower (open_clip names, as is)
    clip = RobustCLIP(model_name=clip_model_name, with_teacher=False)
    visual = {k[len(VISUAL):]: ledger.take(k) for k in list(ledger.group(VISUAL))}
    ours = clip.student.state_dict()
    for key in sorted(set(ours) - set(visual)):
        raise InputError(f"{checkpoint}: missing key {VISUAL}{key}")
    for key in sorted(set(visual) - set(ours)):
        raise InputError(f"{checkpoint}: unknown key {VISUAL}{key} (not in open_clip's {clip_model_name})")
    for key, value in visual.items():
        if value.shape != ours[key].shape:
            raise InputError(f"{checkpoint}: {VISUAL}{key} has shape {tuple(value.shape)}, "
                             f"{clip_model_name} has {tuple(ours[key].shape)}")
    clip.student.load_state_dict(visual, strict=True)

    # 3. the net: their structure (authors' forms), then their additions
    head = {k[len(HEAD):]: ledger.take(k) for k in list(ledger.group(HEAD))}
    grid = _grid(ledger, unet_extras)
    net = ConsisSRNet(unet, controlnet, image_embed_dim=clip.embed_dim, num_image_tokens=_head_tokens(head, unet),
                      hpa_scale=1.0, pos_embed=True, pos_embed_grid=grid, transposed_attention=True,
                      controlnet_conditioning="latent_authors", image_tokens="authors_mlp",
                      controlnet_self_attention=True, transposed_attention_form="authors")
    _map_extras(ledger, UNET, unet_extras, unet, net.self_attention, net.hpa_unet, layers)
    _map_extras(ledger, CONTROL, control_extras, controlnet, net.self_attention_controlnet, net.hpa_controlnet, layers)
    targets = {f"{index}.{name}": f"{ours}.{name}" for index, ours in HEAD_MAP.items() for name in ("weight", "bias")}
    for theirs, ours_name in targets.items():
        if theirs not in head:
            raise InputError(f"{checkpoint}: missing key {HEAD}{theirs}")
        _copy(ledger, HEAD + theirs, net.image_proj.get_parameter(ours_name), head.pop(theirs))
    if head:
        raise InputError(f"{checkpoint}: unknown key {HEAD}{sorted(head)[0]}")
    ledger.check_all_used()
    net.training_info = {"source": "authors", "checkpoint": checkpoint.name}

    # 4. the pipeline, with their inference defaults
    tokenizer = _tokenizer()
    pipe = ConsisSRPipeline(vae, text_encoder, tokenizer, scheduler, net.eval(), clip.eval(), None,
                            defaults={**AUTHORS_DEFAULTS, **(defaults or {})}, training_info=net.training_info)
    return pipe.save_pretrained(out_dir)


def _grid(ledger: _Ledger, unet_extras: dict[str, dict[str, torch.Tensor]]) -> int:
    """The training latent side, from the first input level's positional table (theirs: 64 = 512 / 8)."""
    first = unet_extras.get("input_blocks.1.1.transformer_blocks.0", {}).get("attn1.position_emb")
    if first is None:
        raise InputError(f"{ledger.source}: missing key {UNET}input_blocks.1.1.transformer_blocks.0.attn1.position_emb")
    side = int(round(first.shape[0] ** 0.5))
    if side * side != first.shape[0]:
        raise InputError(f"{ledger.source}: {UNET}input_blocks.1.1.transformer_blocks.0.attn1.position_emb: "
                         f"{first.shape[0]} positions is not a square grid")
    return side


def _head_tokens(head: dict[str, torch.Tensor], unet) -> int:
    """N image tokens of their head: ft_layers_4.1 is Linear(D → N·C)."""
    weight = head.get("1.weight")
    if weight is None:
        raise InputError(f"missing key {HEAD}1.weight")
    return max(1, weight.shape[0] // unet.config.cross_attention_dim)


def _tokenizer():
    """SD 2.1's tokenizer (OpenCLIP's BPE, as their ``open_clip.tokenize``), built offline."""
    import tempfile

    from transformers import CLIPTokenizer

    from consissr.models.backbone import _clip_tokenizer_files

    with tempfile.TemporaryDirectory() as tmp:
        _clip_tokenizer_files(Path(tmp))
        return CLIPTokenizer.from_pretrained(tmp, pad_token="!", model_max_length=77, local_files_only=True)
