"""The CLI's error policy: the project's own errors are one line and exit code 2; others keep their traceback."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from conftest import REPO

from consissr import cli
from consissr.errors import ConsisSRError, InputError, MissingInputError, ParamsError


def _one_line(capsys, command: str) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert err.startswith(f"consissr {command}: error: ")
    return err


def test_a_bad_params_value_is_one_line_naming_the_key(tmp_path, capsys):
    params = tmp_path / "params.yaml"
    params.write_text("train_sdsr:\n  gamma: -1\n")
    assert cli.main(["prepare", "--params", str(params)]) == 2
    assert "train_sdsr.gamma: must be > 0" in _one_line(capsys, "prepare")


def test_a_missing_input_is_one_line_naming_the_file(tmp_path, capsys):
    (tmp_path / "params.yaml").write_text("{}\n")
    argv = ["degrade", "--params", str(tmp_path / "params.yaml"), "--input", str(tmp_path / "nothing"),
            "--out", str(tmp_path / "out")]
    assert cli.main(argv) == 2
    assert f"{tmp_path / 'nothing' / 'index.json'}: missing; run the prepare stage first" in _one_line(capsys, "degrade")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("error", [InputError("a.png: unreadable"), MissingInputError("b.png: missing"),
                                   FileNotFoundError("c.png: missing")])
def test_project_errors_and_missing_files_exit_2(tmp_path, capsys, monkeypatch, error):
    (tmp_path / "params.yaml").write_text("{}\n")

    def fail(params, args):
        raise error

    monkeypatch.setattr(cli, "run_prepare", fail)
    assert cli.main(["prepare", "--params", str(tmp_path / "params.yaml")]) == 2
    assert str(error) in _one_line(capsys, "prepare")


def test_the_error_classes_stay_what_callers_catch():
    assert issubclass(ParamsError, ValueError) and issubclass(InputError, ValueError)
    assert issubclass(MissingInputError, FileNotFoundError)
    assert all(issubclass(e, ConsisSRError) for e in (ParamsError, InputError, MissingInputError))


@pytest.mark.parametrize("error", [RuntimeError("mat1 and mat2 shapes cannot be multiplied (2x3 and 4x5)"),
                                   ValueError("a bug, not bad input")])
def test_any_other_error_is_not_swallowed(tmp_path, monkeypatch, error):
    (tmp_path / "params.yaml").write_text("{}\n")

    def fail(params, args):
        raise error

    monkeypatch.setattr(cli, "run_prepare", fail)
    with pytest.raises(type(error), match=str(error)[:20].replace("(", r"\(")):
        cli.main(["prepare", "--params", str(tmp_path / "params.yaml")])


def test_any_other_error_shows_its_traceback_and_a_nonzero_exit(tmp_path):
    (tmp_path / "params.yaml").write_text("{}\n")
    code = ("import sys; from consissr import cli\n"
            "def fail(params, args):\n"
            "    raise RuntimeError('CUDA out of memory. Tried to allocate 2.00 GiB')\n"
            "cli.run_prepare = fail\n"
            f"sys.exit(cli.main(['prepare', '--params', {str(tmp_path / 'params.yaml')!r}]))\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 1
    assert "Traceback (most recent call last)" in proc.stderr and "in fail" in proc.stderr
    assert "RuntimeError: CUDA out of memory" in proc.stderr
