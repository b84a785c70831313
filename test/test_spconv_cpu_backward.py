"""spconv 2.3.8 CPU backward (cmfiou_core.model.spconv_compat.enable_cpu_backward): gradients of SubMConv3d,
SparseConv3d (stride 2), SparseInverseConv3d (indice_key) and SubMConv2d against an independent dense torch reference,
float64 finite differences, a tiny sparse net that trains, and one real detector training step."""
from __future__ import annotations

import time

import pytest
import torch
import torch.nn.functional as F

spconv = pytest.importorskip("spconv.pytorch")

from cmfiou_core.model.spconv_compat import cpu_backward_enabled, enable_cpu_backward  # noqa: E402

TOL = 1e-4


@pytest.fixture(autouse=True)
def _one_thread_and_patch():
    torch.set_num_threads(1)
    enable_cpu_backward()
    yield


def _rand_sparse(shape, channels, n, seed, dtype=torch.float32, batch_size=2):
    """Random unique active sites over ``batch_size`` samples: indices (N, 1 + ndim) int32, leaf features."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.stack([torch.randint(0, batch_size, (4 * n,), generator=g)]
                      + [torch.randint(0, s, (4 * n,), generator=g) for s in shape], 1)
    idx = torch.unique(idx, dim=0)
    idx = idx[torch.randperm(len(idx), generator=g)[:n]]
    feats = torch.randn(len(idx), channels, generator=g, dtype=dtype).requires_grad_(True)
    return idx.int(), feats


def _to_dense(feats, idx, shape, batch_size):
    """(N, C) + (N, 1 + ndim) -> (B, C, *shape), differentiable w.r.t. feats."""
    c = feats.shape[1]
    dense = feats.new_zeros((batch_size, *shape, c))
    dense = dense.index_put(tuple(idx.long().T), feats)
    return dense.movedim(-1, 1)


def _gather(dense, idx):
    """(B, C, *shape) at (N, 1 + ndim) -> (N, C)."""
    return dense.movedim(1, -1)[tuple(idx.long().T)]


def _krsc_to_torch(w):
    """spconv KRSC weight (out, *k, in) -> torch conv weight (out, in, *k)."""
    return w.movedim(-1, 1)


def _grads(out, feats, weight, grad_out):
    return torch.autograd.grad(out, (feats, weight), grad_out)


def _assert_matches_reference(out, ref, grads, ref_leaves, grad_out):
    """spconv output == dense reference, and spconv's (input, weight) grads == the reference's for ``grad_out``."""
    torch.testing.assert_close(out, ref, atol=TOL, rtol=TOL)
    for got, want in zip(grads, _grads(ref, *ref_leaves, grad_out)):
        torch.testing.assert_close(got, want, atol=TOL, rtol=TOL)


def test_enable_is_idempotent():
    from spconv.pytorch import ops

    enable_cpu_backward()
    getter = ops.get_current_stream
    assert enable_cpu_backward() is False
    assert ops.get_current_stream is getter and cpu_backward_enabled()
    if not torch.cuda.is_available():
        assert ops.get_current_stream() == 0


@pytest.mark.parametrize("ndim", [3, 2])
def test_subm_grads_match_dense(ndim):
    shape = [9, 10, 11] if ndim == 3 else [13, 12]
    idx, feats = _rand_sparse(shape, 4, 120, seed=ndim)
    cls = spconv.SubMConv3d if ndim == 3 else spconv.SubMConv2d
    torch.manual_seed(0)
    conv = cls(4, 6, 3, padding=1, bias=False, indice_key="s")
    x = spconv.SparseConvTensor(feats, idx, shape, 2)
    y = conv(x)
    assert torch.equal(y.indices, idx)  # submanifold: output sites == input sites, same order
    g = torch.randn_like(y.features)
    d_in, d_w = _grads(y.features, feats, conv.weight, g)

    f2 = feats.detach().clone().requires_grad_(True)
    w2 = conv.weight.detach().clone().requires_grad_(True)
    conv_fn = F.conv3d if ndim == 3 else F.conv2d
    ref = _gather(conv_fn(_to_dense(f2, idx, shape, 2), _krsc_to_torch(w2), padding=1), idx)
    _assert_matches_reference(y.features, ref, (d_in, d_w), (f2, w2), g)


def test_sparse_conv3d_stride2_grads_match_dense():
    shape = [10, 11, 12]
    idx, feats = _rand_sparse(shape, 4, 150, seed=7)
    torch.manual_seed(1)
    conv = spconv.SparseConv3d(4, 5, 3, stride=2, padding=1, bias=False, indice_key="d")
    y = conv(spconv.SparseConvTensor(feats, idx, shape, 2))
    g = torch.randn_like(y.features)
    d_in, d_w = _grads(y.features, feats, conv.weight, g)

    f2 = feats.detach().clone().requires_grad_(True)
    w2 = conv.weight.detach().clone().requires_grad_(True)
    dense_out = F.conv3d(_to_dense(f2, idx, shape, 2), _krsc_to_torch(w2), stride=2, padding=1)
    assert list(dense_out.shape[2:]) == list(y.spatial_shape)
    ref = _gather(dense_out, y.indices)
    _assert_matches_reference(y.features, ref, (d_in, d_w), (f2, w2), g)


def test_sparse_inverse_conv3d_grads_match_dense():
    """Inverse conv reuses the strided conv's pairs (indice_key): equals conv_transpose3d (same stride/padding)
    evaluated at the strided conv's input sites."""
    shape = [10, 11, 12]
    idx, feats = _rand_sparse(shape, 4, 150, seed=11)
    torch.manual_seed(2)
    down = spconv.SparseConv3d(4, 5, 3, stride=2, padding=1, bias=False, indice_key="d")
    inv = spconv.SparseInverseConv3d(5, 3, 3, indice_key="d", bias=False)
    with torch.no_grad():
        xd = down(spconv.SparseConvTensor(feats.detach(), idx, shape, 2))
    g0 = torch.Generator().manual_seed(3)
    fd = torch.randn(xd.features.shape, generator=g0).requires_grad_(True)
    y = inv(xd.replace_feature(fd))
    assert torch.equal(y.indices, idx) and list(y.spatial_shape) == shape
    g = torch.randn_like(y.features)
    d_in, d_w = _grads(y.features, fd, inv.weight, g)

    f2 = fd.detach().clone().requires_grad_(True)
    w2 = inv.weight.detach().clone().requires_grad_(True)
    low = list(xd.spatial_shape)
    out_pad = [s - ((o - 1) * 2 - 2 + 3) for s, o in zip(shape, low)]
    # conv_transpose weight is (in, out, *k); spconv inverse KRSC is (out, *k, in)
    dense_out = F.conv_transpose3d(_to_dense(f2, xd.indices, low, 2), w2.movedim(-1, 0), stride=2, padding=1,
                                   output_padding=out_pad)
    assert list(dense_out.shape[2:]) == shape
    ref = _gather(dense_out, idx)
    _assert_matches_reference(y.features, ref, (d_in, d_w), (f2, w2), g)


