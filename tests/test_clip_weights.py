"""CLIP weights by file (clip.pretrained: .../open_clip_pytorch_model.bin): offline, safe, checked, recorded.

The tiny open_clip config stands in for ViT-H-14 / laion2b_s32b_b79k: its state dict saved the way
the authors' ``open_clip_pytorch_model.bin`` is (``torch.save(model.state_dict())``).
"""

from __future__ import annotations

import hashlib
import json
import os
import socket

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import open_clip  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from consissr.config import ClipParams, is_clip_weights_file  # noqa: E402
from consissr.errors import InputError, ParamsError, UnsafeCheckpointError  # noqa: E402
from consissr.models import robust_clip as rc  # noqa: E402
from consissr.models.info import describe_robust_clip  # noqa: E402
from consissr.models.robust_clip import ClipWeightsError, RobustCLIP  # noqa: E402

TINY = "consissr-tiny-vit"
FILE_NAME = "open_clip_pytorch_model.bin"  # the authors' name for the ViT-H-14 laion2b_s32b_b79k weights
MARKER = "pickled_code_ran"


@pytest.fixture
def offline(monkeypatch):
    """No network: every open_clip / huggingface_hub download function and socket connect raises."""
    import huggingface_hub
    import open_clip.factory
    import open_clip.pretrained

    calls: list[str] = []

    def refuse(name):
        def _refuse(*args, **kwargs):
            calls.append(name)
            raise AssertionError(f"network access: {name}{args}")
        return _refuse

    for module, names in ((open_clip.pretrained, ("download_pretrained", "download_pretrained_from_hf",
                                                  "download_pretrained_from_url", "hf_hub_download")),
                          (open_clip.factory, ("download_pretrained", "download_pretrained_from_hf")),
                          (huggingface_hub, ("hf_hub_download", "snapshot_download"))):
        for name in names:
            if hasattr(module, name):
                monkeypatch.setattr(module, name, refuse(f"{module.__name__}.{name}"))
    monkeypatch.setattr(socket.socket, "connect", refuse("socket.connect"))
    return calls


def _save_tiny(path, seed: int = 11, model_name: str = TINY) -> dict[str, torch.Tensor]:
    """A seeded open_clip model's full state dict saved with torch.save; returns a copy of it."""
    torch.manual_seed(seed)
    state = {k: v.detach().clone() for k, v in open_clip.create_model(model_name).state_dict().items()}
    torch.save(state, path)
    return {k: v.clone() for k, v in state.items()}


def _visual(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k[len("visual."):]: v for k, v in state.items() if k.startswith("visual.")}


def _assert_tower_is(tower: torch.nn.Module, expected: dict[str, torch.Tensor]) -> None:
    got = tower.state_dict()
    assert got.keys() == expected.keys() and expected
    for key, value in expected.items():
        assert torch.equal(got[key], value), key


# --------------------------------------------------------------------------------------------
def test_path_or_tag():
    for path in ("/weights/open_clip_pytorch_model.bin", "open_clip_pytorch_model.bin", "w.pt", "w.PTH",
                 "w.safetensors", "sub/weights", "C:\\clip\\weights"):
        assert is_clip_weights_file(path), path
    for tag in ("laion2b_s32b_b79k", "openai", None):
        assert not is_clip_weights_file(tag), tag
    assert ClipParams(model_name="ViT-H-14", pretrained="/w/open_clip_pytorch_model.bin").pretrained
    with pytest.raises(ParamsError, match="pretrained"):
        ClipParams(pretrained="")
    with pytest.raises(ParamsError, match="local-dir"):
        ClipParams(model_name="local-dir:/x", pretrained="/w/open_clip_pytorch_model.bin")


def test_bin_file_by_path_loads_both_towers_offline(tmp_path, offline, monkeypatch):
    saved = _save_tiny(tmp_path / FILE_NAME)
    # open_clip's own file loader must not be used (its TypeError fallback is a full torch.load)
    import open_clip.factory
    monkeypatch.setattr(open_clip.factory, "load_checkpoint", lambda *a, **k: pytest.fail("open_clip read the file"))
    torch.manual_seed(0)  # another seed than the file's: a random init would not match
    robust = RobustCLIP.from_params(ClipParams(model_name=TINY, pretrained=str(tmp_path / FILE_NAME)))
    visual = _visual(saved)
    _assert_tower_is(robust.teacher, visual)
    _assert_tower_is(robust.student, visual)
    assert robust.pretrained_sha256 == hashlib.sha256((tmp_path / FILE_NAME).read_bytes()).hexdigest()
    assert offline == []

    # the same weights as .safetensors
    save_file({k: v.contiguous() for k, v in saved.items()}, str(tmp_path / "open_clip_model.safetensors"))
    from_st = RobustCLIP(model_name=TINY, pretrained=str(tmp_path / "open_clip_model.safetensors"))
    _assert_tower_is(from_st.teacher, visual)
    _assert_tower_is(from_st.student, visual)


