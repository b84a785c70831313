"""ResVC image-plane 2D SubM convs with duplicate (b, u', v') sites (cmfiou_core/model/resvc.py).

* ``image_plane_conv_unique`` ("mean" mode) against an independent dense reference: scatter-mean onto a dense image,
  torch conv2d, gather per voxel -- forward, input and weight gradients; invariant to the order of the voxels.
* Adjointness of the backward: the convs are linear in their input, so L(x + d) - L(x) must equal <dL/dx, d>. Checked
  on every available device for the unique-site path, and for spconv with duplicate sites on the CPU. The CUDA
  variant is collected only where CUDA exists (it passed on the H100 through the device tool).
* A ResConvBlock in "mean" mode trains (finite grads for every parameter) on real projected voxels.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

spconv = pytest.importorskip("spconv.pytorch")

from cmfiou_core.model.resvc import image_plane_conv_unique  # noqa: E402
from cmfiou_core.model.spconv_compat import enable_cpu_backward  # noqa: E402

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
W, H = 60, 20


@pytest.fixture(autouse=True)
def _one_thread_and_patch(request):
    dev = getattr(request.node, "callspec", None)
    on_cpu = dev is None or dev.params.get("device", "cpu") == "cpu"
    if on_cpu and torch.cuda.is_available():
        pytest.skip("CPU sparse convs: a CUDA build of spconv runs them only with ConvAlgo.Native; covered on CPU hosts")
    torch.set_num_threads(1)
    enable_cpu_backward()
    yield


def _duplicated_sites(n, seed, batch_size=2):
    """(N, 3) int32 (b, u, v) with many repeated sites (~N/3 distinct), like voxels projected onto the image."""
    g = torch.Generator().manual_seed(seed)
    base = torch.stack([torch.randint(0, batch_size, (n // 3,), generator=g), torch.randint(0, W, (n // 3,), generator=g),
                        torch.randint(0, H, (n // 3,), generator=g)], 1)
    pick = torch.randint(0, base.shape[0], (n,), generator=g)
    return base[pick].int()


def _dense_reference(feats, uv, weight, batch_size):
    """Independent path: mean of the features per pixel on a dense (B, C, W, H) image, conv2d, read back per voxel."""
    c = feats.shape[1]
    lin = (uv[:, 0].long() * W + uv[:, 1].long()) * H + uv[:, 2].long()
    total = feats.new_zeros((batch_size * W * H, c)).index_add(0, lin, feats)
    count = torch.zeros(batch_size * W * H, dtype=feats.dtype).index_add(0, lin, torch.ones_like(lin, dtype=feats.dtype))
    dense = (total / count.clamp_min(1)[:, None]).view(batch_size, W, H, c).permute(0, 3, 1, 2)
    out = F.conv2d(dense, weight.movedim(-1, 1), padding=1)              # spconv KRSC -> torch OIHW
    return out.permute(0, 2, 3, 1).reshape(-1, out.shape[1])[lin]


def test_unique_site_conv_matches_dense_reference():
    uv = _duplicated_sites(900, seed=1)
    assert torch.unique(uv, dim=0).shape[0] < 0.5 * uv.shape[0]          # the case under test: many duplicates
    torch.manual_seed(0)
    conv = spconv.SubMConv2d(5, 7, 3, padding=1, bias=False, indice_key="t")
    feats = torch.randn(uv.shape[0], 5, dtype=torch.float32, requires_grad=True)
    out = image_plane_conv_unique(feats, uv, [W, H], 2, lambda t: conv(t))
    f2 = feats.detach().clone().requires_grad_(True)
    w2 = conv.weight.detach().clone().requires_grad_(True)
    ref = _dense_reference(f2, uv, w2, 2)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    g = torch.randn_like(out)
    d_in, d_w = torch.autograd.grad(out, (feats, conv.weight), g)
    r_in, r_w = torch.autograd.grad(ref, (f2, w2), g)
    torch.testing.assert_close(d_in, r_in, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(d_w, r_w, atol=1e-4, rtol=1e-4)


def test_unique_site_conv_is_order_invariant():
    uv = _duplicated_sites(600, seed=2)
    torch.manual_seed(0)
    conv = spconv.SubMConv2d(4, 4, 3, padding=1, bias=False, indice_key="t")
    feats = torch.randn(uv.shape[0], 4)
    perm = torch.randperm(uv.shape[0], generator=torch.Generator().manual_seed(3))
    a = image_plane_conv_unique(feats, uv, [W, H], 2, lambda t: conv(t))
    b = image_plane_conv_unique(feats[perm], uv[perm], [W, H], 2, lambda t: conv(t))
    torch.testing.assert_close(a[perm], b, atol=1e-5, rtol=1e-5)


def _adjoint_gap(device, unique: bool, seed=0):
    """|(L(x + d) - L(x)) - <grad L(x), d>| / |L(x + d) - L(x)| for L(x) = <conv(x), r>; 0 up to rounding when the
    backward is the adjoint of the forward."""
    n = 4000
    uv = _duplicated_sites(n, seed=seed, batch_size=1).to(device)
    torch.manual_seed(seed)
    conv = spconv.SubMConv2d(16, 16, 3, padding=1, bias=False, indice_key="a").to(device)

    def run(x):
        if unique:
            return image_plane_conv_unique(x, uv, [W, H], 1, lambda t: conv(t))
        return conv(spconv.SparseConvTensor(x, uv, [W, H], 1)).features

    x = torch.randn(n, 16, device=device, requires_grad=True)
    r = torch.randn(n, 16, device=device)
    (run(x) * r).sum().backward()
    d = torch.randn(n, 16, device=device)
    with torch.no_grad():
        delta = float(((run(x + d) - run(x)) * r).double().sum())
    inner = float((x.grad.double() * d.double()).sum())
    return abs(delta - inner) / max(abs(delta), 1e-9)


@pytest.mark.parametrize("device", DEVICES)
def test_unique_site_backward_is_adjoint(device):
    assert _adjoint_gap(device, unique=True) < 1e-4


def test_spconv_cpu_duplicate_backward_is_adjoint():
    """On the CPU spconv's backward with duplicate sites is still the adjoint of its (hash-order) forward."""
    assert _adjoint_gap("cpu", unique=False) < 1e-4


