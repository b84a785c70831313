"""The sim-to-real report (``cmfiou_core.eval.centre_match`` and ``python -m cmfiou_core.tools.evaluate``'s headline)
against references whose answer is known by construction: label_2 fed back (every object found, nothing unmatched, no
size error, AP = the ceiling), hand-placed detections with known shifts, size errors, wrong classes and duplicates,
and a shifted copy of the real labels written as result files."""
import json
from pathlib import Path

import numpy as np
import pytest

from cmfiou_core.eval.centre_match import centre_match
from cmfiou_core.eval.kitti_io import empty_annotations, format_result_lines, read_kitti_file


def annos(rows, scores=None):
    """rows: (type, x, z, l, h, w) in camera coordinates (y = 1.6, heading 0, a 2D box of 50 px height)."""
    if not rows:
        return empty_annotations()
    n = len(rows)
    a = {"name": np.array([r[0] for r in rows]), "truncated": np.zeros(n), "occluded": np.zeros(n),
         "alpha": np.zeros(n), "bbox": np.tile([100.0, 100.0, 150.0, 150.0], (n, 1)),
         "dimensions": np.array([r[3:6] for r in rows], float),
         "location": np.array([[r[1], 1.6, r[2]] for r in rows], float), "rotation_y": np.zeros(n),
         "score": np.asarray(scores if scores is not None else np.zeros(n), float)}
    return a


def test_known_matches():
    car, ped, cyc = (3.9, 1.5, 1.6), (0.8, 1.7, 0.6), (1.8, 1.7, 0.6)
    gt = [annos([("Car", 0, 10, *car), ("Pedestrian", 5, 20, *ped), ("Cyclist", -5, 30, *cyc),
                 ("Van", 10, 15, 5.0, 2.0, 1.9), ("DontCare", -1000, -1000, -1, -1, -1)]),
          annos([])]
    dt = [annos([("Car", 1.5, 10, 4.3, 1.6, 1.4),      # the car, 1.5 m off (< 2 m); l +0.4, w -0.2, h +0.1
                 ("Cyclist", 5.5, 20, *ped),           # the pedestrian, 0.5 m off, wrong class
                 ("Cyclist", -5, 31.2, *cyc),          # 1.2 m from the cyclist (> 1 m): unmatched
                 ("Car", 10.3, 15, *car),              # on the van: matched (a labelled object), not unmatched
                 ("Car", 30, 40, *car),                # nothing there: unmatched
                 ("Car", 0, 10, *car),                 # second detection of the car (lower score): unmatched, duplicate
                 ("Car", 20, 20, *car)],               # below the score threshold: not counted
                [0.9, 0.8, 0.7, 0.6, 0.55, 0.5, 0.49]),
          annos([("Pedestrian", 0, 5, *ped)], [0.95])]  # a frame without labels: unmatched
    r = centre_match(gt, dt)
    assert r["confident_detections"] == 7
    assert r["unmatched"] == 4 and r["duplicates"] == 1 and r["unmatched_per_frame"] == pytest.approx(2.0)
    c = r["classes"]
    assert (c["Car"]["num_gt"], c["Car"]["found"], c["Car"]["found_right_class"]) == (1, 1, 1)
    assert c["Car"]["median_centre_error_m"] == pytest.approx(1.5)
    assert (c["Pedestrian"]["found"], c["Pedestrian"]["found_right_class"]) == (1, 0)
    assert c["Pedestrian"]["median_centre_error_m"] == pytest.approx(0.5)
    assert (c["Cyclist"]["num_gt"], c["Cyclist"]["found"]) == (1, 0) and c["Cyclist"]["median_centre_error_m"] is None
    s = r["car_size"]
    assert s["matched"] == 1 and s["median_abs_error_lwh_m"] == pytest.approx([0.4, 0.2, 0.1])
    # a wider radius finds the cyclist; a stricter score drops the 0.5 duplicate
    assert centre_match(gt, dt, other_radius=1.3)["classes"]["Cyclist"]["found"] == 1
    assert centre_match(gt, dt, score_min=0.51)["duplicates"] == 0
    with pytest.raises(ValueError, match="2 ground-truth frames but 1"):
        centre_match(gt, dt[:1])


