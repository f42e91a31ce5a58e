"""ConsisSRNet: zero-init equivalence, trainable policy, any latent size, save/load, paper counts, HPA."""

from __future__ import annotations

import copy
import dataclasses
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
import torch.nn.functional as F

from consissr.config import ModelParams, Params
from consissr.errors import ParamsError
from consissr.models.backbone import build_tiny_backbone, tiny_unet_config
from consissr.models.consissr import ConsisSRNet, apply_trainable_policy
from consissr.models.hpa import IMAGE_TOKENS_KWARG, HybridPromptAttnProcessor
from consissr.models.info import SD21_BASE_UNET_CONFIG, SD21_BASE_UNET_PARAMETERS, model_info, print_model_info
from consissr.models.self_attention import ConsisSelfAttnProcessor, SelfAttentionAddition

EMBED_DIM = 64  # the tiny robust CLIP's image embedding width (= the tiny UNet's cross-attention width)
PARAMS = ModelParams(pos_embed_grid=16, num_image_tokens=4, image_tokens="ip_adapter")
PAPER_LITERAL = ModelParams(pos_embed_grid=16)  # clip_embedding tokens (the default)


@pytest.fixture(scope="module")
def backbone_dir(tmp_path_factory):
    return build_tiny_backbone(tmp_path_factory.mktemp("consissr") / "backbone", seed=0)


@pytest.fixture(scope="module")
def vanilla_unet(backbone_dir):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_pretrained(backbone_dir, subfolder="unet").eval()


def make_net(vanilla_unet, params: ModelParams = PARAMS) -> ConsisSRNet:
    return ConsisSRNet.from_backbone(copy.deepcopy(vanilla_unet), params, image_embed_dim=EMBED_DIM).eval()


def inputs(batch=2, height=16, width=16, seed=0, channels=None):
    g = torch.Generator().manual_seed(seed)
    channels = channels or tiny_unet_config()["in_channels"]  # the embedded VAE's latent channels
    return dict(
        noisy_latents=torch.randn(batch, channels, height, width, generator=g),
        t=torch.tensor([10, 700][:batch]),
        encoder_hidden_states=torch.randn(batch, 77, 64, generator=g),
        lq_cond=torch.randn(batch, channels, height, width, generator=g),
        image_embeds=torch.randn(batch, EMBED_DIM, generator=g),
    )


def unet_out(unet, x, tokens=None):
    kwargs = {IMAGE_TOKENS_KWARG: tokens} if tokens is not None else None
    return unet(x["noisy_latents"], x["t"], x["encoder_hidden_states"], cross_attention_kwargs=kwargs).sample


def randomize(module, seed=1, std=0.05):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * std)


@torch.no_grad()
@pytest.mark.parametrize("size,params", [
    ((16, 16), PARAMS), ((16, 24), PARAMS), ((8, 8), PARAMS),
    ((16, 24), dataclasses.replace(PAPER_LITERAL, controlnet_self_attention=True))])
def test_fresh_net_is_the_vanilla_unet_bit_for_bit(vanilla_unet, size, params):
    net = make_net(vanilla_unet, params)
    x = inputs(height=size[0], width=size[1])
    reference = unet_out(vanilla_unet, x)
    tokens = net.image_tokens(x["image_embeds"])
    assert torch.equal(unet_out(net.unet, x), reference)
    assert torch.equal(unet_out(net.unet, x, tokens), reference)
    # the whole net: zero HPA/additions and the ControlNet's zero convolutions
    assert torch.equal(net(**x), reference)
    assert torch.equal(net(**{**x, "image_embeds": None}), reference)


