"""`consissr convert-checkpoint`: the authors' ControlLDM checkpoint → a saved ConsisSRPipeline.

The checkpoint here is built from tiny versions of THEIR structure (github.com/Gujojo/ConsisSR:
``model/cldm.py``, ``ldm/modules/attention_new.py``, ``ldm/modules/encoders/modules.py``), with their
key names written out below, on the tiny backbone's shapes (UNet 32/64 channels, 1 res block a
level, attention at level 0 and the middle; 8-channel latent; 2(+1)-layer text tower).
"""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from consissr import cli
from consissr.errors import InputError

CTX, LATENT, EMB = 64, 8, 128  # cross-attention width, latent channels, time-embedding width
HEADS = 4


def _rand(*shape, gen):
    return torch.randn(*shape, generator=gen) * 0.05


def _resblock(sd, p, cin, cout, gen, emb=EMB):
    sd[f"{p}.in_layers.0.weight"], sd[f"{p}.in_layers.0.bias"] = 1 + _rand(cin, gen=gen), _rand(cin, gen=gen)
    sd[f"{p}.in_layers.2.weight"], sd[f"{p}.in_layers.2.bias"] = _rand(cout, cin, 3, 3, gen=gen), _rand(cout, gen=gen)
    sd[f"{p}.emb_layers.1.weight"], sd[f"{p}.emb_layers.1.bias"] = _rand(cout, emb, gen=gen), _rand(cout, gen=gen)
    sd[f"{p}.out_layers.0.weight"], sd[f"{p}.out_layers.0.bias"] = 1 + _rand(cout, gen=gen), _rand(cout, gen=gen)
    sd[f"{p}.out_layers.3.weight"], sd[f"{p}.out_layers.3.bias"] = _rand(cout, cout, 3, 3, gen=gen), _rand(cout, gen=gen)
    if cin != cout:
        sd[f"{p}.skip_connection.weight"] = _rand(cout, cin, 1, 1, gen=gen)
        sd[f"{p}.skip_connection.bias"] = _rand(cout, gen=gen)


def _linear(sd, p, cin, cout, gen, bias=True):
    sd[f"{p}.weight"] = _rand(cout, cin, gen=gen)
    if bias:
        sd[f"{p}.bias"] = _rand(cout, gen=gen)


def _layernorm(sd, p, c, gen):
    sd[f"{p}.weight"], sd[f"{p}.bias"] = 1 + _rand(c, gen=gen), _rand(c, gen=gen)


def _hybrid_transformer(sd, p, ch, spatial, gen):
    """Their HybridDecoupleTransformer (use_linear): attn1 + position_emb, attnT + normT, decoupled attn2."""
    dh = ch // HEADS
    _layernorm(sd, f"{p}.norm", ch, gen)  # GroupNorm: same two vectors
    _linear(sd, f"{p}.proj_in", ch, ch, gen)
    b = f"{p}.transformer_blocks.0"
    for name in ("to_q", "to_k", "to_v"):
        _linear(sd, f"{b}.attn1.{name}", ch, ch, gen, bias=False)
    _linear(sd, f"{b}.attn1.to_out.0", ch, ch, gen)
    sd[f"{b}.attn1.position_emb"] = _rand(spatial, dh, gen=gen)
    sd[f"{b}.attnT.to_qkv.weight"] = _rand(3 * ch, ch, 1, 1, gen=gen)
    sd[f"{b}.attnT.qkv_dwconv.weight"] = _rand(3 * ch, 1, 3, 3, gen=gen)
    _linear(sd, f"{b}.attnT.to_out.0", ch, ch, gen)
    _linear(sd, f"{b}.ff.net.0.proj", ch, 8 * ch, gen)  # GEGLU: 2 × 4·ch
    _linear(sd, f"{b}.ff.net.2", 4 * ch, ch, gen)
    _linear(sd, f"{b}.attn2.to_q", ch, ch, gen, bias=False)
    _linear(sd, f"{b}.attn2.to_k", CTX, ch, gen, bias=False)
    _linear(sd, f"{b}.attn2.to_v", CTX, ch, gen, bias=False)
    # their _load_from_state_dict copies to_k/to_v into the image K/V when absent: equal here
    sd[f"{b}.attn2.to_k_ip.weight"] = sd[f"{b}.attn2.to_k.weight"].clone()
    sd[f"{b}.attn2.to_v_ip.weight"] = sd[f"{b}.attn2.to_v.weight"].clone()
    _linear(sd, f"{b}.attn2.to_out.0", ch, ch, gen)
    _linear(sd, f"{b}.attn2.to_out_ip.0", dh, dh, gen)
    for norm in ("norm1", "normT", "norm2", "norm3"):
        _layernorm(sd, f"{b}.{norm}", ch, gen)
    _linear(sd, f"{p}.proj_out", ch, ch, gen)


