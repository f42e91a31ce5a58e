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


@pytest.fixture(scope="session")
def tiny_backbone(tmp_path_factory) -> Path:
    """The embedded backbone, built once per test session through the `backbone` stage code."""
    from consissr.models.backbone import build_tiny_backbone

    return build_tiny_backbone(tmp_path_factory.mktemp("backbone") / "backbone", seed=0)
