"""Entry-point wrapper: bad input is one line on stderr and exit code 2, never a traceback.

    if __name__ == "__main__":
        run_main(main)

Exit codes: 0 done; 2 bad input (UsageError, or argparse's own errors); 130 Ctrl-C; 75 a training run
stopped by SIGTERM/SIGUSR1 after writing its checkpoint (requeue, resume with `--resume auto`); 1 a run
that diverged (NaN/inf; the last good checkpoint is kept). Anything else is a bug and keeps its traceback.
"""
import sys

from .errors import UsageError


MAX_LINE = 1000  # characters of an error line; a message quoting a user's value must not flood the terminal


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= MAX_LINE else text[:MAX_LINE] + " [...]"


def _training_stop(e: BaseException):
    """(exit code, message) for the training loop's own stop signals, else None.

    Looked up in sys.modules so that this wrapper imports nothing: an exception of a module that was
    never imported cannot have been raised.
    """
    runtime, update = sys.modules.get("utils.runtime"), sys.modules.get("utils.update")
    interrupted = getattr(runtime, "Interrupted", None)
    if interrupted is not None and isinstance(e, interrupted):
        code = runtime.REQUEUE_EXIT_CODE
        return code, f"interrupted: checkpoint written; resume with --resume auto (exit {code})"
    non_finite = getattr(update, "NonFiniteError", None)
    if non_finite is not None and isinstance(e, non_finite):
        return 1, f"error: {_one_line(e)}"
    return None


def run_main(main_fn, argv=None):
    """Run `main_fn(argv)` and turn expected failures into one line on stderr and an exit code."""
    try:
        main_fn(argv)
    except UsageError as e:
        print(f"error: {_one_line(e)}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted by the user (Ctrl-C)", file=sys.stderr)
        sys.exit(130)
    except Exception as e:
        stop = _training_stop(e)
        if stop is None:
            raise
        print(stop[1], file=sys.stderr)
        sys.exit(stop[0])
