"""How the command line fails: one line on stderr and an exit code, never a traceback.

Exit codes: 2 for bad usage or bad input (the engine's input errors, an unusable path), 1 when the
machine ran out of something (disk, memory) or training diverged (a NaN loss). `OneLineErrors`
turns the option parser's usage errors into that line; `run_guarded` does it for the engine's.
"""

from __future__ import annotations

import errno
import sys

import typer
from typer.core import TyperGroup

from .config import ConfigError
from .views import err


class OneLineErrors(TyperGroup):
    """Usage errors (unknown option, bad value) become one line on stderr with exit code 2."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except typer.TyperException as e:  # typer's own click: every usage error
            if not (sys.argv[1:] if args is None else args):  # no command at all: the help, as no_args_is_help asks
                e.show()
                sys.exit(e.exit_code)
            ctx = getattr(e, "ctx", None)
            hint = f" (see {ctx.command_path} --help)" if ctx is not None else ""
            err.print(f"error: {e.format_message()}{hint}", markup=False)
            sys.exit(e.exit_code)
        except typer.Abort:
            err.print("aborted")
            sys.exit(1)
        sys.exit(rv if isinstance(rv, int) else 0)


def fail(message: str, code: int = 2) -> None:
    err.print(f"error: {message}", markup=False)
    raise typer.Exit(code)


def bad_input_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean bad usage or bad input (exit 2), imported lazily."""
    from .checkpoint import CheckpointError
    from .data.tasks import TaskError
    from .data.tokenizer import TokenizerError
    from .device import DeviceError
    from .lock import RunLocked
    from .metrics import MetricError
    from .samplers import SamplerError
    from .train import TrainError

    return ConfigError, TaskError, TokenizerError, CheckpointError, TrainError, SamplerError, MetricError, DeviceError, RunLocked


def run_guarded(fn, *args, **kwargs):
    """fn(*args, **kwargs), with every expected failure turned into one line and its exit code."""
    try:
        return fn(*args, **kwargs)
    except typer.Exit:
        raise
    except bad_input_errors() as e:
        fail(str(e))
    except FloatingPointError as e:
        fail(str(e), code=1)
    except OSError as e:  # exit 1 when the machine ran out of something, 2 when the path given was unusable
        where = f"{e.filename}: " if e.filename else ""
        fail(f"{where}{e.strerror or e}", code=1 if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EFBIG, errno.ENOMEM) else 2)
    except (MemoryError, RuntimeError) as e:
        text = str(e) or type(e).__name__
        if isinstance(e, MemoryError) or "out of memory" in text or "can't allocate memory" in text:
            fail(f"out of memory: {text.splitlines()[0][:200]} (try a smaller --batch-size or model)", code=1)
        raise
