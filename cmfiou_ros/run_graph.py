"""Starts the replay graph of :mod:`cmfiou_ros.graph` (the graph of ``launch/kitti_replay.launch.py``) as
subprocesses: ``<executable> --ros-args -r __node:=<name> --params-file <yaml> --params-file <overrides> -r a:=b``,
with the installed node executables (``<prefix>/lib/cmfiou_ros/<exe>`` of the ament index, as ``ros2 run``) where they
exist, else ``python -m <module>`` (pip world).

Semantics (the launch file's too): frames go in lockstep with the detector unless ``lockstep:=false``; the replay
logs one line per frame output or dropped frame (``--quiet``: none); any node exiting ends the graph: with an error
(exit code 1 or the node's code) when it failed, cleanly when the replay finished with ``exit_on_end:=true`` (it exits
only once the detector answered its last frame). Ctrl-C / SIGTERM: forwarded to every node (SIGINT, then SIGTERM,
then SIGKILL), exit 0 when every node ended cleanly.

Usage: ``python -m cmfiou_ros.run_graph data:=../shared/kitti_samples/object rate:=5 [--duration 30] [--quiet]``
(the same ``name:=value`` arguments as ``launch/kitti_replay.launch.py``).
"""
from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import yaml

from cmfiou_ros.graph import DEFAULTS, LAUNCH_ARGUMENTS, NodeSpec, replay_graph


def installed_executable(spec: NodeSpec) -> Optional[str]:
    """``<prefix>/lib/<package>/<executable>`` of the package's ament prefix (what ``ros2 run`` runs), if present."""
    from cmfiou_core.resources import ament_share

    share = ament_share(spec.package)
    if share is None:
        return None
    exe = share.parent.parent / "lib" / spec.package / spec.executable
    return str(exe) if exe.is_file() and os.access(exe, os.X_OK) else None


def node_command(spec: NodeSpec, overrides_file: Optional[str], python: str = sys.executable,
                 use_installed: bool = True) -> List[str]:
    exe = installed_executable(spec) if use_installed else None
    cmd = [exe] if exe else [python, "-m", spec.module]
    cmd += ["--ros-args", "-r", f"__node:={spec.name}"]
    if spec.params_file:
        cmd += ["--params-file", spec.params_file]
    if overrides_file:
        cmd += ["--params-file", overrides_file]
    for a, b in spec.remappings:
        cmd += ["-r", f"{a}:={b}"]
    return cmd


def write_overrides(spec: NodeSpec, directory: str) -> Optional[str]:
    """The parameter overrides as a params file (no shell/YAML quoting issues with -p)."""
    if not spec.parameters:
        return None
    path = Path(directory) / f"{spec.name}.overrides.yaml"
    path.write_text(yaml.safe_dump({spec.name: {"ros__parameters": spec.parameters}}, sort_keys=False))
    return str(path)


def _import_roots() -> List[str]:
    """The sys.path entries this process imported cmfiou_ros and cmfiou_core from (children import the same code),
    less the interpreter's own site-packages (on every child's path anyway)."""
    import site

    import cmfiou_core
    import cmfiou_ros

    default = {str(Path(p).resolve()) for p in site.getsitepackages() + [site.getusersitepackages()]}
    roots = [str(Path(p).resolve().parent) for p in list(cmfiou_ros.__path__) + list(cmfiou_core.__path__)]
    return [r for r in dict.fromkeys(roots) if r not in default]


