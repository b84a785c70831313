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


class SignalLatch:
    """Records SIGINT / SIGTERM instead of raising ``KeyboardInterrupt`` or dying (``install_signal_latch``)."""

    def __init__(self):
        self.received: list = []

    def __call__(self, signum, frame) -> None:
        self.received.append(signum)

    @property
    def name(self) -> str:
        import signal

        return signal.Signals(self.received[0]).name if self.received else ""


def install_signal_latch() -> SignalLatch:
    """Install non-raising Python handlers for SIGINT and SIGTERM. Call it *before* ``rclpy.init``.

    rclpy's own handlers (installed by ``rclpy.init``) shut the context down and wake the executors, then chain to
    the handler that was there before them -- this one, which only records the signal. So a second Ctrl-C (a terminal
    sends SIGINT to the whole process group, launch sends its own SIGINT and later SIGTERM) arriving while the node
    tears down (joining its inference thread, destroying entities) or after ``rclpy.shutdown`` has uninstalled
    rclpy's handlers raises no ``KeyboardInterrupt`` traceback, and SIGTERM never kills the process mid-teardown:
    the process finishes its teardown and exits 0.
    """
    import signal

    latch = SignalLatch()
    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, latch)
    return latch


def wants_help(argv) -> bool:
    """``-h`` / ``--help`` among the program's own arguments (before ``--ros-args``); ``argv`` as given to
    ``rclpy.init`` (None = ``sys.argv``)."""
    import sys

    args = list(sys.argv[1:] if argv is None else argv)
    if "--ros-args" in args:
        args = args[:args.index("--ros-args")]
    return any(a in ("-h", "--help") for a in args)


def node_help(prog: str, doc: str, specs) -> str:
    """Usage text of a node executable: its docstring and its parameter table (name, type, default, meaning)."""
    lines = [f"usage: {prog} [-h] [--ros-args [--params-file FILE] [-p NAME:=VALUE] [-r FROM:=TO] ...]", "",
             doc.strip(), "", "parameters (-p NAME:=VALUE or a --params-file):"]
    for s in specs:
        t = s.type.__name__ if s.type is not list else f"list of {s.elem.__name__}"
        ro = ", read-only" if s.read_only else ""
        lines.append(f"  {s.name} ({t}{ro}, default {s.default!r}): {s.doc}")
    return "\n".join(lines) + "\n"


def start_node(prog: str, doc: str, specs, argv) -> Optional[SignalLatch]:
    """Start of a node's main: ``-h`` / ``--help`` prints :func:`node_help` and gives None (the main returns 0);
    otherwise the signal latch is installed, then ``rclpy.init(args=argv)``, and the latch is returned."""
    if wants_help(argv):
        print(node_help(prog, doc, specs), end="")
        return None
    latch = install_signal_latch()  # before rclpy.init: a second Ctrl-C / SIGTERM during teardown stays quiet
    rclpy.init(args=argv)
    return latch


def finish(latch: SignalLatch, rc: int) -> int:
    """End of a node's main: after a signal, leave at once with ``rc`` (``os._exit`` after flushing stdio).

    Interpreter finalization restores the default dispositions of SIGINT / SIGTERM, so a second signal arriving then
    (launch's SIGTERM after its SIGINT, a second Ctrl-C) would kill the process (-15 / -2) after a clean teardown;
    with torch loaded, finalization is also slow, and an inference thread still inside torch must not meet the
    library's destructors. Everything is torn down and logged before this is called."""
    if latch.received:
        import os
        import sys

        for f in (sys.stdout, sys.stderr):
            try:
                f.flush()
            except Exception:  # noqa: BLE001
                pass
        os._exit(rc)
    return rc
