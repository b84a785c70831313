"""Node processes end cleanly when rclpy's signal handler shuts the context down under a spinning executor
(``cmfiou_ros.shutdown.spinning``), with real rclpy executors and contexts."""
from __future__ import annotations

import pytest

from rosutil import require  # noqa: E402  (pytest puts test/ on sys.path)
rclpy = require("rclpy")

from rclpy.executors import SingleThreadedExecutor  # noqa: E402

from cmfiou_ros.shutdown import is_shutdown_race, spinning  # noqa: E402
from rosutil import fresh_domain  # noqa: E402


@pytest.fixture
def ctx_node():
    ctx = rclpy.Context()
    rclpy.init(context=ctx, domain_id=fresh_domain())
    node = rclpy.create_node("shutdown_test", context=ctx)
    ex = SingleThreadedExecutor(context=ctx)
    ex.add_node(node)
    yield ctx, ex
    ex.shutdown()
    node.destroy_node()
    if ctx.ok():
        ctx.shutdown()


def test_spin_after_context_shutdown_is_a_clean_exit(ctx_node):
    ctx, ex = ctx_node
    ctx.shutdown()  # what the SIGINT handler does, here before the executor builds its wait set
    with pytest.raises(RuntimeError, match="context is not valid") as info:
        ex.spin_once(timeout_sec=0.0)  # the raw race error, as seen in the detector's log in CI
    assert is_shutdown_race(info.value, ctx)
    with spinning("shutdown_test", context=ctx):
        ex.spin_once(timeout_sec=0.0)  # swallowed: the shutdown was requested


def test_errors_while_the_context_is_valid_propagate(ctx_node):
    ctx, ex = ctx_node
    ex.spin_once(timeout_sec=0.0)  # a live context spins normally
    assert not is_shutdown_race(RuntimeError("boom"), ctx)
    with pytest.raises(RuntimeError, match="boom"):
        with spinning("shutdown_test", context=ctx):
            raise RuntimeError("boom")
    with pytest.raises(ValueError):
        with spinning("shutdown_test", context=ctx):
            raise ValueError("not a RuntimeError")
    with spinning("shutdown_test", context=ctx):
        raise KeyboardInterrupt  # Ctrl-C ends the spin loop quietly
