"""RPN / dense path unit tests on CPU: anchors, anchor-mask quirk, decode with direction bins, target assignment,
losses; training-mode dense forward with synthetic GT (finite loss) and backward of the dense 2D part (spconv has no
CPU backward); multi-view eval forward; prepare_batch collation."""
import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from cmfiou_core.calib import Calibration
from cmfiou_core.geometry.coders import ResidualCoder
from cmfiou_core.model.detector import build_model, prepare_batch
from cmfiou_core.model.model_config import ConfigError, load_config, parse_model_config
from cmfiou_core.model.rpn import AxisAlignedTargetAssigner, anchor_mask_from_points, generate_anchors

REPO = Path(__file__).resolve().parents[1]
PCR = [0, -40, -3, 70.4, 40, 1]


@pytest.fixture(scope="module")
def cfg():
    return load_config(REPO / "config/cmfiou_kitti_official.yaml").model


def _calib():
    P2 = [[721.5377, 0, 609.5593, 44.85728], [0, 721.5377, 172.854, 0.2163791], [0, 0, 1, 0.002745884]]
    Tr = [[0, -1, 0, 0], [0, 0, -1, -0.08], [1, 0, 0, -0.27]]
    return Calibration(np.array(P2), np.eye(3), np.array(Tr), 1242, 375)


def _scene(seed, gt):
    """Synthetic raw + pseudo 8-col clouds: ground plane + points on the GT box surfaces."""
    g = np.random.default_rng(seed)
    ground = np.c_[g.uniform(2, 60, 4000), g.uniform(-25, 25, 4000), g.normal(-1.7, 0.03, 4000)]
    objs = []
    for b in gt:
        u = g.uniform(-0.5, 0.5, (600, 3)) * b[3:6]
        c, s = math.cos(b[6]), math.sin(b[6])
        objs.append(np.c_[b[0] + u[:, 0] * c - u[:, 1] * s, b[1] + u[:, 0] * s + u[:, 1] * c, b[2] + u[:, 2]])
    xyz = np.concatenate([ground, *objs]).astype(np.float32)
    raw = np.c_[xyz, g.uniform(0, 10, len(xyz)), np.zeros((len(xyz), 3)), np.full(len(xyz), 2)].astype(np.float32)
    pxyz = xyz[g.choice(len(xyz), 6000)] + g.normal(0, 0.05, (6000, 3))
    pseudo = np.c_[pxyz, np.zeros(6000), g.uniform(0, 85, (6000, 3)), np.ones(6000)].astype(np.float32)
    return raw, pseudo


GT = np.array([[15.0, 3.0, -0.9, 3.9, 1.6, 1.56, 0.3, 1], [25.0, -6.0, -0.8, 0.8, 0.6, 1.73, 1.2, 2],
               [30.0, 8.0, -0.8, 1.76, 0.6, 1.73, -2.0, 3]], dtype=np.float32)


def test_anchor_layout(cfg):
    a = generate_anchors(cfg.rpn, cfg.grid_size[:2], PCR)
    assert a.shape == (200, 176, 6, 7)
    assert torch.allclose(a[0, 0, :, 3:6], torch.tensor([[3.9, 1.6, 1.56]] * 2 + [[0.8, 0.6, 1.73]] * 2 +
                                                        [[1.76, 0.6, 1.73]] * 2))
    assert torch.allclose(a[0, 0, :, 6], torch.tensor([0, 1.57] * 3))
    assert a[0, 175, 0, 0] == pytest.approx(70.4) and a[199, 0, 0, 1] == pytest.approx(40.0)
    assert a[0, 0, 0, 2] == pytest.approx(-1.78 + 0.78)


