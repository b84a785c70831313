"""The CMF-IOU detector: ``CMFIOU`` (children vfe, backbone_3d, map_to_bev_module, backbone_2d, dense_head, roi_head;
buffer ``global_step``), ``build_model(cfg)`` and ``prepare_batch(...)`` (per-sample voxelization + collation into the
OpenPCDet-style batch dict, docs/DEVELOPING.md).

``forward(batch, hook=None)``: runs :data:`STAGES` in order (``run_stages``); eval -> the batch dict with predictions
(dense head: ``batch_cls_preds``/``batch_box_preds``; with a RoI head: ``rois`` ... and the RoI head outputs); train ->
``(loss, tb_dict)`` (RPN loss + RoI head loss). ``hook(stage_name, batch)`` is called after each stage (timing,
recording). A replacement for a stage (the inference engine's backbone) is swapped in as the child module, so every
caller runs it through the same list.
"""
from __future__ import annotations

import logging
from typing import Any, Callable, Collection, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import nn

from .backbone3d import VCEConv8x
from .bev import BaseBEVBackbone, HeightCompression
from .model_config import FullConfig, ModelConfig
from ..geometry.view_transform import view_transform_points
from .rpn import AnchorHeadSingle
from .spconv_compat import use_native_algorithm
from .vfe import MeanVFE
from .voxelize import Voxelizer

log = logging.getLogger(__name__)

NUM_POINT_FEATURES = 8

# The forward's stages in order: (stage name, the child modules it runs, in order). The names are the pipeline's
# timing keys. A new stage is a new child module and an entry here.
STAGES: Tuple[Tuple[str, Tuple[str, ...]], ...] = (
    ("vfe", ("vfe",)),
    ("backbone_3d", ("backbone_3d",)),
    ("bev", ("map_to_bev_module", "backbone_2d")),
    ("rpn", ("dense_head",)),
    ("roi_head", ("roi_head",)),
)
StageHook = Callable[[str, Dict[str, Any]], None]


def _build_roi_head(cfg: ModelConfig, backbone: VCEConv8x, num_bev_features: int) -> Optional[nn.Module]:
    """RoI head construction hook: ``cmfiou_core.model.roi_head.RoIHead``, built from the
    ``model.roi_head`` Section. Returns None when the config has no roi_head section."""
    if cfg.roi_head is None:
        return None
    from .roi_head import RoIHead

    return RoIHead(cfg.roi_head, input_channels=dict(backbone.multi_scale_channels), num_class=1)


