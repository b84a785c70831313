"""RoI targets and losses (OpenPCDet/VirConv ``ProposalTargetLayer`` + ``RoIHeadTemplate`` losses).

``ProposalTargetLayer.sample(rois, roi_scores, roi_labels, gt_boxes, stage)`` samples ``roi_per_image`` RoIs per frame:
fg (IoU >= min(reg_fg, cls_fg) threshold of the matched GT's class) without replacement up to ``fg_ratio``; the rest
background, ``hard_bg_ratio`` hard (IoU in [bg_lo, reg_fg)) and the remainder easy (IoU < bg_lo), drawn with
replacement. IoU = 3D IoU with GT boxes of the same class only. Soft cls labels (``roi_iou_x``), reg mask
(IoU > reg_fg of the stage), canonical GT (RoI frame, heading flipped/clamped to [-pi/2, pi/2]).

Random draws use ``torch`` generators on the tensors' device (pass ``generator`` for reproducibility).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F

from ..geometry.boxes import boxes_to_corners_3d, rotate_points_along_z
from ..geometry.coders import ResidualCoder
from ..geometry.iou import boxes_iou3d, boxes_iou3d_aligned


@dataclass
class TargetConfig:
    roi_per_image: int = 160
    fg_ratio: float = 0.5
    cls_fg_thresh: List[float] = field(default_factory=lambda: [0.75, 0.65, 0.65])
    cls_bg_thresh: List[float] = field(default_factory=lambda: [0.25, 0.15, 0.15])
    cls_bg_thresh_lo: float = 0.1
    hard_bg_ratio: float = 0.8
    # per stage, per class (Car, Ped, Cyc)
    reg_fg_thresh: List[List[float]] = field(default_factory=lambda: [[0.5, 0.45, 0.45], [0.55, 0.5, 0.5],
                                                                      [0.6, 0.55, 0.55]])


def _trim_gt(gt: torch.Tensor) -> torch.Tensor:
    """Drop the all-zero padding rows at the end of a (M, 8) GT array."""
    if gt.shape[0] == 0:
        return gt
    nz = (gt.abs().sum(dim=1) > 0).nonzero()
    k = int(nz[-1, 0]) + 1 if nz.numel() else 0
    return gt[:k]


def max_iou_same_class(rois: torch.Tensor, roi_labels: torch.Tensor, gt: torch.Tensor):
    """(N, 7) rois, (N,) labels, (M, 8) gt -> (max_overlaps (N,), gt_assignment (N,)), same class only."""
    n = rois.shape[0]
    max_ov = rois.new_zeros(n)
    assign = torch.zeros(n, dtype=torch.long, device=rois.device)
    if gt.shape[0] == 0 or n == 0:
        return max_ov, assign
    iou = boxes_iou3d(rois[:, :7], gt[:, :7])
    same = roi_labels[:, None] == gt[None, :, 7].long()
    iou = torch.where(same, iou, torch.zeros_like(iou))
    max_ov, assign = iou.max(dim=1)
    # rows without a same-class GT: keep IoU 0; assignment = first GT of the class if any, else 0
    return max_ov, assign


class ProposalTargetLayer:
    def __init__(self, cfg: TargetConfig):
        self.cfg = cfg

    def _per_class(self, values: Sequence[float], labels: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
        t = ref.new_tensor(list(values))
        return t[(labels.clamp(1, len(values)) - 1).long()]

    def _sample_bg(self, hard: torch.Tensor, easy: torch.Tensor, n: int, gen) -> torch.Tensor:
        dev = hard.device
        nh, ne = hard.numel(), easy.numel()
        if nh > 0 and ne > 0:
            h = min(int(n * self.cfg.hard_bg_ratio), nh)
            e = n - h
            return torch.cat([hard[torch.randint(0, nh, (h,), device=dev, generator=gen)],
                              easy[torch.randint(0, ne, (e,), device=dev, generator=gen)]])
        if nh > 0:
            return hard[torch.randint(0, nh, (n,), device=dev, generator=gen)]
        if ne > 0:
            return easy[torch.randint(0, ne, (n,), device=dev, generator=gen)]
        return torch.zeros(0, dtype=torch.long, device=dev)

    def _subsample(self, max_ov: torch.Tensor, fg_thresh: torch.Tensor, reg_thresh: torch.Tensor, gen) -> torch.Tensor:
        cfg = self.cfg
        dev = max_ov.device
        fg_per_image = int(round(cfg.fg_ratio * cfg.roi_per_image))
        fg = (max_ov >= fg_thresh).nonzero().view(-1)
        easy = (max_ov < cfg.cls_bg_thresh_lo).nonzero().view(-1)
        hard = ((max_ov < reg_thresh) & (max_ov >= cfg.cls_bg_thresh_lo)).nonzero().view(-1)
        nfg, nbg = fg.numel(), easy.numel() + hard.numel()
        if nfg > 0 and nbg > 0:
            k = min(fg_per_image, nfg)
            fg = fg[torch.randperm(nfg, device=dev, generator=gen)[:k]]
            bg = self._sample_bg(hard, easy, cfg.roi_per_image - k, gen)
        elif nfg > 0:
            fg = fg[torch.floor(torch.rand(cfg.roi_per_image, device=dev, generator=gen) * nfg).long()]
            bg = fg.new_zeros(0)
        elif nbg > 0:
            fg = fg.new_zeros(0)
            bg = self._sample_bg(hard, easy, cfg.roi_per_image, gen)
        else:  # IoUs between reg and fg thresholds only: sample them as they are
            allr = torch.arange(max_ov.numel(), device=dev)
            return allr[torch.randint(0, max(1, allr.numel()), (cfg.roi_per_image,), device=dev, generator=gen)]
        return torch.cat([fg, bg])

    @torch.no_grad()
    def sample(self, rois: torch.Tensor, roi_scores: torch.Tensor, roi_labels: torch.Tensor, gt_boxes: torch.Tensor,
               stage: int, generator: Optional[torch.Generator] = None) -> Dict[str, torch.Tensor]:
        """rois (B, N, 7), roi_scores (B, N), roi_labels (B, N), gt_boxes (B, M, 8) -> targets dict:
        rois, roi_scores, roi_labels, gt_of_rois (B, R, 8), gt_iou_of_rois (B, R), rcnn_cls_labels (B, R),
        reg_valid_mask (B, R) long."""
        cfg = self.cfg
        B, R = rois.shape[0], cfg.roi_per_image
        reg_vals = cfg.reg_fg_thresh[min(stage, len(cfg.reg_fg_thresh) - 1)]
        out_rois = rois.new_zeros(B, R, rois.shape[-1])
        out_gt = rois.new_zeros(B, R, gt_boxes.shape[-1])
        out_iou = rois.new_zeros(B, R)
        out_scores = rois.new_zeros(B, R)
        out_labels = torch.zeros(B, R, dtype=torch.long, device=rois.device)
        for b in range(B):
            gt = _trim_gt(gt_boxes[b])
            if gt.shape[0] == 0:
                gt = gt_boxes.new_zeros(1, gt_boxes.shape[-1])
            lab = roi_labels[b].long()
            max_ov, assign = max_iou_same_class(rois[b], lab, gt)
            gcls = gt[assign, 7].long().clamp_min(1)
            cls_of = torch.where(max_ov > 0, gcls, lab.clamp_min(1))
            reg_t = self._per_class(reg_vals, cls_of, max_ov)
            fg_t = torch.minimum(reg_t, self._per_class(cfg.cls_fg_thresh, cls_of, max_ov))
            s = self._subsample(max_ov, fg_t, reg_t, generator)
            out_rois[b] = rois[b][s]
            out_labels[b] = lab[s]
            out_iou[b] = max_ov[s]
            out_scores[b] = roi_scores[b][s]
            out_gt[b] = gt[assign[s]]
        cls_of = torch.where(out_iou > 0, out_gt[..., 7].long().clamp_min(1), out_labels.clamp_min(1))
        reg_t = self._per_class(reg_vals, cls_of, out_iou)
        reg_valid = (out_iou > reg_t).long()
        fg_t = self._per_class(cfg.cls_fg_thresh, cls_of, out_iou)
        bg_t = self._per_class(cfg.cls_bg_thresh, cls_of, out_iou)
        fg_mask = out_iou > fg_t
        bg_mask = out_iou < bg_t
        interval = ~fg_mask & ~bg_mask
        cls_labels = fg_mask.to(rois.dtype)
        cls_labels = torch.where(interval, (out_iou - bg_t) / (fg_t - bg_t), cls_labels)
        return {"rois": out_rois, "gt_of_rois": out_gt, "gt_iou_of_rois": out_iou, "roi_scores": out_scores,
                "roi_labels": out_labels, "reg_valid_mask": reg_valid, "rcnn_cls_labels": cls_labels}


def canonical_targets(targets: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Adds ``gt_of_rois_src`` (copy) and turns ``gt_of_rois`` into the RoI frame (OpenPCDet ``assign_targets``)."""
    rois = targets["rois"]
    gt = targets["gt_of_rois"].clone()
    targets["gt_of_rois_src"] = gt.clone().detach()
    B = rois.shape[0]
    roi_center = rois[:, :, 0:3]
    roi_ry = rois[:, :, 6] % (2 * math.pi)
    gt[:, :, 0:3] = gt[:, :, 0:3] - roi_center
    gt[:, :, 6] = gt[:, :, 6] - roi_ry
    gt = rotate_points_along_z(gt.view(-1, 1, gt.shape[-1]), -roi_ry.view(-1)).view(B, -1, gt.shape[-1])
    heading = gt[:, :, 6] % (2 * math.pi)
    opposite = (heading > math.pi * 0.5) & (heading < math.pi * 1.5)
    heading = torch.where(opposite, (heading + math.pi) % (2 * math.pi), heading)
    heading = torch.where(heading > math.pi, heading - 2 * math.pi, heading)
    gt[:, :, 6] = torch.clamp(heading, -math.pi / 2, math.pi / 2)
    targets["gt_of_rois"] = gt
    return targets


