"""The project's own errors: a bad params file, bad input data, a missing input.

The CLI prints these (and ``FileNotFoundError``) as one line and exits with code 2; any other
exception (a shape mismatch, out of memory, a bug) keeps its traceback.
"""

from __future__ import annotations


class ConsisSRError(Exception):
    """Base of the errors a user can fix (the message names the file or key and the problem)."""


class ParamsError(ConsisSRError, ValueError):
    """A params file that does not match the schema (names the file and the dotted key)."""


class InputError(ConsisSRError, ValueError):
    """Input data that cannot be used: unreadable, wrong format, empty, inconsistent."""


class UnsafeCheckpointError(InputError):
    """A weights file holds objects that ``torch.load(weights_only=True)`` will not build (a pickle could run code)."""


class MissingInputError(ConsisSRError, FileNotFoundError):
    """A file or folder a stage needs is not there (usually: run the stage that writes it first)."""


class ClusterStartError(ConsisSRError, TimeoutError):
    """The Dask workers a data stage runs on did not come up within ``parallel.worker_start_timeout``."""


class ResumeRefused(ConsisSRError, RuntimeError):
    """``resume: strict`` and the checkpoint was written by other training code."""


__all__ = ["ClusterStartError", "ConsisSRError", "InputError", "MissingInputError", "ParamsError", "ResumeRefused", "UnsafeCheckpointError"]
