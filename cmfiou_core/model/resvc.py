"""Pseudo-point branch: ResConvBlock ("ResNR") with the 3D -> 2D image-plane SubMConv2d.

The image-plane projection reproduces the official float32 arithmetic (``index2points`` ->
``X_TRANS.backward_with_param`` -> ``Calibration.lidar_to_rect_cuda`` -> ``rect_to_img_cuda`` -> int truncation), with the
official ``matmul`` products evaluated in one fixed order so that the truncated cells are the same on every host
(``ImageProjector`` says why):
- voxel centre = ``idx * (vs * s) + (pc_min + vs * s / 2)`` in float32, the two constants rounded from float64;
- inverse view: ``/ scale``, then negate y if flip, then rotate by ``-rot`` (``points @ R``);
- ``rect = [p, 1] @ (V2C^T @ R0^T)``, ``img = ([rect, 1] @ P2^T)[:, :2] / rect_z`` (divided by the rect depth, not the
  homogeneous one), all float32 with the calibration matrices rounded to float32;
- ``u, v`` truncated toward zero, clamped to ``[0, 1400 - s]`` / ``[0, 400 - s]``, integer-divided by ``s``.
Several voxels may land on the same (u', v') cell (thousands per frame). ``image_plane_duplicates`` decides what
the 2D SubM convs see:

- ``"official"``: the duplicate indices are handed to spconv exactly as the official code does. spconv's hash table
  then keeps one row per site: every duplicate row's output reads the *winner's* features for each tap, so the
  forward depends on spconv's hash order (on the CPU the backward is still its adjoint: test/test_image_plane.py).
  Measured on the H100: full-model training in this mode skipped 106 of 398 steps for non-finite gradients and
  learned nothing useful; the same run in "mean" mode skipped 0 of 394 (docs/results/archive/metrics_full*.jsonl). Kept for
  reproducing the official layout's numbers.
- ``"mean"`` (ours): duplicates are scatter-meaned onto unique sites, the convs run on unique indices and every voxel
  gathers its site's output. Well-defined, order-independent and correctly differentiable on every backend.
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import numpy as np
import spconv.pytorch as spconv
import torch
from torch import nn

from ..geometry.view_transform import inverse_view_transform, view_transform_points  # noqa: F401 (re-exported)
from .s2d import BN1D, sparse_block

IMAGE_GRID_W, IMAGE_GRID_H = 1400, 400   # official hard-coded image-plane extent (pixels) of the 2D sparse tensor


def voxel_centers(indices: torch.Tensor, stride: int, pc_range: Sequence[float], voxel_size: Sequence[float]):
    """(N, 4) int (b, z, y, x) voxel indices at ``stride`` -> (N, 3) float32 xyz voxel centres (official rounding)."""
    f = indices.float()
    vs = [float(v) * stride for v in voxel_size]
    mins = [float(pc_range[i]) + vs[i] / 2 for i in range(3)]
    x = f[:, 3] * vs[0] + mins[0]
    y = f[:, 2] * vs[1] + mins[1]
    z = f[:, 1] * vs[2] + mins[2]
    return torch.stack([x, y, z], dim=1)


def _fma32(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """float32 ``a * b + c`` with one rounding (a fused multiply-add), computed in float64: the float32 product is exact
    in float64, so only the final float64 -> float32 rounding (plus a float64 rounding of the sum that can only matter
    at an exact float32 half-way point) remains. IEEE float64 arithmetic is correctly rounded on every CPU and GPU, so
    the result does not depend on the host's SIMD level."""
    return (a.double() * b.double() + c.double()).float()


def _dot3(x0, x1, x2, m0, m1, m2):
    """Fixed-order float32 3-term dot product: ``fma(x2, m2, x0*m0 + x1*m1)``."""
    return _fma32(x2, m2, x0 * m0 + x1 * m1)