def test_training_mode_bias_grad():
    """spconv adds the bias in Python in training mode (works on CPU); its grad is the column sum of grad_out."""
    shape = [8, 8, 8]
    idx, feats = _rand_sparse(shape, 3, 60, seed=5)
    conv = spconv.SparseConv3d(3, 4, 3, stride=2, padding=1, bias=True).train()
    y = conv(spconv.SparseConvTensor(feats, idx, shape, 2))
    g = torch.randn_like(y.features)
    (gb,) = torch.autograd.grad(y.features, conv.bias, g)
    torch.testing.assert_close(gb, g.sum(0))


@pytest.mark.parametrize("kind", ["subm3d", "spconv3d", "inverse3d", "subm2d"])
def test_gradcheck_float64(kind):
    shape = [6, 7, 5] if kind != "subm2d" else [7, 6]
    idx, feats = _rand_sparse(shape, 2, 25, seed=13, dtype=torch.float64, batch_size=1)
    torch.manual_seed(4)
    if kind == "subm3d":
        conv = spconv.SubMConv3d(2, 3, 3, padding=1, bias=False).double()
    elif kind == "subm2d":
        conv = spconv.SubMConv2d(2, 3, 3, padding=1, bias=False).double()
    elif kind == "spconv3d":
        conv = spconv.SparseConv3d(2, 3, 3, stride=2, padding=1, bias=False).double()
    else:
        down = spconv.SparseConv3d(2, 2, 3, stride=2, padding=1, bias=False, indice_key="d").double()
        with torch.no_grad():
            xd = down(spconv.SparseConvTensor(feats.detach(), idx, shape, 1))
        conv = spconv.SparseInverseConv3d(2, 3, 3, indice_key="d", bias=False).double()
        idx, shape = xd.indices, list(xd.spatial_shape)
        feats = xd.features.detach().clone().requires_grad_(True)
        template = xd

    def fn(f, w):
        if kind == "inverse3d":
            x = template.replace_feature(f)
        else:
            x = spconv.SparseConvTensor(f, idx, shape, 1)
        # run the module's own forward with a substituted weight
        saved = conv.weight
        try:
            del conv.weight
            conv.weight = w
            return conv(x).features
        finally:
            del conv.weight
            conv.weight = saved

    w = conv.weight.detach().clone().requires_grad_(True)
    assert torch.autograd.gradcheck(fn, (feats, w), eps=1e-6, atol=1e-6, rtol=1e-4)


