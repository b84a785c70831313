"""KITTI evaluator: hand-derived cases, the R40 cap on the real samples, a loop-by-loop protocol transcription as an
independent cross-check on random data, rotated IoU against shapely, file validation."""
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cmfiou_core.eval import kitti_eval as ke
from cmfiou_core.eval.kitti_io import (KittiFormatError, empty_annotations, format_result_lines, load_folder,
                                       parse_kitti_text)
from cmfiou_core.eval.rotated_iou import box_corners_bev, iou3d_camera_paired, rotated_intersection, rotated_iou_paired
from cmfiou_core.eval.synthetic import make_dataset

REPO = Path(__file__).resolve().parents[1]


def obj(name="Car", bbox=(100, 100, 200, 160), loc=(0.0, 1.6, 20.0), dims_hwl=(1.5, 1.6, 3.9), ry=0.0, trunc=0.0,
        occ=0, alpha=0.0, score=None):
    h, w, l = dims_hwl
    s = "" if score is None else f" {score}"
    return (f"{name} {trunc} {occ} {alpha} {bbox[0]} {bbox[1]} {bbox[2]} {bbox[3]} {h} {w} {l} "
            f"{loc[0]} {loc[1]} {loc[2]} {ry}{s}")


def annos(*lines, result=False):
    return parse_kitti_text("\n".join(lines), "<test>", result)


def dontcare(bbox):
    return f"DontCare -1 -1 -10 {bbox[0]} {bbox[1]} {bbox[2]} {bbox[3]} -1 -1 -1 -1000 -1000 -1000 -10"


def r40(res, cls="Car", metric="3d", diff=0, s=0):
    return res.ap["R40"][cls][metric][s][diff]


def r11(res, cls="Car", metric="3d", diff=0, s=0):
    return res.ap["R11"][cls][metric][s][diff]


# ------------------------------------------------------------------------------------------- hand-derived cases
def test_one_box_perfect():
    # N = 1 valid GT, one exact detection. Pass 1: TP score [0.9]; get_thresholds keeps it (last element).
    # One threshold -> precision[0] = 1, precision[1:] = 0. R11 = p[0]/11 = 9.0909 %; R40 excludes p[0] -> 0.
    gt = [annos(obj())]
    dt = [annos(obj(name="Car", score=0.9).replace("Car 0.0 0", "Car -1 -1"), result=True)]
    res = ke.evaluate(gt, dt)
    for m in ("bbox", "bev", "3d", "aos"):
        assert r11(res, metric=m) == pytest.approx(100 / 11)
        assert r40(res, metric=m) == 0.0
    assert res.num_valid_gt["Car"] == [1, 1, 1]
    assert r11(res, "Pedestrian") == 0.0  # no pedestrians anywhere: AP 0, not NaN


def test_three_gt_one_fp_hand_computed():
    # 3 Cars (easy), dets: d0 0.9 on GT0, d1 0.8 nowhere, d2 0.7 on GT2; GT1 missed.
    # Pass 1 TP scores [0.9, 0.7]. get_thresholds(N=3): i=0 l=1/3 r=2/3 cur=0: (r-cur)=2/3 >= (cur-l)=-1/3 keep
    # -> cur=1/40; i=1 is the last -> keep. Thresholds [0.9, 0.7].
    # t=0.9: tp=1 fp=0 -> p=1; t=0.7: tp=2 fp=1 (d1) -> p=2/3. Monotone p = [1, 2/3, 0 ...].
    # R11 = p[0]/11 = 9.0909; R40 = p[1]/40 = 1.6667 %.
    g = [obj(loc=(-8, 1.6, 20), bbox=(100, 100, 200, 160)), obj(loc=(0, 1.6, 20), bbox=(300, 100, 400, 160)),
         obj(loc=(8, 1.6, 20), bbox=(500, 100, 600, 160))]
    d = [obj(loc=(-8, 1.6, 20), bbox=(100, 100, 200, 160), score=0.9),
         obj(loc=(0, 1.6, 50), bbox=(800, 100, 900, 160), score=0.8),
         obj(loc=(8, 1.6, 20), bbox=(500, 100, 600, 160), score=0.7)]
    res = ke.evaluate([annos(*g)], [annos(*d, result=True)])
    for m in ("bbox", "bev", "3d"):
        assert r11(res, metric=m) == pytest.approx(100 / 11)
        assert r40(res, metric=m) == pytest.approx(100 * (2 / 3) / 40)


