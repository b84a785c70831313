"""CPU smoke runs of the benchmark harnesses (no timing assertions: speed goals live in bench/, measured on the GPU).
They keep the harnesses from rotting: every stage of the deployed pipeline must show up in the report."""
import json
import sys
from pathlib import Path

import pytest

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


def test_engine_agreement_bar_and_rounding_envelope(tmp_path):
    """bench/engine_agreement.py's equivalence bar (centre within 1 cm or BEV IoU >= 0.99) and its rounding-envelope
    check: comparing the eager pipeline with its own backbone-noise draw 0 (noise large enough to move boxes), every
    difference must be found again by envelope draw 0 (the same draw), so none is outside; and the bar itself on
    hand-made boxes."""
    import numpy as np
    import engine_agreement as ea

    from cmfiou_core.eval.rotated_iou import rotated_iou_paired
    from cmfiou_core.types import Detections

    car = np.array([10.0, 2.0, -1.0, 3.9, 1.6, 1.5, 0.3], np.float32)

    def dets(*boxes, labels=None):
        b = np.array(boxes, np.float32).reshape(-1, 7)
        n = len(b)
        lab = np.array(labels if labels is not None else [1] * n, np.int64)
        return Detections(boxes=b, labels=lab, cls_scores=np.ones(n, np.float32), iou_scores=np.ones(n, np.float32),
                          scores=np.ones(n, np.float32))

    def along(d):  # the car moved by d metres along its heading
        return car + np.array([d * np.cos(0.3), d * np.sin(0.3), 0, 0, 0, 0, 0], np.float32)

    assert ea.within_bar(car, 1, dets(along(0.009)), rotated_iou_paired)         # within 1 cm
    assert ea.within_bar(car, 1, dets(along(0.015)), rotated_iou_paired)         # x by 1.4 cm, BEV IoU 0.992
    assert not ea.within_bar(car, 1, dets(along(0.03)), rotated_iou_paired)      # BEV IoU 0.985
    assert not ea.within_bar(car, 1, dets(car, labels=[2]), rotated_iou_paired)   # another class
    # the LiDAR heading turns counter-clockwise: a car at 45 degrees moved 0.5 m along its length keeps
    # (3.9 - 0.5) / (3.9 + 0.5) of the union
    diag = np.array([[0, 0, 0, 3.9, 1.6, 1.5, np.pi / 4]])
    moved = diag + np.array([[0.5 / np.sqrt(2), 0.5 / np.sqrt(2), 0, 0, 0, 0, 0]])
    assert rotated_iou_paired(ea.bev(diag), ea.bev(moved))[0] == pytest.approx(3.4 / 4.4, abs=1e-9)
    assert not ea.within_bar(car, 1, dets(), rotated_iou_paired)

    out = tmp_path / "agree.json"
    rc = ea.main(["--device", "cpu", "--generated", "1", "--gen-dir", str(tmp_path / "gen"), "--score", "0.1",
                  "--compare", "eager:eager_backbone_noise", "--noise", "0.05", "--noise-seeds", "1",
                  "--envelope", "1", "--json", str(out)])
    assert rc == 0
    res = json.loads(out.read_text())
    c = res["comparisons"]["eager:eager_backbone_noise@seed0"]
    env, worst = c["rounding_envelope"], c["worst"]
    assert worst["pairs_off"] + worst["unmatched"] >= 1, "5% noise on the backbone moved no box: the check is idle"
    assert len(env["items"]) == worst["pairs_off"] + worst["unmatched"] == env["inside"]
    assert env["outside"] == worst["outside_rounding_envelope"] == 0
    assert all(it["reproduced_by_draw"] == 0 for it in env["items"])
    _check_provenance(res, checkpoint=True)
