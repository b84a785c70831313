"""Evaluation tools on bad input: unknown split, missing/empty ground truth, malformed or truncated files (named,
skipped, counted; --strict stops), the right hints, and provenance in the JSON they write."""
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cmfiou_core.eval.dataset_eval import BadInputError, evaluate_split
from tiny_pipeline import TinyPipeline

IDS = ["000003", "000007", "000008", "000009", "000010"]


def run(*args):
    return subprocess.run([sys.executable, "-m", *map(str, args)], capture_output=True, text=True, timeout=300)


def _copy_split(src: Path, dst: Path, ids=IDS) -> Path:
    """A KITTI object layout with real frames (copies: the tests corrupt some files)."""
    for sub, ext in (("velodyne", "bin"), ("image_2", "png"), ("calib", "txt"), ("label_2", "txt")):
        (dst / "training" / sub).mkdir(parents=True, exist_ok=True)
        for i in ids:
            shutil.copy(src / "object" / "training" / sub / f"{i}.{ext}", dst / "training" / sub / f"{i}.{ext}")
    (dst / "ImageSets").mkdir(exist_ok=True)
    (dst / "ImageSets" / "val.txt").write_text("\n".join(ids) + "\n")
    return dst


def test_evaluate_unknown_split_names_the_available_ones(kitti_samples):
    r = run("cmfiou_core.tools.evaluate", "--data", kitti_samples / "object", "--split", "typo")
    assert r.returncode == 2, r.stderr
    assert "unknown split 'typo'" in r.stderr and "available splits: all, train_3dop, val_3dop" in r.stderr


def test_evaluate_missing_or_empty_ground_truth(tmp_path, kitti_samples):
    d = _copy_split(kitti_samples, tmp_path / "d", IDS[:2])
    (d / "training" / "label_2" / f"{IDS[1]}.txt").unlink()
    r = run("cmfiou_core.tools.evaluate", "--data", d, "--split", "val")
    assert r.returncode == 2 and f"ground truth missing for 1 of 2 frames of split 'val' (first: {IDS[1]}.txt)" \
        in r.stderr, r.stderr
    assert "allow" not in r.stderr
    (d / "training" / "label_2" / f"{IDS[0]}.txt").write_text("DontCare -1 -1 -10 1 2 3 4 -1 -1 -1 -1000 -1000 -1000 -10\n")
    (d / "ImageSets" / "val.txt").write_text(IDS[0] + "\n")
    r = run("cmfiou_core.tools.evaluate", "--data", d, "--split", "val")
    assert r.returncode == 2 and "has no Car, Pedestrian or Cyclist object" in r.stderr, r.stderr
    for f in (d / "training" / "label_2").glob("*.txt"):
        f.unlink()
    r = run("cmfiou_core.tools.evaluate", "--data", d, "--split", "all")
    assert r.returncode == 2 and "no ground truth (no label files)" in r.stderr, r.stderr