def _affine4(x0, x1, x2, m0, m1, m2, m3):
    """Fixed-order float32 ``[x0, x1, x2, 1] . [m0, m1, m2, m3]``: ``fma(x2, m2, x0*m0) + (x1*m1 + m3)``."""
    return _fma32(x2, m2, x0 * m0) + (x1 * m1 + m3)


class ImageProjector:
    """Official float32 lidar -> image projection for one calibration (matrices cached per device).

    The official code computes ``rect = [p, 1] @ (V2C^T @ R0^T)`` and ``img = [rect, 1] @ P2^T`` with ``torch.matmul``,
    then *truncates* the pixel coordinates to integers. float32 ``matmul`` has no defined summation order: on the CPU
    it is MKL's sgemm, whose AVX2 and AVX-512 kernels round differently (measured on the reference frame: 40% of the
    pixel values differ in the last bit between the two, and one voxel's truncated pixel moves, which changes 1,290
    rows of ``x_conv3`` through the image-plane convolutions). So the released behaviour is host-dependent.

    Here every product and sum has a fixed order (``_dot3`` / ``_affine4``), written with elementwise IEEE operations
    that give the same bits on every CPU and GPU. The order chosen is the one of MKL's AVX2 sgemm kernel for these
    shapes (identified bit-exactly against it: 0 of 97,807 pixels differ on the reference frame), which is what the
    official reference in ``../shared/official_dense`` was computed with. ``test_image_plane.py`` checks the order
    against an exact float64 projection and across MKL instruction sets."""

    def __init__(self, calib):
        self._p2 = np.asarray(calib.P2, dtype=np.float32)
        self._r0 = np.asarray(calib.R0_rect, dtype=np.float32)
        self._v2c = np.asarray(calib.Tr_velo_to_cam, dtype=np.float32)
        self._cache = {}

    def rect_matrix(self) -> torch.Tensor:
        """(4, 3) float32 ``V2C^T @ R0^T`` in the fixed order (row i, column j = V2C^T[i, :] . R0^T[:, j])."""
        v = torch.from_numpy(self._v2c.T.copy())   # (4, 3)
        r = torch.from_numpy(self._r0.T.copy())    # (3, 3)
        return torch.stack([_dot3(v[:, 0], v[:, 1], v[:, 2], r[0, j], r[1, j], r[2, j]) for j in range(3)], dim=1)

    def _mats(self, device):
        key = str(device)
        if key not in self._cache:
            self._cache[key] = (self.rect_matrix().to(device), torch.from_numpy(self._p2.T.copy()).to(device))
        return self._cache[key]

    def __call__(self, pts: torch.Tensor) -> torch.Tensor:
        """(N, 3) float32 lidar xyz -> (N, 2) float32 pixel (u, v)."""
        m, p = self._mats(pts.device)
        x0, x1, x2 = pts[:, 0], pts[:, 1], pts[:, 2]
        rect = [_affine4(x0, x1, x2, m[0, j], m[1, j], m[2, j], m[3, j]) for j in range(3)]
        img = [_affine4(rect[0], rect[1], rect[2], p[0, j], p[1, j], p[2, j], p[3, j]) for j in range(2)]
        return torch.stack([img[0] / rect[2], img[1] / rect[2]], dim=1)


def _projector(calib) -> ImageProjector:
    p = getattr(calib, "_cmfiou_projector", None)
    if p is None:
        p = ImageProjector(calib)
        try:  # frozen dataclass: cache through object.__setattr__
            object.__setattr__(calib, "_cmfiou_projector", p)
        except (AttributeError, TypeError):
            pass
    return p