def test_anchor_mask_quirk():
    pts = torch.tensor([[0, 1.0, -39.0, 0, 0, 0, 0, 0, 2]])   # coarse cell (0, 0)
    m = anchor_mask_from_points(pts, (200, 176), PCR, 0.05)
    rows = torch.nonzero(m.any(1)).squeeze(1).tolist()
    cols = torch.nonzero(m.any(0)).squeeze(1).tolist()
    assert rows == list(range(0, 10)) + list(range(190, 200))     # 0..9 and the wrapped -10..-1
    assert cols == list(range(0, 10)) + list(range(166, 176))
    assert int(m.sum()) == 400
    far = torch.tensor([[0, 70.39, 39.99, 0, 0, 0, 0, 0, 2]])       # clamps to the last coarse cell (19, 16)
    m = anchor_mask_from_points(far, (200, 176), PCR, 0.05)
    assert m[180:200, 150:170].all() and int(m.sum()) == 400


def test_target_assignment_and_encoding(cfg):
    a = generate_anchors(cfg.rpn, cfg.grid_size[:2], PCR)
    cells = a[80:120, 20:60].reshape(-1, 6, 7)
    per_class = [cells[:, 2 * i:2 * i + 2] for i in range(3)]
    gt = torch.tensor([[list(cells[100, 0, :7].tolist()) + [1]]])           # a car exactly on an anchor
    gt[0, 0, 6] = 0.0
    assigner = AxisAlignedTargetAssigner(cfg.rpn, ResidualCoder(7))
    labels, targets = assigner.assign(per_class, gt)
    labels = labels.view(-1, 6)
    assert labels[100, 0] == 1 and (labels[:, 2:] <= 0).all()            # ped/cyc anchors never match a car
    assert (labels[:, 2:] == 0).all()                                      # no GT of that class: all negative
    assert targets.view(-1, 6, 7)[100, 0].abs().max() < 1e-6
    empty = torch.zeros((1, 2, 8))
    labels, _ = assigner.assign(per_class, empty)
    assert (labels == 0).all()


def test_decode_direction_correction(cfg):
    m = build_model(cfg, with_roi_head=False)
    h = m.dense_head
    anchors = h.anchors_all[0, :1]                                      # (1, 6, 7)
    box = torch.zeros((1, 1, 6 * 7))
    box.view(1, 1, 6, 7)[..., 6] = 0.5
    dirc = torch.zeros((1, 1, 12))
    dirc.view(1, 1, 6, 2)[..., 1] = 1.0                                  # bin 1 -> heading + pi
    _, bb = h.generate_predicted_boxes(1, torch.zeros((1, 1, 18)), box, dirc, anchors)
    rot = anchors[0, :, 6] + 0.5
    off = 0.78539
    expect = (rot - off) - torch.floor((rot - off) / math.pi) * math.pi + off + math.pi
    assert torch.allclose(bb[0, :, 6], expect, atol=1e-6)


def test_config_validation_rejects_unknown_keys():
    import yaml
    data = yaml.safe_load((REPO / "config/cmfiou_kitti.yaml").read_text())["model"]
    data["rpn"]["typo_key"] = 1
    with pytest.raises(ConfigError, match="typo_key"):
        parse_model_config(data)
    data = yaml.safe_load((REPO / "config/cmfiou_kitti_official.yaml").read_text())["model"]
    data["post_processing"]["score_mode"] = "rectified"                 # needs the IoU branch
    with pytest.raises(ConfigError, match="iou_branch"):
        parse_model_config(data)


