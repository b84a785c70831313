#!/usr/bin/env bash
# The project's test command: set up (idempotent, fast when already done), then run the test suite.
# Usage: scripts/test.sh [pytest args]     (default: the whole suite under test/)
# Environment: CMFIOU_VENV (venv, default <repo>/.venv), CMFIOU_TEST_TIMEOUT (per-test limit in s, default 600),
#              CMFIOU_KITTI_SAMPLES / CMFIOU_SHARED (test data, default ../shared/...).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
V=${CMFIOU_VENV:-$ROOT/.venv}
"$ROOT/scripts/setup.sh"
# shellcheck disable=SC1091
. "$V/cmfiou.env"
cd "$ROOT"
# ROS tests must run, not skip, once setup.sh has succeeded.
export CMFIOU_REQUIRE_ROS=1
[ $# -gt 0 ] || set -- test
set +e
python -m pytest -q --timeout="${CMFIOU_TEST_TIMEOUT:-600}" "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
  echo "[test] ERROR: pytest collected no tests (exit status 5) from: $* -- treating this as a failure" >&2
  exit 1
fi
exit "$rc"
