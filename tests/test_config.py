import dataclasses

import pytest
import yaml
from conftest import REPO

from consissr.config import Params, ParamsError, leaf_keys, load_params


def write(tmp_path, text):
    path = tmp_path / "params.yaml"
    path.write_text(text)
    return path


def test_repo_params_load_and_list_every_knob():
    params = load_params(REPO / "params.yaml")
    assert params == Params(), "params.yaml and the schema's defaults are one default (the tiny profile)"
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    # every leaf of the sections present in params.yaml is written out explicitly
    for section in raw:
        for key in leaf_keys(getattr(params, section), f"{section}."):
            node = raw
            for part in key.split("."):
                assert part in node, f"params.yaml does not spell out {key}"
                node = node[part]


def test_unknown_key_is_named(tmp_path):
    path = write(tmp_path, "degrade:\n  first:\n    noise_rnage: [1, 2]\n")
    with pytest.raises(ParamsError, match=r"degrade\.first\.noise_rnage"):
        load_params(path)


def test_unknown_section_is_named(tmp_path):
    with pytest.raises(ParamsError, match=r"unknown key degrad\b"):
        load_params(write(tmp_path, "degrad: {}\n"))


@pytest.mark.parametrize("text, key", [
    ("base:\n  seed: '7'\n", "base.seed"),
    ("base:\n  seed: true\n", "base.seed"),
    ("prepare:\n  crop_size: 12.5\n", "prepare.crop_size"),
    ("degrade:\n  first:\n    noise_range: [1, 2, 3]\n", "degrade.first.noise_range"),
    ("degrade:\n  first:\n    noise_range: [1, abc]\n", r"degrade.first.noise_range\[1\]"),
    ("degrade:\n  usm_sharpen: 1\n", "degrade.usm_sharpen"),
    ("base:\n  profile: tiny\n", "base.profile"),  # removed: nothing read it
    ("encode:\n  dtype: float64\n", "encode.dtype"),
    ("model:\n  image_tokens: clip\n", "model.image_tokens"),
    ("embed_clip:\n  dtype: float64\n", "embed_clip.dtype"),
    ("prepare:\n  sources: embedded\n", "prepare.sources"),
])
def test_wrong_type_is_named(tmp_path, text, key):
    with pytest.raises(ParamsError, match=key):
        load_params(write(tmp_path, text))


def test_values_are_typed_and_defaults_fill_in(tmp_path):
    params = load_params(write(tmp_path, "degrade:\n  first:\n    noise_range: [2, 20]\n"))
    assert params.degrade.first.noise_range == (2.0, 20.0)
    assert all(isinstance(v, float) for v in params.degrade.first.noise_range)
    assert params.degrade.second == Params().degrade.second
    with pytest.raises(dataclasses.FrozenInstanceError):
        params.base.seed = 3


def test_overrides_use_dotted_keys(tmp_path):
    params = load_params(write(tmp_path, "base:\n  seed: 1\n"), {"base.seed": 5, "encode.batch_size": 2})
    assert (params.base.seed, params.encode.batch_size) == (5, 2)
    with pytest.raises(ParamsError, match="encode.batchsize"):
        load_params(write(tmp_path, "{}"), {"encode.batchsize": 2})


def test_paper_config_matches_section_4_1():
    params = load_params(REPO / "configs" / "paper.yaml")
    assert params.prepare.crop_size == 512
    assert params.backbone.pretrained == "stabilityai/stable-diffusion-2-1-base"
    assert (params.clip.model_name, params.clip.pretrained) == ("ViT-H-14", "laion2b_s32b_b79k")
    assert params.model.image_tokens == "clip_embedding"  # §3.3: the embedding itself through the frozen K/V


def test_missing_file_and_bad_yaml_name_the_file(tmp_path):
    with pytest.raises(ParamsError, match="nope.yaml"):
        load_params(tmp_path / "nope.yaml")
    with pytest.raises(ParamsError, match="params.yaml: not valid YAML"):
        load_params(write(tmp_path, "base: [\n"))


def test_paper_config_has_the_section_4_1_training_settings():
    params = load_params(REPO / "configs" / "paper.yaml")
    c, s = params.train_clip, params.train_sdsr
    assert (c.batch_size_per_device, c.lr, c.betas, c.iterations, params.clip.image_size) == (8, 1e-5, (0.9, 0.99), 100_000, 224)
    assert (s.global_batch_size, s.lr, s.betas, s.iterations, s.gamma) == (8, 5e-5, (0.9, 0.99), 200_000, 10.0)


