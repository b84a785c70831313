#!/usr/bin/env bash
# ROS 2 (rclpy + Fast DDS + the interfaces) on the GPU host, which has Python 3.12 and no package index, so that the
# real detector node can be measured there (bench/bench_node_load.py). Uses scripts/setup.sh itself, offline: the
# Kilted cp312 wheels come from a wheelhouse carried with the call (git-ignored), built here with
#   scripts/gpu/ros_env.sh --download [DIR]      (default .gpu_wheels; ~50 MB)
# and on the GPU host:
#   scripts/gpu/ros_env.sh [DIR]                 -> prints the env file to source
# The host's own venv (torch, Triton, numpy, ...) becomes the cmfiou venv: setup.sh finds torch there and installs
# nothing that is already present; only the ROS wheels and the few pure-Python requirements the host lacks are
# installed (without their dependencies: the bag tools' compressors are not needed by the node).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
if [ "${1:-}" = --download ]; then
  WH=$(mkdir -p "${2:-$ROOT/.gpu_wheels}" && cd "${2:-$ROOT/.gpu_wheels}" && pwd)
  V=${CMFIOU_VENV:-$ROOT/.venv}
  # every ROS wheel the local (Python 3.11) set-up resolved, at the same versions, plus the requirements a GPU host
  # with torch lacks; cp312 manylinux builds
  { "$V/bin/python" -m pip freeze 2>/dev/null | grep '^ros-'
    "$V/bin/python" -m pip freeze 2>/dev/null | grep -i -E '^(catkin-pkg|colcon-[a-z-]+|distlib|docutils|empy|lark|lark-parser|mcap|rosbags|shapely)=='
  } > "$WH/requirements-gpu.txt"
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --abi cp312 --abi abi3 --abi none --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any \
    -d "$WH" -r <(grep -v -i '^empy==' "$WH/requirements-gpu.txt")
  # empy is an sdist on PyPI: a pure-Python wheel of it
  python3 -m pip wheel -q --no-deps -w "$WH" "$(grep -i '^empy==' "$WH/requirements-gpu.txt")"
  du -sh "$WH"; exit 0
fi
WH=$(cd "${1:-$ROOT/.gpu_wheels}" && pwd)
PY=$(command -v python3)
V=$("$PY" -c 'import sys; print(sys.prefix if sys.prefix != sys.base_prefix else "")')
if [ -z "$V" ]; then  # not a venv: one over the system packages (torch stays visible)
  V=/tmp/cmfiou_venv; [ -x $V/bin/python ] || "$PY" -m venv --system-site-packages $V
fi
echo "[ros_env] venv $V, wheels $WH ($(ls "$WH"/*.whl | wc -l))"
"$V/bin/python" -m pip install -q --no-index --no-deps "$WH"/*.whl
PIP_NO_INDEX=1 PIP_FIND_LINKS="$WH" PIP_NO_DEPS=1 CMFIOU_VENV="$V" "$ROOT/scripts/setup.sh"
echo "[ros_env] ready: . $V/cmfiou.env"