def test_tie_scores_pass1_first_index_pass2_max_overlap():
    # GT alpha 0. d0 (score 0.5, bbox IoU 0.8, alpha 0), d1 (score 0.5, IoU 1.0, alpha pi/2).
    # Pass 1 (highest score, ties -> lower index) takes d0 -> TP score [0.5] -> one threshold 0.5.
    # Pass 2 (highest overlap) takes d1 -> tp=1, fp=1 (d0) -> precision 1/2 -> R11 bbox = 0.5/11 = 4.5455 %.
    # AOS: similarity of d1 = (1 + cos(pi/2))/2 = 0.5 -> aos = 0.5/(tp+fp) = 0.25 -> R11 aos = 2.2727 %.
    # (Had pass 2 taken d0, aos would be 1/2 -> 4.5455 %.)
    gt = [annos(obj(bbox=(100, 100, 200, 200)))]
    d0 = obj(bbox=(100, 100, 200, 180), score=0.5, alpha=0.0)  # IoU 0.8
    d1 = obj(bbox=(100, 100, 200, 200), score=0.5, alpha=math.pi / 2)
    res = ke.evaluate(gt, [annos(d0, d1, result=True)])
    assert r11(res, metric="bbox") == pytest.approx(50 / 11)
    assert r11(res, metric="aos") == pytest.approx(25 / 11)
    assert r40(res, metric="bbox") == 0.0


def test_all_dontcare_frames_and_dontcare_suppression():
    # Frame 0: one Car + det; frame 1: DontCare only, with a det inside the DontCare box; frame 2: nothing at all.
    # bbox metric: the det in the DontCare region is removed (not FP) -> precision 1 -> R11 = 9.0909 %.
    # BEV/3D: DontCare removes nothing -> tp=1 fp=1 at the only threshold (0.9; the FP has score 0.95 >= 0.9)
    # -> precision 1/2 -> R11 = 4.5455 %.
    gt = [annos(obj()), annos(dontcare((500, 100, 700, 200))), empty_annotations()]
    dt = [annos(obj(score=0.9), result=True),
          annos(obj(bbox=(550, 120, 650, 180), loc=(5, 1.6, 30), score=0.95), result=True), empty_annotations()]
    res = ke.evaluate(gt, dt)
    assert r11(res, metric="bbox") == pytest.approx(100 / 11)
    assert r11(res, metric="bev") == pytest.approx(50 / 11)
    # only DontCare everywhere: no valid GT -> every AP is 0 (not NaN), no exception
    res = ke.evaluate([annos(dontcare((0, 0, 50, 50)))] * 3, [annos(obj(score=0.5), result=True)] * 3)
    assert all(r11(res, c, m, d) == 0 for c in res.classes for m in ("bbox", "bev", "3d") for d in range(3))


def test_empty_predictions_give_zero():
    gt = [annos(obj(), obj(name="Pedestrian", bbox=(10, 10, 40, 100), dims_hwl=(1.7, 0.6, 0.8)))]
    res = ke.evaluate(gt, [empty_annotations()])
    assert all(v == 0 for c in res.ap["R11"].values() for m in c.values() for v in np.ravel(m))
    assert json.dumps(res.to_json())  # serialisable; aos null (not computable without predictions)
    assert res.to_json()["R40"]["Car"]["aos"] == [None, None, None]