def test_one_step_trains_only_the_policy(vanilla_unet):
    net = make_net(vanilla_unet).train()
    trainable = apply_trainable_policy(net)
    names = {name for name, p in net.named_parameters() if p.requires_grad}
    assert {id(p) for p in trainable} == {id(p) for p in net.parameters() if p.requires_grad}
    # the policy: UNet frozen but its additions; ControlNet all but norm2/attn2 of its blocks
    assert not any(n.startswith("unet.") for n in names)
    assert any(n.startswith("self_attention.") for n in names) and any(n.startswith("image_proj.") for n in names)
    control = {n for n in names if n.startswith("controlnet.")}
    assert "controlnet.conv_in.weight" in control and "controlnet.controlnet_cond_embedding.conv_in.weight" in control
    assert any(".attn1.to_q." in n for n in control)
    assert not any(".attn2." in n or ".transformer_blocks.0.norm2." in n for n in control)
    assert any(".resnets.0.norm2." in n for n in control)  # the resnets' norm2 is not cross-attention

    optimizer = torch.optim.AdamW(trainable, lr=1e-3)
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    x = inputs(height=8, width=8)

    def step():
        optimizer.zero_grad(set_to_none=True)
        F.mse_loss(net(**x), torch.zeros_like(x["noisy_latents"])).backward()
        grads = {n: p.grad for n, p in net.named_parameters()}
        optimizer.step()
        return grads

    grads = step()
    assert all(grads[n] is None for n in before if n not in names)
    # every zero-initialised layer of the UNet gets gradient at once
    zero_init = [n for n in names if n.endswith(("pos_embed", "project_out.weight"))
                 or (n.startswith("hpa_unet.") and n.endswith("to_out_image.weight"))]
    assert len(zero_init) == 3 * 4  # 4 transformer blocks in the tiny UNet (1 down, 1 mid, 2 up)
    for n in zero_init:
        assert before[n].abs().max() == 0 and grads[n].abs().max() > 0, n
    changed = {n for n, p in net.named_parameters() if not torch.equal(p.detach(), before[n])}
    assert changed and changed <= names
    assert {n for n in zero_init} <= changed

    # the ControlNet's HPA layers sit behind its zero convolutions: gradient from the 2nd step
    grads = step()
    for n in names:
        if n.startswith("hpa_controlnet.") and n.endswith("to_out_image.weight"):
            assert grads[n].abs().max() > 0, n


@torch.no_grad()
def test_any_latent_size_with_trained_additions(vanilla_unet):
    net = make_net(vanilla_unet)
    randomize(net.self_attention)
    randomize(net.hpa_unet)
    for size in [(16, 24), (8, 8), (24, 16), (12, 20)]:
        x = inputs(height=size[0], width=size[1])
        out = net(**x)
        assert out.shape == x["noisy_latents"].shape and torch.isfinite(out).all()
        assert not torch.equal(unet_out(net.unet, x), unet_out(vanilla_unet, x))
    # the table is used as stored at its training grid, resized bilinearly elsewhere
    addition = next(a for a in net.self_attention.values() if a.grid == (16, 16))
    assert isinstance(addition, SelfAttentionAddition)
    table = addition.pos_embed
    at_grid = addition.positional(16, 16, torch.float32)
    assert torch.equal(at_grid[..., : table.shape[1]], table.flatten(2).transpose(1, 2))
    resized = F.interpolate(table, size=(8, 12), mode="bilinear", align_corners=False)
    assert torch.equal(addition.positional(8, 12, torch.float32)[..., : table.shape[1]],
                       resized.flatten(2).transpose(1, 2))


@torch.no_grad()
def test_save_and_load_round_trip_exactly(vanilla_unet, tmp_path):
    net = make_net(vanilla_unet)
    for part in (net.self_attention, net.hpa_unet, net.hpa_controlnet, net.image_proj, net.controlnet):
        randomize(part)
    net.hpa_scale = 0.7
    x = inputs(height=8, width=16)
    expected = net(**x)
    net.save_pretrained(tmp_path / "net")
    assert sorted(p.name for p in (tmp_path / "net").iterdir()) == [
        "consissr_adapters.safetensors", "consissr_config.json", "controlnet"]

    loaded = ConsisSRNet.from_pretrained(tmp_path / "net", copy.deepcopy(vanilla_unet)).eval()
    assert loaded.hpa_scale == 0.7
    state, loaded_state = net.state_dict(), loaded.state_dict()
    assert state.keys() == loaded_state.keys()
    assert all(torch.equal(state[k], loaded_state[k]) for k in state)
    assert torch.equal(loaded(**x), expected)


@torch.no_grad()
def test_hpa_image_branch_changes_output_and_scales(vanilla_unet):
    net = make_net(vanilla_unet)
    randomize(net.hpa_unet, std=0.5)
    x = inputs()
    tokens = net.image_tokens(x["image_embeds"])
    text_only = unet_out(net.unet, x)
    assert not torch.equal(unet_out(net.unet, x, tokens), text_only)
    net.hpa_scale = 0.0
    assert torch.equal(unet_out(net.unet, x, tokens), text_only)
    processors = [p for m in (net.unet, net.controlnet) for p in m.attn_processors.values()
                  if isinstance(p, HybridPromptAttnProcessor)]
    assert len(processors) == 4 + 2 and all(p.scale == 0.0 for p in processors)  # UNet + ControlNet

    # one layer: the image branch enters before the (linear) to_out, so it scales linearly
    name = "down_blocks.0.attentions.0.transformer_blocks.0.attn2"
    attn = net.unet.get_submodule(name)
    hidden = torch.randn(2, 64, attn.to_q.in_features)

    def layer(scale):
        attn.processor.scale = scale
        return attn(hidden, encoder_hidden_states=x["encoder_hidden_states"], ip_hidden_states=tokens)

    base, one, two = layer(0.0), layer(1.0), layer(2.0)
    assert (one - base).abs().max() > 1e-4
    torch.testing.assert_close(two - base, 2 * (one - base), rtol=1e-4, atol=1e-6)


