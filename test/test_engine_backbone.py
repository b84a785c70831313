"""The static-shape sparse engine (cmfiou_core/engine) against spconv and the eager backbone, on the CPU.

* each conv kind (SubM 3D/2D, strided with several kernels/paddings, stride-1 dilation, inverse) against spconv on
  random sites: the same site sets and features to fp32 noise, padding rows zero;
* the raw S2D branch through the engine against the official reference (``../shared/official_dense``): identical
  index sets, features within the parity test's 1e-3;
* the whole backbone of our config (S2D + ResVC, image-plane sites scatter-meaned) through ``EngineBackbone`` against
  the eager VCEConv8x on a real frame, one view and the three official test views batched in one pass;
* capacity overflow is counted, never silent.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

spconv = pytest.importorskip("spconv.pytorch")

from cmfiou_core.calib import Calibration  # noqa: E402
from cmfiou_core.engine.backbone import BackboneEngine, Capacities, calib_tensors  # noqa: E402
from cmfiou_core.engine.runtime import use_engine  # noqa: E402
from cmfiou_core.engine.sparse import (FoldedConv, conv_map, inverse_map, linear_keys, masked, sort_sites,  # noqa: E402
                                       subm_map)
from cmfiou_core.model.detector import build_model  # noqa: E402
from cmfiou_core.model.model_config import load_config  # noqa: E402
from cmfiou_core.model.vfe import mean_voxel_features  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def _as_set(features, indices, shape):
    o = torch.argsort(linear_keys(indices, shape))
    return indices[o].long(), features[o]


def _valid(t):
    n = int(t.count)
    return t.indices[:n].long(), t.features[:n]


def _random_sites(n, shape, batch, seed):
    g = torch.Generator().manual_seed(seed)
    cols = [torch.randint(0, batch, (n,), generator=g)] + [torch.randint(0, s, (n,), generator=g) for s in shape]
    idx = torch.unique(torch.stack(cols, 1), dim=0)
    return idx[torch.randperm(len(idx), generator=g)].int(), g


@pytest.fixture(params=["sorted", "dense"])
def table_kind(request, monkeypatch):
    """Both site-table implementations (sorted keys: the CPU default; dense grid: the CUDA default)."""
    import cmfiou_core.engine.sparse as sparse

    monkeypatch.setattr(sparse, "_FORCE_DENSE", request.param == "dense")
    return request.param


@pytest.mark.parametrize("kernel,stride,padding", [(3, 2, 1), (3, 2, (0, 1, 1)), (3, 1, 1), ((3, 1, 1), (2, 1, 1), 0),
                                                   (5, 2, 2)])
def test_conv_and_inverse_match_spconv(kernel, stride, padding, table_kind):
    shape = [11, 40, 36]
    idx, g = _random_sites(600, shape, 2, 0)
    f = torch.randn(len(idx), 8, generator=g)
    x = spconv.SparseConvTensor(f, idx, shape, 2)
    ps = sort_sites(f, idx, shape, 2, 700)
    conv = spconv.SparseConv3d(8, 16, kernel, stride=stride, padding=padding, bias=False, indice_key="k")
    inv = spconv.SparseInverseConv3d(16, 8, kernel, indice_key="k", bias=False)
    with torch.no_grad():
        ref = conv(x)
        ref_inv = inv(ref)
        km, overflow = conv_map(ps, kernel, stride, padding, 14000)
        y = masked(FoldedConv(conv)(ps.features, km), km.out.valid)
        im = inverse_map(km.out.replace_feature(y), ps, kernel, stride, padding)
        yi = masked(FoldedConv(inv)(y, im), im.out.valid)
    assert int(overflow) == 0
    for r, (gi, gf), n in ((ref, (km.out.indices, y), km.out.count), (ref_inv, (im.out.indices, yi), im.out.count)):
        ri, rf = _as_set(r.features, r.indices, r.spatial_shape)
        n = int(n)
        assert torch.equal(gi[:n].long(), ri)
        assert (gf[:n] - rf).abs().max() <= 1e-5
        assert bool((gf[n:] == 0).all())


@pytest.mark.parametrize("ndim", [2, 3])
def test_subm_matches_spconv(ndim, table_kind):
    shape = [11, 40, 36][-ndim:]
    idx, g = _random_sites(500, shape, 2, 1)
    f = torch.randn(len(idx), 8, generator=g)
    cls = spconv.SubMConv3d if ndim == 3 else spconv.SubMConv2d
    conv = cls(8, 8, 3, bias=False, indice_key="s")
    bn = torch.nn.BatchNorm1d(8, eps=1e-3).eval()
    with torch.no_grad():
        bn.running_mean.normal_(generator=g)
        bn.running_var.uniform_(0.5, 2.0, generator=g)
        bn.weight.uniform_(0.5, 1.5, generator=g)
        ref = bn(conv(spconv.SparseConvTensor(f, idx, shape, 2)).features)
        ref_idx = conv(spconv.SparseConvTensor(f, idx, shape, 2)).indices
        ps = sort_sites(f, idx, shape, 2, 600)
        km = subm_map(ps, 3)
        y = masked(FoldedConv(conv, bn)(ps.features, km), ps.valid)
    ri, rf = _as_set(ref, ref_idx, shape)
    gi, gf = _valid(ps.replace_feature(y))
    assert torch.equal(gi, ri) and (gf - rf).abs().max() <= 1e-4


def _inputs(shared_dir):
    d = shared_dir / "official_dense"
    if not (d / "outputs.npz").is_file():
        pytest.skip(f"{d} incomplete")
    return np.load(d / "inputs.npz"), np.load(d / "outputs.npz"), np.load(d / "state_dict.npz")


def _calib(inp):
    return Calibration(inp["P2"].astype(np.float64), inp["R0_rect"].astype(np.float64),
                       inp["Tr_velo_to_cam"].astype(np.float64))


def test_raw_branch_matches_official_reference(shared_dir):
    inp, out, st = _inputs(shared_dir)
    cfg = load_config(REPO / "config" / "cmfiou_kitti_official.yaml").model
    bb = dataclasses.replace(cfg.backbone_3d, view_batching="separate", image_plane_duplicates="mean")
    m = build_model(dataclasses.replace(cfg, backbone_3d=bb), with_roi_head=False).eval()
    sd = {k: torch.from_numpy(st[k]).long() if k.endswith("num_batches_tracked") else torch.from_numpy(st[k])
          for k in st.files if k.startswith("backbone_3d.")}
    m.load_state_dict(sd, strict=False)
    # capacities from the site counts of this frame (+10%): keeps the CPU run short
    eng = BackboneEngine(m.backbone_3d, Capacities.calibrated([23628, 15179, 6854, 15179, 6854, 2753, 6742, 2475, 916, 5009],
                                                              margin=1.1))
    f = mean_voxel_features(torch.from_numpy(inp["voxels"]), torch.from_numpy(inp["voxel_num_points"]).float(), True)
    raw = sort_sites(f, torch.from_numpy(inp["voxel_coords"]).int(), m.backbone_3d.sparse_shape, 1, 16384)
    with torch.no_grad():
        r = eng(raw, None, calib_tensors([_calib(inp)], "cpu"), None)
    assert int(r["overflow"]) == 0
    for name, t in (("raw_x_conv3", r["raw"]["x_conv3"]), ("raw_x_conv4", r["raw"]["x_conv4"]),
                    ("encoded_spconv_tensor", r["encoded"])):
        gi, gf = _valid(t)
        assert list(t.spatial_shape) == out[name + "_spatial_shape"].tolist()
        assert np.array_equal(gi.numpy(), out[name + "_indices"]), name
        assert np.abs(gf.numpy() - out[name + "_features"]).max() <= 1e-3, name


def _crop_batch(inp, views):
    """The reference frame cropped to x < 12 m, every 4th pseudo point (keeps the CPU test short), voxelized per view."""
    from cmfiou_core.model.detector import prepare_batch

    raw, pseudo = inp["raw_points"], inp["pseudo_points"]
    raw, pseudo = raw[raw[:, 0] < 12.0], pseudo[pseudo[:, 0] < 12.0][::4]
    cfg = load_config(REPO / "config" / "cmfiou_kitti.yaml").model
    tp = None if views == 1 else [[[0.3, 0.0, 0.98], [0.3, 1.0, 1.02], [0.0, 1.0, 1.0]]]
    return cfg, prepare_batch([raw], [pseudo], [_calib(inp)], cfg, image_shapes=[inp["image_shape"]],
                              transform_params=tp)


def _randomised_model(cfg):
    torch.manual_seed(0)
    m = build_model(cfg, with_roi_head=False)
    g = torch.Generator().manual_seed(3)
    for mod in m.modules():
        if isinstance(mod, torch.nn.BatchNorm1d):
            mod.running_mean.normal_(0, 0.2, generator=g)
            mod.running_var.uniform_(0.5, 1.5, generator=g)
            mod.weight.data.uniform_(0.5, 1.5, generator=g)
            mod.bias.data.normal_(0, 0.2, generator=g)
    return m.eval()


# capacity hints: site counts of every site-creating conv of the engine on these crops, used only to size the
# capacities tightly (short CPU runs). What the tests assert about counts comes from spconv (``_spconv_counts``).
CROP_COUNTS = {1: [8575, 4325, 1533, 4325, 1533, 532, 1581, 483, 170, 1154, 9006, 9006, 4539, 4539, 1558, 1611, 487],
               3: [25318, 12876, 4619, 12876, 4619, 1610, 4715, 1445, 522, 3449, 26372, 26372, 13370, 13370, 4695,
                   4792, 1462]}


def _spconv_counts(ref, views):
    """Site counts of the eager (spconv) tensors a site-creating engine conv must reproduce: raw x_conv2..4 and the
    stride-8 output, pseudo x_conv2..4, summed over the views (the engine batches the views as samples)."""
    sfx = ["" if v == 0 else str(v) for v in range(views)]
    keys = [("multi_scale_3d_features", k) for k in ("x_conv2", "x_conv3", "x_conv4")] + \
        [("multi_scale_3d_features_mm", k) for k in ("x_conv2", "x_conv3", "x_conv4")]
    out = {k: sum(int(ref[k[0] + s][k[1]].indices.shape[0]) for s in sfx) for k in keys}
    out["encoded"] = sum(int(ref["encoded_spconv_tensor" + s].indices.shape[0]) for s in sfx)
    return out


@pytest.mark.parametrize("views", [1, 3])
def test_engine_backbone_equals_eager(shared_dir, views):
    inp, _, _ = _inputs(shared_dir)
    cfg, batch = _crop_batch(inp, views)
    m = _randomised_model(cfg)
    with torch.no_grad():
        ref = m.backbone_3d(m.vfe(dict(batch)))
        eng = use_engine(m, Capacities.calibrated(CROP_COUNTS[views], margin=1.05, quantum=256), use_graph=False,
                         input_capacity=7424)
        got = m.backbone_3d(m.vfe(dict(batch)))
    assert eng.last_overflow == 0
    want = _spconv_counts(ref, views)
    assert set(want.values()) <= set(eng.last_counts), (want, eng.last_counts)
    sfx = ["" if v == 0 else str(v) for v in range(views)]
    checked = 0
    for s in sfx:
        pairs = [(ref["encoded_spconv_tensor" + s], got["encoded_spconv_tensor" + s])]
        for br in ("multi_scale_3d_features", "multi_scale_3d_features_mm"):
            pairs += [(ref[br + s][k], got[br + s][k]) for k in ("x_conv1", "x_conv2", "x_conv3", "x_conv4")]
        for a, b in pairs:
            ia, fa = _as_set(a.features, a.indices, a.spatial_shape)
            ib, fb = _as_set(b.features, b.indices, b.spatial_shape)
            assert list(a.spatial_shape) == list(b.spatial_shape)
            assert torch.equal(ia, ib)
            assert (fa - fb).abs().max() <= 1e-4 * max(1.0, float(fa.abs().max()))
            checked += len(ia)
    assert checked > 8000 * views


def test_overflow_grows_capacities_and_reruns_the_frame(shared_dir, caplog, table_kind):
    """Capacities far too small: the overflow is counted on the device, logged, the capacities grow from the exact
    counts and the frame is re-run, so its output still equals the eager backbone."""
    inp, _, _ = _inputs(shared_dir)
    cfg, batch = _crop_batch(inp, 1)
    m = _randomised_model(cfg)
    with torch.no_grad():
        ref = m.backbone_3d(m.vfe(dict(batch)))["multi_scale_3d_features"]["x_conv4"]
        eng = use_engine(m, Capacities(dilate_ratio=1.0, down_ratio=0.3, min_rows=64), use_graph=False,
                         input_capacity=7424)
        with caplog.at_level("WARNING"):
            got = m.backbone_3d(m.vfe(dict(batch)))["multi_scale_3d_features"]["x_conv4"]
    assert eng.regrowths >= 1 and "capacity overflow" in caplog.text
    assert eng.last_overflow == 0 and int(ref.indices.shape[0]) in eng.last_counts
    assert torch.equal(_as_set(ref.features, ref.indices, ref.spatial_shape)[0],
                       _as_set(got.features, got.indices, got.spatial_shape)[0])


def test_pipeline_graph_engine_equals_eager_on_a_real_frame(kitti_samples, caplog):
    """The whole static path the node runs with ``engine: graph`` (engine.frame.FrameGraph: engine backbone, dense
    BEV + RPN with the anchor mask as validity, static RoI head, static post-processing; no CUDA graph on the CPU, the
    same code) against the eager pipeline, demo checkpoint, a real KITTI frame, starting from capacities that
    overflow: the same detections (matched by class and centre) within 1 cm and 1e-2 in score."""
    import sys

    sys.path.insert(0, str(REPO / "bench"))
    from bench_pipeline import load_frames
    from conftest import assert_detections_agree

    from cmfiou_core.pipeline import Pipeline

    (name, frame), = load_frames([str(kitti_samples / "object" / "training")], 0, REPO / "data", 1)[:1]
    a = Pipeline.from_config(None, "", "cpu")(frame)
    pipe = Pipeline.from_config(None, "", "cpu", engine="graph")
    # capacities far too small from the start: the frame overflows, the capacities grow from the exact counts and
    # the frame is re-run, so its detections are still the eager ones
    eng = pipe.model.backbone_3d
    eng.calibrated = True
    eng.engine.caps = Capacities(dilate_ratio=1.0, down_ratio=0.3, min_rows=64)
    with caplog.at_level("WARNING"):
        b = pipe(frame)
    assert eng.regrowths >= 1 and "capacity overflow" in caplog.text
    assert pipe._frame_graph.last_overflow == 0 and not pipe._frame_graph.last_nms_overflow
    assert_detections_agree(a, b, min_count=5)
