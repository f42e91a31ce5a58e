import os
import shutil
import subprocess
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


def shared_data(*parts: str) -> Path:
    """A folder of ../shared/data, or a skip with the reason when this checkout has none."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.is_dir():
        pytest.skip(f"sample data {path} is absent (it lives beside the repo, never inside it)")
    return path


def copy_tracked_files(dest: Path) -> Path:
    """The repository's git-tracked files, copied into ``dest`` (a fresh checkout for `dvc repro` tests)."""
    files = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    for rel in files:
        if (REPO / rel).is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / rel, dest / rel)
    return dest


# end-to-end copies need working stages, not good models: the VAE trains 10 steps instead of 500
SHORT_TRAINING = {"train_vae.steps": 10}


def set_params(params_path: Path, values: dict) -> None:
    """Set dotted keys (``"train_vae.steps": 10``) in a copy's params.yaml (its comments are dropped)."""
    import yaml

    raw = yaml.safe_load(params_path.read_text())
    for dotted, value in values.items():
        *parents, leaf = dotted.split(".")
        node = raw
        for key in parents:
            node = node[key]
        assert leaf in node, f"{dotted} is not in {params_path}"
        node[leaf] = value
    params_path.write_text(yaml.safe_dump(raw, sort_keys=False))


@pytest.fixture(scope="session")
def tiny_backbone(tmp_path_factory) -> Path:
    """The embedded backbone, built once per test session through the `backbone` stage code."""
    from consissr.models.backbone import build_tiny_backbone

    return build_tiny_backbone(tmp_path_factory.mktemp("backbone") / "backbone", seed=0)
