"""CPU smoke runs of the benchmark harnesses (no timing assertions: speed goals live in bench/, measured on the GPU).
They keep the harnesses from rotting: every stage of the deployed pipeline must show up in the report."""
import json
import sys
from pathlib import Path

from rosutil import require  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))


def _check_provenance(d, checkpoint: bool):
    """Every results JSON records the code, config, weights, device and command (cmfiou_core.provenance)."""
    import hashlib
    import subprocess

    p = d["provenance"]
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True)
    if head.returncode == 0:
        assert p["git_commit"] == head.stdout.strip() and isinstance(p["git_dirty"], bool)
    assert p["device"] == "cpu" and p["device_name"] and p["command"]
    if checkpoint:
        assert p["checkpoint_sha256"] == hashlib.sha256(Path(p["checkpoint"]).read_bytes()).hexdigest()
        assert p["config_sha256"] == hashlib.sha256(Path(p["config"]).read_bytes()).hexdigest()
    else:
        assert p["checkpoint_sha256"] is None


def test_bench_pipeline_cpu_smoke(tmp_path):
    import bench_pipeline

    out = tmp_path / "b.json"
    rc = bench_pipeline.main(["--device", "cpu", "--frames", "1", "--warmup", "0", "--generated", "1",
                              "--gen-dir", str(tmp_path / "gen"), "--json", str(out), "--md", str(tmp_path / "b.md")])
    assert rc == 0
    res = json.loads(out.read_text())
    stages = res["stages"]
    for s in ("h2d", "depth.projection", "depth.completion", "depth.lifting", "depth.thinning", "voxelize",
              "backbone_3d", "bev", "rpn", "roi_head", "postprocess", "end_to_end"):
        assert s in stages and stages[s]["n"] == 1 and stages[s]["p50"] >= 0, s
    # the parts add up to (at most) the end-to-end time
    parts = sum(v["p50"] for k, v in stages.items() if k not in ("end_to_end", "msg_in", "msg_out"))
    assert parts <= stages["end_to_end"]["p50"] * 1.05
    assert "| end_to_end |" in (tmp_path / "b.md").read_text()
    _check_provenance(res, checkpoint=True)


def test_bench_depth_cpu_smoke(tmp_path, kitti_samples):
    import os
    import subprocess

    from PIL import Image

    out = tmp_path / "d.json"
    env = dict(os.environ, CMFIOU_KITTI_SAMPLES=str(kitti_samples))
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_depth.py"), "--device", "cpu", "--iters", "2",
                        "--warmup", "1", "--frame", "000008", "--json", str(out)], capture_output=True, text=True,
                       timeout=600, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    d = json.loads(out.read_text())
    # the real frame went in, every depth stage was timed on each iteration, and the row counts are consistent
    n_points = (kitti_samples / "object" / "training" / "velodyne" / "000008.bin").stat().st_size // 16
    assert d["source"] == "kitti object 000008" and d["points_in"] == n_points and d["iters"] == 2
    assert d["image"] == list(Image.open(kitti_samples / "object" / "training" / "image_2" / "000008.png").size)
    for stage in ("projection", "completion", "lifting", "thinning", "wall"):
        assert d["ms"][stage]["p50"] > 0 and d["ms"][stage]["p95"] >= d["ms"][stage]["p50"], stage
    assert 0 < d["raw_rows"] <= d["points_in"] and 0 < d["pseudo_after_discard"] < d["pseudo_rows"]
    _check_provenance(d, checkpoint=False)
    assert "bench_depth.py" in d["provenance"]["command"]


def test_bench_roi_head_cpu_smoke(tmp_path):
    import bench_roi_head

    out = tmp_path / "r.json"
    res = bench_roi_head.main(["--smoke", "--json", str(out)])
    d = json.loads(out.read_text())
    assert d["ms"]["roi_head"]["p50"] > 0 and d["ms"]["postprocess"]["p50"] >= 0
    for t in range(3):
        assert d["per_stage"][f"s{t}"]["ops"] > 0 and d["per_stage"][f"s{t}"]["syncs"] == 0
    assert d["aten_ops"]["proposal"] > 0 and d["roi_head_totals"]["syncs"] == res["roi_head_totals"]["syncs"]
    _check_provenance(d, checkpoint=False)


def test_bench_node_load_smoke(tmp_path, kitti_samples):
    """The node-load harness end to end with the tiny test pipeline (real detector process, real rclpy)."""
    require("rclpy")
    import bench_node_load

    out = tmp_path / "n.json"
    assert bench_node_load.main(["--data", str(kitti_samples / "object"), "--tiny-sleep-ms", "50",
                                 "--rates", "0", "5", "--seconds", "2",
                                 "--domain", str(120 + __import__("os").getpid() % 80), "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    idle, busy = res["phases"]
    assert idle["rate_hz"] == 0 and idle["inputs"] == idle["outputs"] == 0
    assert busy["inputs"] >= 5 and 1 <= busy["outputs"] <= busy["inputs"] and busy["latency_s"]["newest"] > 0
    for ph in res["phases"]:
        assert ph["main_thread_cpu_pct"] >= 0 and ph["process_cpu_pct"] >= ph["main_thread_cpu_pct"] - 1.0
    assert res["provenance"]["git_commit"]
