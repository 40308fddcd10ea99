"""Exit codes shared by every Badit command (badit-model, badit-data, badit-train, badit-export,
badit-serve), documented in the README:

    0  success
    1  runtime failure (the input was fine but the work failed: a smoke check, an I/O error, ...)
    2  usage or invalid input (argparse's own code for a bad command line; a bad config, export, data
       directory or model name; a run directory that needs --resume or --force)
"""

from __future__ import annotations

import sys
from collections.abc import Callable

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2


def run_cli(prog: str, body: Callable[[], int | None], invalid: tuple[type[BaseException], ...]) -> int:
    """Run a command's body and map its errors to exit codes, one line `prog: error: ...` on stderr:
    an `invalid` exception gives EXIT_USAGE, any other RuntimeError or OSError EXIT_FAILURE."""
    try:
        code = body()
    except invalid as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (RuntimeError, OSError) as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    return EXIT_OK if code is None else code