def test_tiny_sparse_net_trains():
    shape = [12, 12, 12]
    idx, feats = _rand_sparse(shape, 4, 200, seed=21)
    feats = feats.detach()
    torch.manual_seed(5)
    net = spconv.SparseSequential(
        spconv.SubMConv3d(4, 8, 3, padding=1, bias=False, indice_key="s1"), torch.nn.BatchNorm1d(8), torch.nn.ReLU(),
        spconv.SparseConv3d(8, 8, 3, stride=2, padding=1, bias=False, indice_key="d1"), torch.nn.ReLU(),
        spconv.SparseInverseConv3d(8, 1, 3, indice_key="d1", bias=True),
    ).train()
    target = torch.tanh(feats[:, :1] * 2.0 - feats[:, 1:2])
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    losses = []
    for _ in range(15):
        opt.zero_grad()
        out = net(spconv.SparseConvTensor(feats, idx, shape, 2))
        loss = F.mse_loss(out.features, target)
        loss.backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters())
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses


# ---------------------------------------------------------------- detector training step


def _synthetic_points(seed=0):
    """Raw + pseudo points around 3 gt boxes in front of the camera (KITTI-like), plus a sparse background."""
    g = torch.Generator().manual_seed(seed)
    gt = torch.tensor([[12.0, 2.0, -0.9, 3.9, 1.6, 1.5, 0.3, 1.0],
                       [20.0, -4.0, -0.8, 4.2, 1.7, 1.6, -1.2, 1.0],
                       [8.0, -1.5, -0.9, 0.8, 0.6, 1.7, 0.0, 2.0]])

    def in_boxes(n_per, jitter):
        pts = []
        for b in gt:
            u = torch.rand(n_per, 3, generator=g) - 0.5
            local = u * b[3:6] * jitter
            c, s = torch.cos(b[6]), torch.sin(b[6])
            xy = torch.stack([local[:, 0] * c - local[:, 1] * s, local[:, 0] * s + local[:, 1] * c], 1)
            pts.append(torch.cat([xy + b[:2], (local[:, 2] + b[2])[:, None]], 1))
        return torch.cat(pts)

    def rows(xyz, flag):
        n = len(xyz)
        inten = torch.rand(n, 1, generator=g) * (10.0 if flag == 2 else 0.0)
        rgb = torch.rand(n, 3, generator=g) * (255.0 / 3)
        return torch.cat([xyz, inten, rgb, torch.full((n, 1), float(flag))], 1)

    bg = torch.stack([torch.rand(1500, generator=g) * 60 + 2, (torch.rand(1500, generator=g) - 0.5) * 40,
                      torch.rand(1500, generator=g) * 0.3 - 1.7], 1)
    raw = rows(torch.cat([in_boxes(150, 1.0), bg]), 2)
    pseudo = rows(in_boxes(600, 1.0), 1)
    return raw, pseudo, gt