def test_min_height_rules():
    # GT heights: exactly 40 px (ignored at easy: height <= 40), exactly 25 px (ignored at moderate and hard).
    # Dets: perfect copies. Easy: valid GT = 0 -> AP 0, and the matched dets are not FP.
    # Moderate: GT40 valid (N=1), GT25 ignored; det on GT25 has height 25 (not < 25 -> a valid det) but it is
    # assigned to the ignored GT -> neither TP nor FP. Precision 1 -> R11 = 9.0909 %.
    g40 = obj(bbox=(100, 100, 200, 140), loc=(-5, 1.6, 20))
    g25 = obj(bbox=(300, 100, 360, 125), loc=(5, 1.6, 20))
    res = ke.evaluate([annos(g40, g25)], [annos(g40 + " 0.9", g25 + " 0.8", result=True)])
    assert res.num_valid_gt["Car"] == [0, 1, 1]
    assert r11(res, metric="3d", diff=0) == 0.0
    assert r11(res, metric="3d", diff=1) == pytest.approx(100 / 11)
    assert r11(res, metric="3d", diff=2) == pytest.approx(100 / 11)
    # a small FP (24.9 px < 25) of any class is ignored, never FP: adding one leaves moderate unchanged
    small_fp = obj(name="Pedestrian", bbox=(700, 100, 720, 124.9), loc=(9, 1.6, 40), dims_hwl=(1.7, 0.6, 0.8))
    res2 = ke.evaluate([annos(g40, g25)], [annos(g40 + " 0.9", g25 + " 0.8", small_fp + " 0.99", result=True)])
    assert r11(res2, metric="3d", diff=1) == pytest.approx(100 / 11)


def test_neighbouring_classes():
    # Car det on a Van GT and Pedestrian det on a Person_sitting GT: matched to an ignored GT -> not FP.
    # One real Car is detected -> Car precision 1, R11 9.0909 %. Pedestrian: no valid GT -> 0.
    # Without the neighbour rule the Van det would be an FP with higher score -> precision 1/2.
    van = obj(name="Van", bbox=(300, 100, 400, 180), loc=(5, 1.6, 20), dims_hwl=(2.0, 1.9, 5.0))
    sit = obj(name="Person_sitting", bbox=(600, 100, 640, 180), loc=(10, 1.6, 20), dims_hwl=(1.2, 0.6, 0.8))
    car = obj()
    dets = [car + " 0.5", van.replace("Van", "Car", 1) + " 0.9", sit.replace("Person_sitting", "Pedestrian", 1) + " 0.9"]
    res = ke.evaluate([annos(car, van, sit)], [annos(*dets, result=True)])
    assert r11(res, "Car", "3d") == pytest.approx(100 / 11)
    assert r11(res, "Car", "bbox") == pytest.approx(100 / 11)
    assert r11(res, "Pedestrian", "3d") == 0.0
    # the Truck is "other class": a Car det on a Truck is an FP
    truck = obj(name="Truck", bbox=(300, 100, 400, 180), loc=(5, 1.6, 20), dims_hwl=(2.0, 1.9, 5.0))
    res = ke.evaluate([annos(car, truck)], [annos(car + " 0.5", van.replace("Van", "Car", 1) + " 0.9", result=True)])
    assert r11(res, "Car", "3d") == pytest.approx(50 / 11)


def test_strict_overlap_threshold():
    # 2D IoU exactly 0.5 for a Pedestrian (min overlap 0.5, strict >) is not a match -> AP 0 in bbox.
    g = obj(name="Pedestrian", bbox=(100, 100, 200, 200), dims_hwl=(1.7, 0.6, 0.8))
    d = obj(name="Pedestrian", bbox=(100, 100, 200, 150), dims_hwl=(1.7, 0.6, 0.8), score=0.9)  # IoU 0.5
    res = ke.evaluate([annos(g)], [annos(d, result=True)])
    assert r11(res, "Pedestrian", "bbox") == 0.0
    assert r11(res, "Pedestrian", "3d") == pytest.approx(100 / 11)


