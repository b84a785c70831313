"""Greedy rotated-BEV NMS (semantics of OpenPCDet ``iou3d_nms_cuda.nms_gpu``) and per-class / class-agnostic wrappers.

``nms_gpu`` semantics: boxes sorted by score (descending); walk them in order, keep box i unless an earlier kept box
suppressed it, and suppress every later box j with ``IoU_bev(i, j) > thresh`` (strict). The IoU matrix is computed
vectorised (only pairs with overlapping circumscribed circles, upper triangle); the greedy walk loops over *kept*
boxes only and stops after ``post_max_size`` keeps (later keeps never affect earlier ones).
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import numpy as np
import torch

from ..opcount import cuda_path
from .iou import bev_intersection_aligned, bev_intersection_pairwise


def _nms_matrix(boxes: torch.Tensor, thresh: float, limit: int, iou_dtype) -> torch.Tensor:
    """Greedy walk over a precomputed suppression matrix (one vectorised IoU pass, one device->host copy)."""
    sup = suppression_matrix(boxes, thresh, iou_dtype).cpu().numpy()
    n = sup.shape[0]
    removed = np.zeros(n, dtype=bool)
    keep = []
    pos = 0
    while pos < n and len(keep) < limit:
        alive = np.flatnonzero(~removed[pos:])
        if alive.size == 0:
            break
        i = pos + int(alive[0])
        keep.append(i)
        removed |= sup[i]
        pos = i + 1
    return torch.tensor(keep, dtype=torch.long, device=boxes.device)


def nms_sorted(boxes: torch.Tensor, thresh: float, max_keep: Optional[int] = None,
               iou_dtype: Optional[torch.dtype] = torch.float64, mode: str = "auto") -> torch.Tensor:
    """Greedy NMS over boxes already sorted by descending score -> (K,) kept positions (ascending).

    ``mode='lazy'``: loop over kept boxes; each step computes the IoU of the kept box with all later, not yet
    suppressed boxes (vectorised, circle-overlap pre-filter) -- best when few boxes are kept (test proposals: 50).
    ``mode='matrix'``: all pairwise IoUs at once, then the greedy walk on the host (training proposals: 512 kept).
    ``auto`` picks matrix on CUDA (one IoU pass and one device->host copy instead of a sync per kept box: the lazy
    walk measured ~115 ms for 2000 -> 50 test proposals on an H100), lazy on the CPU (~2x faster there for
    4000 -> 512). Both give identical results.
    """
    n = boxes.shape[0]
    dev = boxes.device
    if n == 0:
        return torch.zeros(0, dtype=torch.long, device=dev)
    if mode not in ("auto", "lazy", "matrix"):
        raise ValueError(f"nms_sorted: mode must be auto, lazy or matrix, got {mode!r}")
    lim = n if max_keep is None else int(max_keep)
    if mode == "matrix" or (mode == "auto" and cuda_path(boxes) and n > 1):
        return _nms_matrix(boxes, thresh, lim, iou_dtype)
    b = boxes[:, :7].to(iou_dtype) if iou_dtype is not None else boxes[:, :7]
    area = b[:, 3] * b[:, 4]
    rad = torch.sqrt(b[:, 3] ** 2 + b[:, 4] ** 2) / 2
    ar = torch.arange(n, device=dev)
    removed = torch.zeros(n, dtype=torch.bool, device=dev)
    keep = []
    pos = 0
    limit = n if max_keep is None else int(max_keep)
    while len(keep) < limit and pos < n:
        alive = (~removed[pos:]).nonzero()
        if alive.numel() == 0:
            break
        i = pos + int(alive[0, 0])
        keep.append(i)
        pos = i + 1
        if pos >= n or len(keep) >= limit:
            continue
        d2 = (b[pos:, 0] - b[i, 0]) ** 2 + (b[pos:, 1] - b[i, 1]) ** 2
        rr = (rad[pos:] + rad[i]) * (1 + 1e-6) + 1e-6
        cand = ar[pos:][(~removed[pos:]) & (d2 <= rr * rr)]
        if cand.numel() == 0:
            continue
        inter = bev_intersection_aligned(b[i].expand(cand.numel(), 7), b[cand])
        iou = inter / (area[i] + area[cand] - inter).clamp_min(1e-8)
        removed[cand[iou > thresh]] = True
    return torch.tensor(keep, dtype=torch.long, device=dev)


def suppression_matrix(boxes: torch.Tensor, thresh: float, iou_dtype: Optional[torch.dtype] = torch.float64) -> torch.Tensor:
    """(N, 7) -> (N, N) bool, [i, j] = j > i and IoU_bev(i, j) > thresh (reference / tests)."""
    b = boxes[:, :7].to(iou_dtype) if iou_dtype is not None else boxes[:, :7]
    inter = bev_intersection_pairwise(b, b, upper_only=True)
    area = b[:, 3] * b[:, 4]
    iou = inter / (area[:, None] + area[None, :] - inter).clamp_min(1e-8)
    n = b.shape[0]
    upper = torch.ones(n, n, dtype=torch.bool, device=b.device).triu(1)
    return (iou > thresh) & upper


def nms_gpu(boxes: torch.Tensor, scores: torch.Tensor, thresh: float, pre_maxsize: Optional[int] = None,
            post_max_size: Optional[int] = None, iou_dtype: Optional[torch.dtype] = torch.float64) -> torch.Tensor:
    """OpenPCDet ``nms_gpu``: sort by score (desc, stable), take ``pre_maxsize``, greedy NMS -> indices into ``boxes``."""
    order = torch.sort(scores, dim=0, descending=True, stable=True)[1]
    if pre_maxsize is not None:
        order = order[:pre_maxsize]
    keep = nms_sorted(boxes[order], thresh, post_max_size, iou_dtype)
    return order[keep]


def class_agnostic_nms(box_scores: torch.Tensor, box_preds: torch.Tensor, nms_thresh: float, pre_maxsize: int,
                       post_max_size: int, score_thresh: Optional[float] = None,
                       iou_dtype: Optional[torch.dtype] = torch.float64) -> Tuple[torch.Tensor, torch.Tensor]:
    """OpenPCDet ``model_nms_utils.class_agnostic_nms``: optional ``score >= score_thresh``, top-k ``pre_maxsize``,
    ``nms_gpu``, first ``post_max_size`` -> (selected indices into the inputs, their scores)."""
    src_scores = box_scores
    idx_map = None
    if score_thresh is not None:
        mask = box_scores >= score_thresh
        idx_map = mask.nonzero().view(-1)
        box_scores = box_scores[mask]
        box_preds = box_preds[mask]
    selected = torch.zeros(0, dtype=torch.long, device=box_scores.device)
    if box_scores.shape[0] > 0:
        scores_nms, indices = torch.topk(box_scores, k=min(int(pre_maxsize), box_scores.shape[0]))
        keep = nms_gpu(box_preds[indices][:, 0:7], scores_nms, nms_thresh, post_max_size=post_max_size,
                       iou_dtype=iou_dtype)
        selected = indices[keep[:post_max_size]]
    if idx_map is not None:
        selected = idx_map[selected]
    return selected, src_scores[selected]


def multi_class_nms(box_scores: torch.Tensor, box_preds: torch.Tensor, box_labels: torch.Tensor,
                    nms_thresh: Sequence[float], pre_maxsize: Sequence[int], post_max_size: Sequence[int],
                    score_thresh: Optional[float] = None,
                    iou_dtype: Optional[torch.dtype] = torch.float64) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-class NMS: labels 1..K, per-class thresholds/limits (lists of length K). Returns (indices, scores),
    concatenated class by class (ascending label), each class in descending score order."""
    sel = []
    for k in range(len(nms_thresh)):
        m = (box_labels == k + 1).nonzero().view(-1)
        if m.numel() == 0:
            continue
        s, _ = class_agnostic_nms(box_scores[m], box_preds[m], nms_thresh[k], pre_maxsize[k], post_max_size[k],
                                  score_thresh, iou_dtype)
        sel.append(m[s])
    selected = torch.cat(sel) if sel else torch.zeros(0, dtype=torch.long, device=box_scores.device)
    return selected, box_scores[selected]
