"""One entry wrapper for every launcher, so all of them agree on exit codes and error output.

Exit codes (omni_jax.errors): 0 success; 2 usage error (bad flag or input: absl flag parsing errors,
`absl.app.UsageError`, `omni_jax.errors.UsageError`); 1 runtime failure (any other `OmniError`, or a bug);
130 interrupted. A user error prints one line, `error: <message>`, on stderr and no traceback (run with
`--verbosity=1` to see it); an unexpected exception is a bug, so its traceback is always printed.
Jax-free on purpose: launchers validate flags and exit before jax is even imported.
"""

from __future__ import annotations

import os
import sys
import tempfile
import traceback
from typing import Any, Callable, Sequence

from absl import app, flags

from omni_jax.errors import EXIT_RUNTIME, EXIT_USAGE, OmniError, UsageError

EXIT_INTERRUPTED = 130
_HELP_FLAGS = ("-h", "-?", "--help", "--helpshort", "--helpfull", "--helpxml")


def _verbose() -> bool:
    """--verbosity >= 1 (absl's logging flag; False before flags are parsed or without absl flags)."""
    try:
        return flags.FLAGS.is_parsed() and int(flags.FLAGS.verbosity) >= 1
    except (AttributeError, flags.Error, TypeError, ValueError):
        return False


def fail(message: str, code: int, exc: BaseException | None = None, show_traceback: bool | None = None) -> None:
    """Print `error: message` (after the traceback, when wanted) to stderr and exit with `code`."""
    if exc is not None and (_verbose() if show_traceback is None else show_traceback):
        traceback.print_exception(type(exc), exc, exc.__traceback__, file=sys.stderr)
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(code)


def guard(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Call fn(*args, **kwargs), turning exceptions into the exit codes above (SystemExit passes through)."""
    try:
        return fn(*args, **kwargs)
    except KeyboardInterrupt as e:
        fail("interrupted", EXIT_INTERRUPTED, e)
    except (app.UsageError, UsageError) as e:
        fail(str(e), EXIT_USAGE, e)
    except OmniError as e:
        fail(str(e), e.exit_code, e)
    except Exception as e:  # noqa: BLE001 - a bug: say so, with the traceback
        fail(f"unexpected {type(e).__name__}: {e} (this is a bug; the traceback is above)", EXIT_RUNTIME, e,
             show_traceback=True)


def parse_flags(argv: Sequence[str]) -> list[str]:
    """absl flag parsing with bad flags -> exit 2 and one line (absl's default exits 1 and prints usage).
    --help and friends exit 0."""
    try:
        return flags.FLAGS(list(argv))
    except flags.Error as e:
        fail(f"{e} (see --helpshort)", EXIT_USAGE)
    except SystemExit as e:
        if e.code == 1 and any(a.split("=")[0] in _HELP_FLAGS for a in argv[1:]):
            sys.exit(0)
        raise


def run(main: Callable[[list[str]], Any]) -> None:
    """`absl.app.run(main)` with the exit-code contract above; use in every launcher's __main__."""
    app.run(lambda argv: guard(main, argv), flags_parser=parse_flags)


# ----------------------------------------------------------------------------- early input checks (jax-free)


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
