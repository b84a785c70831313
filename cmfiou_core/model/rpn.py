"""Dense head ``AnchorHeadSingle``: anchors, the VirConv anchor mask, 1x1 convs, box decoding with the
direction-bin correction, anchor targets (``AxisAlignedTargetAssigner`` semantics) and the RPN losses (sigmoid focal,
smooth-L1 with the sin-difference trick, direction cross-entropy).

Anchor layout: per BEV cell (row-major over (y, x)) the anchors are [class-major, rotation-minor], matching the
channel layout of ``conv_cls`` (A*K), ``conv_box`` (A*7) and ``conv_dir_cls`` (A*2) after NHWC permutation.
"""
from __future__ import annotations

from typing import Any, Dict, List, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..geometry.boxes import limit_period
from ..geometry.coders import ResidualCoder, add_sin_difference
from ..geometry.iou import boxes3d_nearest_bev_iou
from .model_config import RPNConfig


# ---------------------------------------------------------------------------------------------- anchors
def generate_anchors(rpn: RPNConfig, grid_size_xy, point_cloud_range) -> torch.Tensor:
    """All anchors as (H, W, A, 7) float32 (CPU), A = sum over classes of len(rotations).

    Centres follow OpenPCDet ``AnchorGenerator`` (align_center False): x = arange(xmin, xmax + 1e-5, step) with
    step = (xmax - xmin) / (nx - 1) (float32 range values, float64 step), same for y; z = bottom + h / 2 (float32).
    """
    r = np.asarray(point_cloud_range, dtype=np.float32)
    per_class = []
    for a in rpn.anchors:
        nx, ny = grid_size_xy[0] // a.feature_map_stride, grid_size_xy[1] // a.feature_map_stride
        # float32 range values, strides computed in float64 (numpy float32 / int64 grid size) - matches the
        # official anchors bit for bit (official_roi/inputs.npz)
        x0, x1, y0, y1 = (float(v) for v in (r[0], r[3], r[1], r[4]))
        xs = torch.arange(x0, x1 + 1e-5, step=(x1 - x0) / (nx - 1), dtype=torch.float32)
        ys = torch.arange(y0, y1 + 1e-5, step=(y1 - y0) / (ny - 1), dtype=torch.float32)
        if xs.numel() != nx or ys.numel() != ny:
            raise ValueError(f"anchor grid {xs.numel()}x{ys.numel()} does not match the feature map {nx}x{ny}")
        R = len(a.rotations)
        anc = torch.zeros((ny, nx, R, 7), dtype=torch.float32)
        anc[..., 0] = xs.view(1, nx, 1)
        anc[..., 1] = ys.view(ny, 1, 1)
        size = torch.tensor(a.size, dtype=torch.float32)
        anc[..., 2] = torch.tensor(a.bottom, dtype=torch.float32)
        anc[..., 3:6] = size
        anc[..., 6] = torch.tensor(a.rotations, dtype=torch.float32).view(1, 1, R)
        anc[..., 2] += anc[..., 5] / 2
        per_class.append(anc)
    return torch.cat(per_class, dim=2)


def anchor_mask_from_points(points: torch.Tensor, shape_hw: Tuple[int, int], point_cloud_range, voxel_size_x: float,
                            stride_bev: int = 8) -> torch.Tensor:
    """VirConv ``get_anchor_mask``: a coarse grid of (10 fine cells) cells marked by any raw point of the batch (x ->
    column, y -> row, truncation, clamp of the upper side only); each marked coarse cell c enables fine cells
    10c + [-10, 9] on both axes, negative indices wrapping around (Python indexing). Returns (H, W) bool."""
    H, W = shape_hw
    stride = float(np.round(voxel_size_x * stride_bev * 10.0))
    dev = points.device
    hl, wl = H // 10, W // 10
    in_x = ((points[:, 1] - point_cloud_range[0]) / stride).long().clamp(max=wl - 1)
    in_y = ((points[:, 2] - point_cloud_range[1]) / stride).long().clamp(max=hl - 1)
    large = torch.zeros((hl, wl), dtype=torch.bool, device=dev)
    large[in_y, in_x] = True
    idx = torch.nonzero(large, as_tuple=False) * 10                       # (K, 2) row, col
    off = torch.arange(-10, 10, device=dev)
    rows = (idx[:, 0:1, None] + off.view(1, 20, 1)).expand(-1, 20, 20).reshape(-1)
    cols = (idx[:, 1:2, None] + off.view(1, 1, 20)).expand(-1, 20, 20).reshape(-1)
    mask = torch.zeros((H, W), dtype=torch.bool, device=dev)
    mask[rows % H, cols % W] = True   # only negative wrap can occur (row <= 10*(hl-1)+9 < H)
    return mask