def test_resconv_block_mean_mode_trains_cpu():
    """ResConvBlock with image_plane_duplicates='mean' on voxels projected through a KITTI calibration: forward and
    backward run and every parameter gets a finite, non-zero gradient."""
    import numpy as np
    from cmfiou_core.calib import Calibration
    from cmfiou_core.model.resvc import ResConvBlock, voxels_to_image_indices

    calib = Calibration(P2=np.array([[721.5, 0, 609.6, 44.9], [0, 721.5, 172.9, 0.2], [0, 0, 1, 0.003]]),
                        R0_rect=np.eye(3), Tr_velo_to_cam=np.array([[0, -1, 0, 0], [0, 0, -1, -0.08], [1, 0, 0, -0.27]],
                                                                    dtype=np.float64))
    g = torch.Generator().manual_seed(0)
    shape = [20, 800, 704]  # z, y, x at 0.05 m (41 x 1600 x 1408 / 2 for speed; the geometry only needs indices)
    n = 3000
    idx = torch.stack([torch.zeros(n, dtype=torch.long), torch.randint(0, 20, (n,), generator=g),
                       torch.randint(300, 500, (n,), generator=g), torch.randint(50, 400, (n,), generator=g)], 1)
    idx = torch.unique(idx, dim=0).int()
    feats = torch.randn(idx.shape[0], 16, generator=g)
    block = ResConvBlock(16, 16, stride=1, indice_key="v", image_plane_duplicates="mean").train()
    x = spconv.SparseConvTensor(feats, idx, shape, 1)
    uv = voxels_to_image_indices(idx, 1, [calib], 1, None, block.pc_range, block.voxel_size)
    assert torch.unique(uv, dim=0).shape[0] < uv.shape[0]  # duplicates do occur
    out = block(x, 1, [calib], 1, None)
    (out.features ** 2).mean().backward()
    for name, p in block.named_parameters():
        if name.startswith("down_layer"):  # stride 1: the official block keeps but does not use its down layer
            assert p.grad is None
            continue
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert block.d2_conv1[0].weight.grad.abs().sum() > 0