def test_perfect_predictions_kitti_samples(kitti_samples):
    # Valid GT counts over the 13 label files of object/training (counted by hand with awk over label_2:
    # type, occluded <= 0/1/2, truncated <= .15/.30/.50, bbox height > 40/25/25):
    #   Car 13 / 24 / 32, Pedestrian 3 / 3 / 4, Cyclist 0 / 1 / 1.
    # Perfect predictions (Car/Ped/Cyc GT boxes, score 1) -> every match is a TP, no FP (dets on ignored GT are
    # assigned, small ones are ignored). With N <= 40 get_thresholds keeps every TP score (at step i the test
    # cur = i/40 <= (i + 1.5)/N always holds), so precision = 1 at the first N sample points and 0 after:
    #   AP_R40 = (N - 1)/40 * 100 (the R40 cap: recall 0 is excluded),  AP_R11 = ceil(N/4)/11 * 100.
    # -> Car R40 30.0 / 57.5 / 77.5, R11 36.36 / 54.55 / 72.73; Ped R40 5.0 / 5.0 / 7.5, R11 9.09 each;
    #    Cyc R40 0 / 0 / 0 (N = 1 gives 0), R11 0 / 9.09 / 9.09 (N = 0 -> 0).
    gt = load_folder(kitti_samples / "object" / "training" / "label_2", None, False)
    dt = []
    for a in gt:
        m = np.isin(a["name"], ["Car", "Pedestrian", "Cyclist"])
        b = {k: v[m] for k, v in a.items()}
        b["score"] = np.ones(int(m.sum()))
        dt.append(b)
    res = ke.evaluate(gt, dt)
    assert res.num_valid_gt == {"Car": [13, 24, 32], "Pedestrian": [3, 3, 4], "Cyclist": [0, 1, 1]}
    expect_r40 = {"Car": [30.0, 57.5, 77.5], "Pedestrian": [5.0, 5.0, 7.5], "Cyclist": [0.0, 0.0, 0.0]}
    expect_r11 = {"Car": [400 / 11, 600 / 11, 800 / 11], "Pedestrian": [100 / 11] * 3, "Cyclist": [0, 100 / 11, 100 / 11]}
    js = res.to_json()
    for c in expect_r40:
        for m in ("bbox", "bev", "3d", "aos"):
            np.testing.assert_allclose(js["R40"][c][m], expect_r40[c], atol=1e-9)
            np.testing.assert_allclose(js["R11"][c][m], expect_r11[c], atol=1e-9)
            np.testing.assert_allclose(res.ap["R40"][c][m][1], expect_r40[c], atol=1e-9)  # second overlap set
    # the ceiling printed beside every AP is that perfect-prediction AP, whatever the predictions are
    empty = ke.evaluate(gt, [ke.perfect_predictions([a], ())[0] for a in gt])
    cj = empty.ceiling_json()
    for c in expect_r40:
        assert empty.to_json()["R40"][c]["3d"] == [0.0, 0.0, 0.0]
        for m in ("bbox", "bev", "3d"):
            np.testing.assert_allclose(cj["R40"][c][m], expect_r40[c], atol=1e-9)
            np.testing.assert_allclose(cj["R11"][c][m], expect_r11[c], atol=1e-9)
    table = empty.table()
    assert "3d   AP:0.0000, 0.0000, 0.0000   (ceiling 30.0000, 57.5000, 77.5000)" in table
    warn = empty.small_set_warnings()
    assert len(warn) == 3 and "Car has 13 / 24 / 32 objects" in warn[0] and all(w in table for w in warn)


def test_ceiling_reaches_100_from_41_objects():
    # 41 easy cars (one per frame): R40 needs recall 1/40 ... 40/40 after the first TP -> every point reached, 100;
    # with 40 the closed form above gives 39/40 = 97.5 and a warning
    for n, want in ((41, 100.0), (40, 97.5)):
        res = ke.evaluate([annos(obj()) for _ in range(n)], [annos() for _ in range(n)])
        assert res.ceiling["R40"]["Car"]["3d"][0][0] == pytest.approx(want)
        assert any(w.startswith("warning: Car") for w in res.small_set_warnings()) == (n < 41)


def test_perfect_predictions_expected_helper():
    # the closed form used above, checked against get_thresholds for every N <= 40
    for n in range(1, 41):
        assert len(ke.get_thresholds(np.ones(n), n)) == n


