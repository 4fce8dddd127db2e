"""Launcher support: the exit-code contract here; shared flag groups (`flag_groups`), early input checks
(`checks`) and streamed-output writers (`output`) in the submodules.

One entry wrapper for every launcher, so all of them agree on exit codes and error output.

Exit codes (omni_jax.errors): 0 success; 2 usage error (bad flag or input: absl flag parsing errors,
`absl.app.UsageError`, `omni_jax.errors.UsageError`); 1 runtime failure (any other `OmniError`, or a bug);
130 interrupted. A user error prints one line, `error: <message>`, on stderr and no traceback (run with
`--verbosity=1` to see it); an unexpected exception is a bug, so its traceback is always printed.
Jax-free on purpose: launchers validate flags and exit before jax is even imported.
"""

from __future__ import annotations

import sys
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
