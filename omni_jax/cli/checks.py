"""Early input checks for launchers (jax-free): they fail in well under a second, before any weights load."""

from __future__ import annotations

import os
import tempfile

from omni_jax.errors import UsageError


def read_text_file(path: str, flag: str) -> str:
    """A UTF-8 text file's contents, or UsageError naming the file (and the byte offset of invalid UTF-8)."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise UsageError(f"{flag}={path!r}: no such file") from None
    except OSError as e:
        raise UsageError(f"{flag}={path!r}: cannot read it ({e.strerror})") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UsageError(f"{flag}={path!r} is not valid UTF-8: byte 0x{data[e.start]:02x} at byte offset {e.start} "
                         f"({e.reason}); re-save the file as UTF-8") from None


def _check_writable_dir(directory: str, flag: str, path: str) -> None:
    """Create and remove a temp file in `directory`: the only reliable test (ACLs, read-only mounts, root)."""
    if not os.path.isdir(directory):
        if os.path.exists(directory):
            raise UsageError(f"{flag}={path!r}: {directory!r} is not a directory; choose another path")
        raise UsageError(f"{flag}={path!r}: directory {directory!r} does not exist; create it first or choose "
                         "another path")
    try:
        fd, tmp = tempfile.mkstemp(prefix=".omni-write-check-", dir=directory)
        os.close(fd)
        os.remove(tmp)
    except OSError as e:
        raise UsageError(f"{flag}={path!r}: cannot write to directory {directory!r} ({e.strerror}); "
                         "choose a writable location") from None


def check_output_file(path: str, flag: str) -> None:
    """UsageError unless `path` can be written as a file; checks the directory, never touches `path` itself."""
    if os.path.isdir(path):
        raise UsageError(f"{flag}={path!r} is a directory; give a file path, e.g. {os.path.join(path, 'output.wav')!r}")
    _check_writable_dir(os.path.dirname(os.path.abspath(path)), flag, path)
    if os.path.exists(path) and not os.access(path, os.W_OK):
        raise UsageError(f"{flag}={path!r} exists and is not writable; choose another path")


def check_output_dir(path: str, flag: str) -> None:
    """UsageError unless `path` is (or can be created as) a writable directory; creates nothing."""
    if os.path.exists(path):
        if not os.path.isdir(path):
            raise UsageError(f"{flag}={path!r} exists and is not a directory")
        _check_writable_dir(path, flag, path)
        return
    parent = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(parent):  # os.makedirs creates the missing levels under the nearest existing one
        parent = os.path.dirname(parent)
    _check_writable_dir(parent, flag, path)


def check_speech(config, checkpoint: str | None) -> None:
    """UsageError for a speech request on a thinker-only checkpoint (Thinking, Captioner: no talker)."""
    if not config.enable_audio_output:
        raise UsageError(f"checkpoint {checkpoint} has no talker (a thinker-only model, saved with "
                         "enable_audio_output=false): it answers in text only; pass --text_only")
