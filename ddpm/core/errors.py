"""User errors: one line on stderr and exit code 2, never a traceback."""

import logging
import os
import sys
import warnings


class UserError(Exception):
    """A problem with the user's input or files, reported as one line."""

    exit_code = 2


def warn(message):
    """Print one 'warning: ...' line on stderr."""
    print(f"warning: {message}", file=sys.stderr, flush=True)


def _one_line_warning(message, category, filename, lineno, line=None):
    return f"warning: {message}\n"


def user_message(error):
    """The message of a UserError, also when a DataLoader worker re-raised it inside a traceback."""
    lines = [line for line in str(error).strip().splitlines() if line.strip()]
    return lines[-1].split("UserError: ", 1)[-1] if lines else type(error).__name__


def run_cli(main):
    """Run main(); a UserError becomes 'error: <message>' on stderr and its exit code."""
    warnings.formatwarning = _one_line_warning
    try:
        result = main()
    except UserError as error:
        print(f"error: {user_message(error)}", file=sys.stderr, flush=True)
        _leave(error.exit_code)
    _leave(0)
    return result


def _leave(code):
    """Exit with code. One process of several (torchrun, accelerate launch: WORLD_SIZE > 1) ends with
    os._exit once its output is flushed: its process group is destroyed by then (end_training), but
    gloo's transport threads can still be running when the interpreter's static destructors run, and
    the C++ runtime then aborts the process ("terminate called without an active exception", seen
    now and then at the very end of 2-process runs that had finished their work)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        if code:
            sys.exit(code)
        return
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