def test_parameter_counts_paper_and_tiny(backbone_dir, vanilla_unet, capsys):
    info = model_info(Params(model=dataclasses.replace(Params().model, image_tokens="ip_adapter")), "paper",
                      backbone_dir)
    counts = info["counts"]
    # the SD 2.1-base UNet itself, built from its config on the meta device
    assert counts["unet"] == {"total": SD21_BASE_UNET_PARAMETERS, "trainable": 0}
    assert 865.8e6 < counts["unet"]["total"] < 866.0e6

    # the documented additions, from the config: per transformer block of width C with h heads
    # of 64 channels on a g×g grid: g²·64 positional + (4C² + 27C + h) MDTA + (64² + 64) HPA
    widths, heads = SD21_BASE_UNET_CONFIG["block_out_channels"], SD21_BASE_UNET_CONFIG["attention_head_dim"]
    # (level, transformer blocks) of the UNet: down 2 per level, mid 1, up 3 per level
    layers = [(lvl, 2) for lvl in range(3)] + [(3, 1)] + [(lvl, 3) for lvl in range(3)]
    pos = sum(n * (64 // 2 ** lvl) ** 2 * 64 for lvl, n in layers)
    mdta = sum(n * (4 * widths[lvl] ** 2 + 27 * widths[lvl] + heads[lvl]) for lvl, n in layers)
    assert counts["pos_embed"] == {"total": pos, "trainable": pos} == {"total": 1_724_416, "trainable": 1_724_416}
    assert counts["transposed_attention"]["total"] == mdta == 49_898_755
    assert counts["hpa_unet"]["total"] == 16 * (64 * 64 + 64)
    assert counts["hpa_controlnet"]["total"] == 7 * (64 * 64 + 64)
    assert counts["image_projection"]["total"] == 1024 * 4 * 1024 + 4 * 1024 + 2 * 1024
    assert 360e6 < counts["controlnet"]["total"] < 370e6
    assert 0 < counts["controlnet"]["trainable"] < counts["controlnet"]["total"]
    if counts["robust_clip"]["total"]:  # open_clip ViT-H-14 visual tower
        assert 632.0e6 < counts["robust_clip"]["total"] < 632.2e6

    tiny = print_model_info(Params(), profile="tiny", backbone_dir=backbone_dir)["tiny"]["counts"]
    assert tiny["unet"]["total"] == sum(p.numel() for p in vanilla_unet.parameters())
    assert "UNet (frozen SD)" in capsys.readouterr().out


def test_policy_freezes_the_hpa_when_its_scale_is_zero(vanilla_unet):
    """hpa_scale 0 skips the image branch; trainable parameters without gradient would break DDP."""
    on = make_net(vanilla_unet)
    off = make_net(vanilla_unet, dataclasses.replace(PARAMS, hpa_scale=0.0))
    apply_trainable_policy(on)
    apply_trainable_policy(off)
    trainable_on = {n for n, p in on.named_parameters() if p.requires_grad}
    trainable_off = {n for n, p in off.named_parameters() if p.requires_grad}
    hpa = {n for n in trainable_on if n.startswith(("hpa_unet.", "hpa_controlnet.", "image_proj."))}
    assert hpa and trainable_off == trainable_on - hpa
    off(**inputs()).square().mean().backward()
    assert all(p.grad is not None for p in off.parameters() if p.requires_grad)


# --------------------------------------------------------------------------------------------
# HPA image tokens: clip_embedding (the paper's) vs ip_adapter; the ControlNet additions
# --------------------------------------------------------------------------------------------
def _added(net: ConsisSRNet) -> dict[str, torch.Tensor]:
    """Parameters the net adds beyond the UNet, the ControlNet and the self-attention additions."""
    return {n: p for n, p in net.named_parameters()
            if not n.startswith(("unet.", "controlnet.", "self_attention.", "self_attention_controlnet."))}


def test_clip_embedding_adds_only_the_zero_initialised_output_layers(vanilla_unet):
    net = make_net(vanilla_unet, PAPER_LITERAL)
    added = _added(net)
    layers = 4 + 2  # attn2 layers of the tiny UNet and of its ControlNet
    assert sorted({n.rsplit(".", 2)[-2] for n in added}) == ["to_out_image"]
    assert len(added) == 2 * layers and all(p.abs().max() == 0 for p in added.values())
    assert net.image_proj is None
    embeds = torch.randn(3, EMBED_DIM)
    assert torch.equal(net.image_tokens(embeds), embeds[:, None, :])  # one token, the embedding itself
    # ip_adapter adds the projection on top of the same output layers (Table 3's "+ IP-Adapter")
    ip = _added(make_net(vanilla_unet, PARAMS))
    assert set(ip) - set(added) == {f"image_proj.{k}" for k in ("proj.weight", "proj.bias", "norm.weight", "norm.bias")}
    assert sum(p.numel() for n, p in ip.items() if n.startswith("image_proj.")) == 64 * 4 * 64 + 4 * 64 + 2 * 64
    apply_trainable_policy(net)
    assert {n for n, p in _added(net).items() if p.requires_grad} == set(added)


@torch.no_grad()
def test_clip_embedding_goes_through_the_layers_own_frozen_value_projection(vanilla_unet):
    """Image branch of one attn2 = to_out(W_img(Attn(Q, to_k(e), to_v(e)))) with the layer's own to_k/to_v.

    One token: the softmax over one key is 1, so the branch is W_img(to_v(e)) at every position and
    to_k drops out; perturbing to_v changes it, perturbing to_k does not.
    """
    net = make_net(vanilla_unet, PAPER_LITERAL)
    randomize(net.hpa_unet, std=0.5)
    x = inputs()
    tokens = net.image_tokens(x["image_embeds"])
    assert not torch.equal(unet_out(net.unet, x, tokens), unet_out(net.unet, x))
    name = "down_blocks.0.attentions.0.transformer_blocks.0.attn2"
    attn = net.unet.get_submodule(name)
    hidden = torch.randn(2, 64, attn.to_q.in_features)

    def image_branch():
        out = {}
        for scale in (0.0, 1.0):
            attn.processor.scale = scale
            out[scale] = attn(hidden, encoder_hidden_states=x["encoder_hidden_states"], ip_hidden_states=tokens)
        return out[1.0] - out[0.0]

    def expected():  # W_img per head on to_v(e), merged, through to_out's (linear) weight
        heads, head_dim = attn.heads, attn.inner_dim // attn.heads
        v = attn.to_v(tokens).view(2, 1, heads, head_dim)
        image = attn.processor.adapter(v).reshape(2, 1, heads * head_dim)
        return (image @ attn.to_out[0].weight.T).expand(2, 64, -1)

    branch = image_branch()
    assert branch.abs().max() > 1e-4
    torch.testing.assert_close(branch, expected(), rtol=1e-4, atol=1e-6)
    attn.to_k.weight.add_(torch.randn_like(attn.to_k.weight))
    torch.testing.assert_close(image_branch(), branch, rtol=1e-4, atol=1e-6)
    attn.to_v.weight.add_(0.1 * torch.randn_like(attn.to_v.weight))
    perturbed = image_branch()
    assert (perturbed - branch).abs().max() > 1e-4
    torch.testing.assert_close(perturbed, expected(), rtol=1e-4, atol=1e-6)


def test_clip_embedding_width_mismatch_is_a_params_error(vanilla_unet):
    with pytest.raises(ParamsError, match=r"model\.image_tokens: .*width 32\).*\(width 64\).*ip_adapter"):
        ConsisSRNet.from_backbone(copy.deepcopy(vanilla_unet), PAPER_LITERAL, image_embed_dim=32)
    net = ConsisSRNet.from_backbone(copy.deepcopy(vanilla_unet), PARAMS, image_embed_dim=32)  # projection: any D
    assert net.image_tokens(torch.randn(2, 32)).shape == (2, 4, 64)


def test_controlnet_self_attention_option(vanilla_unet, tmp_path):
    params = dataclasses.replace(PAPER_LITERAL, controlnet_self_attention=True)
    net = make_net(vanilla_unet, params)
    control_attn1 = [n for n in net.controlnet.attn_processors if n.endswith("attn1.processor")]
    assert len(control_attn1) == 2 and all(
        isinstance(net.controlnet.attn_processors[n], ConsisSelfAttnProcessor) for n in control_attn1)
    assert len(net.self_attention_controlnet) == 2 and len(make_net(vanilla_unet).self_attention_controlnet) == 0
    apply_trainable_policy(net)
    assert all(p.requires_grad for p in net.self_attention_controlnet.parameters())
    # trained (here: randomised) ControlNet additions change the prediction and survive save/load
    randomize(net.controlnet, std=0.05)
    x = inputs(height=8, width=8)
    with torch.no_grad():
        before = net(**x)
        randomize(net.self_attention_controlnet, std=0.5)
        after = net(**x)
    assert not torch.equal(before, after)
    net.save_pretrained(tmp_path / "net")
    loaded = ConsisSRNet.from_pretrained(tmp_path / "net", copy.deepcopy(vanilla_unet))
    assert loaded.config["controlnet_self_attention"] and loaded.config["image_tokens"] == "clip_embedding"
    with torch.no_grad():
        assert torch.equal(loaded(**x), after)
