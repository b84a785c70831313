"""KITTI 3D object evaluation (AP R11 / R40 for bbox, BEV, 3D and AOS), vectorised numpy, float64.

Semantics are those of the python reference used by OpenPCDet / CMF-IOU (``kitti_object_eval_python/eval.py``),
re-implemented from the protocol description of the KITTI devkit:

- difficulty filters ``MIN_HEIGHT = 40/25/25`` px (GT ignored when ``height <= MIN_HEIGHT``), ``MAX_OCCLUSION = 0/1/2``,
  ``MAX_TRUNCATION = 0.15/0.30/0.50``; neighbouring classes (Van for Car, Person_sitting for Pedestrian) are
  ignored GT; a detection whose 2D height ``< MIN_HEIGHT`` is ignored (of any class); DontCare regions remove
  unmatched detections (2D overlap normalised by the detection area > min_overlap) for the bbox metric only;
- matching per frame in GT order: pass 1 (score thresholds) takes the highest-score candidate, pass 2 the
  highest-overlap valid candidate, else the first ignored one; ``overlap > min_overlap`` strictly; ties go to the
  lower detection index;
- thresholds sampled from the pass-1 TP scores at ~1/40 recall steps; precision made monotone; AP_R11 over
  recall {0, 0.1, .., 1}, AP_R40 over {1/40, .., 1}.

Vectorisation: all same-frame GT/detection pairs are built at once; the greedy matching only matters inside
connected components of the candidate graph (edges = overlap > min_overlap), so it runs over padded components,
all score thresholds at once. Everything else is counting.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from .rotated_iou import iou3d_camera_paired, rotated_iou_paired

MIN_HEIGHT = (40.0, 25.0, 25.0)
MAX_OCCLUSION = (0, 1, 2)
MAX_TRUNCATION = (0.15, 0.30, 0.50)
DIFFICULTIES = ("easy", "moderate", "hard")
METRICS = ("bbox", "bev", "3d")
EVAL_CLASSES = ("Car", "Pedestrian", "Cyclist", "Van", "Person_sitting", "Truck")
# [overlap set][metric bbox, bev, 3d][class in EVAL_CLASSES order]
MIN_OVERLAPS = np.array([
    [[0.7, 0.5, 0.5, 0.7, 0.5, 0.7], [0.7, 0.5, 0.5, 0.7, 0.5, 0.7], [0.7, 0.5, 0.5, 0.7, 0.5, 0.7]],
    [[0.7, 0.5, 0.5, 0.7, 0.5, 0.5], [0.5, 0.25, 0.25, 0.5, 0.25, 0.5], [0.5, 0.25, 0.25, 0.5, 0.25, 0.5]],
])
NEIGHBOURS = {"car": "van", "pedestrian": "person_sitting"}
N_SAMPLE_PTS = 41


# ------------------------------------------------------------------------------------------------ data layout
@dataclass
class _Flat:
    """Annotations of all frames concatenated; ``frame`` gives the frame of each row."""

    frame: np.ndarray
    name: np.ndarray  # lower-case
    dontcare: np.ndarray  # exact "DontCare"
    truncated: np.ndarray
    occluded: np.ndarray
    alpha: np.ndarray
    bbox: np.ndarray
    box3d: np.ndarray  # (N, 7) x y z l h w ry (camera)
    score: np.ndarray
    count: np.ndarray  # per frame

    @classmethod
    def build(cls, annos: Sequence[Dict[str, np.ndarray]]) -> "_Flat":
        counts = np.array([len(a["name"]) for a in annos], np.int64)
        cat = lambda k, shape: (np.concatenate([np.asarray(a[k], np.float64).reshape(shape) for a in annos])  # noqa
                                if len(annos) else np.zeros((0,) + shape[1:]))
        names = np.concatenate([np.asarray(a["name"]).astype(str) for a in annos]) if len(annos) else np.zeros(0, str)
        loc, dims, ry = cat("location", (-1, 3)), cat("dimensions", (-1, 3)), cat("rotation_y", (-1,))
        return cls(frame=np.repeat(np.arange(len(annos)), counts), name=np.char.lower(names.astype(str)),
                   dontcare=names == "DontCare", truncated=cat("truncated", (-1,)), occluded=cat("occluded", (-1,)),
                   alpha=cat("alpha", (-1,)), bbox=cat("bbox", (-1, 4)),
                   box3d=np.concatenate([loc, dims, ry[:, None]], 1), score=cat("score", (-1,)), count=counts)

    @property
    def height(self) -> np.ndarray:
        return self.bbox[:, 3] - self.bbox[:, 1]


def _same_frame_pairs(gt_idx: np.ndarray, gt_frame: np.ndarray, dt_frame: np.ndarray, n_frames: int):
    """All (gt, det) index pairs within the same frame for the GT rows ``gt_idx`` (global det indices)."""
    d_per = np.bincount(dt_frame, minlength=n_frames)
    d_off = np.concatenate([[0], np.cumsum(d_per)])
    # gt_idx is sorted by frame (rows are frame-ordered); each GT row pairs with d_per[frame] dets
    reps = d_per[gt_frame[gt_idx]]
    total = int(reps.sum())
    g = np.repeat(gt_idx, reps)
    start = np.repeat(np.cumsum(reps) - reps, reps)
    d = d_off[gt_frame[g]] + (np.arange(total) - start)
    return g, d


def image_overlap(a: np.ndarray, b: np.ndarray, criterion: int = -1) -> np.ndarray:
    """Paired 2D overlap: -1 IoU, 0 intersection / area(a), 1 intersection / area(b) (no +1 pixel convention)."""
    iw = np.minimum(a[:, 2], b[:, 2]) - np.maximum(a[:, 0], b[:, 0])
    ih = np.minimum(a[:, 3], b[:, 3]) - np.maximum(a[:, 1], b[:, 1])
    inter = np.where((iw > 0) & (ih > 0), iw * ih, 0.0)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    ua = {-1: area_a + area_b - inter, 0: area_a, 1: area_b}[criterion]
    return np.where(inter > 0, inter / np.where(inter > 0, ua, 1.0), 0.0)


# ------------------------------------------------------------------------------------------------ thresholds / AP
def get_thresholds(scores: np.ndarray, num_gt: int, num_sample_pts: int = N_SAMPLE_PTS) -> np.ndarray:
    """Score thresholds at ~1/(num_sample_pts-1) recall steps from the TP scores (reference ``get_thresholds``)."""
    s = np.sort(np.asarray(scores, np.float64))[::-1]
    out: List[float] = []
    cur = 0.0
    n = len(s)
    for i in range(n):
        l_recall = (i + 1) / num_gt
        r_recall = (i + 2) / num_gt if i < n - 1 else l_recall
        if (r_recall - cur) < (cur - l_recall) and i < n - 1:
            continue
        out.append(s[i])
        cur += 1.0 / (num_sample_pts - 1.0)
    return np.asarray(out, np.float64)


def ap_r11(prec: np.ndarray) -> np.ndarray:
    return prec[..., 0:N_SAMPLE_PTS:4].sum(-1) / 11 * 100


def ap_r40(prec: np.ndarray) -> np.ndarray:
    return prec[..., 1:N_SAMPLE_PTS].sum(-1) / 40 * 100


# ------------------------------------------------------------------------------------------------ matching
def _components(eg: np.ndarray, ed: np.ndarray, n_gt: int, n_dt: int):
    """Connected components of the bipartite candidate graph; returns per-edge component id and node maps."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    ug, ig = np.unique(eg, return_inverse=True)
    ud, idd = np.unique(ed, return_inverse=True)
    n = len(ug) + len(ud)
    m = coo_matrix((np.ones(len(eg)), (ig, len(ug) + idd)), shape=(n, n))
    _, lab = connected_components(m, directed=False)
    return ug, ud, lab[: len(ug)], lab[len(ug):]