# ------------------------------------------------------------------------------------------- rotated IoU
def test_rotated_iou_hand_cases():
    a = np.array([[0, 0, 2, 2, 0.0]])
    assert rotated_iou_paired(a, np.array([[1, 0, 2, 2, 0.0]]))[0] == pytest.approx(2 / 6)  # half overlap: 2/(4+4-2)
    # square rotated by 45 deg over the same square: intersection = octagon area 8(sqrt2 - 1) for side 2
    inter = rotated_intersection(a, np.array([[0, 0, 2, 2, math.pi / 4]]))[0]
    assert inter == pytest.approx(8 * (math.sqrt(2) - 1))
    assert rotated_iou_paired(a, np.array([[5, 0, 2, 2, 0.3]]))[0] == 0.0
    assert rotated_iou_paired(a, a)[0] == pytest.approx(1.0)
    # 3D: same BEV, vertical spans [0-2, 0] and [1-2, 1] -> overlap 1 of height 2: IoU = 4/(8+8-4) = 1/3
    b3 = np.array([[0, 0, 0, 2, 2, 2, 0.0]])
    c3 = np.array([[0, 1, 0, 2, 2, 2, 0.0]])
    assert iou3d_camera_paired(b3, c3)[0] == pytest.approx(1 / 3)


def test_rotated_intersection_vs_shapely():
    shapely = pytest.importorskip("shapely.geometry")
    rng = np.random.default_rng(1)
    n = 2000
    a = np.c_[rng.uniform(-3, 3, (n, 2)), rng.uniform(0.3, 5, (n, 2)), rng.uniform(-4, 4, n)]
    b = np.c_[rng.uniform(-3, 3, (n, 2)), rng.uniform(0.3, 5, (n, 2)), rng.uniform(-4, 4, n)]
    got = rotated_intersection(a, b)
    ca, cb = box_corners_bev(a), box_corners_bev(b)
    ref = np.array([shapely.Polygon(ca[i]).intersection(shapely.Polygon(cb[i])).area for i in range(n)])
    np.testing.assert_allclose(got, ref, atol=1e-9)


