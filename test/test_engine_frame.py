"""The static pieces ``engine.frame`` adds between the backbone engine and the static RoI head, each against the eager
op it replaces: spconv's ``dense()``, VirConv's anchor mask (``rpn.anchor_mask_from_points``), the dense head's
compaction of masked anchors, and the proposal layer with an anchor-validity mask."""
import numpy as np
import pytest
import spconv.pytorch as spconv
import torch

from cmfiou_core.engine.frame import anchor_mask_static, dense_volume
from cmfiou_core.engine.nms import proposal_layer_static
from cmfiou_core.engine.padded import PaddedSparse
from cmfiou_core.model.rpn import anchor_mask_from_points


def test_dense_volume_equals_spconv_dense():
    g = torch.Generator().manual_seed(0)
    shape, B, C = (2, 20, 22), 3, 5
    space = B * int(np.prod(shape))
    keys = torch.randperm(space, generator=g)[:300]
    idx = torch.stack([keys // (shape[0] * shape[1] * shape[2]), (keys // (shape[1] * shape[2])) % shape[0],
                       (keys // shape[2]) % shape[1], keys % shape[2]], 1).int()
    feats = torch.randn(300, C, generator=g)
    ref = spconv.SparseConvTensor(feats, idx, list(shape), B).dense()
    # the engine layout: key-sorted rows, padding, and samples beyond the batch (other views) that must be ignored
    t = PaddedSparse.from_spconv(spconv.SparseConvTensor(feats, idx, list(shape), B), 400)
    got = dense_volume(t, 2)
    assert torch.equal(got, ref[:2])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_anchor_mask_static_equals_eager(seed):
    """Points spread over the range and beyond it on every side (negative cells wrap, upper cells clamp, as in the
    eager mask), and a padding tail that must not count."""
    g = torch.Generator().manual_seed(seed)
    pc_range = [0.0, -40.0, -3.0, 70.4, 40.0, 1.0]
    n = 50 + 400 * seed
    x = torch.rand(n, generator=g) * 90 - 10
    y = torch.rand(n, generator=g) * 100 - 50
    pts = torch.stack([torch.zeros(n), x, y, torch.zeros(n)], 1)
    H, W = 200, 176
    ref = anchor_mask_from_points(pts, (H, W), pc_range, 0.05)
    pad = torch.cat([pts[:, 1:3], torch.full((37, 2), 5.0)])
    valid = torch.arange(n + 37) < n
    got = anchor_mask_static(pad, valid, (H, W), pc_range, 0.05)
    assert got.dtype == torch.bool and torch.equal(got, ref)
    assert 0 < int(ref.sum()) < H * W


def test_proposal_layer_anchor_valid_equals_compacted():
    """Masked anchors: the static layer over all anchors with a validity mask proposes exactly what it proposes over
    the compacted (valid-only) anchors, both when valid anchors outnumber pre_maxsize and when they do not."""
    g = torch.Generator().manual_seed(3)
    A = 3000
    xy = torch.rand(1, A, 2, generator=g) * 60
    box = torch.cat([xy, torch.zeros(1, A, 1), torch.rand(1, A, 3, generator=g) * 2 + 1,
                     torch.rand(1, A, 1, generator=g) * 6 - 3], -1)
    cls = torch.randn(1, A, 3, generator=g)
    for frac in (0.9, 0.1):
        valid = torch.rand(1, A, generator=g) < frac
        idx = torch.nonzero(valid[0])[:, 0]
        ref = proposal_layer_static(box[:, idx], cls[:, idx], 0.7, 1000, 100, mode="rows")
        got = proposal_layer_static(box, cls, 0.7, 1000, 100, mode="rows", anchor_valid=valid)
        assert torch.equal(got.valid, ref.valid) and int(got.count) == int(ref.count) > 10
        assert torch.equal(got.rois, ref.rois) and torch.equal(got.roi_labels, ref.roi_labels)
        assert torch.equal(got.roi_scores, ref.roi_scores)


def test_frame_graph_static_function_is_sync_free(shared_dir):
    """The function FrameGraph captures (backbone engine -> BEV -> RPN -> static RoI head -> post-processing), counted
    on its CUDA code path (opcount: every .item(), nonzero, bool-index, host<->device copy): no host synchronisation
    once its constants exist (the first call builds them, as a CUDA graph's warm-up does), and the same output shape
    for frames of different content: the CUDA-graph requirements that can be checked on the CPU."""
    from test_engine_backbone import CROP_COUNTS, _crop_batch, _inputs

    from cmfiou_core.engine.backbone import Capacities
    from cmfiou_core.engine.frame import FrameGraph
    from cmfiou_core.engine.runtime import use_engine
    from cmfiou_core.model.detector import build_model
    from cmfiou_core.opcount import OpCounter

    inp, _, _ = _inputs(shared_dir)
    cfg, batch = _crop_batch(inp, 1)
    torch.manual_seed(0)
    m = build_model(cfg).eval()
    eng = use_engine(m, Capacities.calibrated(CROP_COUNTS[1], margin=1.05, quantum=256), use_graph=False,
                     input_capacity=7424)
    fg = FrameGraph(m, eng, use_graph=False, pair_capacity=1 << 14)
    orig, seen = fg._forward, []

    def counted(*a):
        with OpCounter(cuda_paths=True) as oc:
            flat, meta = orig(*a)
        seen.append((oc, tuple(flat.shape), meta))
        return flat, meta

    fg._forward = counted
    with torch.no_grad():
        b = m.vfe(dict(batch))
        fg(dict(b))
        fewer = dict(b)                     # a frame with other content: half of the raw voxels
        n = b["voxel_features"].shape[0] // 2
        fewer["voxel_features"], fewer["voxel_coords"] = b["voxel_features"][:n], b["voxel_coords"][:n]
        fg(fewer)
    oc = seen[-1][0]
    assert oc.n_syncs() == 0, oc.sync_sites()
    assert oc.n_ops() > 2000                 # the counter saw the whole forward
    assert seen[0][1:] == seen[1][1:]        # static output shape
    assert fg.last_overflow == 0


def test_frame_graph_with_a_bf16_backbone_engine(shared_dir):
    """inference.precision bf16: the sparse backbone engine computes in bfloat16 and the dense / RoI heads pool its
    features in fp32. Its stride-8 output stays within bf16 rounding of the fp32 engine's (same weights, same frame),
    and the whole frame function runs on it with fp32, finite detections."""
    from test_engine_backbone import CROP_COUNTS, _crop_batch, _inputs

    from cmfiou_core.engine.backbone import Capacities
    from cmfiou_core.engine.frame import FrameGraph
    from cmfiou_core.engine.runtime import EngineBackbone
    from cmfiou_core.model.detector import build_model

    inp, _, _ = _inputs(shared_dir)
    cfg, batch = _crop_batch(inp, 1)
    torch.manual_seed(0)
    m = build_model(cfg).eval()
    caps = Capacities.calibrated(CROP_COUNTS[1], margin=1.05, quantum=256)
    eager_bb = m.backbone_3d
    engines = {dt: EngineBackbone(eager_bb, caps, 7424, use_graph=False, dtype=dt).eval()
               for dt in (torch.float32, torch.bfloat16)}
    with torch.no_grad():
        b = m.vfe(dict(batch))
        enc = {}
        for dt, eng in engines.items():
            eng(dict(b))
            enc[dt] = eng.last_padded["encoded"].features.float()      # padding rows are zero in both
        ref = enc[torch.float32]
        err = (enc[torch.bfloat16] - ref).abs().max() / ref.abs().max()
        assert 0 < err < 5e-2, err               # bf16 really ran (not equal) and stays near the fp32 result
        m.backbone_3d = engines[torch.bfloat16]
        det = FrameGraph(m, engines[torch.bfloat16], use_graph=False, pair_capacity=1 << 14)(dict(b))
    assert det.boxes.dtype == torch.float32 and det.score.dtype == torch.float32
    assert len(det.score) > 0 and torch.isfinite(det.boxes).all() and torch.isfinite(det.score).all()
