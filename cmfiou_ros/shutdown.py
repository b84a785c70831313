"""Clean exits of the node processes on SIGINT / SIGTERM.

rclpy's signal handler shuts the context down asynchronously. If that happens while an executor is between its
``rclpy.ok()`` check and building its wait set, ``spin`` raises ``RCLError: failed to initialize wait set: the given
context is not valid`` (a ``RuntimeError``) instead of ``ExternalShutdownException``: a requested shutdown that would
otherwise end the process with a traceback and exit code 1 (seen in CI, ~1 run in 10). :func:`spinning` treats exactly
that case as the normal shutdown it is; any error raised while the context is still valid propagates.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import rclpy


def is_shutdown_race(exc: BaseException, context: Optional[object] = None) -> bool:
    """True when ``exc`` is a ``RuntimeError`` raised because ``context`` (default: the global one) was shut down."""
    return isinstance(exc, RuntimeError) and not rclpy.ok(context=context)


@contextlib.contextmanager
def spinning(logger_name: str, context: Optional[object] = None) -> Iterator[None]:
    """Wrap an executor's spin loop: Ctrl-C, external shutdown and the wait-set race above end it quietly."""
    from rclpy.executors import ExternalShutdownException

    try:
        yield
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    except RuntimeError as e:
        if not is_shutdown_race(e, context):
            raise
        rclpy.logging.get_logger(logger_name).debug(f"shutdown while the executor was waiting: {e}")