def _encoder_half(sd, p, gen):
    """time_embed + input_blocks + middle_block (shared by their UNet and ControlNet)."""
    _linear(sd, f"{p}time_embed.0", 32, EMB, gen)
    _linear(sd, f"{p}time_embed.2", EMB, EMB, gen)
    sd[f"{p}input_blocks.0.0.weight"], sd[f"{p}input_blocks.0.0.bias"] = _rand(32, LATENT, 3, 3, gen=gen), _rand(32, gen=gen)
    _resblock(sd, f"{p}input_blocks.1.0", 32, 32, gen)
    _hybrid_transformer(sd, f"{p}input_blocks.1.1", 32, 32 * 32, gen)
    sd[f"{p}input_blocks.2.0.op.weight"], sd[f"{p}input_blocks.2.0.op.bias"] = _rand(32, 32, 3, 3, gen=gen), _rand(32, gen=gen)
    _resblock(sd, f"{p}input_blocks.3.0", 32, 64, gen)
    _resblock(sd, f"{p}middle_block.0", 64, 64, gen)
    _hybrid_transformer(sd, f"{p}middle_block.1", 64, 16 * 16, gen)
    _resblock(sd, f"{p}middle_block.2", 64, 64, gen)


def _vae_resnet(sd, p, cin, cout, gen):
    _layernorm(sd, f"{p}.norm1", cin, gen)
    sd[f"{p}.conv1.weight"], sd[f"{p}.conv1.bias"] = _rand(cout, cin, 3, 3, gen=gen), _rand(cout, gen=gen)
    _layernorm(sd, f"{p}.norm2", cout, gen)
    sd[f"{p}.conv2.weight"], sd[f"{p}.conv2.bias"] = _rand(cout, cout, 3, 3, gen=gen), _rand(cout, gen=gen)
    if cin != cout:
        sd[f"{p}.nin_shortcut.weight"], sd[f"{p}.nin_shortcut.bias"] = _rand(cout, cin, 1, 1, gen=gen), _rand(cout, gen=gen)


def _conv(sd, p, cin, cout, k, gen):
    sd[f"{p}.weight"], sd[f"{p}.bias"] = _rand(cout, cin, k, k, gen=gen), _rand(cout, gen=gen)