def test_relative_path_and_training_checkpoint_layout(tmp_path, offline, monkeypatch):
    saved = _save_tiny(tmp_path / "plain.bin", seed=5)
    # open_clip's training checkpoints: {"epoch", "state_dict": {"module." + key: ...}}
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in saved.items()}}, tmp_path / "epoch_3.pt")
    monkeypatch.chdir(tmp_path)
    robust = RobustCLIP(model_name=TINY, pretrained="epoch_3.pt")  # relative to the working directory
    _assert_tower_is(robust.student, _visual(saved))
    assert offline == []


def test_recorded_in_saved_config_and_model_info(tmp_path, offline):
    _save_tiny(tmp_path / FILE_NAME)
    digest = hashlib.sha256((tmp_path / FILE_NAME).read_bytes()).hexdigest()
    robust = RobustCLIP(model_name=TINY, pretrained=str(tmp_path / FILE_NAME))
    robust.save_pretrained(tmp_path / "robust")
    config = json.loads((tmp_path / "robust" / "config.json").read_text())
    assert (config["pretrained"], config["pretrained_sha256"]) == (str(tmp_path / FILE_NAME), digest)
    line, _ = describe_robust_clip(tmp_path / "robust")
    assert str(tmp_path / FILE_NAME) in line and digest in line

    # inference restore keeps the record without reading the file; a teacher reload checks the file
    restored = RobustCLIP.from_pretrained(tmp_path / "robust")
    assert restored.pretrained_sha256 == digest
    RobustCLIP.from_pretrained(tmp_path / "robust", with_teacher=True)
    _save_tiny(tmp_path / FILE_NAME, seed=12)  # other weights under the same name
    with pytest.raises(ClipWeightsError, match="changed"):
        RobustCLIP.from_pretrained(tmp_path / "robust", with_teacher=True)


def test_offline_fixture_catches_a_tag_download(offline):
    """The fixture the tests above rely on: a tag's download is caught (so `offline == []` means something)."""
    with pytest.raises(RuntimeError):
        RobustCLIP(model_name="ViT-B-32", pretrained="laion2b_s34b_b79k")
    assert offline and "download" in offline[0]


def test_missing_file_and_unknown_tag(tmp_path, offline):
    missing = tmp_path / FILE_NAME
    with pytest.raises(InputError, match=f"{missing}.*not found"):
        RobustCLIP(model_name=TINY, pretrained=str(missing))
    with pytest.raises(InputError, match="neither an open_clip tag"):
        RobustCLIP(model_name=TINY, pretrained="laion2b_typo")
    assert offline == []


def test_file_of_another_model_names_file_and_key(tmp_path, offline):
    _save_tiny(tmp_path / FILE_NAME)
    torch.manual_seed(0)
    with pytest.raises(ClipWeightsError) as err:  # a tiny file given for ViT-B-32
        RobustCLIP(model_name="ViT-B-32", pretrained=str(tmp_path / FILE_NAME))
    message = str(err.value)
    assert str(tmp_path / FILE_NAME) in message
    assert "of another shape" in message and "positional_embedding (file (77, 32), model (77, 512))" in message

    # same widths, one tensor reshaped and one key dropped
    state = _save_tiny(tmp_path / "odd.bin")
    state["visual.proj"] = state["visual.proj"][:, :32].clone()
    del state["visual.ln_post.bias"]
    torch.save(state, tmp_path / "odd.bin")
    with pytest.raises(ClipWeightsError, match=r"odd\.bin.*visual\.proj \(file \(64, 32\), model \(64, 64\)\)"
                       r".*1 missing, first \['visual\.ln_post\.bias'\]"):
        RobustCLIP(model_name=TINY, pretrained=str(tmp_path / "odd.bin"))


class _Payload:
    """Unpickling it would create the marker file."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickled_code_refused_and_not_run(tmp_path, offline):
    marker = tmp_path / MARKER
    state = _save_tiny(tmp_path / FILE_NAME)
    torch.save({**state, "extra": _Payload(str(marker))}, tmp_path / FILE_NAME)
    with pytest.raises(UnsafeCheckpointError, match=rf"{FILE_NAME}: holds objects that a weights-only load "
                                                    r"refuses to build: (builtins|io)\.open"):
        RobustCLIP(model_name=TINY, pretrained=str(tmp_path / FILE_NAME))
    assert not marker.exists()
    # the same pickle read without weights_only does run it: the marker test can fail
    torch.load(tmp_path / FILE_NAME, weights_only=False)
    assert marker.exists()


def test_not_a_state_dict(tmp_path):
    torch.save([torch.zeros(1)], tmp_path / "list.pt")
    with pytest.raises(ClipWeightsError, match=r"list\.pt: expected a state dict"):
        rc.read_clip_weights(tmp_path / "list.pt")
    (tmp_path / "junk.bin").write_bytes(b"not a checkpoint")
    with pytest.raises(InputError, match=r"junk\.bin: not a readable torch checkpoint"):
        rc.read_clip_weights(tmp_path / "junk.bin")
    # a TypeError inside the weights-only unpickler (open_clip would retry with a plain torch.load)
    (tmp_path / "typeerror.bin").write_bytes(b"\x80\x02ccollections\nOrderedDict\n(K\x01K\x02K\x03tR.")
    with pytest.raises(InputError, match=r"typeerror\.bin: not a readable torch checkpoint \(TypeError"):
        rc.read_clip_weights(tmp_path / "typeerror.bin")
