"""What command-line mains share: run the command, report an expected error as one line on stderr with an exit code
(never a traceback), else print the command's result line."""
from __future__ import annotations

import sys
from typing import Callable, Tuple, Type


def report_errors(action: Callable[[], str], errors: Tuple[Type[BaseException], ...], prefix: str, code: int) -> int:
    """``action()`` -> its line on stdout and 0; one of ``errors`` -> ``"{prefix}: {error}"`` on stderr and
    ``code``."""
    try:
        line = action()
    except errors as e:
        print(f"{prefix}: {e}", file=sys.stderr)
        return code
    print(line)
    return 0
