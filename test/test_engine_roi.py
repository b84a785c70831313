"""Static-shape engine, RoI part (issue 16): PaddedSparse.from_spconv, graph-capturable proposal layer / final NMS and
the static RoI head, each against the eager path (official_roi reference inputs and the demo checkpoint on a real
KITTI frame)."""
import numpy as np
import pytest
import torch

from cmfiou_core.engine.nms import greedy_keep, greedy_keep_rows, proposal_layer_static, suppression_matrix
from cmfiou_core.engine.padded import PaddedSparse
from cmfiou_core.geometry.nms import nms_sorted
from cmfiou_core.model.proposal import ProposalConfig, proposal_layer

spconv = pytest.importorskip("spconv.pytorch")


def test_from_spconv_sorts_and_pads():
    g = torch.Generator().manual_seed(0)
    shape = [5, 7, 9]
    sites = torch.randperm(2 * 5 * 7 * 9, generator=g)[:40]
    idx = torch.stack([sites // 315, sites // 63 % 5, sites // 9 % 7, sites % 9], 1).int()
    feats = torch.randn(40, 3, generator=g)
    t = spconv.SparseConvTensor(feats, idx, shape, 2)
    p = PaddedSparse.from_spconv(t, 64)
    assert p.features.shape == (64, 3) and p.indices.shape == (64, 4) and int(p.count) == 40
    key = ((p.indices[:40, 0].long() * 5 + p.indices[:40, 1]) * 7 + p.indices[:40, 2]) * 9 + p.indices[:40, 3]
    assert torch.all(key[1:] > key[:-1])
    assert torch.all(p.indices[40:] == -1) and torch.all(p.features[40:] == 0)
    # the same (site -> feature) pairs as the input
    lookup = {tuple(r.tolist()): f for r, f in zip(idx, feats)}
    for r, f in zip(p.indices[:40], p.features[:40]):
        assert torch.equal(lookup[tuple(r.tolist())], f)
    assert p.valid.sum() == 40 and p.spatial_shape == (5, 7, 9) and p.batch_size == 2
    with pytest.raises(ValueError, match="capacity"):
        PaddedSparse.from_spconv(t, 39)


def _random_boxes(n, seed, spread=20.0):
    g = torch.Generator().manual_seed(seed)
    b = torch.rand(n, 7, generator=g)
    b[:, 0:2] *= spread
    b[:, 3:6] = b[:, 3:6] * 4 + 0.3
    b[:, 6] = b[:, 6] * 6.3 - 3.15
    return b


@pytest.mark.parametrize("thresh", [0.1, 0.3, 0.75])
def test_static_nms_modes_equal_eager_greedy(thresh):
    """Both static walks (suppression matrix, per-step rows) keep exactly the eager nms_sorted boxes, incl. padding
    and invalid (masked) inputs."""
    for seed in range(3):
        boxes = _random_boxes(120, seed, spread=12.0)
        valid = torch.ones(120, dtype=torch.bool)
        valid[[5, 17, 60]] = False
        ref = nms_sorted(boxes[valid], thresh)
        ref_pos = torch.arange(120)[valid][ref]
        for T in (10, 200):
            sup, ovf = suppression_matrix(boxes[None], valid[None], thresh)
            pm, km = greedy_keep(sup, valid[None], T)
            pr, kr = greedy_keep_rows(boxes[None], valid[None], thresh, T)
            n = min(T, ref_pos.numel())
            assert not bool(ovf)
            for pos, kept in ((pm, km), (pr, kr)):
                assert int(kept.sum()) == n and bool(kept[0, :n].all())
                assert torch.equal(pos[0, :n], ref_pos[:n])
        # a pair capacity below the candidate count is reported, never silent
        _, ovf = suppression_matrix(boxes[None], valid[None], thresh, pair_capacity=3)
        assert bool(ovf)


def test_proposal_layer_static_equals_eager_official_inputs(shared_dir):
    inp = np.load(shared_dir / "official_roi" / "inputs.npz")
    out = np.load(shared_dir / "official_roi" / "outputs.npz")
    bp = torch.from_numpy(inp["proposal_batch_box_preds"])
    cp = torch.from_numpy(inp["proposal_batch_cls_preds"])
    p = proposal_layer_static(bp, cp, 0.75, 2000, 50, mode="rows")
    assert np.array_equal(p.rois.numpy(), out["rois"]) and np.array_equal(p.roi_scores.numpy(), out["roi_scores"])
    assert np.array_equal(p.roi_labels.numpy(), out["roi_labels"]) and int(p.count[0]) == 50
    # the matrix walk on a smaller top-k (all K^2/2 pairs on the CPU are slow) against the eager layer, batch of 2
    bp2, cp2 = torch.cat([bp, bp.flip(1)]), torch.cat([cp, cp.flip(1)])
    bd = {"batch_size": 2, "batch_box_preds": bp2, "batch_cls_preds": cp2}
    proposal_layer(bd, ProposalConfig(0.3, 300, 40))
    pm = proposal_layer_static(bp2, cp2, 0.3, 300, 40, mode="matrix")
    assert not bool(pm.overflow)
    for k in ("rois", "roi_scores", "roi_labels"):
        assert torch.equal(getattr(pm, k), bd[k]), k
    assert torch.equal(pm.valid.sum(1), pm.count) and torch.all(pm.rois[~pm.valid] == 0)