# ------------------------------------------------------------------------------------------- loop transcription
def _ref_eval(gts, dts, cls="car", diff=1, metric="3d", mo=0.7, aos=False):
    """Frame-by-frame, box-by-box transcription of the KITTI protocol as OpenPCDet's kitti_object_eval_python runs
    it (clean_data filtering, compute_statistics_jit matching, get_thresholds / eval_class AP); slow, independent of
    the vectorised matcher (shares only the paired IoU functions)."""
    nb = {"car": "van", "pedestrian": "person_sitting"}.get(cls)
    frames, n_valid = [], 0
    for g, d in zip(gts, dts):
        ig, idt, dc = [], [], []
        for i in range(len(g["name"])):
            nm = g["name"][i].lower()
            h = g["bbox"][i][3] - g["bbox"][i][1]
            vc = 1 if nm == cls else (0 if nm == nb else -1)
            ign = (g["occluded"][i] > ke.MAX_OCCLUSION[diff] or g["truncated"][i] > ke.MAX_TRUNCATION[diff]
                   or h <= ke.MIN_HEIGHT[diff])
            if vc == 1 and not ign:
                ig.append(0)
                n_valid += 1
            elif vc == 0 or (ign and vc == 1):
                ig.append(1)
            else:
                ig.append(-1)
            if g["name"][i] == "DontCare":
                dc.append(g["bbox"][i])
        for j in range(len(d["name"])):
            h = abs(d["bbox"][j][3] - d["bbox"][j][1])
            idt.append(1 if h < ke.MIN_HEIGHT[diff] else (0 if d["name"][j].lower() == cls else -1))
        nd_, ng_ = len(d["name"]), len(g["name"])
        jj, ii = [x.ravel() for x in np.meshgrid(np.arange(nd_), np.arange(ng_), indexing="ij")]
        if metric == "bbox":
            ov = ke.image_overlap(d["bbox"][jj], g["bbox"][ii])
        else:
            gb = np.c_[g["location"], g["dimensions"], g["rotation_y"]][ii]
            db = np.c_[d["location"], d["dimensions"], d["rotation_y"]][jj]
            ov = (rotated_iou_paired(db[:, [0, 2, 3, 5, 6]], gb[:, [0, 2, 3, 5, 6]]) if metric == "bev"
                  else iou3d_camera_paired(db, gb))
        ov = ov.reshape(nd_, ng_)
        frames.append((g, d, ig, idt, dc, ov))

    def stats(g, d, ig, idt, dc, ov, thresh, compute_fp):
        nd = len(d["name"])
        assigned = [False] * nd
        below = [compute_fp and d["score"][j] < thresh for j in range(nd)]
        tp = fp = fn = 0
        tps, deltas = [], []
        for i in range(len(g["name"])):
            if ig[i] == -1:
                continue
            det, valid, maxov, ass_ign = -1, None, 0.0, False
            for j in range(nd):
                if idt[j] == -1 or assigned[j] or below[j]:
                    continue
                o, s = ov[j, i], d["score"][j]
                if not compute_fp and o > mo and (valid is None or s > valid):
                    det, valid = j, s
                elif compute_fp and o > mo and (o > maxov or ass_ign) and idt[j] == 0:
                    maxov, det, valid, ass_ign = o, j, 1, False
                elif compute_fp and o > mo and valid is None and idt[j] == 1:
                    det, valid, ass_ign = j, 1, True
            if valid is None and ig[i] == 0:
                fn += 1
            elif valid is not None and (ig[i] == 1 or idt[det] == 1):
                assigned[det] = True
            elif valid is not None:
                tp += 1
                tps.append(d["score"][det])
                deltas.append(g["alpha"][i] - d["alpha"][det])
                assigned[det] = True
        sim = 0.0
        if compute_fp:
            for j in range(nd):
                if not (assigned[j] or idt[j] != 0 or below[j]):
                    fp += 1
            nstuff = 0
            if metric == "bbox":
                for b in dc:
                    for j in range(nd):
                        if assigned[j] or idt[j] != 0 or below[j]:
                            continue
                        if ke.image_overlap(d["bbox"][j:j + 1], np.asarray(b)[None], 0)[0] > mo:
                            assigned[j] = True
                            nstuff += 1
            fp -= nstuff
            sim = sum((1 + math.cos(x)) / 2 for x in deltas)
        return tp, fp, fn, sim, tps

    scores = []
    for f in frames:
        scores += stats(*f, 0.0, False)[4]
    thr = ke.get_thresholds(np.array(scores), n_valid) if n_valid else []
    prec, aosv = np.zeros(41), np.zeros(41)
    for t, th in enumerate(thr):
        tp = fp = fn = 0
        sim = 0.0
        for f in frames:
            a, b, c, s, _ = stats(*f, th, True)
            tp, fp, fn, sim = tp + a, fp + b, fn + c, sim + s
        prec[t] = tp / (tp + fp)
        aosv[t] = sim / (tp + fp)
    for t in range(41):
        prec[t] = prec[t:].max()
        aosv[t] = aosv[t:].max()
    return (ke.ap_r11(aosv), ke.ap_r40(aosv)) if aos else (ke.ap_r11(prec), ke.ap_r40(prec))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_vectorised_equals_loop_transcription(seed):
    # dense, crowded frames (many overlaps, duplicates, ties in score, threshold-dependent greedy assignment)
    gts, dts = make_dataset(n_frames=15, seed=seed, mean_obj=12, n_fp=12)
    rng = np.random.default_rng(seed)
    for d, g in zip(dts, gts):  # duplicate some dets (ties) and quantise scores (more ties)
        d["score"] = np.round(d["score"], 1)
        m = np.isin(g["name"], ["Car", "Pedestrian", "Cyclist"])
        if m.any() and len(d["name"]):
            k = rng.integers(0, len(d["name"]))
            for key in d:
                d[key] = np.concatenate([d[key], d[key][k:k + 1]])
    res = ke.evaluate(gts, dts)
    for cls, ci in (("Car", 0), ("Pedestrian", 1), ("Cyclist", 2)):
        for diff in range(3):
            for mi, metric in enumerate(("bbox", "bev", "3d")):
                for s in (0, 1):
                    mo = ke.MIN_OVERLAPS[s, mi, ci]
                    e11, e40 = _ref_eval(gts, dts, cls.lower(), diff, metric, mo)
                    assert res.ap["R11"][cls][metric][s][diff] == pytest.approx(e11, abs=1e-9), (cls, diff, metric, s)
                    assert res.ap["R40"][cls][metric][s][diff] == pytest.approx(e40, abs=1e-9), (cls, diff, metric, s)
            a11, a40 = _ref_eval(gts, dts, cls.lower(), diff, "bbox", ke.MIN_OVERLAPS[0, 0, ci], aos=True)
            assert res.ap["R11"][cls]["aos"][0][diff] == pytest.approx(a11, abs=1e-9)
            assert res.ap["R40"][cls]["aos"][0][diff] == pytest.approx(a40, abs=1e-9)