def voxels_to_image_indices(indices: torch.Tensor, batch_size: int, calibs: List, stride: int,
                            trans_param: Optional[torch.Tensor], pc_range, voxel_size) -> torch.Tensor:
    """(N, 4) voxel indices at ``stride`` -> (N, 3) int32 (b, u', v') image-plane indices (official ``index2uv``)."""
    uv = torch.zeros((indices.shape[0], 2), dtype=torch.int32, device=indices.device)
    for b in range(batch_size):
        m = indices[:, 0] == b
        pts = voxel_centers(indices[m], stride, pc_range, voxel_size)
        if trans_param is not None:
            pts = inverse_view_transform(pts, trans_param[b])
        uv[m] = pixels_to_cells(_projector(calibs[b])(pts), stride)
    return torch.stack([indices[:, 0].int(), uv[:, 0], uv[:, 1]], dim=1)


def pixels_to_cells(img: torch.Tensor, stride: int) -> torch.Tensor:
    """(N, 2) float pixel (u, v) -> (N, 2) int32 image-plane cells at ``stride`` (official ``index2uv``: truncation,
    clamp to the 1400 x 400 grid, integer division). Finite, in-int32-range values convert exactly as the official
    ``.int()``; inf / nan are made deterministic."""
    uv = torch.nan_to_num(img, nan=0.0).clamp(-2.0 ** 30, 2.0 ** 30).int()
    u = torch.clamp(uv[:, 0], min=0, max=IMAGE_GRID_W - stride) // stride
    v = torch.clamp(uv[:, 1], min=0, max=IMAGE_GRID_H - stride) // stride
    return torch.stack([u, v], dim=1)