# ---------------------------------------------------------------------------------------------------- losses
def smooth_l1(diff: torch.Tensor, beta: float) -> torch.Tensor:
    n = diff.abs()
    if beta < 1e-5:
        return n
    return torch.where(n < beta, 0.5 * n * n / beta, n - 0.5 * beta)


def corner_loss_lidar(pred: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    """(N, 7) x (N, 7) -> (N,) mean over corners of Huber(1) of min(corner dist to gt, to gt flipped by pi)."""
    pc = boxes_to_corners_3d(pred)
    gc = boxes_to_corners_3d(gt)
    gf = gt.clone()
    gf[:, 6] = gf[:, 6] + math.pi
    gfc = boxes_to_corners_3d(gf)
    d = torch.minimum(torch.norm(pc - gc, dim=2), torch.norm(pc - gfc, dim=2))
    return smooth_l1(d, 1.0).mean(dim=1)


def bb_loss(pred: torch.Tensor, gt: torch.Tensor, center_huber: float = 0.0) -> torch.Tensor:
    """CMF-IOU ``bb_loss`` per pair (N,): 1.5 * (1 - iou + 1.25 (1 - |cos dθ|) + c(||c_p - c_g||)).

    ``center_huber`` = 0: c(d) = d^2, the official term. ``center_huber`` = δ > 0: the Huber form c(d) = d^2 for
    d <= δ and 2 δ d - δ^2 beyond (same value and slope at δ): identical to the official term for centre errors up to
    δ metres, but its gradient is bounded by 2 δ instead of growing with the error. Reason: with the squared term one
    badly placed foreground RoI (a 20 m centre error is an ordinary early-training regression output of ~4 times the
    RoI diagonal) gives that RoI ~250x the gradient of every other regression term; these spikes were the largest
    gradients of the camera+LiDAR runs on the H100 (``rcnn_aux_p`` 0.9 -> 9 at the step whose grad norm was 426)."""

    def wrap(a):
        return a - torch.floor((a + math.pi) / (2 * math.pi)) * 2 * math.pi  # (-pi, pi]

    def iou1d(c1, s1, c2, s2):
        inter = (torch.minimum(c1 + s1 / 2, c2 + s2 / 2) - torch.maximum(c1 - s1 / 2, c2 - s2 / 2)).clamp_min(0)
        outer = (torch.maximum(c1 + s1 / 2, c2 + s2 / 2) - torch.minimum(c1 - s1 / 2, c2 - s2 / 2)).clamp_min(1e-6)
        return inter / outer

    dth = wrap(pred[:, 6]) - wrap(gt[:, 6])
    iou = iou1d(pred[:, 0], pred[:, 3], gt[:, 0], gt[:, 3]) * iou1d(pred[:, 1], pred[:, 4], gt[:, 1], gt[:, 4]) * \
        iou1d(pred[:, 2], pred[:, 5], gt[:, 2], gt[:, 5]) * (1 - torch.sin(dth).abs())
    center = ((pred[:, 0:3] - gt[:, 0:3]) ** 2).sum(dim=1)
    if center_huber > 0:
        d2 = center_huber * center_huber
        # sqrt of a value clamped to >= δ^2: finite gradient in both torch.where branches
        center = torch.where(center <= d2, center, 2 * center_huber * torch.sqrt(center.clamp_min(d2)) - d2)
    return 1.5 * (1 - iou + 1.25 * (1 - torch.cos(dth).abs()) + center)


def decode_rcnn_boxes(rcnn_reg: torch.Tensor, rois: torch.Tensor, coder: ResidualCoder) -> torch.Tensor:
    """(R, 7) residuals against (R, 7) RoIs -> (R, 7) global boxes (``generate_predicted_boxes`` semantics)."""
    local = rois.clone().detach()
    local[:, 0:3].zero_()
    boxes = coder.decode_torch(rcnn_reg, local)
    boxes = rotate_points_along_z(boxes.unsqueeze(1), rois[:, 6]).squeeze(1)
    return torch.cat([boxes[:, 0:3] + rois[:, 0:3], boxes[:, 3:]], dim=1)


@dataclass
class LossWeights:
    """RoI-head loss weights (YAML ``roi_head.loss``) and ``bb_center_huber``, the centre-term form of
    :func:`bb_loss` (metres; 0 = the official squared distance)."""
    cls: float = 1.0
    reg: float = 1.0
    corner: float = 1.0
    bb: float = 1.0
    aux: float = 0.5
    iou: float = 1.0
    bb_center_huber: float = 0.0


def rcnn_cls_loss(rcnn_cls: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    logits = rcnn_cls.view(-1)
    lab = labels.view(-1).to(logits.dtype)
    valid = (lab >= 0).to(logits.dtype)
    loss = F.binary_cross_entropy_with_logits(logits, lab.clamp_min(0), reduction="none")
    return (loss * valid).sum() / valid.sum().clamp_min(1.0)


LOSS_SIZE_LOG_CLIP = math.log(1000.0 / 16.0)  # the common "wh ratio clip" bound on log-size residuals


def rcnn_reg_loss(rcnn_reg: torch.Tensor, targets: Dict[str, torch.Tensor], coder: ResidualCoder,
                  w: LossWeights) -> Dict[str, torch.Tensor]:
    """Smooth-L1 (1/9) on residual targets over fg / #fg, + corner loss (mean over fg), + bb_loss (sum / (#fg + 1))."""
    cs = 7
    rois = targets["rois"].reshape(-1, targets["rois"].shape[-1])[:, :cs]
    gt_ct = targets["gt_of_rois"].reshape(-1, targets["gt_of_rois"].shape[-1])[:, :cs]
    gt_src = targets["gt_of_rois_src"].reshape(-1, targets["gt_of_rois_src"].shape[-1])[:, :cs]
    reg = rcnn_reg.view(-1, cs)
    fg = targets["reg_valid_mask"].view(-1) > 0
    nfg = fg.sum()
    anchor = rois.clone().detach()
    anchor[:, 0:3] = 0
    anchor[:, 6] = 0
    reg_t = coder.encode_torch(gt_ct, anchor)
    diff = reg - torch.where(torch.isnan(reg_t), reg, reg_t)
    l_reg = (smooth_l1(diff, 1.0 / 9.0) * fg[:, None].to(reg.dtype)).sum() / nfg.clamp_min(1).to(reg.dtype)
    zero = reg.sum() * 0
    l_corner, l_bb = zero, zero
    if bool(fg.any()):
        fr = reg[fg]
        # the corner loss and bb_loss decode sizes with exp(residual): bound the log-size residuals there (sizes within
        # e^+-4.1 of the RoI's) so one wild prediction cannot produce an exp-sized gradient; the smooth-L1 term above
        # still pulls such residuals back. On the H100, camera+LiDAR training without it diverged after ~300
        # iterations (grad norm -> 1e13 / inf, loss spikes; largest output gradients at the regression layers:
        # docs/results/archive/metrics_long*.jsonl, grad_probe_long.jsonl). With it and the Huber centre term of bb_loss
        # (``w.bb_center_huber``) both 12-minute H100 runs had 0 skipped steps
        # (docs/results/archive/metrics_{full,lidar}.jsonl).
        fr = torch.cat([fr[:, 0:3], fr[:, 3:6].clamp(-LOSS_SIZE_LOG_CLIP, LOSS_SIZE_LOG_CLIP), fr[:, 6:]], dim=1)
        boxes = decode_rcnn_boxes(fr, rois[fg], coder)
        l_corner = corner_loss_lidar(boxes, gt_src[fg]).mean()
        pred_ct = coder.decode_torch(fr, anchor[fg])  # canonical (RoI frame) prediction
        l_bb = bb_loss(pred_ct, gt_ct[fg], w.bb_center_huber).sum() / (nfg.to(reg.dtype) + 1)
    return {"reg": l_reg * w.reg, "corner": l_corner * w.corner, "bb": l_bb * w.bb}


def iou_branch_targets(boxes: torch.Tensor, gt_src: torch.Tensor, has_gt: torch.Tensor) -> torch.Tensor:
    """3D IoU of refined boxes (R, 7) with their assigned GT (R, 7); 0 where ``has_gt`` is False."""
    iou = boxes_iou3d_aligned(boxes[:, :7].detach(), gt_src[:, :7])
    return torch.where(has_gt, iou, torch.zeros_like(iou))
