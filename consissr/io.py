"""Atomic writes, the project's one copy: build next to the target, then rename (never half-written)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path in the target's folder; on success it replaces ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp" + path.suffix, dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        if os.path.exists(tmp):  # mkstemp creates 0600: give the file the mode a plain open() would
            os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())


def write_json(path: str | Path, data: Any, *, sort_keys: bool = False) -> None:
    write_bytes(path, (json.dumps(data, indent=2, sort_keys=sort_keys) + "\n").encode())


@contextmanager
def atomic_dir(path: str | Path, *, fsync: bool = False) -> Iterator[Path]:
    """Build a whole folder in a hidden one beside ``path`` (``.<name>.tmp``); swap it in when complete.

    A leftover hidden folder of an interrupted build is removed first. ``fsync``: flush the files
    and the parent folder to disk before and after the rename (checkpoints).
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        if fsync:
            for f in tmp.rglob("*"):
                _fsync(f)
        if path.exists():
            shutil.rmtree(path)
        tmp.rename(path)
        if fsync:
            _fsync(path.parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def move_into(src_dir: str | Path, dst_dir: str | Path, *, last: str | None = None) -> None:
    """Move every entry of ``src_dir`` into ``dst_dir`` (replacing same-named ones), then remove ``src_dir``.

    For an output folder that also holds other things (``checkpoints/``): ``last`` names the entry
    a reader checks first (a config json); it is removed up front and moved in last, so an
    interrupted move never looks complete.
    """
    src_dir, dst_dir = Path(src_dir), Path(dst_dir)
    dst_dir.mkdir(parents=True, exist_ok=True)
    if last is not None:
        (dst_dir / last).unlink(missing_ok=True)
    for entry in sorted(src_dir.iterdir(), key=lambda p: p.name == last):
        target = dst_dir / entry.name
        if target.is_dir():
            shutil.rmtree(target)
        os.replace(entry, target)
    src_dir.rmdir()


def _fsync(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_weights_file(path: str | os.PathLike, *, mmap: bool = False) -> Any:
    """What a weights file holds, read without running a pickle's code: the one reader of the
    checkpoints users bring (SD single files, OpenCLIP ``.bin``, Real-ESRGAN ``.pth``).

    ``.safetensors``: ``safetensors.torch.load_file``; anything else ``torch.load(map_location="cpu",
    weights_only=True)`` (``mmap``: map a zip checkpoint's storages instead of reading them), never
    retried without it. A refused object raises ``UnsafeCheckpointError`` naming the file and its
    type; any other failure ``InputError`` naming the file.
    """
    import pickle
    import re

    import torch

    from consissr.errors import InputError, UnsafeCheckpointError

    path = Path(path)
    if path.suffix.lower() == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except Exception as e:  # noqa: BLE001 - SafetensorError and friends: bad input
            raise InputError(f"{path}: not a readable safetensors file ({e})") from None
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        try:  # reads the pickle's opcodes only (zip checkpoints); builds nothing
            unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
        except Exception:  # noqa: BLE001 - a legacy or damaged file: torch's message names the global
            unsafe = []
        unsafe = unsafe or re.findall(r"GLOBAL ([\w.]+)", str(e)) or re.findall(r"Unsupported global: ([\w.]+)", str(e))
        if unsafe:
            raise UnsafeCheckpointError(
                f"{path}: holds objects that a weights-only load refuses to build: {', '.join(sorted(set(unsafe)))}; "
                "the file is not loaded (a pickle could run code). Use a .safetensors file, or re-save the "
                "state dict alone") from None
        raise InputError(f"{path}: not a readable torch checkpoint ({_first_line(e)})") from None
    except Exception as e:  # noqa: BLE001 - truncated zip, not a torch file, a TypeError in the unpickler ...
        raise InputError(f"{path}: not a readable torch checkpoint ({_first_line(e)})") from None


def key_mismatch(state: dict[str, Any], expected: dict[str, Any]) -> str | None:
    """How a state dict fails to fit a model's ``state_dict()`` (missing, unexpected keys, tensors of
    another shape, each with its first examples), or None when it fits key for key."""
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [f"{k} (file {tuple(state[k].shape)}, model {tuple(expected[k].shape)})"
                  for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    parts = [f"{len(mismatched)} of another shape, first {mismatched[:2]}" if mismatched else "",
             f"{len(missing)} missing, first {missing[:3]}" if missing else "",
             f"{len(unexpected)} unexpected, first {unexpected[:3]}" if unexpected else ""]
    return "; ".join(p for p in parts if p) or None


def _first_line(exc: Exception) -> str:
    """The informative line of a load error (torch's weights-only message opens with boilerplate)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    useful = [line for line in lines if not line.startswith(("Weights only load failed", "Please file an issue",
                                                              "Check the documentation"))]
    return f"{type(exc).__name__}: {(useful or lines or [''])[0]}"