# ------------------------------------------------------------------------------------------- files / CLI
def test_label_validation_errors(tmp_path):
    with pytest.raises(KittiFormatError, match=r"f.txt:2: a label line needs 15 fields"):
        parse_kitti_text(obj() + "\nCar 0 0\n", "f.txt")
    with pytest.raises(KittiFormatError, match=r":1: unknown object type 'car'"):
        parse_kitti_text(obj(name="car"), "f.txt")
    with pytest.raises(KittiFormatError, match=r":1: non-numeric field 'abc'"):
        parse_kitti_text(obj().replace("20.0", "abc"), "f.txt")
    with pytest.raises(KittiFormatError, match=r"result line needs 16 fields"):
        parse_kitti_text(obj(), "p.txt", is_result=True)
    with pytest.raises(KittiFormatError, match=r"NaN or inf"):
        parse_kitti_text(obj(score="nan"), "p.txt", is_result=True)
    with pytest.raises(KittiFormatError, match=r"bbox has right < left"):
        parse_kitti_text(obj(bbox=(200, 100, 100, 160)), "f.txt")
    with pytest.raises(KittiFormatError, match=r"dimensions h w l must be positive"):
        parse_kitti_text(obj(dims_hwl=(0, 1, 1)), "f.txt")
    (tmp_path / "gt").mkdir()
    (tmp_path / "gt" / "000001.txt").write_text(obj() + "\n")
    (tmp_path / "pred").mkdir()
    with pytest.raises(KittiFormatError, match=r"1 of 1 prediction files missing \(first: 000001.txt\); pass "
                                               r"--allow-missing"):
        load_folder(tmp_path / "pred", ["000001"], True)
    assert len(load_folder(tmp_path / "pred", ["000001"], True, allow_missing=True)[0]["name"]) == 0
    # missing ground truth is an error that allow_missing does not cover (and the message does not offer it)
    for allow in (False, True):
        with pytest.raises(KittiFormatError, match=r"ground truth missing for 1 of 2 frames \(first: 000002.txt\)") as e:
            load_folder(tmp_path / "gt", ["000001", "000002"], False, allow_missing=allow)
        assert "allow" not in str(e.value)


def test_result_line_roundtrip():
    a = annos(obj(score=0.5, ry=0.25, alpha=-0.5), result=True)
    text = format_result_lines(a["name"], a["alpha"], a["bbox"], a["dimensions"], a["location"], a["rotation_y"],
                               a["score"])
    b = parse_kitti_text(text, "x", True)
    for k in ("bbox", "dimensions", "location", "rotation_y", "score", "alpha"):
        np.testing.assert_allclose(a[k], b[k], atol=1e-4)


