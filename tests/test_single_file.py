"""backbone.pretrained as one SD 2.1 checkpoint file in the original LDM layout (issue 20, point 2).

Tiny diffusers models (SD's shapes: layers_per_block 2, cross-attention and plain blocks, a VAE with
mid-block attention, a 2-layer CLIP text transformer) are written back to the LDM names with this
test's own map, written from the LDM naming (CompVis' ``openaimodel.py``, ``model.py`` and
OpenCLIP's ``transformer.py``), not from diffusers' tables: a wrong conversion fails here.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from consissr.errors import InputError, MissingInputError, ParamsError
from consissr.models import backbone as bb
from consissr.models import single_file as sf

UNET_CONFIG = dict(
    sample_size=8, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(32, 32, 64),
    norm_num_groups=8, down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), mid_block_type="UNetMidBlock2DCrossAttn",
    cross_attention_dim=64, attention_head_dim=(4, 4, 4), use_linear_projection=True)
VAE_CONFIG = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
    down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
    block_out_channels=(16, 32, 32), norm_num_groups=8, sample_size=32)  # mid-block attention: the default
TEXT_CONFIG = dict(
    vocab_size=49408, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    max_position_embeddings=77, projection_dim=64, hidden_act="gelu")


# --------------------------------------------------------------------------------------------
# the test's own diffusers → LDM map
# --------------------------------------------------------------------------------------------
UNET_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
               "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
VAE_RESNET = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2", "conv_shortcut": "nin_shortcut"}
VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _rename(mapping: dict[str, str]):
    def rename(suffix: str) -> str:
        for new, old in mapping.items():
            if suffix.startswith(new + "."):
                return old + suffix[len(new):]
        raise AssertionError(f"no LDM name for {suffix}")
    return rename


def _same(suffix: str) -> str:
    return suffix


def _apply(state: dict, pairs: list[tuple[str, str, object]], ldm_prefix: str) -> dict:
    out = {}
    for key, value in state.items():
        hits = [(d, ldm, fn) for d, ldm, fn in pairs if key.startswith(d)]
        assert len(hits) == 1, f"{key}: {len(hits)} LDM names in the test's map"
        d, ldm, fn = hits[0]
        name = ldm + fn(key[len(d):])
        out[ldm_prefix + name] = value.clone()
    return out


def unet_to_ldm(state: dict, cfg: dict) -> dict:
    """openaimodel.UNetModel: input_blocks[0] = conv_in, then per level ``layers`` (ResBlock,
    SpatialTransformer) and a Downsample (``op``) but the last; middle_block = ResBlock, transformer,
    ResBlock; output_blocks per level ``layers + 1`` (ResBlock, transformer) and an Upsample (``conv``)
    after the last one of every level but the last; out = GroupNorm, SiLU, conv."""
    n, layers = len(cfg["block_out_channels"]), cfg["layers_per_block"]
    res = _rename(UNET_RESNET)
    pairs = [("time_embedding.linear_1.", "time_embed.0.", _same), ("time_embedding.linear_2.", "time_embed.2.", _same),
             ("conv_in.", "input_blocks.0.0.", _same), ("conv_norm_out.", "out.0.", _same),
             ("conv_out.", "out.2.", _same),
             ("mid_block.resnets.0.", "middle_block.0.", res), ("mid_block.attentions.0.", "middle_block.1.", _same),
             ("mid_block.resnets.1.", "middle_block.2.", res)]
    for b in range(n):
        for j in range(layers):
            i = 1 + b * (layers + 1) + j
            pairs += [(f"down_blocks.{b}.resnets.{j}.", f"input_blocks.{i}.0.", res),
                      (f"down_blocks.{b}.attentions.{j}.", f"input_blocks.{i}.1.", _same)]
        pairs.append((f"down_blocks.{b}.downsamplers.0.conv.", f"input_blocks.{1 + b * (layers + 1) + layers}.0.op.",
                      _same))
        for j in range(layers + 1):
            i = b * (layers + 1) + j
            pairs += [(f"up_blocks.{b}.resnets.{j}.", f"output_blocks.{i}.0.", res),
                      (f"up_blocks.{b}.attentions.{j}.", f"output_blocks.{i}.1.", _same)]
        last = b * (layers + 1) + layers
        slot = 2 if cfg["up_block_types"][b].startswith("CrossAttn") else 1
        pairs.append((f"up_blocks.{b}.upsamplers.0.conv.", f"output_blocks.{last}.{slot}.conv.", _same))
    return _apply(state, pairs, "model.diffusion_model.")


def vae_to_ldm(state: dict, cfg: dict) -> dict:
    """ldm.modules.diffusionmodules.model Encoder/Decoder: down[i].block[j] / downsample.conv,
    mid.block_1 / attn_1 (1x1 convs q, k, v, proj_out) / block_2, norm_out; the decoder's up[] is
    indexed from the lowest resolution's end (up[n-1] runs first)."""
    n, layers = len(cfg["block_out_channels"]), cfg["layers_per_block"]
    res, attn = _rename(VAE_RESNET), _rename(VAE_ATTENTION)
    pairs = [("quant_conv.", "quant_conv.", _same), ("post_quant_conv.", "post_quant_conv.", _same)]
    for part in ("encoder", "decoder"):
        pairs += [(f"{part}.conv_in.", f"{part}.conv_in.", _same), (f"{part}.conv_out.", f"{part}.conv_out.", _same),
                  (f"{part}.conv_norm_out.", f"{part}.norm_out.", _same),
                  (f"{part}.mid_block.resnets.0.", f"{part}.mid.block_1.", res),
                  (f"{part}.mid_block.resnets.1.", f"{part}.mid.block_2.", res),
                  (f"{part}.mid_block.attentions.0.", f"{part}.mid.attn_1.", attn)]
    for i in range(n):
        pairs += [(f"encoder.down_blocks.{i}.resnets.{j}.", f"encoder.down.{i}.block.{j}.", res) for j in range(layers)]
        pairs.append((f"encoder.down_blocks.{i}.downsamplers.0.conv.", f"encoder.down.{i}.downsample.conv.", _same))
        pairs += [(f"decoder.up_blocks.{i}.resnets.{j}.", f"decoder.up.{n - 1 - i}.block.{j}.", res)
                  for j in range(layers + 1)]
        pairs.append((f"decoder.up_blocks.{i}.upsamplers.0.conv.", f"decoder.up.{n - 1 - i}.upsample.conv.", _same))
    ldm = _apply(state, pairs, "first_stage_model.")
    for key, value in ldm.items():  # the attention's projections are 1x1 convolutions in LDM
        if ".mid.attn_1." in key and key.endswith("weight") and ".norm." not in key:
            ldm[key] = value.reshape(*value.shape, 1, 1)
    return ldm