# ---------------------------------------------------------------------------------------------- losses
def sigmoid_focal_loss(logits, targets, weights, alpha: float = 0.25, gamma: float = 2.0):
    p = torch.sigmoid(logits)
    alpha_w = targets * alpha + (1 - targets) * (1 - alpha)
    pt = targets * (1.0 - p) + (1.0 - targets) * p
    bce = torch.clamp(logits, min=0) - logits * targets + torch.log1p(torch.exp(-torch.abs(logits)))
    return alpha_w * torch.pow(pt, gamma) * bce * weights.unsqueeze(-1)


def weighted_smooth_l1(pred, target, weights, code_weights: torch.Tensor, beta: float = 1.0 / 9.0):
    target = torch.where(torch.isnan(target), pred, target)
    diff = (pred - target) * code_weights.view(1, 1, -1)
    n = torch.abs(diff)
    loss = n if beta < 1e-5 else torch.where(n < beta, 0.5 * n ** 2 / beta, n - 0.5 * beta)
    return loss * weights.unsqueeze(-1)


def direction_targets(anchors, reg_targets, dir_offset: float, num_bins: int):
    rot_gt = reg_targets[..., 6] + anchors[..., 6]
    off = limit_period(rot_gt - dir_offset, 0, 2 * np.pi)
    t = torch.floor(off / (2 * np.pi / num_bins)).long()
    return torch.clamp(t, min=0, max=num_bins - 1)


# ---------------------------------------------------------------------------------------------- targets
class AxisAlignedTargetAssigner:
    """Per class: nearest-BEV axis-aligned IoU between that class's anchors and GT of the same class. Positive if IoU
    >= matched or the anchor attains some GT's best IoU (label of its argmax GT, the OpenPCDet quirk); negative if
    max IoU < unmatched; otherwise ignored (-1). Regression targets by ResidualCoder against the argmax GT."""

    def __init__(self, rpn: RPNConfig, coder: ResidualCoder):
        self.rpn = rpn
        self.coder = coder

    def _single(self, anchors, gt, gt_cls, matched, unmatched):
        n = anchors.shape[0]
        dev = anchors.device
        labels = torch.full((n,), -1, dtype=torch.long, device=dev)
        targets = anchors.new_zeros((n, self.coder.code_size))
        if gt.shape[0] == 0 or n == 0:
            labels[:] = 0
            return labels, targets
        ov = boxes3d_nearest_bev_iou(anchors[:, :7], gt[:, :7])
        a2g_arg = torch.argmax(ov, dim=1)
        a2g_max = ov[torch.arange(n, device=dev), a2g_arg]
        g2a_arg = torch.argmax(ov, dim=0)
        g2a_max = ov[g2a_arg, torch.arange(gt.shape[0], device=dev)]
        g2a_max = torch.where(g2a_max == 0, torch.full_like(g2a_max, -1), g2a_max)
        forced = torch.nonzero(ov == g2a_max.view(1, -1), as_tuple=False)[:, 0]
        forced_gt = a2g_arg[forced]
        labels[forced] = gt_cls[forced_gt]
        pos = a2g_max >= matched
        labels[pos] = gt_cls[a2g_arg[pos]]
        fg = torch.nonzero(labels > 0, as_tuple=False)[:, 0]
        labels[a2g_max < unmatched] = 0
        labels[forced] = gt_cls[forced_gt]
        targets[fg] = self.coder.encode_torch(gt[a2g_arg[fg]][:, :7], anchors[fg][:, :7])
        return labels, targets

    def assign(self, anchors_per_class: List[torch.Tensor], gt_boxes: torch.Tensor):
        """anchors_per_class: list over classes of (M, R, 7) (masked cells); gt_boxes (B, G, 8) zero padded.
        Returns box_cls_labels (B, M*A) long, box_reg_targets (B, M*A, code)."""
        B = gt_boxes.shape[0]
        all_labels, all_targets = [], []
        for b in range(B):
            g = gt_boxes[b]
            valid = ~(g.abs().sum(dim=1) == 0)
            # OpenPCDet strips trailing all-zero rows only; zero rows in the middle do not occur in practice
            cnt = int(valid.nonzero()[-1].item()) + 1 if bool(valid.any()) else 0
            g = g[:cnt]
            cls = g[:, 7].long()
            lab_c, tgt_c = [], []
            for ci, (anc, ac) in enumerate(zip(anchors_per_class, self.rpn.anchors)):
                M, R = anc.shape[0], anc.shape[1]
                m = cls == ci + 1
                lab, tgt = self._single(anc.reshape(-1, 7), g[m], cls[m], ac.matched_threshold,
                                        ac.unmatched_threshold)
                lab_c.append(lab.view(M, R))
                tgt_c.append(tgt.view(M, R, -1))
            all_labels.append(torch.cat(lab_c, dim=1).reshape(-1))
            all_targets.append(torch.cat(tgt_c, dim=1).reshape(-1, self.coder.code_size))
        return torch.stack(all_labels, 0), torch.stack(all_targets, 0)


