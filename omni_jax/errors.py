"""One error vocabulary for the whole library, so launchers can map failures to exit codes.

`OmniError` is anything the user can fix (a bad flag, a broken checkpoint, NaNs from bad weights);
its message says what is wrong, where, and how to fix it, so launchers print it without a traceback.
Exit codes: 0 success, 2 usage error (`UsageError`: flags and inputs), 1 runtime failure (everything else).
Existing error classes (ConfigError, CheckpointError, MeshSpecError, SafetensorsError) derive from these.
"""

from __future__ import annotations

import numpy as np

EXIT_OK = 0
EXIT_RUNTIME = 1
EXIT_USAGE = 2


class OmniError(Exception):
    """A failure the user can fix; `str(e)` is the whole message."""

    exit_code = EXIT_RUNTIME


class UsageError(OmniError, ValueError):
    """A bad flag or input value: detected before any expensive work."""

    exit_code = EXIT_USAGE


class NumericalError(OmniError, FloatingPointError):
    """NaN/Inf came out of a model stage; nothing from that stage is written."""

    def __init__(self, stage: str, detail: str = ""):
        self.stage = stage
        super().__init__(f"non-finite values (NaN/Inf) in the {stage} output{': ' + detail if detail else ''}; "
                         "nothing was written. Check the checkpoint (a corrupt or mismatched file is the usual cause) "
                         "and the dtype (try --dtype=float32).")


class CheckpointError(OmniError, ValueError):
    """A checkpoint (HF safetensors dir or omni_jax Orbax dir) is incomplete, corrupt or does not match the config."""


class CheckpointNotFoundError(UsageError, CheckpointError, FileNotFoundError):
    """A checkpoint path given by the user does not exist: a usage error (exit 2), caught before any work."""


def check_finite(*stages: tuple[str, str, object]) -> None:
    """Raise NumericalError for the first (stage, detail, flag) whose flag is False.

    The flags are device-side booleans reduced during a stage (every logit finite, ...): reading
    them here is the stage's one host sync for the guard."""
    for stage, detail, flag in stages:
        if not bool(np.all(flag)):  # a flag per row (served batches) or one for the batch
            raise NumericalError(stage, detail)