def authors_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """A tiny ControlLDM state dict with the authors' key names."""
    gen = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}
    # 1. UNet (model.diffusion_model.*): encoder half, output blocks, out
    u = "model.diffusion_model."
    _encoder_half(sd, u, gen)
    _resblock(sd, f"{u}output_blocks.0.0", 128, 64, gen)
    _resblock(sd, f"{u}output_blocks.1.0", 96, 64, gen)
    _conv(sd, f"{u}output_blocks.1.1.conv", 64, 64, 3, gen)  # Upsample (no attention at this level)
    _resblock(sd, f"{u}output_blocks.2.0", 96, 32, gen)
    _hybrid_transformer(sd, f"{u}output_blocks.2.1", 32, 32 * 32, gen)
    _resblock(sd, f"{u}output_blocks.3.0", 64, 32, gen)
    _hybrid_transformer(sd, f"{u}output_blocks.3.1", 32, 32 * 32, gen)
    _layernorm(sd, f"{u}out.0", 32, gen)
    _conv(sd, f"{u}out.2", 32, LATENT, 3, gen)
    # 2. ControlNet (control_model.*): encoder half, 8-conv latent hint block, zero convs
    c = "control_model."
    _encoder_half(sd, c, gen)
    hint = [LATENT, 16, 16, 32, 32, 96, 96, 256, 32]
    for i in range(8):
        _conv(sd, f"{c}input_hint_block.{2 * i}", hint[i], hint[i + 1], 3, gen)
    for i, ch in enumerate((32, 32, 32, 64)):
        _conv(sd, f"{c}zero_convs.{i}.0", ch, ch, 1, gen)
    _conv(sd, f"{c}middle_block_out.0", 64, 64, 1, gen)
    # 3. VAE (first_stage_model.*), LDM AutoencoderKL at the tiny backbone's shape: ch 16, mult (1, 2, 2)
    v = "first_stage_model."
    _conv(sd, f"{v}encoder.conv_in", 3, 16, 3, gen)
    _vae_resnet(sd, f"{v}encoder.down.0.block.0", 16, 16, gen)
    _conv(sd, f"{v}encoder.down.0.downsample.conv", 16, 16, 3, gen)
    _vae_resnet(sd, f"{v}encoder.down.1.block.0", 16, 32, gen)
    _conv(sd, f"{v}encoder.down.1.downsample.conv", 32, 32, 3, gen)
    _vae_resnet(sd, f"{v}encoder.down.2.block.0", 32, 32, gen)
    for part in ("encoder", "decoder"):
        _vae_resnet(sd, f"{v}{part}.mid.block_1", 32, 32, gen)
        _vae_resnet(sd, f"{v}{part}.mid.block_2", 32, 32, gen)
    _layernorm(sd, f"{v}encoder.norm_out", 32, gen)
    _conv(sd, f"{v}encoder.conv_out", 32, 2 * LATENT, 3, gen)
    _conv(sd, f"{v}quant_conv", 2 * LATENT, 2 * LATENT, 1, gen)
    _conv(sd, f"{v}post_quant_conv", LATENT, LATENT, 1, gen)
    _conv(sd, f"{v}decoder.conv_in", LATENT, 32, 3, gen)
    for level, (cin, cout) in {2: (32, 32), 1: (32, 32), 0: (32, 16)}.items():
        _vae_resnet(sd, f"{v}decoder.up.{level}.block.0", cin, cout, gen)
        _vae_resnet(sd, f"{v}decoder.up.{level}.block.1", cout, cout, gen)
        if level:
            _conv(sd, f"{v}decoder.up.{level}.upsample.conv", cout, cout, 3, gen)
    _layernorm(sd, f"{v}decoder.norm_out", 16, gen)
    _conv(sd, f"{v}decoder.conv_out", 16, 3, 3, gen)
    # their condition encoder: a copy of the VAE encoder
    for key in [k for k in sd if k.startswith((f"{v}encoder.", f"{v}quant_conv."))]:
        sd["cond_encoder." + key[len(v):]] = sd[key].clone()
    # 4. OpenCLIP (cond_stage_model.model.*): text tower of 3 layers (the last unused), visual tower
    t = "cond_stage_model.model."
    sd[f"{t}token_embedding.weight"] = _rand(49408, CTX, gen=gen)
    sd[f"{t}positional_embedding"] = _rand(77, CTX, gen=gen)
    for i in range(3):
        r = f"{t}transformer.resblocks.{i}"
        _layernorm(sd, f"{r}.ln_1", CTX, gen)
        sd[f"{r}.attn.in_proj_weight"], sd[f"{r}.attn.in_proj_bias"] = _rand(3 * CTX, CTX, gen=gen), _rand(3 * CTX, gen=gen)
        _linear(sd, f"{r}.attn.out_proj", CTX, CTX, gen)
        _layernorm(sd, f"{r}.ln_2", CTX, gen)
        _linear(sd, f"{r}.mlp.c_fc", CTX, 2 * CTX, gen)
        _linear(sd, f"{r}.mlp.c_proj", 2 * CTX, CTX, gen)
    _layernorm(sd, f"{t}ln_final", CTX, gen)
    sd[f"{t}text_projection"] = _rand(CTX, CTX, gen=gen)
    sd[f"{t}logit_scale"] = torch.tensor(math.log(1 / 0.07))
    import open_clip

    import consissr.models.robust_clip  # noqa: F401  (registers consissr-tiny-vit with open_clip)

    torch.manual_seed(seed)
    for key, value in open_clip.create_model("consissr-tiny-vit").visual.state_dict().items():
        sd[f"{t}visual.{key}"] = value + _rand(*value.shape, gen=gen)
    # 5. their image-token head: ft_layers_4 = LayerNorm, Linear, GELU, Reshape, Linear, GELU, zero Linear
    h = "cond_stage_model.ft_layers_4."
    _layernorm(sd, f"{h}0", CTX, gen)
    _linear(sd, f"{h}1", CTX, CTX, gen)
    _linear(sd, f"{h}4", CTX, CTX, gen)
    _linear(sd, f"{h}6", CTX, CTX, gen)
    # 6. LatentDiffusion buffers
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    sd["betas"], sd["alphas_cumprod"] = betas.float(), torch.cumprod(1 - betas, 0).float()
    sd["logvar"], sd["scale_factor"] = torch.zeros(1000), torch.tensor(1.0)  # the tiny VAE's scaling_factor
    return sd