class CMFIOU(nn.Module):
    def __init__(self, cfg: ModelConfig, with_roi_head: bool = True):
        super().__init__()
        self.cfg = cfg
        self.vfe = MeanVFE(NUM_POINT_FEATURES, cfg.vfe_flag_reduce)
        self.backbone_3d = VCEConv8x(cfg.backbone_3d, NUM_POINT_FEATURES, cfg.sparse_shape, cfg.point_cloud_range,
                                     cfg.voxel_size)
        d = cfg.sparse_shape[0]  # z extent through conv2..conv4 (k3 s2, z padding 1, 1, 0) and conv_out (k3 s2 p0)
        d = (d + 2 - 3) // 2 + 1
        d = (d + 2 - 3) // 2 + 1
        d = (d + 0 - 3) // 2 + 1
        d = (d - 3) // 2 + 1  # conv_out k3 s2 p0 along z
        self.map_to_bev_module = HeightCompression(cfg.backbone_3d.out_features * d)
        self.backbone_2d = BaseBEVBackbone(cfg.bev, self.map_to_bev_module.num_bev_features)
        self.dense_head = AnchorHeadSingle(cfg.rpn, self.backbone_2d.num_bev_features, cfg.num_class, cfg.grid_size,
                                           cfg.point_cloud_range, cfg.voxel_size)
        self.roi_head = _build_roi_head(cfg, self.backbone_3d, self.backbone_2d.num_bev_features) \
            if with_roi_head else None
        self.register_buffer("global_step", torch.LongTensor(1).zero_())
        use_native_algorithm(self)   # the GPU's implicit-GEMM convs are not reproducible here (spconv_compat)

    def update_global_step(self):
        self.global_step += 1

    def stages(self) -> List[Tuple[str, List[nn.Module]]]:
        """:data:`STAGES` with their current child modules; a stage whose module is None (no RoI head) is left out."""
        out = []
        for name, attrs in STAGES:
            mods = [getattr(self, a) for a in attrs]
            if all(m is not None for m in mods):
                out.append((name, mods))
        return out

    def run_stages(self, batch: Dict[str, Any], hook: Optional[StageHook] = None,
                   skip: Collection[str] = ()) -> Dict[str, Any]:
        """Run the stages in order on ``batch``; ``hook(name, batch)`` after each; stages named in ``skip`` (the
        pipeline's static RoI head replaces ``roi_head``) do not run."""
        unknown = set(skip) - {n for n, _ in STAGES}
        if unknown:
            raise ValueError(f"run_stages: unknown stage(s) {sorted(unknown)} (stages: {[n for n, _ in STAGES]})")
        for name, mods in self.stages():
            if name in skip:
                continue
            for m in mods:
                batch = m(batch)
            if hook is not None:
                hook(name, batch)
        return batch

    def forward(self, batch: Dict[str, Any], hook: Optional[StageHook] = None):
        batch = self.run_stages(batch, hook)
        if self.training:
            loss, tb = self.dense_head.get_loss()
            if self.roi_head is not None:
                loss_rcnn, tb_rcnn = self.roi_head.get_loss()
                loss = loss + loss_rcnn
                tb.update(tb_rcnn)
            tb["loss"] = float(loss.detach())
            return loss, tb
        return batch

    def post_process(self, batch: Dict[str, Any]):
        """Final detections per frame (``postprocess.post_process`` with ``model.post_processing``): list of
        ``FrameDetections(boxes, labels, cls, iou, score)``. Needs the RoI head outputs."""
        from .postprocess import post_process

        if "rois" not in batch:
            raise ValueError("post_process needs the RoI head outputs (model built without roi_head?)")
        return post_process(batch, self.cfg.post_processing)


def build_model(cfg: Union[FullConfig, ModelConfig], with_roi_head: bool = True) -> CMFIOU:
    """Build the detector from a loaded config (``model_config.load_config``). ``with_roi_head=False`` builds the
    dense path only (vfe .. dense_head)."""
    mc = cfg.model if isinstance(cfg, FullConfig) else cfg
    return CMFIOU(mc, with_roi_head=with_roi_head)


def view_transform_params(cfg: ModelConfig, batch_size: int) -> List[List[List[float]]]:
    """(B, V, 3) ``transform_params`` for :func:`prepare_batch` from ``model.test_views`` (identity: one view)."""
    return [cfg.test_views.params() for _ in range(batch_size)]


def _as_tensor(x, device) -> torch.Tensor:
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(np.ascontiguousarray(x))
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"expected a numpy array or tensor, got {type(x).__name__}")
    return x.to(device=device, dtype=torch.float32)


