"""consissr.io: the atomic writer leaves a complete file with the user's usual permissions."""

import os
import stat

import pytest

from consissr.io import atomic_path, write_json


def test_atomic_file_gets_the_mode_of_a_plain_open(tmp_path):
    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    write_json(tmp_path / "out.json", {"a": 1})
    assert stat.S_IMODE(os.stat(tmp_path / "out.json").st_mode) == stat.S_IMODE(os.stat(plain).st_mode)


def test_a_failed_write_leaves_neither_target_nor_temporary(tmp_path):
    with pytest.raises(RuntimeError):
        with atomic_path(tmp_path / "out.bin") as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []
