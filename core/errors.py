"""Bad input is reported as one line naming the problem and the fix, never as a traceback."""
import sys


class UserError(Exception):
    """An input problem the user can fix; entry points print it as one line and exit with status 2."""


def run_cli(main):
    """Call main (argument parsing included), turning a UserError into one line and exit status 2."""
    try:
        return main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