# ---------------------------------------------------------------------------------------------- head
class AnchorHeadSingle(nn.Module):
    def __init__(self, rpn: RPNConfig, input_channels: int, num_class: int, grid_size, point_cloud_range,
                 voxel_size):
        super().__init__()
        self.rpn = rpn
        self.num_class = num_class
        self.pc_range = [float(v) for v in point_cloud_range]
        self.voxel_size_x = (self.pc_range[3] - self.pc_range[0]) / grid_size[0]
        self.coder = ResidualCoder(7)
        anchors = generate_anchors(rpn, grid_size[:2], point_cloud_range)       # (H, W, A, 7)
        self.register_buffer("anchors_all", anchors, persistent=False)
        self.num_anchors_per_location = anchors.shape[2]
        self.rotations_per_class = len(rpn.anchors[0].rotations)
        A = self.num_anchors_per_location
        self.conv_cls = nn.Conv2d(input_channels, A * num_class, kernel_size=1)
        self.conv_box = nn.Conv2d(input_channels, A * self.coder.code_size, kernel_size=1)
        self.conv_dir_cls = nn.Conv2d(input_channels, A * rpn.num_dir_bins, kernel_size=1)
        nn.init.constant_(self.conv_cls.bias, -float(np.log((1 - 0.01) / 0.01)))
        nn.init.normal_(self.conv_box.weight, mean=0, std=0.001)
        self.assigner = AxisAlignedTargetAssigner(rpn, self.coder)
        self.register_buffer("code_weights", torch.tensor(rpn.loss.code_weights, dtype=torch.float32),
                             persistent=False)
        self.forward_ret_dict: Dict[str, Any] = {}

    def anchor_mask(self, batch, H: int, W: int) -> torch.Tensor:
        dev = batch["st_features_2d"].device
        if not self.rpn.anchor_mask:
            return torch.ones((H, W), dtype=torch.bool, device=dev)
        return anchor_mask_from_points(batch["points"], (H, W), self.pc_range, self.voxel_size_x)

    def forward(self, batch: Dict[str, Any]) -> Dict[str, Any]:
        x = batch["st_features_2d"]
        B, _, H, W = x.shape
        mask = self.anchor_mask(batch, H, W)
        anchors = self.anchors_all.to(x.device)[mask]                  # (M, A, 7)
        cls = self.conv_cls(x).permute(0, 2, 3, 1).contiguous()[:, mask, :]
        box = self.conv_box(x).permute(0, 2, 3, 1).contiguous()[:, mask, :]
        dirc = self.conv_dir_cls(x).permute(0, 2, 3, 1).contiguous()[:, mask, :]
        self.forward_ret_dict = {"cls_preds": cls, "box_preds": box, "dir_cls_preds": dirc, "anchors": anchors,
                                 "anchor_mask": mask}
        batch["anchor_mask"] = mask
        if self.training:
            R = self.rotations_per_class
            per_class = [anchors[:, i * R:(i + 1) * R] for i in range(len(self.rpn.anchors))]
            labels, targets = self.assigner.assign(per_class, batch["gt_boxes"])
            self.forward_ret_dict["box_cls_labels"] = labels
            self.forward_ret_dict["box_reg_targets"] = targets
        batch_cls, batch_box = self.generate_predicted_boxes(B, cls, box, dirc, anchors)
        batch["batch_cls_preds"] = batch_cls
        batch["batch_box_preds"] = batch_box
        batch["cls_preds_normalized"] = False
        return batch

    def generate_predicted_boxes(self, B, cls, box, dirc, anchors):
        n = anchors.shape[0] * anchors.shape[1]
        ba = anchors.reshape(1, n, 7).repeat(B, 1, 1)
        batch_cls = cls.reshape(B, n, -1).float()
        batch_box = self.coder.decode_torch(box.reshape(B, n, -1), ba)
        dir_labels = torch.max(dirc.reshape(B, n, -1), dim=-1)[1]
        period = 2 * np.pi / self.rpn.num_dir_bins
        off = self.rpn.dir_offset
        dir_rot = limit_period(batch_box[..., 6] - off, self.rpn.dir_limit_offset, period)
        batch_box[..., 6] = dir_rot + off + period * dir_labels.to(batch_box.dtype)
        return batch_cls, batch_box

    def get_loss(self) -> Tuple[torch.Tensor, Dict[str, float]]:
        d = self.forward_ret_dict
        lc = self.rpn.loss
        cls_preds, box_preds, dir_preds = d["cls_preds"], d["box_preds"], d["dir_cls_preds"]
        labels = d["box_cls_labels"]
        B = int(cls_preds.shape[0])
        positives = labels > 0
        negatives = labels == 0
        cls_w = (negatives.float() + positives.float())
        pos_norm = positives.sum(1, keepdim=True).float()
        reg_w = positives.float() / torch.clamp(pos_norm, min=1.0)
        cls_w = cls_w / torch.clamp(pos_norm, min=1.0)
        cared = labels >= 0
        cls_targets = labels * cared.type_as(labels)
        one_hot = torch.zeros(*cls_targets.shape, self.num_class + 1, dtype=cls_preds.dtype, device=cls_preds.device)
        one_hot.scatter_(-1, cls_targets.unsqueeze(-1).long(), 1.0)
        one_hot = one_hot[..., 1:]
        cls_loss = sigmoid_focal_loss(cls_preds.reshape(B, -1, self.num_class), one_hot, cls_w, lc.focal_alpha,
                                      lc.focal_gamma).sum() / B * lc.cls_weight
        A = self.num_anchors_per_location
        bp = box_preds.reshape(B, -1, box_preds.shape[-1] // A)
        tg = d["box_reg_targets"]
        bp_s, tg_s = add_sin_difference(bp, tg)
        loc_loss = weighted_smooth_l1(bp_s, tg_s, reg_w, self.code_weights.to(bp.device), lc.smooth_l1_beta)
        loc_loss = loc_loss.sum() / B * lc.loc_weight
        anchors = d["anchors"].reshape(1, -1, 7).repeat(B, 1, 1)
        dir_t = direction_targets(anchors, tg, self.rpn.dir_offset, self.rpn.num_dir_bins)
        dir_logits = dir_preds.reshape(B, -1, self.rpn.num_dir_bins)
        w = positives.type_as(dir_logits)
        w = w / torch.clamp(w.sum(-1, keepdim=True), min=1.0)
        dir_loss = (F.cross_entropy(dir_logits.permute(0, 2, 1), dir_t, reduction="none") * w).sum() / B
        dir_loss = dir_loss * lc.dir_weight
        rpn_loss = cls_loss + loc_loss + dir_loss
        tb = {"rpn_loss_cls": float(cls_loss.detach()), "rpn_loss_loc": float(loc_loss.detach()),
              "rpn_loss_dir": float(dir_loss.detach()), "rpn_loss": float(rpn_loss.detach())}
        return rpn_loss, tb
