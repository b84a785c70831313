"""Post-processing: per frame scores -> threshold -> NMS -> (boxes, labels, cls, iou, score).

Official KITTI mode (``score_mode: cls``, class-agnostic NMS 0.1 / pre 4096 / post 500, ``score_thresh`` 0.4 with
``>=``) equals OpenPCDet ``Detector3DTemplate.post_processing`` with ``has_class_labels`` (labels = ``roi_labels``).
With the IoU branch, ``score_mode`` ``rectified`` / ``add`` rank, threshold and NMS by the combined score
(``iou_joint.combine_scores``). Per-class NMS takes per-class lists for thresh/pre/post. The config is
``model_config.PostProcessConfig`` (keys of ``model.post_processing``).
"""
from __future__ import annotations

from typing import Any, Dict, List, Mapping, NamedTuple, Optional, Union

import torch

from ..geometry.nms import class_agnostic_nms, multi_class_nms
from .iou_joint import combine_scores
from .model_config import PostProcessConfig  # the one post-processing config (``model.post_processing``)

__all__ = ["FrameDetections", "PostProcessConfig", "post_process"]


class FrameDetections(NamedTuple):
    boxes: torch.Tensor   # (K, 7)
    labels: torch.Tensor  # (K,) int64 1..3
    cls: torch.Tensor     # (K,) sigmoid of the mean stage logit
    iou: torch.Tensor     # (K,) predicted IoU in [0, 1] (NaN without IoU branch)
    score: torch.Tensor   # (K,) ranking score


def post_process(batch_dict: Dict[str, Any], cfg: Optional[Union[PostProcessConfig, Mapping]] = None) -> List[FrameDetections]:
    """Reads ``batch_box_preds`` (B, N, 7), ``batch_cls_preds`` (B, N, 1) logits (or probabilities with
    ``cls_preds_normalized``), ``roi_labels`` (B, N), optional ``batch_iou_preds`` (B, N, 1) in [0, 1]."""
    cfg = PostProcessConfig.from_any(cfg)
    B = int(batch_dict["batch_size"])
    out: List[FrameDetections] = []
    for b in range(B):
        boxes = batch_dict["batch_box_preds"][b]
        cls = batch_dict["batch_cls_preds"][b]
        if not batch_dict.get("cls_preds_normalized", False):
            cls = torch.sigmoid(cls)
        cls, lab = torch.max(cls, dim=-1)
        if batch_dict.get("has_class_labels", False) and "roi_labels" in batch_dict:
            labels = batch_dict["roi_labels"][b].long()
        else:
            labels = lab + 1
        iou_t = batch_dict.get("batch_iou_preds")
        iou = iou_t[b].view(-1) if iou_t is not None else torch.full_like(cls, float("nan"))
        if cfg.score_mode != "cls" and iou_t is None:
            raise ValueError(f"post_process: score_mode {cfg.score_mode!r} needs batch_iou_preds "
                             "(enable roi_head.iou_branch) or use score_mode 'cls'")
        score = combine_scores(cls, iou, labels, cfg.score_mode, cfg.alpha)
        # score threshold and degenerate-box filter as one compaction (one nonzero instead of a bool(all()) check,
        # a nonzero and three mask indexings); the NMS then sees the same boxes in the same order
        keep = score >= cfg.score_thresh
        if cfg.drop_degenerate:
            keep = keep & (boxes[:, 3:6] > 0).all(dim=1)
        kidx = keep.nonzero().view(-1)
        boxes, labels, cls, iou, score = boxes[kidx], labels[kidx], cls[kidx], iou[kidx], score[kidx]
        if cfg.class_agnostic_nms:
            sel, _ = class_agnostic_nms(score, boxes, cfg.nms_thresh[0], cfg.nms_pre_maxsize[0],
                                        cfg.nms_post_maxsize[0])
        else:
            sel, _ = multi_class_nms(score, boxes, labels, cfg.nms_thresh, cfg.nms_pre_maxsize,
                                     cfg.nms_post_maxsize)
        out.append(FrameDetections(boxes[sel], labels[sel], cls[sel], iou[sel], score[sel]))
    return out