def _rank_within(comp: np.ndarray) -> np.ndarray:
    """Rank of each element within its component, elements given sorted by (comp, original index)."""
    order = np.lexsort((np.arange(len(comp)), comp))
    c = comp[order]
    first = np.concatenate([[True], c[1:] != c[:-1]])
    start = np.maximum.accumulate(np.where(first, np.arange(len(c)), 0))
    rank = np.empty(len(comp), np.int64)
    rank[order] = np.arange(len(c)) - start
    return rank


@dataclass
class _Stats:
    tp: np.ndarray
    fp: np.ndarray
    fn: np.ndarray
    sim: np.ndarray
    tp_scores: np.ndarray = field(default_factory=lambda: np.zeros(0))


def _greedy(eg, ed, ov, ign_gt, ign_dt, score, gt_alpha, dt_alpha, thresholds, pass1: bool, compute_aos: bool):
    """Greedy assignment over the candidate edges (eg, ed, ov) for every threshold at once.

    Returns tp (T,), fn_matched (T,) = valid GT matched to ignored dets (neither TP nor FN), assigned valid-det mask
    per threshold as (T, idx) pairs via ``assigned_dets`` (list of arrays), similarity (T,), pass-1 TP scores.
    """
    T = len(thresholds)
    tp = np.zeros(T, np.int64)
    gt_to_ign = np.zeros(T, np.int64)
    sim = np.zeros(T)
    tp_scores = []
    assigned_out = []  # (t index array, det global index array)
    if len(eg) == 0:
        return tp, gt_to_ign, sim, np.zeros(0), (np.zeros(0, np.int64), np.zeros(0, np.int64))
    ug, ud, cg, cd = _components(eg, ed, 0, 0)
    n_comp = int(max(cg.max(), cd.max())) + 1
    rg, rd = _rank_within(cg), _rank_within(cd)
    gsize = np.bincount(cg, minlength=n_comp)
    dsize = np.bincount(cd, minlength=n_comp)
    # buckets by number of GTs in the component (limits padding)
    bucket_of = np.digitize(gsize, [2, 3, 5, 9, 17])
    gpos = np.searchsorted(ug, eg)
    dpos = np.searchsorted(ud, ed)
    ecomp = cg[gpos]
    for bkt in np.unique(bucket_of):
        comps = np.nonzero(bucket_of == bkt)[0]
        K = len(comps)
        cidx = np.full(n_comp, -1, np.int64)
        cidx[comps] = np.arange(K)
        G = int(gsize[comps].max())
        D = int(dsize[comps].max())
        E = np.zeros((K, G, D), bool)
        OV = np.zeros((K, G, D))
        em = cidx[ecomp] >= 0
        kk, gg, dd = cidx[ecomp[em]], rg[gpos[em]], rd[dpos[em]]
        E[kk, gg, dd] = True
        OV[kk, gg, dd] = ov[em]
        gsel = cidx[cg] >= 0
        dsel = cidx[cd] >= 0
        GI = np.full((K, G), -1, np.int64)  # global gt idx
        GI[cidx[cg[gsel]], rg[gsel]] = ug[gsel]
        DI = np.full((K, D), -1, np.int64)
        DI[cidx[cd[dsel]], rd[dsel]] = ud[dsel]
        dpad = DI < 0
        DIc = np.where(dpad, 0, DI)
        dscore = np.where(dpad, -np.inf, score[DIc])
        digd = np.where(dpad, -1, ign_dt[DIc])
        dalpha = dt_alpha[DIc]
        active = np.ones((K, 1, D), bool) if pass1 else (dscore[:, None, :] >= thresholds[None, :, None])
        Tb = 1 if pass1 else T
        assigned = np.zeros((K, Tb, D), bool)
        krange = np.arange(K)[:, None]
        for g in range(G):
            gi = GI[:, g]
            has_gt = gi >= 0
            gic = np.where(has_gt, gi, 0)
            igt = np.where(has_gt, ign_gt[gic], -1)
            cand = E[:, g, None, :] & ~assigned & active
            if pass1:
                key = np.where(cand, dscore[:, None, :], -np.inf)
                j = key.argmax(-1)
                has = cand.any(-1)
            else:
                vc = cand & (digd == 0)[:, None, :]
                key = np.where(vc, OV[:, g, None, :], -np.inf)
                jv = key.argmax(-1)
                hasv = vc.any(-1)
                ic = cand & (digd == 1)[:, None, :]
                ji = ic.argmax(-1)
                j = np.where(hasv, jv, ji)
                has = hasv | ic.any(-1)
            chosen_ign = digd[krange, j] == 1  # (K, Tb)
            kk_, tt_ = np.nonzero(has)
            assigned[kk_, tt_, j[kk_, tt_]] = True
            valid_gt = (igt == 0)[:, None]
            is_tp = has & valid_gt & ~chosen_ign
            tp += is_tp.sum(0) if not pass1 else 0
            gt_to_ign += (has & valid_gt & chosen_ign).sum(0) if not pass1 else 0
            if pass1:
                tp_scores.append(dscore[krange, j][is_tp])
            elif compute_aos:
                d_alpha = gt_alpha[gic][:, None] - dalpha[krange, j]
                sim += np.where(is_tp, (1.0 + np.cos(d_alpha)) / 2.0, 0.0).sum(0)
        if not pass1:
            k_, t_, d_ = np.nonzero(assigned)
            assigned_out.append((t_, DI[k_, d_]))
    if pass1:
        return tp, gt_to_ign, sim, np.concatenate(tp_scores) if tp_scores else np.zeros(0), None
    at = np.concatenate([a[0] for a in assigned_out]) if assigned_out else np.zeros(0, np.int64)
    ad = np.concatenate([a[1] for a in assigned_out]) if assigned_out else np.zeros(0, np.int64)
    return tp, gt_to_ign, sim, np.zeros(0), (at, ad)