def _save(sd, path):
    torch.save({"state_dict": sd, "global_step": 7, "hyper_parameters": {"learning_rate": 1e-4}}, path)
    return path


@pytest.fixture(scope="module")
def converted(tiny_backbone, tmp_path_factory):
    from consissr.models.convert_authors import convert_authors_checkpoint

    root = tmp_path_factory.mktemp("convert")
    sd = authors_state_dict()
    ckpt = _save(sd, root / "ConsisSR.ckpt")
    out = convert_authors_checkpoint(ckpt, root / "model", config_dir=tiny_backbone, clip_model_name="consissr-tiny-vit")
    return sd, out


def test_converts_strictly_and_puts_their_weights_where_they_belong(converted):
    from consissr.inference.pipeline import load_pipeline

    sd, out = converted
    pipe = load_pipeline(out, device="cpu")
    net = pipe.net
    # SD parts: a few weights at their diffusers places
    u, c = "model.diffusion_model.", "control_model."
    assert torch.equal(pipe.unet.conv_in.weight, sd[f"{u}input_blocks.0.0.weight"])
    assert torch.equal(pipe.unet.up_blocks[1].resnets[1].conv2.weight, sd[f"{u}output_blocks.3.0.out_layers.3.weight"])
    assert torch.equal(pipe.controlnet.controlnet_down_blocks[3].weight, sd[f"{c}zero_convs.3.0.weight"])
    assert torch.equal(pipe.controlnet.controlnet_cond_embedding.conv_out.weight, sd[f"{c}input_hint_block.14.weight"])
    assert torch.equal(pipe.vae.decoder.conv_out.weight, sd["first_stage_model.decoder.conv_out.weight"])
    t = "cond_stage_model.model."
    text = pipe.text_encoder.get_input_embeddings()
    assert torch.equal(text.weight, sd[f"{t}token_embedding.weight"])
    layers = [m for m in pipe.text_encoder.modules() if type(m).__name__ == "CLIPEncoderLayer"]
    assert len(layers) == 2  # the third (last) layer is dropped
    assert torch.equal(layers[1].self_attn.v_proj.bias,
                       sd[f"{t}transformer.resblocks.1.attn.in_proj_bias"][2 * CTX:])
    assert torch.equal(pipe.robust_clip.student.conv1.weight, sd[f"{t}visual.conv1.weight"])
    # their hint block keeps the latent's size: no conv is strided
    assert all(conv.stride == (1, 1) for conv in pipe.controlnet.controlnet_cond_embedding.blocks)
    # positional table: their row r·W + c of (H·W, d) is our [0, :, r, c]
    b = f"{u}input_blocks.1.1.transformer_blocks.0"
    table = net.self_attention["down_blocks-0-attentions-0-transformer_blocks-0-attn1"].pos_embed
    theirs = sd[f"{b}.attn1.position_emb"]
    assert table.shape == (1, 8, 32, 32)
    for r, col in ((0, 0), (0, 5), (3, 7), (31, 30)):
        assert torch.equal(table[0, :, r, col], theirs[r * 32 + col])
    mid = net.self_attention_controlnet["mid_block-attentions-0-transformer_blocks-0-attn1"]
    assert torch.equal(mid.transposed.qkv.weight, sd[f"{c}middle_block.1.transformer_blocks.0.attnT.to_qkv.weight"])
    assert torch.equal(mid.transposed.norm.bias, sd[f"{c}middle_block.1.transformer_blocks.0.normT.bias"])
    up = net.hpa_unet["up_blocks-1-attentions-1-transformer_blocks-0-attn2"].to_out_image
    assert torch.equal(up.weight, sd[f"{u}output_blocks.3.1.transformer_blocks.0.attn2.to_out_ip.0.weight"])
    assert torch.equal(net.image_proj.out.weight, sd["cond_stage_model.ft_layers_4.6.weight"])
    # their inference defaults
    d = pipe.defaults
    assert (d.guidance_scale, d.num_inference_steps, d.color_fix) == (5.0, 50, "adain")
    assert d.prompt == "clean, high-resolution, 8k" and d.negative_prompt == "dotted, noise, blur, lowres, smooth"