def text_to_openclip(state: dict, cfg: dict, projection: torch.Tensor) -> dict:
    """OpenCLIP's text tower: token_embedding, positional_embedding (a Parameter), transformer.resblocks[i]
    (ln_1, attn = nn.MultiheadAttention with q, k, v stacked in in_proj, ln_2, mlp.c_fc / c_proj), ln_final,
    text_projection (a Parameter, width x embed_dim)."""
    p = "cond_stage_model.model."
    out = {p + "token_embedding.weight": state["embeddings.token_embedding.weight"],
           p + "positional_embedding": state["embeddings.position_embedding.weight"],
           p + "ln_final.weight": state["final_layer_norm.weight"], p + "ln_final.bias": state["final_layer_norm.bias"],
           p + "text_projection": projection}
    used = {"embeddings.token_embedding.weight", "embeddings.position_embedding.weight", "final_layer_norm.weight",
            "final_layer_norm.bias"}
    for i in range(cfg["num_hidden_layers"]):
        d, o = f"encoder.layers.{i}.", f"{p}transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            qkv = [f"{d}self_attn.{q}_proj.{kind}" for q in "qkv"]
            out[f"{o}attn.in_proj_{kind}"] = torch.cat([state[k] for k in qkv])
            used.update(qkv)
            for new, old in (("ln_1", "layer_norm1"), ("ln_2", "layer_norm2"), ("attn.out_proj", "self_attn.out_proj"),
                             ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2")):
                out[f"{o}{new}.{kind}"] = state[f"{d}{old}.{kind}"]
                used.add(f"{d}{old}.{kind}")
    assert used == {k for k in state if not k.endswith("position_ids")}, "the test's OpenCLIP map misses a weight"
    return {k: v.clone() for k, v in out.items()}


# --------------------------------------------------------------------------------------------
# fixtures
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny models, their config dir (the packaged one's shape) and the LDM files written from them."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    root = tmp_path_factory.mktemp("single_file")
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**UNET_CONFIG)
    vae = AutoencoderKL(**VAE_CONFIG)
    text = CLIPTextModel(CLIPTextConfig(**TEXT_CONFIG))
    with torch.no_grad():  # GroupNorm / LayerNorm start at 1 and 0: make every weight distinct
        for model in (unet, vae, text):
            for param in model.parameters():
                param.add_(torch.randn_like(param) * 0.01)
    configs = root / "configs"
    unet.save_config(configs / "unet")
    vae.save_config(configs / "vae")
    text.config.save_pretrained(configs / "text_encoder")
    ldm = {**unet_to_ldm(unet.state_dict(), UNET_CONFIG), **vae_to_ldm(vae.state_dict(), VAE_CONFIG),
           **text_to_openclip(text.state_dict(), TEXT_CONFIG, torch.randn(64, 64)),
           "betas": torch.linspace(1e-4, 2e-2, 1000), "alphas_cumprod": torch.rand(1000)}  # the DDPM buffers SD ships
    ckpt, safe = root / "v2-1_tiny-ema-pruned.ckpt", root / "v2-1_tiny-ema-pruned.safetensors"
    torch.save({"state_dict": ldm, "global_step": 110000}, ckpt)
    save_file({k: v.contiguous() for k, v in ldm.items()}, str(safe))
    return dict(unet=unet, vae=vae, text=text, configs=configs, ldm=ldm, ckpt=ckpt, safe=safe, root=root)


@pytest.fixture
def tiny_configs(tiny, monkeypatch):
    """Point the single-file loader at the tiny configs (the packaged SD 2.1-base ones otherwise)."""
    monkeypatch.setattr(bb, "SD21_BASE_CONFIG_DIR", tiny["configs"])
    return tiny


def assert_same_weights(loaded, original) -> None:
    got, want = loaded.state_dict(), original.state_dict()
    assert sorted(got) == sorted(want)
    different = [k for k in want if not torch.equal(got[k], want[k])]
    assert not different, different[:5]


# --------------------------------------------------------------------------------------------
# loading
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["ckpt", "safe"])
def test_an_ldm_file_loads_every_weight_of_unet_vae_and_text_encoder(tiny, kind, monkeypatch):
    reads = []
    real_read = sf.read_checkpoint
    monkeypatch.setattr(sf, "read_checkpoint", lambda *a, **k: reads.append(a) or real_read(*a, **k))
    out = sf.load_backbone(tiny[kind], config_dir=tiny["configs"])
    assert len(reads) == 1  # one read for the three parts
    assert_same_weights(out.unet, tiny["unet"])
    assert_same_weights(out.vae, tiny["vae"])
    assert_same_weights(out.text_encoder, tiny["text"])
    assert out.source == str(tiny[kind])
    assert not any(p.requires_grad for m in (out.unet, out.vae, out.text_encoder) for p in m.parameters())
    # the text encoder computes what the original does (the causal mask and q/k/v split included)
    ids = torch.tensor([[49406, 320, 1125, 49407] + [0] * 4])
    with torch.no_grad():
        assert torch.equal(out.text_encoder(ids).last_hidden_state, tiny["text"](ids).last_hidden_state)


