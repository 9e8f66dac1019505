"""User errors: one line on stderr and exit code 2, never a traceback."""

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
        return main()
    except UserError as error:
        print(f"error: {user_message(error)}", file=sys.stderr, flush=True)
        sys.exit(error.exit_code)