# ------------------------------------------------------------------------------------------------ evaluator
@dataclass
class EvalResult:
    """``ap[curve][class][metric]`` = (n_overlap_sets, 3 difficulties) percent; also PR curves for plots."""

    classes: Tuple[str, ...]
    ap: Dict[str, Dict[str, Dict[str, np.ndarray]]]
    precision: Dict[str, Dict[str, np.ndarray]]  # [class][metric] (sets, diffs, 41) monotone precision
    recall: Dict[str, Dict[str, np.ndarray]]  # raw recall at the thresholds (for PR plots)
    num_valid_gt: Dict[str, List[int]]
    min_overlaps: np.ndarray  # (sets, metrics, classes)
    aos_computed: bool
    # the same AP for perfect predictions (label_2 fed back, score 1) on this ground truth: what a small set allows
    ceiling: Optional[Dict[str, Dict[str, Dict[str, np.ndarray]]]] = None

    def ceiling_json(self, overlap_set: int = 0) -> Optional[dict]:
        if self.ceiling is None:
            return None
        return {curve: {c: {m: [float(x) for x in v[overlap_set]] for m, v in d.items() if m != "aos"}
                        for c, d in per.items()} for curve, per in self.ceiling.items()}

    def small_set_warnings(self) -> List[str]:
        """One line per class with fewer than 41 valid objects in a difficulty (the R40 curve's 40 recall points
        then cannot all be reached: AP is capped below 100 even for perfect predictions; see the ceiling)."""
        out = []
        for c in self.classes:
            n = self.num_valid_gt.get(c, [])
            if n and max(n) == 0:
                out.append(f"warning: {c} has no objects in this ground truth: its AP is 0 by definition")
            elif n and min(n) < SMALL_SET:
                out.append(f"warning: {c} has {' / '.join(str(x) for x in n)} objects (easy / moderate / hard), fewer "
                           f"than {SMALL_SET} in at least one difficulty: the R40 AP of this set is capped even for "
                           "perfect predictions; compare with the ceiling printed beside it")
        return out

    def to_json(self, overlap_set: int = 0) -> dict:
        out = {}
        for curve in ("R40", "R11"):
            out[curve] = {}
            for c in self.classes:
                d = {}
                for m in ("3d", "bev", "bbox", "aos"):
                    if m == "aos" and not self.aos_computed:
                        d[m] = [None, None, None]
                    else:
                        d[m] = [float(x) for x in self.ap[curve][c][m][overlap_set]]
                out[curve][c] = d
        return out

    def table(self) -> str:
        lines = []
        for ci, c in enumerate(self.classes):
            for k in range(self.min_overlaps.shape[0]):
                mo = ", ".join(f"{x:.2f}" for x in self.min_overlaps[k, :, ci])
                for curve, tag in (("R11", "AP"), ("R40", "AP_R40")):
                    lines.append(f"{c} {tag}@{mo}:")
                    for m, lab in (("bbox", "bbox AP"), ("bev", "bev  AP"), ("3d", "3d   AP"), ("aos", "aos  AP")):
                        if m == "aos" and not self.aos_computed:
                            continue
                        v = self.ap[curve][c][m][k]
                        line = f"{lab}:{v[0]:.4f}, {v[1]:.4f}, {v[2]:.4f}"
                        if self.ceiling is not None and m != "aos":
                            cv = self.ceiling[curve][c][m][k]
                            line += f"   (ceiling {cv[0]:.4f}, {cv[1]:.4f}, {cv[2]:.4f})"
                        lines.append(line)
        lines += self.small_set_warnings()
        return "\n".join(lines) + "\n"