def test_the_tokenizer_is_openclips_and_the_scheduler_sds(tiny_configs):
    import open_clip

    out = bb.load_backbone(str(tiny_configs["safe"]))
    text = "a photo of a cat, high resolution"
    ids = out.tokenizer(text, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    assert torch.equal(ids, open_clip.tokenize([text]))  # OpenCLIP pads with 0, SD's tokenizer with "!" = id 0
    s = out.noise_scheduler.config
    assert (s.num_train_timesteps, s.beta_start, s.beta_end, s.beta_schedule, s.prediction_type) == (
        1000, 0.00085, 0.012, "scaled_linear", "epsilon")


def test_load_vae_routes_a_file_and_the_packaged_vae_config_has_sds_scaling(tiny_configs, monkeypatch):
    assert_same_weights(bb.load_vae(str(tiny_configs["ckpt"])), tiny_configs["vae"])
    monkeypatch.undo()  # the packaged SD 2.1-base configs
    config = bb.load_vae_config(str(tiny_configs["ckpt"]))
    assert config["scaling_factor"] == 0.18215 and config["latent_channels"] == 4
    assert config["block_out_channels"] == [128, 256, 512, 512]


def test_the_packaged_sd21_configs_reject_a_file_of_other_shapes(tiny):
    """The tiny file against SD 2.1-base's real configs: a shape mismatch, named by file and part."""
    with pytest.raises(InputError, match=r"v2-1_tiny-ema-pruned\.safetensors.*UNet.*unet/config\.json"):
        sf.load_backbone(tiny["safe"])


# --------------------------------------------------------------------------------------------
# refusals
# --------------------------------------------------------------------------------------------
class Marker:
    """Harmless, but not a tensor: unpickling it would run ``__setstate__`` (it writes a file)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __setstate__(self, state: dict) -> None:
        Path(state["path"]).write_text("code ran")
        self.__dict__.update(state)


def test_a_ckpt_with_a_foreign_object_is_refused_by_type_and_its_code_never_runs(tiny, tmp_path):
    marker = tmp_path / "marker"
    path = tmp_path / "trap.ckpt"
    torch.save({"state_dict": tiny["ldm"], "callbacks": Marker(str(marker))}, path)
    with pytest.raises(sf.UnsafeCheckpointError, match=rf"trap\.ckpt.*{Marker.__module__}\.Marker") as err:
        sf.read_checkpoint(path)
    assert isinstance(err.value, InputError)
    assert not marker.exists()
    with pytest.raises(sf.UnsafeCheckpointError, match="Marker"):
        sf.check_checkpoint(path)  # stage backbone's memory-mapped check refuses it as well
    assert not marker.exists()
    torch.load(path, weights_only=False)  # the trap is real: an unsafe load would have run it
    assert marker.read_text() == "code ran"


def test_a_lightning_namespace_is_named_too(tiny, tmp_path):
    path = tmp_path / "hparams.ckpt"
    torch.save({"state_dict": {"x": torch.zeros(1)}, "hyper_parameters": argparse.Namespace(lr=1e-4)}, path)
    with pytest.raises(sf.UnsafeCheckpointError, match=r"hparams\.ckpt.*argparse\.Namespace"):
        sf.load_backbone(path)


@pytest.mark.parametrize("drop, missing", [
    ("model.diffusion_model.", "model.diffusion_model."),
    ("first_stage_model.", "first_stage_model."),
    ("cond_stage_model.model.", "cond_stage_model.model."),
])
def test_a_file_without_a_parts_prefix_fails_naming_it(tiny, tmp_path, drop, missing):
    path = tmp_path / "partial.safetensors"
    save_file({k: v.contiguous() for k, v in tiny["ldm"].items() if not k.startswith(drop)}, str(path))
    with pytest.raises(InputError, match=rf"partial\.safetensors: no {missing}"):
        sf.load_backbone(path, config_dir=tiny["configs"])
    with pytest.raises(InputError, match=rf"partial\.safetensors: no {missing}"):
        sf.check_checkpoint(path)


@pytest.mark.parametrize("hole, part, name", [
    ("model.diffusion_model.out.2.weight", "UNet", "conv_out.weight"),
    ("first_stage_model.decoder.up.0.block.2.conv1.bias", "VAE", "decoder.up_blocks.2.resnets.2.conv1.bias"),
    ("cond_stage_model.model.ln_final.weight", "text encoder", "final_layer_norm.weight"),
])
def test_a_missing_weight_is_named_not_left_uninitialised(tiny, tmp_path, hole, part, name):
    path = tmp_path / "holed.ckpt"
    torch.save({k: v for k, v in tiny["ldm"].items() if k != hole}, path)
    with pytest.raises(InputError, match=rf"holed\.ckpt: the {part} lacks 1 weights.*\(e\.g\. {name}\)"):
        sf.load_backbone(path, config_dir=tiny["configs"])


def test_a_missing_file_and_a_wrong_suffix_are_named(tmp_path):
    with pytest.raises(MissingInputError, match=r"nowhere\.ckpt: no such checkpoint file"):
        sf.read_checkpoint(tmp_path / "nowhere.ckpt")
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(InputError, match=r"weights\.bin: a single-file checkpoint must end in \.ckpt or \.safetensors"):
        sf.read_checkpoint(tmp_path / "weights.bin")
    (tmp_path / "junk.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(InputError, match=r"junk\.ckpt: not a readable torch checkpoint"):
        sf.read_checkpoint(tmp_path / "junk.ckpt")


# --------------------------------------------------------------------------------------------
# params → stage backbone → every stage's load_backbone
# --------------------------------------------------------------------------------------------
def test_backbone_pretrained_takes_the_file_through_validation_and_the_backbone_stage(tiny_configs, tmp_path):
    from consissr.config import params_from_dict
    from consissr.inference.pipeline import _backbone_source

    ckpt = str(tiny_configs["ckpt"])
    params = params_from_dict({"backbone": {"pretrained": ckpt}})
    out = bb.write_backbone(params.backbone, out_dir=tmp_path / "bb", seed=0)
    assert json.loads((out / "source.json").read_text()) == {"pretrained": ckpt, "revision": None}
    source, revision = _backbone_source(out)
    loaded = bb.load_backbone(source, revision=revision)
    assert_same_weights(loaded.unet, tiny_configs["unet"])
    assert_same_weights(loaded.vae, tiny_configs["vae"])
    assert_same_weights(loaded.text_encoder, tiny_configs["text"])

    with pytest.raises(ParamsError, match="backbone.revision"):
        params_from_dict({"backbone": {"pretrained": ckpt, "revision": "main"}})
    with pytest.raises(ParamsError, match=r"backbone.pretrained: .*\.ckpt or \.safetensors"):
        params_from_dict({"backbone": {"pretrained": "/models/v2-1_512-ema-pruned.pth"}})


def test_the_backbone_stage_refuses_a_bad_file_before_recording_it(tiny, tmp_path):
    from consissr.config import BackboneParams

    path = tmp_path / "unet_only.safetensors"
    save_file({k: v.contiguous() for k, v in tiny["ldm"].items() if k.startswith("model.diffusion_model.")}, str(path))
    with pytest.raises(InputError, match=r"unet_only\.safetensors: no first_stage_model\. keys"):
        bb.write_backbone(BackboneParams(pretrained=str(path)), out_dir=tmp_path / "bb", seed=0)
    assert not (tmp_path / "bb").exists()
    with pytest.raises(MissingInputError, match=r"gone\.ckpt"):
        bb.write_backbone(BackboneParams(pretrained=str(tmp_path / "gone.ckpt")), out_dir=tmp_path / "bb", seed=0)


def test_sd21_base_scale_keys_and_shapes_convert_onto_the_packaged_configs():
    """SD 2.1-base's own layout (4 levels, 12 input blocks, 24 OpenCLIP blocks of which SD uses 23,
    text_projection) on the meta device: diffusers' converters give every weight of the packaged
    configs' models, each in its shape (what the tiny round trip cannot show at this scale)."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import (
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
        convert_open_clip_checkpoint,
    )
    from transformers import CLIPTextConfig, CLIPTextModel

    configs = bb.SD21_BASE_CONFIG_DIR
    unet_cfg = UNet2DConditionModel.load_config(configs, subfolder="unet")
    vae_cfg = AutoencoderKL.load_config(configs, subfolder="vae")
    text_cfg = CLIPTextConfig.from_pretrained(configs, subfolder="text_encoder")
    with init_empty_weights():
        unet, vae, text = UNet2DConditionModel.from_config(unet_cfg), AutoencoderKL.from_config(vae_cfg), CLIPTextModel(text_cfg)
    width = text_cfg.hidden_size
    openclip = text_to_openclip(text.state_dict(), text_cfg.to_dict(), torch.empty(width, 1024, device="meta"))
    last = "cond_stage_model.model.transformer.resblocks."
    openclip.update({k.replace(f"{last}22.", f"{last}23."): v for k, v in openclip.items() if k.startswith(f"{last}22.")})
    for model, converted in [
        (unet, convert_ldm_unet_checkpoint(unet_to_ldm(unet.state_dict(), unet_cfg), unet_cfg)),
        (vae, convert_ldm_vae_checkpoint(vae_to_ldm(vae.state_dict(), vae_cfg), vae_cfg)),
        (text, {k.removeprefix("text_model."): v for k, v in convert_open_clip_checkpoint(text, openclip).items()}),
    ]:
        want = {k: v.shape for k, v in model.state_dict().items() if not k.endswith("position_ids")}
        assert {k: v.shape for k, v in converted.items() if k in want} == want
        assert set(converted) <= set(want), sorted(set(converted) - set(want))[:5]
    assert sum(p.numel() for p in unet.parameters()) == 865_910_724
