"""Environments for the subprocesses tests start: the session's settings (tests/conftest.py) plus, for
multi-device runs, a simulated CPU device count (XLA_FLAGS must be final before jax loads)."""

from __future__ import annotations

import os

DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"


def xla_flags(devices: int | None = None) -> str:
    """This process's XLA_FLAGS with any device count replaced by `devices` (None: one device)."""
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if not f.startswith(DEVICE_COUNT_FLAG)]
    if devices:
        flags.append(f"{DEVICE_COUNT_FLAG}={devices}")
    return " ".join(flags)


def env(devices: int | None = None) -> dict[str, str]:
    out = dict(os.environ, PYTHONUNBUFFERED="1")
    out["XLA_FLAGS"] = xla_flags(devices)
    return out
