"""Proposal layer (OpenPCDet ``RoIHeadTemplate.proposal_layer``).

Class-agnostic: per frame, score = max class logit, label = argmax + 1; top-k ``pre_maxsize`` by score; greedy rotated
BEV NMS (strict ``>`` thresh); first ``post_max_size`` kept boxes. Outputs are zero padded to ``post_max_size``. No
score threshold (the official proposal layer ignores SCORE_THRESH).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict

import torch

from ..config import Section
from ..geometry.nms import class_agnostic_nms


@dataclass
class ProposalConfig:
    nms_thresh: float = 0.75
    pre_maxsize: int = 2000
    post_max_size: int = 50

    @classmethod
    def from_section(cls, sec: Section, default: "ProposalConfig") -> "ProposalConfig":
        c = cls(sec.float("nms_thresh", default.nms_thresh, min=0.0, max=1.0),
                sec.int("pre_maxsize", default.pre_maxsize, min=1),
                sec.int("post_max_size", default.post_max_size, min=1))
        sec.finish()
        return c


TRAIN_DEFAULT = ProposalConfig(0.8, 4000, 512)
TEST_DEFAULT = ProposalConfig(0.75, 2000, 50)


@torch.no_grad()
def proposal_layer(batch_dict: Dict[str, Any], cfg: ProposalConfig) -> Dict[str, Any]:
    """Reads ``batch_size``, ``batch_box_preds`` (B, A, 7+), ``batch_cls_preds`` (B, A, K) logits.

    Writes ``rois`` (B, post, 7+), ``roi_scores`` (B, post) max logit, ``roi_labels`` (B, post) int64 in 1..K
    (padding rows: zeros boxes/scores, label 1 as OpenPCDet), ``has_class_labels`` (K > 1). Removes ``batch_index``.
    """
    B = int(batch_dict["batch_size"])
    box_preds_all = batch_dict["batch_box_preds"]
    cls_preds_all = batch_dict["batch_cls_preds"]
    if box_preds_all.dim() != 3 or cls_preds_all.dim() != 3:
        raise ValueError("proposal_layer expects batch_box_preds (B, A, 7) and batch_cls_preds (B, A, K); "
                         f"got {tuple(box_preds_all.shape)} and {tuple(cls_preds_all.shape)}")
    post = cfg.post_max_size
    rois = box_preds_all.new_zeros((B, post, box_preds_all.shape[-1]))
    roi_scores = box_preds_all.new_zeros((B, post))
    roi_labels = box_preds_all.new_zeros((B, post), dtype=torch.long)
    for b in range(B):
        box_preds = box_preds_all[b]
        cur_scores, cur_labels = torch.max(cls_preds_all[b], dim=1)
        selected, _ = class_agnostic_nms(cur_scores, box_preds, cfg.nms_thresh, cfg.pre_maxsize, post)
        n = selected.numel()
        rois[b, :n] = box_preds[selected]
        roi_scores[b, :n] = cur_scores[selected]
        roi_labels[b, :n] = cur_labels[selected]
    batch_dict["rois"] = rois
    batch_dict["roi_scores"] = roi_scores
    batch_dict["roi_labels"] = roi_labels + 1  # OpenPCDet adds 1 everywhere: padding rows get label 1
    batch_dict["has_class_labels"] = cls_preds_all.shape[-1] > 1
    batch_dict.pop("batch_index", None)
    return batch_dict