def _check_aos(dt_annos) -> bool:
    for a in dt_annos:  # reference rule: look at the first non-empty prediction frame
        if len(a["alpha"]):
            return bool(a["alpha"][0] != -10)
    return False


SMALL_SET = 41  # R40 samples recall at 1/40 ... 40/40 (plus 0): below 41 objects not every point is reachable


def perfect_predictions(gt_annos: Sequence[Dict[str, np.ndarray]],
                        classes: Sequence[str] = EVAL_CLASSES) -> List[Dict[str, np.ndarray]]:
    """The ground truth of the evaluated classes as predictions with score 1 (what a perfect detector outputs)."""
    out = []
    for a in gt_annos:
        keep = np.isin(a["name"], list(classes))
        d = {k: v[keep] for k, v in a.items()}
        d["score"] = np.ones(int(keep.sum()))
        out.append(d)
    return out


def evaluate(gt_annos: Sequence[Dict[str, np.ndarray]], dt_annos: Sequence[Dict[str, np.ndarray]],
             classes: Sequence[str] = ("Car", "Pedestrian", "Cyclist"), overlap_sets: Sequence[int] = (0, 1),
             compute_aos: Optional[bool] = None, with_ceiling: bool = True) -> EvalResult:
    """Evaluate frame-aligned lists of annotation dicts (see :mod:`kitti_io`) with the official formulas.

    ``with_ceiling``: also evaluate :func:`perfect_predictions` of the same ground truth (``EvalResult.ceiling``):
    with fewer than 41 objects of a class the official R40 AP cannot reach 100 even then."""
    if with_ceiling:
        res = evaluate(gt_annos, dt_annos, classes, overlap_sets, compute_aos, with_ceiling=False)
        res.ceiling = evaluate(gt_annos, perfect_predictions(gt_annos, classes), classes, overlap_sets, False,
                               with_ceiling=False).ap
        return res
    if len(gt_annos) != len(dt_annos):
        raise ValueError(f"{len(gt_annos)} ground-truth frames but {len(dt_annos)} prediction frames")
    for c in classes:
        if c not in EVAL_CLASSES:
            raise ValueError(f"cannot evaluate class {c!r}: one of {EVAL_CLASSES}")
    if compute_aos is None:
        compute_aos = _check_aos(dt_annos)
    F = len(gt_annos)
    gt, dt = _Flat.build(gt_annos), _Flat.build(dt_annos)
    cls_lower = [c.lower() for c in classes]
    relevant_names = set(cls_lower) | {NEIGHBOURS[c] for c in cls_lower if c in NEIGHBOURS}
    gt_rel = np.nonzero(np.isin(gt.name, list(relevant_names)))[0]
    pg, pd = _same_frame_pairs(gt_rel, gt.frame, dt.frame, F)
    # a detection takes part when it has an evaluated class or may be a small (ignored) one
    dt_part = np.isin(dt.name, cls_lower) | (dt.height < max(MIN_HEIGHT))
    sel = dt_part[pd]
    pg, pd = pg[sel], pd[sel]
    overlaps = {"bbox": image_overlap(gt.bbox[pg], dt.bbox[pd], -1)}
    # BEV / 3D only for pairs whose BEV circumcircles touch
    g3, d3 = gt.box3d[pg], dt.box3d[pd]
    rg = 0.5 * np.hypot(g3[:, 3], g3[:, 5])
    rd = 0.5 * np.hypot(d3[:, 3], d3[:, 5])
    near = np.hypot(g3[:, 0] - d3[:, 0], g3[:, 2] - d3[:, 2]) <= (rg + rd) * (1 + 1e-9) + 1e-9
    bev = np.zeros(len(pg))
    d3v = np.zeros(len(pg))
    if near.any():
        bev[near] = rotated_iou_paired(g3[near][:, [0, 2, 3, 5, 6]], d3[near][:, [0, 2, 3, 5, 6]])
        d3v[near] = iou3d_camera_paired(g3[near], d3[near])
    overlaps["bev"], overlaps["3d"] = bev, d3v
    # DontCare: per detection, max over DontCare boxes of the frame of intersection / detection area
    dc_idx = np.nonzero(gt.dontcare)[0]
    dc_g, dc_d = _same_frame_pairs(dc_idx, gt.frame, dt.frame, F)
    dc_ov = image_overlap(dt.bbox[dc_d], gt.bbox[dc_g], 0)
    dc_max = np.zeros(len(dt.frame))
    np.maximum.at(dc_max, dc_d, dc_ov)

    min_ov = MIN_OVERLAPS[list(overlap_sets)][:, :, [EVAL_CLASSES.index(c) for c in classes]]
    S = len(overlap_sets)
    ap = {curve: {c: {} for c in classes} for curve in ("R11", "R40")}
    prec_out: Dict[str, Dict[str, np.ndarray]] = {c: {} for c in classes}
    rec_out: Dict[str, Dict[str, np.ndarray]] = {c: {} for c in classes}
    nvalid: Dict[str, List[int]] = {}
    g_height, d_height = gt.height, np.abs(dt.bbox[:, 3] - dt.bbox[:, 1])
    for ci, cname in enumerate(cls_lower):
        C = classes[ci]
        nvalid[C] = []
        prec = np.zeros((3, S, 3, N_SAMPLE_PTS))  # metric, set, diff, pts
        rec = np.zeros_like(prec)
        aos = np.zeros((S, 3, N_SAMPLE_PTS))
        for diff in range(3):
            # ---- clean_data
            is_cls = gt.name == cname
            is_nb = (gt.name == NEIGHBOURS[cname]) if cname in NEIGHBOURS else np.zeros(len(gt.name), bool)
            ignore = ((gt.occluded > MAX_OCCLUSION[diff]) | (gt.truncated > MAX_TRUNCATION[diff])
                      | (g_height <= MIN_HEIGHT[diff]))
            ign_gt = np.full(len(gt.name), -1, np.int64)
            ign_gt[is_nb | (is_cls & ignore)] = 1
            ign_gt[is_cls & ~ignore] = 0
            n_valid = int((ign_gt == 0).sum())
            nvalid[C].append(n_valid)
            ign_dt = np.where(d_height < MIN_HEIGHT[diff], 1, np.where(dt.name == cname, 0, -1)).astype(np.int64)
            valid_dt = ign_dt == 0
            pair_ok = (ign_gt[pg] != -1) & (ign_dt[pd] != -1)
            memo = {}  # identical (metric, min_overlap) across overlap sets (bbox: 0.7/0.5/0.5 in both) -> reuse
            for mi, metric in enumerate(METRICS):
                ov_all = overlaps[metric]
                for si in range(S):
                    mo = float(min_ov[si, mi, ci])
                    if (metric, mo) in memo:
                        s0 = memo[(metric, mo)]
                        prec[mi, si, diff], rec[mi, si, diff] = prec[mi, s0, diff], rec[mi, s0, diff]
                        if metric == "bbox":
                            aos[si, diff] = aos[s0, diff]
                        continue
                    memo[(metric, mo)] = si
                    e = pair_ok & (ov_all > mo)
                    eg, ed, ov = pg[e], pd[e], ov_all[e]
                    # pass 1: TP scores -> thresholds
                    _, _, _, tps, _ = _greedy(eg, ed, ov, ign_gt, ign_dt, dt.score, gt.alpha, dt.alpha,
                                              np.zeros(1), True, False)
                    thr = get_thresholds(tps, n_valid) if n_valid > 0 else np.zeros(0)
                    T = len(thr)
                    if T == 0:
                        continue
                    aos_here = compute_aos and metric == "bbox"
                    tp, g2i, sim, _, (at, ad) = _greedy(eg, ed, ov, ign_gt, ign_dt, dt.score, gt.alpha, dt.alpha,
                                                        thr, False, aos_here)
                    fn = n_valid - tp - g2i
                    counted = valid_dt & ~((dc_max > mo) if metric == "bbox" else np.zeros(len(valid_dt), bool))
                    cs = np.sort(dt.score[counted])
                    n_active = len(cs) - np.searchsorted(cs, thr, side="left")
                    keep = counted[ad]
                    n_assigned = np.bincount(at[keep], minlength=T)
                    fp = n_active - n_assigned
                    p = tp / np.maximum(tp + fp, 1)
                    r = tp / np.maximum(tp + fn, 1)
                    pp = np.zeros(N_SAMPLE_PTS)
                    pp[:T] = p
                    prec[mi, si, diff] = np.maximum.accumulate(pp[::-1])[::-1]
                    rec[mi, si, diff, :T] = r
                    if aos_here:
                        aa = np.zeros(N_SAMPLE_PTS)
                        aa[:T] = sim / np.maximum(tp + fp, 1)
                        aos[si, diff] = np.maximum.accumulate(aa[::-1])[::-1]
        for mi, metric in enumerate(METRICS):
            prec_out[C][metric] = prec[mi]
            rec_out[C][metric] = rec[mi]
            ap["R11"][C][metric] = ap_r11(prec[mi])
            ap["R40"][C][metric] = ap_r40(prec[mi])
        prec_out[C]["aos"] = aos
        ap["R11"][C]["aos"] = ap_r11(aos)
        ap["R40"][C]["aos"] = ap_r40(aos)
    return EvalResult(tuple(classes), ap, prec_out, rec_out, nvalid, min_ov, compute_aos)


