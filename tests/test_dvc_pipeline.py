"""dvc.yaml stays true to the code, and `dvc repro` rebuilds the data stages end to end."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import REPO, SHORT_TRAINING, copy_tracked_files, set_params

from consissr.config import STAGE_PARAMS, stage_param_keys

DVC = REPO / "dvc.yaml"


def dvc_stages():
    return yaml.safe_load(DVC.read_text())["stages"]


def test_every_stage_is_a_consissr_command_with_its_params_file():
    for name, stage in dvc_stages().items():
        assert stage["cmd"].startswith(f"consissr {name.replace('_', '-')} --params params.yaml"), name


@pytest.mark.parametrize("stage", sorted(STAGE_PARAMS))
def test_stage_params_match_the_fields_the_code_reads(stage):
    listed = dvc_stages()[stage].get("params", [])
    assert sorted(listed) == sorted(stage_param_keys(stage)), (
        f"dvc.yaml stage {stage!r} params drifted from config.STAGE_PARAMS")


def test_every_dvc_stage_has_declared_params():
    assert set(dvc_stages()) == set(STAGE_PARAMS)


def test_stage_commands_read_only_their_declared_params(monkeypatch, tmp_path):
    """Each `consissr <stage>` hands its plain function explicit sections; record what it reads."""
    from consissr import cli
    from consissr.config import Params

    class Recorder:
        def __init__(self, obj, prefix, seen):
            self._obj, self._prefix, self._seen = obj, prefix, seen

        def __getattr__(self, name):
            value = getattr(self._obj, name)
            key = f"{self._prefix}{name}"
            if hasattr(value, "__dataclass_fields__"):
                return Recorder(value, key + ".", self._seen)
            self._seen.add(key)
            return value

    import consissr.data.degradation as deg
    import consissr.data.embedding_cache as ec
    import consissr.data.latent_cache as lc
    import consissr.data.sources as src
    import consissr.evaluation.stage as eval_stage
    import consissr.models.backbone as bb
    import consissr.training.clip_stage as clip_stage
    import consissr.training.gan_stage as gan_stage
    import consissr.training.sdsr_stage as sdsr_stage
    import consissr.training.vae_stage as vae_stage

    def consume(*args, **kwargs):  # a stand-in stage function that reads every field it is given
        for value in (*args, *kwargs.values()):
            if isinstance(value, Recorder):
                from consissr.config import leaf_keys
                for key in leaf_keys(value._obj):
                    node = value
                    for part in key.split("."):
                        node = getattr(node, part)

    monkeypatch.setattr(bb, "write_backbone", consume)
    monkeypatch.setattr(src, "prepare", consume)
    monkeypatch.setattr(deg, "degrade_folder", consume)
    monkeypatch.setattr(lc, "encode_pairs", consume)
    monkeypatch.setattr(ec, "embed_lq_images", consume)
    monkeypatch.setattr(clip_stage, "train_clip", consume)
    monkeypatch.setattr(sdsr_stage, "train_sdsr", consume)
    monkeypatch.setattr(vae_stage, "train_vae", consume)
    monkeypatch.setattr(vae_stage, "vae_ceiling", consume)
    monkeypatch.setattr(gan_stage, "train_gan", consume)
    monkeypatch.setattr(eval_stage, "evaluate", consume)
    args = type("Args", (), {"out": tmp_path, "input": tmp_path, "prepared": tmp_path,
                             "degraded": tmp_path, "backbone": tmp_path, "vae": tmp_path,
                             "latents": tmp_path, "robust_clip": tmp_path, "embeddings": tmp_path, "metrics": tmp_path, "plots": tmp_path,
                             "report": tmp_path, "work": tmp_path, "pipeline": None})()
    for stage in STAGE_PARAMS:
        seen: set = set()
        getattr(cli, f"run_{stage}")(Recorder(Params(), "", seen), args)
        assert sorted(seen) == sorted(stage_param_keys(stage)), stage


def _dvc(cwd, *args):
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
               DVC_NO_ANALYTICS="1", HF_HUB_OFFLINE="1")
    proc = subprocess.run([str(Path(sys.executable).parent / "dvc"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout + proc.stderr


def ran(output):
    return {line.split("'")[1] for line in output.splitlines() if line.startswith("Running stage '")}


@pytest.mark.slow
def test_dvc_repro_end_to_end_in_a_temporary_copy(tmp_path, dvc_cache, user_photos):
    copy_tracked_files(tmp_path)
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    _dvc(tmp_path, "cache", "dir", "--local", str(dvc_cache))  # test_eval_dvc restores these stages from it
    # a user's folder in place of the embedded photos, and no other edit
    set_params(tmp_path / "params.yaml", {**SHORT_TRAINING, "prepare.sources": [str(user_photos)]})
    data_stages = {"train_vae", "backbone", "prepare", "degrade", "vae_ceiling", "encode"}

    first = _dvc(tmp_path, "repro", "encode", "vae_ceiling")
    assert ran(first) == data_stages
    assert (tmp_path / "data" / "latents" / "manifest.json").is_file()

    second = _dvc(tmp_path, "repro", "encode", "vae_ceiling")
    assert ran(second) == set(), second

    set_params(tmp_path / "params.yaml", {"degrade.first.noise_range": [2.0, 30.0]})
    third = _dvc(tmp_path, "repro", "encode", "vae_ceiling")
    assert ran(third) == {"degrade", "vae_ceiling", "encode"}, third  # the VAE does not retrain

    # reproducible: retraining the VAE and rebuilding the backbone from scratch gives byte-identical
    # outputs (prepare, degrade and encode: test_prepare, test_scale_data, test_latent_cache)
    lock = (tmp_path / "dvc.lock").read_text()
    forced = _dvc(tmp_path, "repro", "--force", "--single-item", "train_vae", "backbone")
    assert ran(forced) == {"train_vae", "backbone"}
    assert (tmp_path / "dvc.lock").read_text() == lock