def label_counts(label_dir: Path):
    n = {"Car": 0, "Pedestrian": 0, "Cyclist": 0}
    for p in label_dir.glob("*.txt"):
        for ln in p.read_text().splitlines():
            t = ln.split()[:1]
            if t and t[0] in n:
                n[t[0]] += 1
    return n


def run_tool(args, tmp_path):
    from cmfiou_core.tools.evaluate import main

    out = tmp_path / "r.json"
    assert main(args + ["--json", str(out)]) == 0
    return json.loads(out.read_text())


def test_label2_as_predictions_is_the_ceiling(kitti_samples, tmp_path):
    obj = kitti_samples / "object"
    js = run_tool(["--data", str(obj), "--split", "all", "--predictions-from-gt"], tmp_path)
    h, counts = js["headline"], label_counts(obj / "training" / "label_2")
    assert js["frames"] == 13 and h["unmatched"] == 0 and h["unmatched_per_frame"] == 0
    for c in ("Car", "Pedestrian", "Cyclist"):
        assert h[c]["num_gt"] == counts[c] and h[c]["found"] == h[c]["found_right_class"] == counts[c]
        assert h[c]["median_centre_error_m"] == pytest.approx(0.0, abs=1e-9)
        assert h[c]["ap_3d_r40"] == pytest.approx(h[c]["ceiling_3d_r40"])
        assert h[c]["best_iou_mean"] == pytest.approx(1.0) and h[c]["recall_at_threshold"] == 1.0
    assert h["Car"]["ap_bev_r40"] == pytest.approx(h["Car"]["ceiling_bev_r40"])
    # the R40 cap of this small set (43 cars: 13 / 24 / 32 of them in easy / moderate / hard)
    assert h["Car"]["ceiling_3d_r40"] == pytest.approx([30.0, 57.5, 77.5])
    assert h["Car"]["objects_easy_mod_hard"] == [13, 24, 32]
    assert h["car_size"]["matched"] == counts["Car"] and h["car_size"]["median_abs_error_lwh_m"] == [0.0, 0.0, 0.0]
    p = js["provenance"]
    assert len(p["git_commit"]) == 40 and p["checkpoint"] is None and p["config"] is None and p["command"]


def test_shifted_labels_give_the_shift(kitti_samples, tmp_path):
    """Result files = label_2 with every Car / Pedestrian / Cyclist moved 0.3 m along camera x and every car 0.25 m
    longer: each car is found 0.3 m off with a 0.25 m length error and nothing else; the AP drops below the ceiling."""
    obj = kitti_samples / "object"
    lab = obj / "training" / "label_2"
    pred = tmp_path / "pred"
    pred.mkdir()
    for p in sorted(lab.glob("*.txt")):
        a = read_kitti_file(p)
        keep = np.isin(a["name"], ["Car", "Pedestrian", "Cyclist"])
        a = {k: v[keep] for k, v in a.items()}
        loc, dims = a["location"].copy(), a["dimensions"].copy()
        loc[:, 0] += 0.3
        dims[a["name"] == "Car", 0] += 0.25
        (pred / p.name).write_text(format_result_lines(a["name"], a["alpha"], a["bbox"], dims, loc, a["rotation_y"],
                                                       np.full(len(loc), 0.9)))
    js = run_tool(["--data", str(obj), "--split", "all", "--predictions", str(pred)], tmp_path)
    h = js["headline"]
    assert h["Car"]["found"] == h["Car"]["num_gt"] == label_counts(lab)["Car"]
    assert h["Car"]["median_centre_error_m"] == pytest.approx(0.3, abs=1e-3)  # result files carry 4 decimals
    assert h["car_size"]["median_abs_error_lwh_m"] == pytest.approx([0.25, 0.0, 0.0], abs=1e-3)
    assert h["unmatched"] == 0
    assert h["Car"]["ap_3d_r40"][1] < h["Car"]["ceiling_3d_r40"][1]
