"""A shared DVC remote (a local folder here): push from one clone, pull into a fresh one, nothing to rebuild."""

from pathlib import Path

import pytest
from test_dvc_pipeline import _dvc, ran
from test_retrain_flow import copy_repo

pytestmark = pytest.mark.slow


def files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_push_then_pull_into_a_fresh_clone_restores_outputs_and_repro_has_nothing_to_do(tmp_path):
    remote = tmp_path / "remote"
    first = copy_repo(tmp_path / "laptop")
    _dvc(first, "remote", "add", "--default", "shared", str(remote))
    built = _dvc(first, "repro", "prepare")
    assert ran(built) == {"prepare"}
    _dvc(first, "push", "prepare")
    assert any(p.is_file() for p in remote.rglob("*")), "push wrote nothing to the remote"

    # a fresh clone: the same commit (tracked files + dvc.lock + the remote in .dvc/config), no data
    second = copy_repo(tmp_path / "gpu-worker")
    for rel in ("dvc.lock", ".dvc/config"):
        (second / rel).write_bytes((first / rel).read_bytes())
    assert not (second / "data" / "prepared").exists()
    _dvc(second, "pull", "prepare")
    assert files(second / "data" / "prepared") == files(first / "data" / "prepared")
    assert len(files(second / "data" / "prepared")) > 1
    again = _dvc(second, "repro", "prepare")
    assert ran(again) == set(), again
    assert "up to date" in _dvc(second, "status", "prepare")
