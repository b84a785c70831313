"""Pip-world launcher: starts the replay graph of :mod:`cmfiou_ros.graph` as subprocesses
(``python -m <module> --ros-args -r __node:=<name> --params-file <yaml> --params-file <overrides> -r a:=b``),
supervises them (a node that exits with an error tears the graph down, exit code propagated), forwards SIGINT/SIGTERM
and tears everything down (SIGINT, then SIGTERM, then SIGKILL).

Usage: ``python -m cmfiou_ros.run_graph data:=../shared/kitti_samples/object rate:=5 [--duration 30]``
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

from cmfiou_ros.graph import DEFAULTS, LAUNCH_ARGUMENTS, REPO, NodeSpec, replay_graph


def node_command(spec: NodeSpec, overrides_file: Optional[str], python: str = sys.executable) -> List[str]:
    cmd = [python, "-m", spec.module, "--ros-args", "-r", f"__node:={spec.name}"]
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


def child_env(extra: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    env = dict(os.environ)
    pp = env.get("PYTHONPATH", "")
    if str(REPO) not in pp.split(os.pathsep):
        env["PYTHONPATH"] = str(REPO) + (os.pathsep + pp if pp else "")
    shm = REPO / "config" / "fastdds_shm.xml"
    if "FASTDDS_DEFAULT_PROFILES_FILE" not in env and shm.is_file():
        env["FASTDDS_DEFAULT_PROFILES_FILE"] = str(shm)  # large clouds between processes (ros2_pip.md section 2)
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
                                 epilog="arguments:\n" + "\n".join(f"  {n}:={d!r:<12} {t}" for n, d, t in
                                                                  LAUNCH_ARGUMENTS))
    ap.add_argument("args", nargs="*", help="name:=value graph arguments")
    ap.add_argument("--duration", type=float, default=0.0, help="stop after this many seconds (0 = until ^C)")
    ap.add_argument("--log-dir", default=None, help="write each node's output to <dir>/<node>.log")
    ns = ap.parse_args(argv)
    specs = replay_graph(parse_graph_args(ns.args))
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
    bad = {n: c for n, c in rcs.items() if c not in (0, -signal.SIGINT, -signal.SIGTERM)}
    if bad and rc == 0:
        print(f"[run_graph] unclean exits: {bad}", file=sys.stderr)
    return rc


if __name__ == "__main__":
    raise SystemExit(main())