def test_their_transposed_attention_and_image_head_compute_as_theirs(converted):
    """Our modules against a reference written from their forward (attention_new.py / modules.py)."""
    from consissr.inference.pipeline import load_pipeline

    sd, out = converted
    net = load_pipeline(out, device="cpu").net
    b = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0"
    x = torch.randn(2, 16, 32, generator=torch.Generator().manual_seed(3))  # (B, h·w, C), a 4×4 map
    # theirs: normT, 1×1 conv + depthwise conv, heads over channels, softmax(q kᵀ / sqrt(h·w)) v, Linear
    xn = F.layer_norm(x, (32,), sd[f"{b}.normT.weight"], sd[f"{b}.normT.bias"])
    img = xn.transpose(1, 2).reshape(2, 32, 4, 4)
    qkv = F.conv2d(F.conv2d(img, sd[f"{b}.attnT.to_qkv.weight"]), sd[f"{b}.attnT.qkv_dwconv.weight"], padding=1,
                   groups=96)
    q, k, v = (t.flatten(2).reshape(2 * HEADS, 8, 16) for t in qkv.chunk(3, dim=1))
    attn = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(16), dim=-1)
    ref = (attn @ v).reshape(2, 32, 16).transpose(1, 2)
    ref = F.linear(ref, sd[f"{b}.attnT.to_out.0.weight"], sd[f"{b}.attnT.to_out.0.bias"])
    ours = net.self_attention["down_blocks-0-attentions-0-transformer_blocks-0-attn1"].transposed(x, 4, 4)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
    # their head: gelu(Linear(LN(e))) → (1, C) → gelu(Linear) → Linear
    h = "cond_stage_model.ft_layers_4."
    e = torch.randn(3, CTX, generator=torch.Generator().manual_seed(4))
    y = F.gelu(F.linear(F.layer_norm(e, (CTX,), sd[f"{h}0.weight"], sd[f"{h}0.bias"]), sd[f"{h}1.weight"], sd[f"{h}1.bias"]))
    y = F.linear(F.gelu(F.linear(y.view(3, 1, CTX), sd[f"{h}4.weight"], sd[f"{h}4.bias"])), sd[f"{h}6.weight"],
                 sd[f"{h}6.bias"])
    torch.testing.assert_close(net.image_tokens(e), y, rtol=1e-5, atol=1e-6)