def test_evaluate_split_bad_files_named_skipped_counted(tmp_path, kitti_samples):
    d = _copy_split(kitti_samples, tmp_path / "d")
    t = d / "training"
    bad = {
        "000003": t / "velodyne" / "000003.bin",
        "000007": t / "calib" / "000007.txt",
        "000008": t / "label_2" / "000008.txt",
        "000009": t / "image_2" / "000009.png",
    }
    raw = bad["000003"].read_bytes()
    bad["000003"].write_bytes(raw[: len(raw) // 2 + 6])  # cut mid-point: size no longer a multiple of 16
    bad["000007"].write_text("P2: 1 2 3 4 5\nR0_rect: 1 0 0 0 1 0 0 0 1\nTr_velo_to_cam: 0 0 0 0 0 0 0 0 0 0 0 0\n")
    bad["000008"].write_text("Car 0.0 0 1.0 100 100 200 200 1.5 1.6\n")
    png = bad["000009"].read_bytes()
    bad["000009"].write_bytes(png[: len(png) // 2])
    r = evaluate_split(TinyPipeline(), d, "val", out_dir=tmp_path / "out")
    assert set(r.skipped) == set(bad) and r.frames == 1 and not r.failed
    for fid, path in bad.items():
        assert str(path) in r.skipped[fid], r.skipped[fid]
    assert "not a multiple of 16" in r.skipped["000003"] and "unreadable image" in r.skipped["000009"]
    assert "needs 15 fields" in r.skipped["000008"]
    assert sorted(p.stem for p in (tmp_path / "out" / "results").glob("*.txt")) == ["000010"]
    assert r.summary()["skipped"] == r.skipped
    with pytest.raises(BadInputError, match=re.escape(str(bad["000003"]))):
        evaluate_split(TinyPipeline(), d, "val", strict=True)
    # LiDAR-only frames are listed with the reason
    lo = evaluate_split(TinyPipeline(), d, "val", lidar_only=True)
    assert lo.lidar_only == {"000010": "--lidar-only: no camera image given"}


def _write(folder: Path, name: str, text: str):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.txt").write_text(text)


def test_eval_kitti_bad_missing_empty(tmp_path, kitti_samples):
    labels = kitti_samples / "object" / "training" / "label_2"
    gt, pred = tmp_path / "gt", tmp_path / "pred"
    for i in IDS[:3]:
        text = (labels / f"{i}.txt").read_text()
        _write(gt, i, text)
        _write(pred, i, "".join(" ".join(ln.split()[:15]) + " 1.0\n" for ln in text.splitlines()
                                if ln.split()[0] in ("Car", "Pedestrian", "Cyclist")))
    _write(pred, IDS[1], "Car 1 2\n")
    js = tmp_path / "ap.json"
    r = run("cmfiou_core.tools.eval_kitti", "--gt", gt, "--pred", pred, "--json", js)
    assert r.returncode == 0, r.stderr
    assert f"frame {IDS[1]} skipped" in r.stderr and f"{pred / IDS[1]}.txt:1" in r.stderr
    out = json.loads(js.read_text())
    assert list(out["skipped"]) == [IDS[1]] and out["frames"] == 2
    prov = out["provenance"]
    assert re.fullmatch(r"[0-9a-f]{40}", prov["git_commit"]) and isinstance(prov["git_dirty"], bool)
    assert "--gt" in prov["command"] and prov["config"] is None and prov["checkpoint_sha256"] is None
    assert prov["device_name"]
    r = run("cmfiou_core.tools.eval_kitti", "--gt", gt, "--pred", pred, "--strict")
    assert r.returncode == 2 and f"error: {pred / IDS[1]}.txt:1" in r.stderr
    # missing predictions: the hint; missing ground truth: an error without it, --allow-missing or not
    (pred / f"{IDS[2]}.txt").unlink()
    r = run("cmfiou_core.tools.eval_kitti", "--gt", gt, "--pred", pred)
    assert r.returncode == 2 and "1 of 3 prediction files missing" in r.stderr and "--allow-missing" in r.stderr
    ids = tmp_path / "ids.txt"
    ids.write_text("\n".join(IDS[:4]) + "\n")
    for extra in ([], ["--allow-missing"]):
        r = run("cmfiou_core.tools.eval_kitti", "--gt", gt, "--pred", pred, "--ids", ids, *extra)
        assert r.returncode == 2 and "ground truth missing for 1 of 4 frames" in r.stderr, r.stderr
        assert "allow" not in r.stderr.split("error:")[1]
    # empty ground truth: no files, or no object of the evaluated classes
    r = run("cmfiou_core.tools.eval_kitti", "--gt", tmp_path / "nogt", "--pred", pred)
    assert r.returncode == 2
    (tmp_path / "nogt").mkdir()
    r = run("cmfiou_core.tools.eval_kitti", "--gt", tmp_path / "nogt", "--pred", pred)
    assert r.returncode == 2 and "no ground truth" in r.stderr
    for i in IDS[:3]:
        _write(tmp_path / "dcgt", i, "")
    r = run("cmfiou_core.tools.eval_kitti", "--gt", tmp_path / "dcgt", "--pred", pred, "--allow-missing")
    assert r.returncode == 2 and "has no object of Car, Pedestrian, Cyclist" in r.stderr, r.stderr