def test_paper_config_spells_out_every_section_of_params_yaml():
    default = yaml.safe_load((REPO / "params.yaml").read_text())
    paper = yaml.safe_load((REPO / "configs" / "paper.yaml").read_text())

    def keys(node, prefix=""):
        if not isinstance(node, dict):
            return {prefix}
        return set().union(*(keys(v, f"{prefix}{k}.") for k, v in node.items()))

    assert keys(default) <= keys(paper), "configs/paper.yaml must be a complete drop-in for params.yaml"


def test_exponent_without_a_dot_is_a_number(tmp_path):
    params = load_params(write(tmp_path, "train_clip:\n  lr: 1e-5\n"), {"train_sdsr.lr": "5e-5"})
    assert (params.train_clip.lr, params.train_sdsr.lr) == (1e-5, 5e-5)
    with pytest.raises(ParamsError, match="train_clip.lr"):
        load_params(write(tmp_path, "train_clip:\n  lr: fast\n"))


@pytest.mark.parametrize("text, key, why", [
    ("train_sdsr:\n  gamma: 0\n", "train_sdsr.gamma", "must be > 0"),
    ("train_sdsr:\n  prompt_dropout: 1.5\n", "train_sdsr.prompt_dropout", r"\[0, 1\]"),
    ("train_sdsr:\n  prompt: fixed\n", "train_sdsr.prompt_text", "prompt is 'fixed'"),
    ("train_sdsr:\n  prompt: captions\n", "train_sdsr.caption_file", "prompt is 'captions'"),
    ("train_sdsr:\n  global_batch_size: 6\n  gradient_accumulation: 4\n", "train_sdsr.global_batch_size",
     "not divisible"),
    ("train_sdsr:\n  sample_timesteps: [0, 10]\n", "train_sdsr.sample_timesteps", "t >= 1"),
    ("train_clip:\n  keep_checkpoints: 0\n", "train_clip.keep_checkpoints", ">= 1"),
    ("train_clip:\n  batch_size_per_device: 0\n", "train_clip.batch_size_per_device", ">= 1"),
    ("degrade:\n  kernel_range: [7, 8]\n", "degrade.kernel_range", "odd"),
    ("degrade:\n  second:\n    noise_range: [30, 1]\n", "degrade.second.noise_range", "low <= high"),
    ("degrade:\n  first:\n    kernel_prob: [1.0]\n", "degrade.first.kernel_prob", "one probability per"),
    ("base:\n  device: gpu\n", "base.device", "auto, cpu, cuda"),
    ("encode:\n  shard_size: 0\n", "encode.shard_size", ">= 1"),
    ("embed_clip:\n  batch_size: 0\n", "embed_clip.batch_size", ">= 1"),
    ("inference:\n  tile_size: 64\n  tile_overlap: 64\n", "inference.tile_overlap", r"\[0, tile_size 64\)"),
    ("evaluate:\n  sweep_t_max: [600, 1001]\n", "evaluate.sweep_t_max", r"\[1, 1000\]"),
])
def test_out_of_range_and_cross_field_values_are_named(tmp_path, text, key, why):
    with pytest.raises(ParamsError, match=rf"{key}: .*{why}"):
        load_params(write(tmp_path, text))


def test_a_section_built_in_code_is_checked_too():
    from consissr.config import TrainSdsrParams

    with pytest.raises(ParamsError, match="gamma"):
        TrainSdsrParams(gamma=-1.0)


def test_params_rewritten_by_dvc_exp_run_set_still_load(tmp_path):
    """`dvc exp run -S` rewrites params.yaml through DVC's YAML 1.2 writer, which drops the quotes of
    `mixed_precision: "no"`; PyYAML's default YAML 1.1 would read the bare `no` as False."""
    import shutil

    from dvc.utils.serialize import modify_yaml

    path = tmp_path / "params.yaml"
    shutil.copy(REPO / "params.yaml", path)
    with modify_yaml(path) as raw:  # what `dvc exp run -S train_sdsr.gamma=5` does to the file
        raw["train_sdsr"]["gamma"] = 5
    assert "  mixed_precision: no " in path.read_text()
    params = load_params(path)
    assert params.train_clip.mixed_precision == "no" and params.train_sdsr.mixed_precision == "no"
    assert params.train_sdsr.gamma == 5 and params.train_sdsr.tala is True
    from consissr.cli import _parse_overrides

    assert _parse_overrides(["train_sdsr.mixed_precision=no", "train_sdsr.tala=false"]) == \
        {"train_sdsr.mixed_precision": "no", "train_sdsr.tala": False}