def evaluate_folders(gt_dir, pred_dir, ids=None, allow_missing: bool = False, **kw) -> EvalResult:
    from .kitti_io import load_folder

    gt = load_folder(gt_dir, ids, is_result=False)
    if ids is None:
        from pathlib import Path

        ids = sorted(p.stem for p in Path(gt_dir).glob("*.txt"))
    dt = load_folder(pred_dir, ids, is_result=True, allow_missing=allow_missing)
    return evaluate(gt, dt, **kw)


# ------------------------------------------------------------------------------------------------ localization
LOCALIZATION_BAND = 0.05


def localization_quality(gt_annos: Sequence[Dict[str, np.ndarray]], dt_annos: Sequence[Dict[str, np.ndarray]],
                         classes: Sequence[str] = ("Car", "Pedestrian", "Cyclist"),
                         band: float = LOCALIZATION_BAND) -> Dict[str, Dict[str, Optional[float]]]:
    """How far the boxes sit from the AP overlap threshold, per class (a diagnostic beside AP, not a KITTI metric).

    For every ground-truth object of the class (all difficulties; DontCare and neighbour classes excluded) take the
    best 3D IoU of a same-class detection of its frame, whatever its score (0 when there is none). Reported:
    ``num_gt``, ``mean_best_iou``, ``median_best_iou``, ``recall`` (best IoU > the class's first-set 3D threshold,
    0.7 / 0.5 / 0.5; also returned as ``threshold``) and ``near_threshold`` (share within ``band`` of it, also returned);
    None for a class without ground truth.
    A model with many objects near the threshold has an AP that swings with small changes of its boxes (a 2 %
    scale, a 2.5 cm shift, a different test view); its ``mean_best_iou`` moves far less."""
    if len(gt_annos) != len(dt_annos):
        raise ValueError(f"{len(gt_annos)} ground-truth frames but {len(dt_annos)} prediction frames")
    gt, dt = _Flat.build(gt_annos), _Flat.build(dt_annos)
    out: Dict[str, Dict[str, Optional[float]]] = {}
    for c in classes:
        if c not in EVAL_CLASSES:
            raise ValueError(f"cannot evaluate class {c!r}: one of {EVAL_CLASSES}")
        thr = float(MIN_OVERLAPS[0, 2, EVAL_CLASSES.index(c)])
        g_idx = np.nonzero(gt.name == c.lower())[0]
        d_idx = np.nonzero(dt.name == c.lower())[0]
        best = np.zeros(g_idx.size)
        if g_idx.size and d_idx.size:
            # pairs within a frame, restricted to this class's detections
            pg, pd = _same_frame_pairs(g_idx, gt.frame, dt.frame[d_idx], len(gt_annos))
            if pg.size:
                iou = iou3d_camera_paired(gt.box3d[pg], dt.box3d[d_idx[pd]])
                pos = np.searchsorted(g_idx, pg)
                np.maximum.at(best, pos, iou)
        n = int(g_idx.size)
        if n == 0:  # None, not NaN: the summary is written as strict JSON
            out[c] = {"num_gt": 0, "mean_best_iou": None, "median_best_iou": None, "recall": None,
                      "near_threshold": None, "threshold": thr, "band": band}
            continue
        out[c] = {"num_gt": n, "mean_best_iou": float(best.mean()), "median_best_iou": float(np.median(best)),
                  "recall": float((best > thr).mean()), "near_threshold": float((np.abs(best - thr) <= band).mean()),
                  "threshold": thr, "band": band}
    return out
