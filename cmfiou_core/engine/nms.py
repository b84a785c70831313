"""Graph-capturable rotated-BEV NMS, proposal layer and final post-processing.

Same selection as the eager path (``geometry/nms.py``, ``model/proposal.py``, ``model/postprocess.py``) with fixed
shapes and no host synchronisation (no ``.item()``, ``nonzero()`` or data-dependent shape):

- **Suppression matrix.** Candidate pairs (i < j, both valid, circumscribed BEV circles overlapping: the eager
  pre-filter, same float64 arithmetic) are compacted into a fixed ``pair_capacity`` by a prefix sum; their rotated BEV
  IoU is the eager ``bev_intersection_aligned`` (float64, strict ``IoU > thresh``). The default capacity is every
  upper-triangle pair, so nothing can overflow; a smaller one is a memory/speed bucket and reports ``overflow`` (a
  device flag, read by the caller with the result) when the frame had more candidate pairs.
- **Triton (CUDA).** Where Triton exists, ``mode='auto'`` runs both as two kernels (``engine.triton_nms``: the
  matrix over every candidate pair with the same float64 arithmetic, then the walk in one program per frame): ~7
  kernels per NMS instead of ~150 per pair pass + 3 per walk step; the torch code below stays the reference and the
  CPU path.
- **Greedy walk.** A static loop of ``max_keep`` steps: take the first alive box (lowest sorted position), keep it,
  clear it and every box it suppresses. This is exactly the eager walk over kept boxes (later keeps never affect
  earlier ones); steps after the last alive box produce padding (``valid`` False).
- **Ties.** The eager layers rank with ``torch.topk`` (tie order unspecified) then a stable sort; here the proposal
  layer uses the same ``topk`` call (same order on the same device), the post-processing ranks with a stable sort of
  the masked scores (ties in input index order). Only exactly tied scores can order differently.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch

from ..geometry.iou import _CHUNK, _intersection_area_aligned, bev_intersection_aligned
from ..model.iou_joint import combine_scores
from ..opcount import cuda_path


_CHUNK_PAIRS_CUDA = 1 << 18
USE_TRITON_NMS = True     # CUDA: suppression matrix + greedy walk as two Triton kernels (engine.triton_nms)
TRITON_ON_CPU = False     # tests / op counts: the Triton NMS on CPU tensors too (needs Triton's interpreter)


def triton_nms_used(boxes: torch.Tensor) -> bool:
    """Whether ``nms_sorted_static(mode='auto')`` runs the Triton kernels for ``boxes``: CUDA with Triton (or the CPU
    under Triton's interpreter with ``TRITON_ON_CPU``), unless ``USE_TRITON_NMS`` is off."""
    if not USE_TRITON_NMS or not (boxes.is_cuda or (TRITON_ON_CPU and boxes.device.type == "cpu")):
        return False
    from . import triton_conv

    return triton_conv.supports(boxes)


def suppression_matrix(boxes: torch.Tensor, valid: torch.Tensor, thresh: float,
                       pair_capacity: Optional[int] = None, iou_dtype: torch.dtype = torch.float64):
    """boxes (B, K, 7+) sorted by descending score, valid (B, K) bool ->
    (sup (B, K, K) bool, [b, i, j] = i < j and IoU_bev(i, j) > thresh; overflow () bool).

    Pairs are evaluated only where the eager path evaluates them (circle overlap); ``pair_capacity`` (default: all
    B*K*(K-1)/2 upper pairs) bounds the pairs evaluated per call."""
    B, K = boxes.shape[0], boxes.shape[1]
    dev = boxes.device
    b = boxes[..., :7].to(iou_dtype)
    rad = torch.sqrt(b[..., 3] ** 2 + b[..., 4] ** 2) / 2
    d2 = (b[:, :, None, 0] - b[:, None, :, 0]) ** 2 + (b[:, :, None, 1] - b[:, None, :, 1]) ** 2
    rr = rad[:, :, None] + rad[:, None, :]
    ar = torch.arange(K, device=dev)
    cand = (d2 <= (rr * (1 + 1e-6) + 1e-6) ** 2) & (ar[:, None] < ar[None, :]) & valid[:, :, None] & valid[:, None, :]
    total = B * K * K
    cap = B * K * (K - 1) // 2 if pair_capacity is None else int(pair_capacity)
    cap = max(1, min(cap, total))
    flat = cand.reshape(-1)
    run = torch.cumsum(flat, 0)
    n_pairs = run[-1]
    slot = torch.where(flat & (run <= cap), run - 1, cap)
    ids = torch.zeros(cap + 1, dtype=torch.long, device=dev)
    ids.scatter_(0, slot, torch.arange(total, device=dev))
    ids = ids[:cap]
    used = torch.arange(cap, device=dev) < n_pairs
    bi = ids // (K * K)
    ii = (ids // K) % K
    jj = ids % K
    bb = b.reshape(B * K, 7)
    a_box = bb[bi * K + ii]
    b_box = bb[bi * K + jj]
    # one polygon-clipping pass per 2^18 pairs on CUDA (~1.4 GB peak, ~150 kernels per pass), cache-sized on the CPU;
    # pairs are independent, so the chunking changes no value
    ch = _CHUNK_PAIRS_CUDA if cuda_path(boxes) else _CHUNK
    parts = [_intersection_area_aligned(a_box[i:i + ch], b_box[i:i + ch]) for i in range(0, cap, ch)]
    inter = parts[0] if len(parts) == 1 else torch.cat(parts)
    area_a = a_box[:, 3] * a_box[:, 4]
    area_b = b_box[:, 3] * b_box[:, 4]
    iou = inter / (area_a + area_b - inter).clamp_min(1e-8)
    sup = torch.zeros(total + 1, dtype=torch.bool, device=dev)
    sup.scatter_(0, torch.where(used, ids, total), (iou > thresh) & used)
    return sup[:total].view(B, K, K), n_pairs > cap


def greedy_keep(sup: torch.Tensor, valid: torch.Tensor, max_keep: int):
    """Greedy NMS walk on a suppression matrix: sup (B, K, K), valid (B, K) ->
    (pos (B, T) long sorted positions of the kept boxes in keep order, kept (B, T) bool), T = min(max_keep, K).
    Padding steps have pos K - 1 (a valid index) and kept False."""
    B, K = valid.shape
    dev = valid.device
    T = min(int(max_keep), K)
    ar = torch.arange(K, device=dev)
    # survivors after keeping box i: not suppressed by i, and not i itself; row K (no box left) keeps everything
    stay = ~(sup | torch.eye(K, dtype=torch.bool, device=dev))
    stay = torch.cat([stay, stay.new_ones((B, 1, K))], dim=1)          # (B, K + 1, K)
    cand = torch.where(valid, ar, K)                                   # sorted position of each alive box, else K
    picks: List[torch.Tensor] = []
    for _ in range(T):                                                 # 3 kernels a step
        i = cand.amin(dim=1)                                           # first alive sorted position, K if none
        picks.append(i)
        cand = torch.where(stay.gather(1, i.view(B, 1, 1).expand(B, 1, K)).view(B, K), cand, K)
    pos = torch.stack(picks, dim=1)
    kept = pos < K
    return pos.clamp_max(K - 1), kept


def greedy_keep_rows(boxes: torch.Tensor, valid: torch.Tensor, thresh: float, max_keep: int,
                     iou_dtype: torch.dtype = torch.float64):
    """The greedy walk computing, at each of its ``max_keep`` steps, only the kept box's IoU row (K pairs, the eager
    CPU "lazy" walk's pairs and arithmetic): T*K pairs instead of K^2/2, T*~150 small ops. Same outputs as
    :func:`greedy_keep` on :func:`suppression_matrix`."""
    B, K = valid.shape
    dev = valid.device
    T = min(int(max_keep), K)
    b = boxes[..., :7].to(iou_dtype)
    area = b[..., 3] * b[..., 4]
    rad = torch.sqrt(b[..., 3] ** 2 + b[..., 4] ** 2) / 2
    ar = torch.arange(K, device=dev)
    alive = valid.clone()
    picks: List[torch.Tensor] = []
    for _ in range(T):
        i = torch.where(alive, ar, K).amin(dim=1)                      # first alive sorted position, K if none
        picks.append(i)
        ic = i.clamp_max(K - 1)
        bi = b.gather(1, ic.view(B, 1, 1).expand(B, 1, 7))              # (B, 1, 7)
        d2 = (b[..., 0] - bi[..., 0]) ** 2 + (b[..., 1] - bi[..., 1]) ** 2
        rr = (rad + rad.gather(1, ic[:, None])) * (1 + 1e-6) + 1e-6
        inter = bev_intersection_aligned(bi.expand(B, K, 7).reshape(B * K, 7), b.reshape(B * K, 7)).view(B, K)
        iou = inter / (area.gather(1, ic[:, None]) + area - inter).clamp_min(1e-8)
        sup = (iou > thresh) & (d2 <= rr * rr) & (ar[None] > i[:, None])
        alive = alive & ~sup & (ar[None] != i[:, None])
    pos = torch.stack(picks, dim=1)
    kept = pos < K
    return pos.clamp_max(K - 1), kept


def nms_sorted_static(boxes: torch.Tensor, valid: torch.Tensor, thresh: float, max_keep: int,
                      pair_capacity: Optional[int] = None, mode: str = "auto"):
    """boxes (B, K, 7+) sorted by descending score, valid (B, K) -> (pos (B, T), kept (B, T), overflow ()).

    ``mode``: ``triton`` (the suppression matrix by two Triton kernels over every candidate pair, the walk by a third:
    ~7 kernels, never overflows, ``pair_capacity`` unused; the CUDA choice where Triton exists), ``matrix`` (the same
    matrix and walk as torch ops: ~150 kernels per 2^18-pair pass, 3 per walk step), ``rows`` (one IoU row per step:
    fewest pairs, the CPU choice), ``auto`` picks ``triton`` where :func:`triton_nms_used`, else by device
    (``opcount.cuda_path``: an op counter counts the CUDA choice on the CPU). Identical selections (``triton``: up to
    an IoU within ~1e-12 of ``thresh``, see engine.triton_nms)."""
    if mode == "auto":
        mode = "triton" if triton_nms_used(boxes) else ("matrix" if cuda_path(boxes) else "rows")
    if mode == "triton":
        from .triton_nms import greedy_walk, suppression_bits

        sup = suppression_bits(boxes, valid, thresh)
        return greedy_walk(sup, valid, max_keep, with_flag=True)
    if mode == "rows":
        pos, kept = greedy_keep_rows(boxes, valid, thresh, max_keep)
        return pos, kept, torch.zeros((), dtype=torch.bool, device=boxes.device)
    if mode != "matrix":
        raise ValueError(f"nms_sorted_static: mode must be auto, triton, matrix or rows, got {mode!r}")
    sup, overflow = suppression_matrix(boxes, valid, thresh, pair_capacity)
    pos, kept = greedy_keep(sup, valid, max_keep)
    return pos, kept, overflow


# ------------------------------------------------------------------------------------------------- proposal layer
@dataclass
class StaticProposals:
    rois: torch.Tensor        # (B, post, 7+), padding rows 0
    roi_scores: torch.Tensor  # (B, post) max class logit, padding 0
    roi_labels: torch.Tensor  # (B, post) int64 1..K (padding 1, as the eager layer / OpenPCDet)
    valid: torch.Tensor       # (B, post) bool
    count: torch.Tensor       # (B,) int64
    overflow: torch.Tensor    # () bool: the pair capacity was too small for this frame (result not exact)


def proposal_layer_static(box_preds: torch.Tensor, cls_preds: torch.Tensor, nms_thresh: float, pre_maxsize: int,
                          post_max_size: int, pair_capacity: Optional[int] = None,
                          mode: str = "auto", anchor_valid: Optional[torch.Tensor] = None) -> StaticProposals:
    """``model.proposal.proposal_layer`` with static shapes: box_preds (B, A, 7+), cls_preds (B, A, C) logits.

    ``anchor_valid`` (B, A) bool: only these anchors may be proposed (the eager path compacts the masked anchors
    away first; here they rank last and are invalid, which selects the same proposals)."""
    B, A = box_preds.shape[0], box_preds.shape[1]
    scores, labels = torch.max(cls_preds, dim=-1)                       # (B, A)
    rank = scores if anchor_valid is None else torch.where(anchor_valid, scores, torch.full_like(scores, -float("inf")))
    K = min(int(pre_maxsize), A)
    top_scores, top_idx = torch.topk(rank, k=K, dim=1)                # eager: topk, then a stable sort (a no-op)
    order = torch.sort(top_scores, dim=1, descending=True, stable=True)[1]
    top_idx = top_idx.gather(1, order)
    boxes = box_preds.gather(1, top_idx[..., None].expand(B, K, box_preds.shape[-1]))
    valid = torch.ones((B, K), dtype=torch.bool, device=box_preds.device) if anchor_valid is None else \
        anchor_valid.gather(1, top_idx)
    pos, kept, overflow = nms_sorted_static(boxes, valid, nms_thresh, post_max_size, pair_capacity, mode)
    sel = top_idx.gather(1, pos)                                        # (B, T) anchor indices
    T = sel.shape[1]
    post = int(post_max_size)
    rois = box_preds.new_zeros((B, post, box_preds.shape[-1]))
    roi_scores = box_preds.new_zeros((B, post))
    roi_labels = torch.zeros((B, post), dtype=torch.long, device=box_preds.device)
    valid_out = torch.zeros((B, post), dtype=torch.bool, device=box_preds.device)
    km = kept[..., None].to(box_preds.dtype)
    rois[:, :T] = box_preds.gather(1, sel[..., None].expand(B, T, box_preds.shape[-1])) * km
    roi_scores[:, :T] = scores.gather(1, sel) * kept.to(scores.dtype)
    roi_labels[:, :T] = labels.gather(1, sel) * kept.long()
    valid_out[:, :T] = kept
    return StaticProposals(rois, roi_scores, roi_labels + 1, valid_out, kept.sum(1), overflow)


# ------------------------------------------------------------------------------------------------- post-processing
@dataclass
class PaddedDetections:
    """Final detections with a fixed capacity per frame: rows ``< count[b]`` are valid (the eager
    ``FrameDetections`` order), padding rows are 0 (labels 0)."""
    boxes: torch.Tensor   # (B, cap, 7)
    labels: torch.Tensor  # (B, cap) int64
    cls: torch.Tensor     # (B, cap)
    iou: torch.Tensor     # (B, cap)
    score: torch.Tensor   # (B, cap)
    valid: torch.Tensor   # (B, cap) bool
    count: torch.Tensor   # (B,) int64
    overflow: torch.Tensor  # () bool


def _ranked_nms(score: torch.Tensor, boxes: torch.Tensor, keep: torch.Tensor, thresh: float, pre: int, post: int,
                pair_capacity: Optional[int], mode: str):
    """score/keep (B, N), boxes (B, N, 7): stable descending rank of the kept rows, first ``pre``, greedy NMS ->
    (idx (B, T) into N, kept (B, T), overflow)."""
    B, N = score.shape
    key = torch.where(keep, score, torch.full_like(score, float("-inf")))
    order = torch.sort(key, dim=1, descending=True, stable=True)[1][:, :min(int(pre), N)]
    valid = keep.gather(1, order)
    sb = boxes.gather(1, order[..., None].expand(-1, -1, boxes.shape[-1]))
    pos, kept, overflow = nms_sorted_static(sb, valid, thresh, post, pair_capacity, mode)
    return order.gather(1, pos), kept, overflow


def post_process_static(box_preds: torch.Tensor, cls_preds: torch.Tensor, roi_labels: Optional[torch.Tensor],
                        iou_preds: Optional[torch.Tensor], cfg, cls_preds_normalized: bool = False,
                        has_class_labels: bool = True, pair_capacity: Optional[int] = None,
                        mode: str = "auto") -> PaddedDetections:
    """``model.postprocess.post_process`` with static shapes. box_preds (B, N, 7), cls_preds (B, N, C), roi_labels
    (B, N), iou_preds (B, N, 1) in [0, 1] or None; cfg a ``postprocess.PostProcessConfig``."""
    cls = cls_preds if cls_preds_normalized else torch.sigmoid(cls_preds)
    cls, lab = torch.max(cls, dim=-1)
    labels = roi_labels.long() if (has_class_labels and roi_labels is not None) else lab + 1
    if cfg.score_mode != "cls" and iou_preds is None:
        raise ValueError(f"post_process_static: score_mode {cfg.score_mode!r} needs iou_preds")
    iou = iou_preds[..., 0] if iou_preds is not None else torch.full_like(cls, float("nan"))
    score = combine_scores(cls, iou, labels, cfg.score_mode, cfg.alpha)
    keep = score >= cfg.score_thresh
    if cfg.drop_degenerate:
        keep = keep & (box_preds[..., 3:6] > 0).all(dim=-1)
    if cfg.class_agnostic_nms:
        idx, kept, overflow = _ranked_nms(score, box_preds, keep, cfg.nms_thresh[0], cfg.nms_pre_maxsize[0],
                                          cfg.nms_post_maxsize[0], pair_capacity, mode)
    else:
        parts, flags, ovf = [], [], []
        for k in range(len(cfg.nms_thresh)):
            i_k, v_k, o_k = _ranked_nms(score, box_preds, keep & (labels == k + 1), cfg.nms_thresh[k],
                                        cfg.nms_pre_maxsize[k], cfg.nms_post_maxsize[k], pair_capacity, mode)
            parts.append(i_k)
            flags.append(v_k)
            ovf.append(o_k)
        idx, kept = torch.cat(parts, 1), torch.cat(flags, 1)
        front = torch.sort((~kept).to(torch.uint8), dim=1, stable=True)[1]  # class by class, valid rows first
        idx, kept = idx.gather(1, front), kept.gather(1, front)
        overflow = torch.stack(ovf).any()
    B, T = idx.shape
    kf = kept.to(box_preds.dtype)
    boxes = box_preds.gather(1, idx[..., None].expand(B, T, box_preds.shape[-1])) * kf[..., None]
    return PaddedDetections(boxes, labels.gather(1, idx) * kept.long(), cls.gather(1, idx) * kf,
                            torch.where(kept, iou.gather(1, idx), torch.zeros_like(kf)), score.gather(1, idx) * kf,
                            kept, kept.sum(1), overflow)


def unpad(det: PaddedDetections, b: int = 0):
    """Frame ``b`` of a ``PaddedDetections`` as the eager ``FrameDetections`` (host sync: after the engine's d2h)."""
    from ..model.postprocess import FrameDetections

    n = int(det.count[b])
    return FrameDetections(det.boxes[b, :n], det.labels[b, :n], det.cls[b, :n], det.iou[b, :n], det.score[b, :n])


__all__: Sequence[str] = ("suppression_matrix", "greedy_keep", "greedy_keep_rows", "nms_sorted_static",
                          "proposal_layer_static",
                          "StaticProposals", "post_process_static", "PaddedDetections", "unpad")