def child_env(extra: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    from cmfiou_core import resources

    env = dict(os.environ)
    pp = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    missing = [r for r in _import_roots() if r not in pp]
    if missing:
        env["PYTHONPATH"] = os.pathsep.join(missing + pp)
    if "FASTDDS_DEFAULT_PROFILES_FILE" not in env and resources.exists("config", "fastdds_shm.xml"):
        # large clouds between processes: with Fast DDS defaults a >1 MB message is lost or delayed (fastdds_shm.xml)
        env["FASTDDS_DEFAULT_PROFILES_FILE"] = str(resources.config("fastdds_shm.xml"))
    env.setdefault("PYTHONUNBUFFERED", "1")
    env.update(extra or {})
    return env


class Graph:
    """Starts and supervises the nodes. ``with Graph(specs) as g: g.wait(...)``."""

    def __init__(self, specs: Sequence[NodeSpec], env: Optional[Dict[str, str]] = None, log_dir: Optional[str] = None,
                 python: str = sys.executable):
        self.specs = list(specs)
        self.env = child_env(env)
        self.python = python
        self.tmp = tempfile.TemporaryDirectory(prefix="cmfiou_graph_")
        self.log_dir = Path(log_dir) if log_dir else None
        self.procs: Dict[str, subprocess.Popen] = {}
        self._logs = []

    def start(self) -> "Graph":
        for spec in self.specs:
            cmd = node_command(spec, write_overrides(spec, self.tmp.name), self.python)
            out = None
            if self.log_dir is not None:
                self.log_dir.mkdir(parents=True, exist_ok=True)
                out = open(self.log_dir / f"{spec.name}.log", "w")
                self._logs.append(out)
            self.procs[spec.name] = subprocess.Popen(cmd, env=self.env, stdout=out, stderr=subprocess.STDOUT
                                                     if out else None, start_new_session=True)
        return self

    def poll(self) -> Optional[tuple]:
        """(name, returncode) of the first node that exited, else None."""
        for name, p in self.procs.items():
            rc = p.poll()
            if rc is not None:
                return name, rc
        return None

    def signal_all(self, sig) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                try:
                    p.send_signal(sig)
                except ProcessLookupError:
                    pass

    def stop(self, timeout: float = 10.0) -> Dict[str, int]:
        for sig, wait in ((signal.SIGINT, timeout), (signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
            if all(p.poll() is not None for p in self.procs.values()):
                break
            self.signal_all(sig)
            t_end = time.monotonic() + wait
            while time.monotonic() < t_end and any(p.poll() is None for p in self.procs.values()):
                time.sleep(0.05)
        rcs = {n: p.wait() for n, p in self.procs.items()}
        for f in self._logs:
            f.close()
        self.tmp.cleanup()
        return rcs

    def __enter__(self) -> "Graph":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def parse_graph_args(items: Sequence[str]) -> Dict[str, str]:
    out = {}
    for it in items:
        if ":=" not in it:
            raise SystemExit(f"expected name:=value, got {it!r}")
        k, v = it.split(":=", 1)
        if k not in DEFAULTS:
            raise SystemExit(f"unknown argument {k!r}; known: {', '.join(DEFAULTS)}")
        out[k] = v
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="arguments:\n" + "\n".join(f"  {n + ':=' + repr(d):<30} {t}"
                                                                  for n, d, t in LAUNCH_ARGUMENTS))
    ap.add_argument("args", nargs="*", help="name:=value graph arguments")
    ap.add_argument("--duration", type=float, default=0.0, help="stop after this many seconds (0 = until ^C)")
    ap.add_argument("--log-dir", default=None, help="write each node's output to <dir>/<node>.log")
    ap.add_argument("--quiet", action="store_true", help="no per-frame lines (same as print_frames:=false)")
    ns = ap.parse_args(argv)
    gargs = parse_graph_args(ns.args)
    if ns.quiet:
        gargs["print_frames"] = "false"
    specs = replay_graph(gargs)
    g = Graph(specs, log_dir=ns.log_dir)
    stop = {"sig": None}

    def on_signal(signum, frame):
        stop["sig"] = signum

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    g.start()
    for name, p in g.procs.items():
        print(f"[run_graph] started {name} pid {p.pid}", file=sys.stderr, flush=True)
    rc = 0
    t0 = time.monotonic()
    try:
        while stop["sig"] is None:
            ended = g.poll()
            if ended is not None:
                name, code = ended
                if code != 0:
                    print(f"[run_graph] {name} exited with {code}: tearing the graph down", file=sys.stderr)
                    rc = code if code > 0 else 1
                else:
                    print(f"[run_graph] {name} finished", file=sys.stderr)
                break
            if ns.duration and time.monotonic() - t0 > ns.duration:
                break
            time.sleep(0.1)
    finally:
        rcs = g.stop()
        for s, h in old.items():
            signal.signal(s, h)
    bad = {n: c for n, c in rcs.items() if c != 0}
    if bad:
        print(f"[run_graph] unclean exits: {bad}", file=sys.stderr)
        if rc == 0:
            rc = 1
    else:
        print(f"[run_graph] every node exited cleanly{' (' + signal.Signals(stop['sig']).name + ')' if stop['sig'] else ''}",
              file=sys.stderr)
    return rc


if __name__ == "__main__":
    raise SystemExit(main())
