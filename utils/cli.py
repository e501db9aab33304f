"""Entry-point wrapper: bad input is one line on stderr and exit code 2, never a traceback."""
import sys

from .errors import UsageError


def run_main(main_fn, argv=None):
    """Run `main_fn(argv)`; UsageError -> 'error: ...' + exit 2; Ctrl-C -> exit 130.

    A training run stopped by SIGTERM/SIGUSR1 after writing its checkpoint exits with 75 (requeue);
    NaN/inf in training exits 1 with one line (the last good checkpoint is kept).
    """
    from .advmoe import NonFiniteError
    from .train import REQUEUE_EXIT_CODE, Interrupted
    try:
        main_fn(argv)
    except UsageError as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        sys.exit(2)
    except Interrupted:
        print(f"interrupted: checkpoint written; resume with --resume auto (exit {REQUEUE_EXIT_CODE})",
              file=sys.stderr)
        sys.exit(REQUEUE_EXIT_CODE)
    except NonFiniteError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("interrupted by the user", file=sys.stderr)
        sys.exit(130)