def prepare_batch(raw_points: Sequence, pseudo_points: Sequence, calibs: Sequence, cfg: ModelConfig, *,
                  image_shapes: Optional[Sequence] = None, training: bool = False,
                  transform_params: Optional[Sequence] = None, aug_params: Optional[Sequence] = None,
                  gt_boxes: Optional[Sequence] = None, device: Union[str, torch.device, None] = None,
                  voxelizer: Optional[Voxelizer] = None) -> Dict[str, Any]:
    """Voxelize and collate B samples into the model's batch dict.

    raw_points[b], pseudo_points[b]: (N, 8) ``[x, y, z, i*10|0, R/3, G/3, B/3, flag]`` arrays/tensors of sample b.
    With ``transform_params`` (B, V, 3) test views [rot, flip, scale]: either a list of V already transformed arrays
    per sample, or one array that is transformed here (X_TRANS forward: rotate, flip y, scale).
    calibs: list of ``Calibration``; image_shapes: list of (H, W); aug_params: (B, 3) training augmentation
    [rot, flip, scale] (the points are already augmented), or (B, 6) with the global shift of ``random_local_trans``
    appended (applied last; the ResVC image-plane projection undoes it); gt_boxes: list of (M_b, 8) (box + class id).
    Each view's points are masked to the x/y range (official ``mask_points_by_range``, inclusive) - ``points`` feeds
    the anchor mask - then voxelized (``Voxelizer``, cap = max_voxels train/test per modality). Everything is put on
    ``device`` (default: the device of the first raw point tensor).
    """
    B = len(raw_points)
    if len(pseudo_points) != B or len(calibs) != B:
        raise ValueError(f"prepare_batch: {B} raw, {len(pseudo_points)} pseudo and {len(calibs)} calib entries")
    if device is None:
        first = raw_points[0][0] if isinstance(raw_points[0], (list, tuple)) else raw_points[0]
        device = first.device if isinstance(first, torch.Tensor) else torch.device("cpu")
    device = torch.device(device)
    vox = voxelizer or Voxelizer(cfg.voxel_size, cfg.point_cloud_range, cfg.max_points_per_voxel,
                                 cfg.max_voxels(training))
    V = 1 if transform_params is None else len(transform_params[0])
    batch: Dict[str, Any] = {"batch_size": B, "calib": list(calibs)}
    for v in range(V):
        sfx = "" if v == 0 else str(v)
        for mod, src in (("", raw_points), ("_mm", pseudo_points)):
            vs, cs, ns, pts = [], [], [], []
            for b in range(B):
                per_view = isinstance(src[b], (list, tuple))
                if per_view and (transform_params is None or len(src[b]) != V):
                    raise ValueError(f"prepare_batch: sample {b}: got a list of {len(src[b])} views but "
                                     f"{V} transform_params")
                p = _as_tensor(src[b][v] if per_view else src[b], device)
                if p.dim() != 2 or p.shape[1] != NUM_POINT_FEATURES:
                    raise ValueError(f"prepare_batch: sample {b} points must be (N, 8), got {tuple(p.shape)}")
                if transform_params is not None and not per_view:
                    p = view_transform_points(p, transform_params[b][v])
                r = cfg.point_cloud_range
                keep = (p[:, 0] >= r[0]) & (p[:, 0] <= r[3]) & (p[:, 1] >= r[1]) & (p[:, 1] <= r[4])
                p = p[keep]
                voxels, coords, num = vox(p)
                vs.append(voxels)
                cs.append(torch.cat([torch.full((coords.shape[0], 1), b, dtype=torch.int32, device=device), coords],
                                    1))
                ns.append(num)
                pts.append(torch.cat([torch.full((p.shape[0], 1), float(b), device=device), p], 1))
            batch["voxels" + mod + sfx] = torch.cat(vs, 0)
            batch["voxel_coords" + mod + sfx] = torch.cat(cs, 0)
            batch["voxel_num_points" + mod + sfx] = torch.cat(ns, 0)
            batch["points" + mod + sfx] = torch.cat(pts, 0)
    if image_shapes is not None:
        batch["image_shape"] = torch.as_tensor(np.asarray(image_shapes, dtype=np.int64).reshape(B, 2), device=device)
    if transform_params is not None:
        batch["transform_param"] = torch.as_tensor(np.asarray(transform_params, dtype=np.float32).reshape(B, V, 3),
                                                   device=device)
    if aug_params is not None:
        ap = np.asarray(aug_params, dtype=np.float32).reshape(B, -1)
        if ap.shape[1] not in (3, 6):
            raise ValueError(f"prepare_batch: aug_params must be (B, 3) [rot, flip, scale] or (B, 6) with the global "
                             f"shift [tx, ty, tz] appended, got {ap.shape}")
        batch["aug_param"] = torch.as_tensor(ap, device=device)
    if gt_boxes is not None:
        M = max([len(g) for g in gt_boxes] + [1])
        gt = torch.zeros((B, M, 8), dtype=torch.float32, device=device)
        for b, g in enumerate(gt_boxes):
            if len(g):
                gt[b, :len(g)] = _as_tensor(g, device)
        batch["gt_boxes"] = gt
    return batch