def test_cli(tmp_path, kitti_samples):
    gt_dir = kitti_samples / "object" / "training" / "label_2"
    pred = tmp_path / "pred"
    pred.mkdir()
    for p in sorted(gt_dir.glob("*.txt")):
        lines = [ln.strip() + " 1.0" for ln in p.read_text().splitlines()
                 if ln.split() and ln.split()[0] in ("Car", "Pedestrian", "Cyclist")]
        (pred / p.name).write_text("".join(x + "\n" for x in lines))
    out = tmp_path / "r.json"
    r = subprocess.run([sys.executable, "-m", "cmfiou_core.tools.eval_kitti", "--gt", str(gt_dir), "--pred", str(pred),
                        "--json", str(out)], capture_output=True, text=True, cwd=REPO, env={"PYTHONPATH": str(REPO)})
    assert r.returncode == 0, r.stderr
    assert "Car AP_R40@0.70, 0.70, 0.70:" in r.stdout
    js = json.loads(out.read_text())
    assert {"R40", "R11", "ap_ceiling", "warnings", "skipped", "provenance"} <= set(js)
    assert set(js["R40"]) == {"Car", "Pedestrian", "Cyclist"}
    assert set(js["R40"]["Car"]) == {"3d", "bev", "bbox", "aos"}
    assert js["R40"]["Car"]["3d"] == pytest.approx([30.0, 57.5, 77.5])
    (pred / "000001.txt").write_text("Car 0 0 0 1 2 3\n")
    r = subprocess.run([sys.executable, "-m", "cmfiou_core.tools.eval_kitti", "--gt", str(gt_dir), "--pred", str(pred),
                        "--strict"], capture_output=True, text=True, cwd=REPO, env={"PYTHONPATH": str(REPO)})
    assert r.returncode == 2 and "000001.txt:1: a result line needs 16 fields" in r.stderr
    # without --strict the frame is named, skipped and counted
    r = subprocess.run([sys.executable, "-m", "cmfiou_core.tools.eval_kitti", "--gt", str(gt_dir), "--pred", str(pred)],
                       capture_output=True, text=True, cwd=REPO, env={"PYTHONPATH": str(REPO)})
    assert r.returncode == 0 and "frame 000001 skipped" in r.stderr and "000001.txt:1: a result line needs 16" in r.stderr
    assert "skipped 1 of" in r.stdout


# ------------------------------------------------------------------------------------------- localization quality
def test_localization_quality_hand_computed():
    # frame 0: Car A (l 3.9 along x), det shifted 0.39 m along its length -> IoU = 3.51 / 4.29 = 0.8182;
    #          Car B only covered by a *Pedestrian* detection (other class: does not count) -> 0;
    #          Pedestrian exact -> 1.0 (its best), a worse second Pedestrian det is ignored (max).
    # frame 1: Car C, det shifted 0.7 m -> IoU = 3.2 / 4.6 = 0.6957 (inside the +-0.05 band around 0.7);
    #          a Car det of frame 0 near C's position must not count across frames.
    g0 = annos(obj(loc=(0, 1.6, 20)), obj(loc=(8, 1.6, 20)), obj("Pedestrian", loc=(-5, 1.6, 10), dims_hwl=(1.7, .6, .8)))
    d0 = annos(obj(loc=(0.39, 1.6, 20), score=0.9), obj("Pedestrian", loc=(8, 1.6, 20), score=0.8),
               obj("Pedestrian", loc=(-5, 1.6, 10), dims_hwl=(1.7, .6, .8), score=0.7),
               obj("Pedestrian", loc=(-5.3, 1.6, 10), dims_hwl=(1.7, .6, .8), score=0.6),
               obj(loc=(0, 1.6, 40), score=0.5), result=True)
    g1 = annos(obj(loc=(0, 1.6, 40)))
    d1 = annos(obj(loc=(0.7, 1.6, 40), score=0.4), result=True)
    q = ke.localization_quality([g0, g1], [d0, d1])
    car = q["Car"]
    ious = np.array([3.51 / 4.29, 0.0, 3.2 / 4.6])
    assert car["num_gt"] == 3 and car["threshold"] == 0.7
    assert car["mean_best_iou"] == pytest.approx(ious.mean(), abs=1e-9)
    assert car["median_best_iou"] == pytest.approx(np.median(ious), abs=1e-9)
    assert car["recall"] == pytest.approx(1 / 3)
    assert car["near_threshold"] == pytest.approx(1 / 3)
    ped = q["Pedestrian"]
    assert ped["num_gt"] == 1 and ped["mean_best_iou"] == pytest.approx(1.0) and ped["recall"] == 1.0
    assert q["Cyclist"]["num_gt"] == 0 and q["Cyclist"]["mean_best_iou"] is None
    json.dumps(q, allow_nan=False)  # strict JSON
    with pytest.raises(ValueError, match="frames"):
        ke.localization_quality([g0], [d0, d1])