def _expected_without_grad(name: str, train_aux_heads: bool) -> bool:
    """Parameters that legitimately take no part in the training loss: ``vir_conv1`` has stride 1, so its
    ``down_layer`` is built (state_dict layout) but not applied; the RoI aux heads get no loss when
    ``roi_head.train_aux_heads`` is false (released CMF-IOU behaviour, config/cmfiou_kitti.yaml)."""
    if name.startswith("backbone_3d.vir_conv1.down_layer."):
        return True
    aux = name.startswith(("roi_head.cls_layers_P.", "roi_head.reg_layers_P.", "roi_head.cls_layers_PI.",
                           "roi_head.reg_layers_PI."))
    return aux and not train_aux_heads


def test_detector_training_step_cpu(kitti_samples):
    """One real CMF-IOU training step on CPU (~30 s on 2 cores): finite loss, every participating parameter gets a
    finite grad (sparse backbone included), one Adam step changes the loss."""
    from pathlib import Path

    from cmfiou_core.calib import Calibration
    from cmfiou_core.model.detector import build_model, prepare_batch
    from cmfiou_core.model.model_config import load_config

    repo = Path(__file__).resolve().parents[1]
    calib_file = kitti_samples / "object" / "training" / "calib" / "000008.txt"
    t0 = time.perf_counter()
    torch.manual_seed(0)
    cfg = load_config(repo / "config" / "cmfiou_kitti.yaml")
    model = build_model(cfg).train()
    calib = Calibration.from_kitti_object_file(str(calib_file), 1242, 375)
    raw, pseudo, gt = _synthetic_points()

    def step():
        batch = prepare_batch([raw], [pseudo], [calib], cfg.model, training=True, aug_params=[[0.0, 0.0, 1.0]],
                              gt_boxes=[gt], image_shapes=[(375, 1242)])
        return model(batch)

    loss, tb = step()
    assert loss.ndim == 0 and torch.isfinite(loss), (loss, tb)
    assert all(v == v for v in tb.values()), tb  # no NaN component
    loss.backward()
    aux = model.roi_head.cfg.train_aux_heads
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    missing = [n for n, p in trainable if p.grad is None and not _expected_without_grad(n, aux)]
    assert not missing, f"parameters without grad: {missing[:10]}"
    got = [(n, p) for n, p in trainable if p.grad is not None]
    bad = [n for n, p in got if not torch.isfinite(p.grad).all()]
    assert not bad, f"non-finite grads: {bad[:10]}"
    # every applied sparse conv (3-D and 2-D, subm / strided / inverse) of both branches passes gradient back
    sparse_w = [(n, p) for n, p in got if n.startswith("backbone_3d.") and p.dim() >= 4]
    assert len(sparse_w) > 20 and all(p.grad.abs().sum() > 0 for _, p in sparse_w), \
        [n for n, p in sparse_w if p.grad.abs().sum() == 0]
    opt = torch.optim.Adam([p for _, p in trainable], lr=1e-3)
    opt.step()
    opt.zero_grad()
    torch.manual_seed(0)
    loss2, _ = step()
    assert torch.isfinite(loss2) and loss2.item() != loss.item()
    print(f"detector CPU train step: loss {loss.item():.4f} -> {loss2.item():.4f}, "
          f"{len(got)}/{len(trainable)} params with grad, {time.perf_counter() - t0:.1f}s")