def test_training_forward_dense_loss_finite_and_2d_backward(cfg):
    torch.manual_seed(0)
    m = build_model(cfg, with_roi_head=False).train()
    raw, pseudo = _scene(0, GT)
    raw2, pseudo2 = _scene(1, GT[:1])
    b = prepare_batch([raw, raw2], [pseudo, pseudo2], [_calib(), _calib()], cfg, training=True,
                      image_shapes=[(375, 1242)] * 2, aug_params=[[0.1, 1, 1.02], [0.0, 0, 1.0]],
                      gt_boxes=[GT, GT[:1]])
    loss, tb = m(b)
    assert torch.isfinite(loss) and loss.item() > 0
    assert all(math.isfinite(v) for v in tb.values()) and {"rpn_loss_cls", "rpn_loss_loc", "rpn_loss_dir"} <= set(tb)
    labels = m.dense_head.forward_ret_dict["box_cls_labels"]
    assert (labels > 0).sum() >= 4                                       # every GT got positive anchors
    # backward of the dense 2D part (BEV backbone + head) from the detached BEV map
    sf = b["spatial_features"].detach().requires_grad_(True)
    b2 = {"spatial_features": sf, "points": b["points"], "gt_boxes": b["gt_boxes"], "batch_size": 2}
    b2 = m.dense_head(m.backbone_2d(b2))
    loss2, _ = m.dense_head.get_loss()
    loss2.backward()
    g = m.backbone_2d.blocks[0][1].weight.grad
    assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0
    assert torch.isfinite(m.dense_head.conv_box.weight.grad).all() and torch.isfinite(sf.grad).all()


@pytest.mark.parametrize("views", ["wide", "separate"])
def test_eval_three_views(cfg, views):
    torch.manual_seed(0)
    c = dataclasses.replace(cfg, backbone_3d=dataclasses.replace(cfg.backbone_3d, view_batching=views))
    m = build_model(c, with_roi_head=False).eval()
    raw, pseudo = _scene(2, GT)
    tp = c.test_views.params()
    assert len(tp) == 3 and tp[0] == [0.3, 0.0, 0.98]
    from cmfiou_core.model.roi_head import x_trans_forward  # noqa: F401  (views are produced by the data side)
    rv, pv = [], []
    for rot, flip, scale in tp:
        out = []
        for arr in (raw, pseudo):
            p = arr.copy()
            cs, sn = math.cos(rot), math.sin(rot)
            x, y = p[:, 0].copy(), p[:, 1].copy()
            p[:, 0], p[:, 1] = x * cs - y * sn, x * sn + y * cs
            if flip:
                p[:, 1] = -p[:, 1]
            p[:, :3] *= scale
            out.append(p)
        rv.append(out[0])
        pv.append(out[1])
    b = prepare_batch([rv], [pv], [_calib()], c, transform_params=[tp], image_shapes=[(375, 1242)])
    b_auto = prepare_batch([raw], [pseudo], [_calib()], c, transform_params=[tp], image_shapes=[(375, 1242)])
    for s in ("", "1", "2"):   # views made inside prepare_batch == views made outside (float32 vs float64 rounding)
        assert abs(b["voxel_coords" + s].shape[0] - b_auto["voxel_coords" + s].shape[0]) <= 5
    with torch.no_grad():
        b = m(b)
    for s in ("", "1", "2"):
        assert b["multi_scale_3d_features" + s]["x_conv4"].spatial_shape == [10, 200, 176]
        assert b["multi_scale_3d_features_mm" + s]["x_conv3"].features.shape[1] == 64
    assert b["batch_box_preds"].shape[-1] == 7 and torch.isfinite(b["batch_box_preds"]).all()


def _sorted_sparse(t):
    idx = t.indices.long()
    key = ((idx[:, 0] * 4096 + idx[:, 1]) * 4096 + idx[:, 2]) * 8192 + idx[:, 3]
    o = torch.argsort(key)
    return idx[o], t.features[o]


