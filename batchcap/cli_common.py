"""What every batchcap command shares: logging setup, exit codes, and the one-line fatal error."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
import warnings
from collections.abc import Iterator
from typing import Any

import click

from .items import FatalError

EXIT_OK, EXIT_FATAL, EXIT_USAGE, EXIT_ITEMS_FAILED, EXIT_INTERRUPTED, EXIT_TERMINATED = 0, 1, 2, 3, 130, 143
EXIT_HANGUP = 129  # 128 + SIGHUP: the terminal or ssh session closed

log = logging.getLogger("batchcap")


class Terminated(BaseException):
    """SIGTERM (systemd, ``timeout``, a scheduler's stop) or SIGHUP (the terminal or ssh session closed),
    raised in the main thread so that the run unwinds like Ctrl-C: buffered rows are flushed, the lock
    released."""

    def __init__(self, signum: int = signal.SIGTERM):
        super().__init__(signum)
        self.signum = signum


@contextlib.contextmanager
def guarded_run(resume_hint: str) -> Iterator[None]:
    """Run a command's work: a FatalError, any unexpected error (a bug, a full disk) and SIGTERM
    become one ``Error: ...`` line and an exit code; the traceback only with ``-vv``."""
    def terminate(signum: int, frame: Any) -> None:
        if _in_finalizer(frame):  # raised there, it would be printed and dropped, and the run would go on
            again = threading.Timer(0.05, os.kill, (os.getpid(), signum))  # so: again, once out of it
            again.daemon = True
            again.start()
            return
        raise Terminated(signum)

    previous: dict[int, Any] = {}
    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGTERM, signal.SIGHUP):
            if signum == signal.SIGHUP and signal.getsignal(signum) == signal.SIG_IGN:
                continue  # nohup: the user asked the run to outlive its terminal
            previous[signum] = signal.signal(signum, terminate)
    try:
        yield
    except FatalError as exc:
        raise CommandError(str(exc)) from None
    except KeyboardInterrupt:
        raise CommandError(f"interrupted: {resume_hint}", EXIT_INTERRUPTED) from None
    except Terminated as exc:
        if exc.signum == signal.SIGHUP:
            raise CommandError(f"hung up (SIGHUP): {resume_hint}", EXIT_HANGUP) from None
        raise CommandError(f"terminated (SIGTERM): {resume_hint}", EXIT_TERMINATED) from None
    except (click.ClickException, click.exceptions.Exit):
        raise
    except Exception as exc:
        log.debug("unexpected error", exc_info=True)
        text = str(exc).strip().splitlines()
        raise CommandError(f"{type(exc).__name__}: {text[0] if text else ''} (run with -vv for the traceback); "
                           f"{resume_hint}") from None
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _in_finalizer(frame: Any) -> bool:
    """Whether Python is running a finalizer at ``frame`` (an object's ``__del__``, a weakref callback),
    where an exception is reported as "Exception ignored in ..." and does not unwind the program."""
    while frame is not None:
        code = frame.f_code
        if code.co_name == "__del__" or code.co_filename.endswith("weakref.py"):
            return True
        frame = frame.f_back
    return False


class CommandError(click.ClickException):
    """A failure of the whole command: printed as one ``Error: ...`` line, exits with ``exit_code``."""

    def __init__(self, message: str, exit_code: int = EXIT_FATAL):
        super().__init__(message)
        self.exit_code = exit_code

    def show(self, file=None) -> None:  # noqa: ANN001 - click's signature
        try:
            click.echo(f"Error: {self.format_message()}", err=True)
            sys.stderr.flush()
        except OSError:  # stderr gone (`| tee` stopped with the job, a closed terminal): the exit code still tells
            with contextlib.suppress(OSError):
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stderr.fileno())


def setup_logging(verbose: int, quiet: bool) -> None:
    """batchcap's log lines on stderr: bare on a terminal, timestamped otherwise (cron); quiet HF libraries."""
    level = logging.WARNING if quiet else (logging.DEBUG if verbose > 1 else logging.INFO)
    handler = logging.StreamHandler(sys.stderr)
    fmt = "%(message)s" if sys.stderr.isatty() else "%(asctime)s batchcap %(levelname)s %(message)s"
    handler.setFormatter(logging.Formatter(fmt, datefmt="%Y-%m-%dT%H:%M:%S"))
    root = logging.getLogger("batchcap")
    root.handlers[:] = [handler]
    root.setLevel(level)
    if verbose < 1:  # transformers' / peft's deprecation chatter is not for our users
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
        logging.getLogger("transformers").setLevel(logging.ERROR)
        warnings.filterwarnings("ignore", category=FutureWarning)
    # Pillow warns of images above its own pixel limit; batchcap's --max-pixels decides (and says why per row)
    warnings.filterwarnings("ignore", message=r"Image size \(\d+ pixels\) exceeds limit")
    # and of EXIF it cannot parse ("Corrupt EXIF data", "Tag data larger than file"): the pixels still decode,
    # and a damaged image is its row's decode_error
    warnings.filterwarnings("ignore", category=UserWarning, module=r"PIL\.TiffImagePlugin")
    if quiet or not sys.stderr.isatty():  # no "Loading weights" bars in cron logs
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        try:
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()
        except ImportError:  # pragma: no cover
            pass