def image_plane_conv_unique(features: torch.Tensor, uv: torch.Tensor, spatial_shape: Sequence[int], batch_size: int,
                            convs) -> torch.Tensor:
    """Run 2D sparse ``convs`` over the *unique* (b, u', v') sites of ``uv`` (N, 3): features of voxels sharing a site
    are averaged (scatter-mean), the convs see each site once, and each of the N voxels gets its site's output (N, C).
    """
    w, h = int(spatial_shape[0]), int(spatial_shape[1])
    key = (uv[:, 0].long() * w + uv[:, 1].long()) * h + uv[:, 2].long()
    sites, inverse = torch.unique(key, return_inverse=True)
    count = torch.bincount(inverse, minlength=sites.numel()).to(features.dtype).clamp_min(1)
    mean = features.new_zeros((sites.numel(), features.shape[1])).index_add_(0, inverse, features) / count[:, None]
    idx = torch.stack([sites // (w * h), (sites // h) % w, sites % h], dim=1).int()
    out = convs(spconv.SparseConvTensor(features=mean, indices=idx, spatial_shape=[w, h], batch_size=batch_size))
    return out.features[inverse]


def align_rows(features: torch.Tensor, indices: torch.Tensor, target_indices: torch.Tensor,
               spatial_shape: Sequence[int]) -> torch.Tensor:
    """Rows of ``features`` (at ``indices``) reordered to ``target_indices`` (the same voxel set in another order).

    Two strided convolutions of one input have the same output voxels, but spconv does not promise their order: on
    the CPU it is the same, on the GPU the implicit-GEMM algorithms build each conv's outputs through a hash table, so
    adding their features row by row (ResVC's ``d3 + resnet_layer``) would add different voxels. Identity when the
    orders agree; ValueError when the voxel sets differ (one host sync: the eager path only)."""
    if torch.equal(indices, target_indices):
        return features
    key_src = _linear_key(indices, spatial_shape)
    key_dst = _linear_key(target_indices, spatial_shape)
    o_src = torch.argsort(key_src)
    o_dst = torch.argsort(key_dst)
    if key_src.shape != key_dst.shape or not torch.equal(key_src[o_src], key_dst[o_dst]):
        raise ValueError(f"align_rows: the two sparse tensors hold different voxels ({key_src.numel()} vs "
                         f"{key_dst.numel()} rows)")
    out = torch.empty_like(features)
    out[o_dst] = features[o_src]
    return out


def _linear_key(indices: torch.Tensor, spatial_shape: Sequence[int]) -> torch.Tensor:
    idx = indices.long()
    key = idx[:, 0]
    for d, s in enumerate(spatial_shape):
        key = key * int(s) + idx[:, d + 1]
    return key


class ResConvBlock(nn.Module):
    """ResVC block (c = channels, h = c/2): optional strided ``down_layer``; D = d3_conv2(d3_conv1(X)) (+ resnet_layer(X));
    G = d2_conv2(d2_conv1(D on the image plane)); D = d3_conv3(mid_norm(D + G)); out = output_norm(d3_conv4(D) + X)."""

    def __init__(self, cin: int = 64, cout: int = 64, stride: int = 1, res_enable: bool = True, padding=1,
                 indice_key: str = "vir1", pc_range=(0, -40, -3, 70.4, 40, 1), voxel_size=(0.05, 0.05, 0.05),
                 image_plane_duplicates: str = "official"):
        super().__init__()
        if image_plane_duplicates not in ("official", "mean"):
            raise ValueError(f"ResConvBlock: image_plane_duplicates must be 'official' or 'mean', "
                             f"got {image_plane_duplicates!r}")
        self.image_plane_duplicates = image_plane_duplicates
        self.stride = stride
        self.residual = res_enable
        self.pc_range = tuple(float(v) for v in pc_range)
        self.voxel_size = tuple(float(v) for v in voxel_size)
        h = cout // 2
        self.down_layer = sparse_block(cin, cout, 3, "spconv_down" + indice_key, stride=stride, padding=padding,
                                       conv_type="spconv")
        if res_enable:
            self.resnet_layer = sparse_block(cin, h, 3, "res" + indice_key, stride=2, padding=1, conv_type="spconv")
        self.d3_conv1 = sparse_block(cin, h, 3, "3dspconv" + indice_key, stride=2, padding=1, conv_type="spconv")
        self.d3_conv2 = sparse_block(h, h, 3, "3dsubm1" + indice_key)
        self.d2_conv1 = sparse_block(h, h, 3, "2dsubm1" + indice_key, ndim=2)
        self.d2_conv2 = sparse_block(h, h, 3, "2dsubm2" + indice_key, ndim=2)
        self.d3_conv3 = sparse_block(h, h, 3, "3dsubm2" + indice_key)
        self.d3_conv4 = sparse_block(h, cout, 3, "3dspconv" + indice_key, conv_type="inverseconv")
        self.mid_norm_fn = BN1D(h)
        self.output_norm_fn = BN1D(cout)

    def forward(self, x, batch_size: int, calibs: List, img_stride: int, trans_param: Optional[torch.Tensor]):
        if self.stride > 1:
            x = self.down_layer(x)
        d3 = self.d3_conv2(self.d3_conv1(x))
        if self.residual:
            res = self.resnet_layer(x)   # same voxels as d3, not necessarily in d3's row order (align_rows)
            d3 = d3.replace_feature(d3.features + align_rows(res.features, res.indices, d3.indices, d3.spatial_shape))
        uv = voxels_to_image_indices(d3.indices, batch_size, calibs, img_stride, trans_param, self.pc_range,
                                     self.voxel_size)
        shape = [IMAGE_GRID_W // img_stride, IMAGE_GRID_H // img_stride]
        if self.image_plane_duplicates == "mean":
            g = image_plane_conv_unique(d3.features, uv, shape, batch_size, lambda t: self.d2_conv2(self.d2_conv1(t)))
        else:
            d2 = spconv.SparseConvTensor(features=d3.features, indices=uv, spatial_shape=shape, batch_size=batch_size)
            g = self.d2_conv2(self.d2_conv1(d2)).features
        d3 = d3.replace_feature(self.mid_norm_fn(d3.features + g))
        d3 = self.d3_conv3(d3)
        out = self.d3_conv4(d3)
        return out.replace_feature(self.output_norm_fn(out.features + x.features))
