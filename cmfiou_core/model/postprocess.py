"""Post-processing: per frame scores -> threshold -> NMS -> (boxes, labels, cls, iou, score).

Official KITTI mode (``score_mode: cls``, class-agnostic NMS 0.1 / pre 4096 / post 500, ``score_thresh`` 0.4 with
``>=``) equals OpenPCDet ``Detector3DTemplate.post_processing`` with ``has_class_labels`` (labels = ``roi_labels``).
With the IoU branch, ``score_mode`` ``rectified`` / ``add`` rank, threshold and NMS by the combined score
(``iou_joint.combine_scores``). Per-class NMS takes per-class lists for thresh/pre/post.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, NamedTuple, Optional, Union

import torch

from ..config import ConfigError, Section
from ..geometry.nms import class_agnostic_nms, multi_class_nms
from .iou_joint import DEFAULT_ALPHA, SCORE_MODES, combine_scores


@dataclass
class PostProcessConfig:
    score_mode: str = "cls"
    alpha: List[float] = field(default_factory=lambda: list(DEFAULT_ALPHA))
    score_thresh: float = 0.4
    class_agnostic_nms: bool = True
    nms_thresh: List[float] = field(default_factory=lambda: [0.1])
    nms_pre_maxsize: List[int] = field(default_factory=lambda: [4096])
    nms_post_maxsize: List[int] = field(default_factory=lambda: [500])
    drop_degenerate: bool = True  # drop zero-size boxes decoded from zero-padded RoIs

    @classmethod
    def from_mapping(cls, data: Optional[Mapping[str, Any]], source: str = "<config>",
                     path: str = "model.post_processing") -> "PostProcessConfig":
        d = cls()
        s = Section(data, path, source)

        def lst(key, default, conv):
            v = s.raw(key, default)
            v = v if isinstance(v, (list, tuple)) else [v]
            try:
                return [conv(x) for x in v]
            except (TypeError, ValueError):
                raise ConfigError(f"{source}: '{path}.{key}' must be a number or a list of numbers, got {v!r}") from None

        c = cls(score_mode=s.str("score_mode", d.score_mode, choices=SCORE_MODES),
                alpha=s.floats("alpha", d.alpha, length=3),
                score_thresh=s.float("score_thresh", d.score_thresh, min=0.0, max=1.0),
                class_agnostic_nms=s.bool("class_agnostic_nms", d.class_agnostic_nms),
                nms_thresh=lst("nms_thresh", d.nms_thresh, float), nms_pre_maxsize=lst("nms_pre_maxsize", d.nms_pre_maxsize, int),
                nms_post_maxsize=lst("nms_post_maxsize", d.nms_post_maxsize, int),
                drop_degenerate=s.bool("drop_degenerate", d.drop_degenerate))
        s.finish()
        n = 1 if c.class_agnostic_nms else 3
        for k in ("nms_thresh", "nms_pre_maxsize", "nms_post_maxsize"):
            v = getattr(c, k)
            if len(v) == 1 and n == 3:
                setattr(c, k, v * 3)
            elif len(v) != n:
                raise ConfigError(f"{source}: '{path}.{k}' needs {n} value(s) for "
                                  f"{'class-agnostic' if n == 1 else 'per-class'} NMS, got {v}")
        return c


    @classmethod
    def from_any(cls, cfg: Any) -> "PostProcessConfig":
        """None (defaults), a PostProcessConfig, a mapping (validated), or ``model_config.PostProcessConfig``
        (attributes score_mode, rectifier_alpha, score_thresh, nms_type, nms_thresh, nms_pre_maxsize, nms_post_maxsize)."""
        if cfg is None:
            return cls()
        if isinstance(cfg, cls):
            return cfg
        if isinstance(cfg, Mapping):
            return cls.from_mapping(cfg)
        if hasattr(cfg, "nms_type"):
            m = {"score_mode": cfg.score_mode, "alpha": list(cfg.rectifier_alpha), "score_thresh": float(cfg.score_thresh),
                 "class_agnostic_nms": cfg.nms_type == "class_agnostic", "nms_thresh": list(cfg.nms_thresh),
                 "nms_pre_maxsize": list(cfg.nms_pre_maxsize), "nms_post_maxsize": list(cfg.nms_post_maxsize)}
            return cls.from_mapping(m, "<model_config.PostProcessConfig>")
        raise TypeError(f"post_process: unsupported config type {type(cfg).__name__}")


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