def test_converted_pipeline_upscales(converted):
    from consissr.inference.pipeline import load_pipeline

    _, out = converted
    pipe = load_pipeline(out, device="cpu")
    pipe.set_progress_bar_config(disable=True)
    lq = np.random.default_rng(0).random((8, 12, 3), dtype=np.float32)
    image = pipe(lq, num_inference_steps=2, seed=0, output_type="np").images[0]
    assert image.shape == (32, 48, 3)
    assert np.isfinite(image).all() and image.min() >= 0.0 and image.max() <= 1.0
    assert image.std() > 0


@pytest.mark.parametrize("key", [
    "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.position_emb",
    "control_model.middle_block.1.transformer_blocks.0.attnT.to_out.0.bias",
    "cond_stage_model.ft_layers_4.6.weight",
    "cond_stage_model.model.visual.conv1.weight",
])
def test_a_missing_key_is_named(tiny_backbone, tmp_path, key):
    from consissr.models.convert_authors import convert_authors_checkpoint

    sd = authors_state_dict()
    del sd[key]
    with pytest.raises(InputError, match="missing key " + key.replace(".", r"\.")):
        convert_authors_checkpoint(_save(sd, tmp_path / "c.ckpt"), tmp_path / "m", config_dir=tiny_backbone,
                                   clip_model_name="consissr-tiny-vit")
    assert not (tmp_path / "m").exists()


def test_a_missing_sd_weight_is_named(tiny_backbone, tmp_path):
    """A UNet weight gone: the error names the UNet weight left without one."""
    from consissr.models.convert_authors import convert_authors_checkpoint

    sd = authors_state_dict()
    del sd["model.diffusion_model.output_blocks.1.1.conv.weight"]
    with pytest.raises(InputError, match=r"missing key for the UNet.*up_blocks\.0\.upsamplers\.0\.conv\."):
        convert_authors_checkpoint(_save(sd, tmp_path / "c.ckpt"), tmp_path / "m", config_dir=tiny_backbone,
                                   clip_model_name="consissr-tiny-vit")


@pytest.mark.parametrize("key", [
    "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn3.to_q.weight",
    "control_model.input_blocks.1.1.transformer_blocks.0.normX.weight",
    "cond_stage_model.ft_layers_4.8.weight",
    "some_new_module.weight",
])
def test_an_unknown_key_is_named(tiny_backbone, tmp_path, key):
    from consissr.models.convert_authors import convert_authors_checkpoint

    sd = authors_state_dict()
    sd[key] = torch.zeros(4, 4)
    with pytest.raises(InputError, match="unknown key.*" + key.replace(".", r"\.")):
        convert_authors_checkpoint(_save(sd, tmp_path / "c.ckpt"), tmp_path / "m", config_dir=tiny_backbone,
                                   clip_model_name="consissr-tiny-vit")


def test_an_image_kv_of_its_own_is_refused_by_name(tiny_backbone, tmp_path):
    """Their to_k_ip trained apart from to_k: our HPA (frozen to_k/to_v) cannot hold it."""
    from consissr.models.convert_authors import convert_authors_checkpoint

    sd = authors_state_dict()
    key = "control_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k_ip.weight"
    sd[key] = sd[key] + 0.01
    with pytest.raises(InputError, match=key.replace(".", r"\.") + " differs from"):
        convert_authors_checkpoint(_save(sd, tmp_path / "c.ckpt"), tmp_path / "m", config_dir=tiny_backbone,
                                   clip_model_name="consissr-tiny-vit")


def test_cli_names_a_bad_checkpoint(tmp_path, capsys):
    (tmp_path / "bad.ckpt").write_bytes(b"not a checkpoint")
    rc = cli.main(["convert-checkpoint", str(tmp_path / "bad.ckpt"), str(tmp_path / "out")])
    assert rc == 2
    assert "bad.ckpt" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