def test_training_projection_undoes_world_and_global_shift(kitti_samples):
    """Real KITTI frame: augment the LiDAR points as training does (world rotation/flip/scale, then the global shift
    of random_local_trans); ResVC's inverse with [rot, flip, scale, tx, ty, tz] must project every point back onto
    its original pixel. With only [rot, flip, scale] (the official aug_param) the pixels are measurably off."""
    import numpy as np
    from cmfiou_core.calib import Calibration
    from cmfiou_core.data import augment as A
    from cmfiou_core.model.resvc import _projector, inverse_view_transform

    root = kitti_samples / "object" / "training"
    fid = sorted(p.stem for p in (root / "velodyne").glob("*.bin"))[0]
    calib = Calibration.from_kitti_object_file(root / "calib" / f"{fid}.txt")
    pts = np.fromfile(root / "velodyne" / f"{fid}.bin", dtype=np.float32).reshape(-1, 4)
    pts = pts[(pts[:, 0] > 5) & (pts[:, 0] < 70)][::20]
    proj = _projector(calib)
    uv0 = proj(torch.from_numpy(pts[:, :3].copy()))
    cfg = A.AugmentConfig()
    rng = np.random.default_rng(3)
    for _ in range(4):
        d = {"points": pts.copy(), "gt_boxes": np.zeros((0, 7))}
        d = A.random_world(d, cfg, rng)
        d = A.random_local_trans(d, cfg, rng)
        aug = torch.from_numpy(d["points"][:, :3].astype(np.float32))
        full = torch.tensor(list(d["aug_param"]) + list(d["local_trans"]), dtype=torch.float32)
        back = inverse_view_transform(aug, full)
        err = (proj(back) - uv0).abs().max()
        assert err < 0.05, f"pixel error {float(err):.3f} with the shift undone"
        if np.abs(d["local_trans"][:2]).max() > 0.1:
            off = (proj(inverse_view_transform(aug, full[:3])) - uv0).abs().max()
            assert off > 1.0, "the global shift should move projections by pixels when it is ignored"


def test_test_views_map_voxels_back_onto_the_identity_image_plane(kitti_samples):
    """Test-time views (official X_TRANS [rot, flip, scale]): the view applied to the points by prepare_batch and
    undone by ResVC's projection puts every point back on its pixel, and a mirrored voxel under the flip view lands
    on the very (u', v') cell of the identity voxel at every ResVC stride."""
    import numpy as np
    from cmfiou_core.calib import Calibration
    from cmfiou_core.model.model_config import OFFICIAL_X_TRANS
    from cmfiou_core.model.resvc import _projector, inverse_view_transform, view_transform_points, voxels_to_image_indices

    root = kitti_samples / "object" / "training"
    fid = sorted(p.stem for p in (root / "velodyne").glob("*.bin"))[0]
    calib = Calibration.from_kitti_object_file(root / "calib" / f"{fid}.txt")
    pts = np.fromfile(root / "velodyne" / f"{fid}.bin", dtype=np.float32).reshape(-1, 4)
    pts = torch.from_numpy(pts[(pts[:, 0] > 5) & (pts[:, 0] < 70) & (np.abs(pts[:, 1]) < 39)][::10].copy())
    proj = _projector(calib)
    uv0 = proj(pts[:, :3])
    for view in OFFICIAL_X_TRANS.params():
        moved = view_transform_points(pts, view)
        assert not torch.allclose(moved[:, :3], pts[:, :3])
        back = inverse_view_transform(moved[:, :3], torch.tensor(view))
        assert (proj(back) - uv0).abs().max() < 0.05, view
    pc_range, vs = (0.0, -40.0, -3.0, 70.4, 40.0, 1.0), (0.05, 0.05, 0.1)
    for stride in (2, 4, 8, 16):
        ny = int(round(80 / (vs[1] * stride)))
        ix = ((pts[:, 0] - pc_range[0]) / (vs[0] * stride)).long()
        iy = ((pts[:, 1] - pc_range[1]) / (vs[1] * stride)).long()
        iz = ((pts[:, 2] - pc_range[2]) / (vs[2] * stride)).long()
        idx = torch.unique(torch.stack([torch.zeros_like(ix), iz, iy, ix], 1), dim=0)
        mirrored = idx.clone()
        mirrored[:, 2] = ny - 1 - idx[:, 2]
        ident = voxels_to_image_indices(idx, 1, [calib], stride, None, pc_range, vs)
        flip = voxels_to_image_indices(mirrored, 1, [calib], stride, torch.tensor([[0.0, 1.0, 1.0]]), pc_range, vs)
        same = (ident == flip).all(1).float().mean()
        assert same > 0.999, f"stride {stride}: only {float(same):.4f} of the voxels on the same cell"
        assert (ident - flip).abs().max() <= 1