def test_three_identity_views_equal_the_one_view_path(cfg):
    """With three identity views, every view's sparse features (raw and pseudo branch, each level) and the dense head
    equal the single-view forward on the same points ("separate" batching: each view in its own tensor)."""
    torch.manual_seed(0)
    one = dataclasses.replace(cfg, backbone_3d=dataclasses.replace(cfg.backbone_3d, view_batching="separate"),
                              test_views=dataclasses.replace(cfg.test_views, rotation=(0.0,), flip=(0,), scale=(1.0,)))
    three = dataclasses.replace(one, test_views=dataclasses.replace(cfg.test_views, rotation=(0.0,) * 3,
                                                                   flip=(0,) * 3, scale=(1.0,) * 3))
    m = build_model(one, with_roi_head=False).eval()
    raw, pseudo = _scene(3, GT)
    with torch.no_grad():
        b1 = m(prepare_batch([raw], [pseudo], [_calib()], one, transform_params=[one.test_views.params()],
                             image_shapes=[(375, 1242)]))
        b3 = m(prepare_batch([raw], [pseudo], [_calib()], three, transform_params=[three.test_views.params()],
                             image_shapes=[(375, 1242)]))
    n_checked = 0
    for s in ("", "1", "2"):
        for key in ("multi_scale_3d_features", "multi_scale_3d_features_mm"):
            for level in ("x_conv1", "x_conv2", "x_conv3", "x_conv4"):
                i1, f1 = _sorted_sparse(b1[key][level])
                i3, f3 = _sorted_sparse(b3[key + s][level])
                assert torch.equal(i1, i3), (key + s, level)
                assert f1.shape[0] > 0 and torch.allclose(f1, f3, atol=1e-5), (key + s, level)
                n_checked += 1
    assert n_checked == 24
    for k in ("st_features_2d", "batch_cls_preds", "batch_box_preds"):
        assert torch.allclose(b1[k], b3[k], atol=1e-5), k


def test_losses_against_direct_formulas():
    from cmfiou_core.model.rpn import direction_targets, sigmoid_focal_loss, weighted_smooth_l1
    g = torch.Generator().manual_seed(0)
    x = torch.randn((2, 50, 3), generator=g) * 3
    t = (torch.rand((2, 50, 3), generator=g) > 0.7).float()
    w = torch.rand((2, 50), generator=g)
    p = torch.sigmoid(x)
    pt = torch.where(t > 0, p, 1 - p)
    at = torch.where(t > 0, torch.full_like(p, 0.25), torch.full_like(p, 0.75))
    ref = -at * (1 - pt) ** 2 * torch.log(pt) * w[..., None]
    assert torch.allclose(sigmoid_focal_loss(x, t, w), ref, rtol=1e-4, atol=1e-6)
    a, b = torch.randn((2, 50, 7), generator=g), torch.randn((2, 50, 7), generator=g)
    d = (a - b).abs()
    ref = torch.where(d < 1 / 9, 4.5 * d ** 2, d - 1 / 18) * w[..., None]
    assert torch.allclose(weighted_smooth_l1(a, b, w, torch.ones(7)), ref, atol=1e-6)
    anchors = torch.zeros((1, 4, 7))
    reg = torch.zeros((1, 4, 7))
    reg[0, :, 6] = torch.tensor([0.0, 1.0, 3.0, -1.0])       # heading - 0.785 wrapped to [0, 2pi), bins of pi
    assert direction_targets(anchors, reg, 0.78539, 2).tolist() == [[1, 0, 0, 1]]


def test_lidar_only_frame_dense_path(cfg):
    """No pseudo points at all (no image): the ResVC branch yields empty tensors of the right shapes."""
    torch.manual_seed(0)
    m = build_model(cfg, with_roi_head=False).eval()
    raw, _ = _scene(3, GT)
    b = prepare_batch([raw], [np.zeros((0, 8), np.float32)], [_calib()], cfg)
    with torch.no_grad():
        b = m(b)
    mm = b["multi_scale_3d_features_mm"]
    assert mm["x_conv3"].features.shape == (0, 64) and list(mm["x_conv4"].spatial_shape) == [10, 200, 176]
    assert torch.isfinite(b["batch_box_preds"]).all()
    with pytest.raises(ValueError, match="no raw LiDAR voxels"):
        m(prepare_batch([np.zeros((0, 8), np.float32)], [raw], [_calib()], cfg))
