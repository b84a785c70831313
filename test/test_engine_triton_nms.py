"""The Triton NMS (cmfiou_core/engine/triton_nms.py) against the torch paths of engine/nms.py: the suppression matrix
(identical bits, the IoU of every candidate pair to 1e-12) on random boxes with identical, touching, nested,
zero-size and exactly-at-threshold pairs and on real-frame proposals; the greedy walk (identical kept positions) on
random matrices; the proposal layer and the final post-processing through ``mode='triton'`` and the default dispatch.

Compiled on the GPU host (CUDA, full sizes); on the CPU under Triton's interpreter (fixture ``triton_device``) at small
sizes (the interpreter runs each program in numpy: ~0.3 s per 32 x 32 tile)."""
import math

import numpy as np
import pytest
import torch

from cmfiou_core.engine import nms as N
from cmfiou_core.engine import triton_nms as TN
from cmfiou_core.geometry.iou import _intersection_area_aligned
from cmfiou_core.opcount import OpCounter


def _boxes(B, K, seed, spread, dev):
    """(B, K, 7) float32 random boxes; rows 0-15 of each frame are special pairs (see the asserts)."""
    g = torch.Generator().manual_seed(seed)
    b = torch.rand(B, K, 7, generator=g)
    b[..., 0:2] *= spread
    b[..., 3:6] = b[..., 3:6] * 4 + 0.3
    b[..., 6] = b[..., 6] * 6.3 - 3.15
    for f in range(B):
        x = b[f]
        x[1] = x[0]                                                   # identical
        x[2] = torch.tensor([1.0, 1.0, 0, 2.0, 1.5, 1, 0.0])          # touching along an edge (heading 0)
        x[3] = torch.tensor([3.0, 1.0, 0, 2.0, 1.5, 1, 0.0])
        x[4] = torch.tensor([5.0, 5.0, 0, 0.0, 2.0, 1, 0.3])          # zero size ...
        x[5] = torch.tensor([5.0, 5.0, 0, 1.0, 2.0, 1, 0.3])          # ... over a real box
        x[6] = torch.tensor([9.0, 2.0, 0, 4.0, 3.0, 1, 0.7])          # nested, rotated
        x[7] = torch.tensor([9.0, 2.0, 0, 1.0, 0.5, 1, -1.1])
        x[8] = torch.tensor([2.0, 9.0, 0, 3.0, 1.0, 1, 0.0])          # the same rectangle turned by pi/2
        x[9] = torch.tensor([2.0, 9.0, 0, 1.0, 3.0, 1, math.pi / 2])
        x[10] = torch.tensor([12.0, 12.0, 0, 1.0, 1.0, 1, 0.0])       # unit squares half over: IoU exactly 1/3
        x[11] = torch.tensor([12.5, 12.0, 0, 1.0, 1.0, 1, 0.0])
        x[12] = torch.tensor([15.0, 15.0, 0, 1.0, 1.0, 1, 0.0])       # touching at one corner
        x[13] = torch.tensor([16.0, 16.0, 0, 1.0, 1.0, 1, 0.0])
        x[14] = torch.tensor([18.0, 3.0, 0, 2.0, 1.0, 1, 0.4])        # identical up to one float32 ulp in x
        x[15] = x[14]
        x[15, 0] = torch.nextafter(x[14, 0], torch.tensor(100.0))
    return b.to(dev)


def _torch_iou(boxes, valid):
    """Rotated BEV IoU of every candidate pair by the torch path (float64), -1 elsewhere; candidates by the eager
    rule, written out here."""
    B, K = valid.shape
    b = boxes[..., :7].double().cpu()
    v = valid.cpu()
    rad = torch.sqrt(b[..., 3] ** 2 + b[..., 4] ** 2) / 2
    d2 = (b[:, :, None, 0] - b[:, None, :, 0]) ** 2 + (b[:, :, None, 1] - b[:, None, :, 1]) ** 2
    rr = rad[:, :, None] + rad[:, None, :]
    ar = torch.arange(K)
    cand = (d2 <= (rr * (1 + 1e-6) + 1e-6) ** 2) & (ar[:, None] < ar[None]) & v[:, :, None] & v[:, None, :]
    f, i, j = cand.nonzero(as_tuple=True)
    inter = _intersection_area_aligned(b[f, i], b[f, j])
    out = torch.full((B, K, K), -1.0, dtype=torch.float64)
    out[f, i, j] = inter / (b[f, i, 3] * b[f, i, 4] + b[f, j, 3] * b[f, j, 4] - inter).clamp_min(1e-8)
    return out, cand


@pytest.mark.parametrize("thresh", [1.0 / 3.0, 0.1])
def test_suppression_matrix_kernel_equals_torch(thresh, triton_device):
    dev = triton_device
    B, K = (2, 700) if dev == "cuda" else (2, 80 if thresh > 0.2 else 48)
    boxes = _boxes(B, K, 0, spread=25.0 if dev == "cuda" else 12.0, dev=dev)
    valid = torch.rand(B, K, generator=torch.Generator().manual_seed(1)).to(dev) > 0.1
    valid[:, :16] = True
    if dev == "cpu":
        valid[1, 16:] = False                                       # a frame of the special pairs only
    ref, ovf = N.suppression_matrix(boxes, valid, thresh)
    got, iou = TN.suppression_bits(boxes, valid, thresh, with_iou=True)
    assert not bool(ovf)
    assert torch.equal(got, ref), int((got != ref).sum())
    want, cand = _torch_iou(boxes, valid)
    assert torch.equal(iou.cpu() >= 0, cand)                        # the same candidate pairs
    assert float((iou.cpu() - want).abs().max()) <= 1e-12
    assert int(ref.sum()) > 20 and int(cand.sum()) > 3 * int(ref.sum()) // 2   # real work, real rejections
    for f in range(B):
        c = iou[f].cpu()
        assert c[0, 1] == pytest.approx(1.0, abs=1e-12) and bool(got[f, 0, 1])  # identical
        assert c[2, 3] == 0 and c[4, 5] == 0 and c[12, 13] == 0                  # touching / zero size / corner
        assert c[6, 7] == pytest.approx(0.5 / 12, abs=1e-12)                     # nested: small / large area
        assert c[8, 9] == pytest.approx(1.0, abs=1e-6)                          # (float32 pi/2)
        assert c[10, 11] == 1.0 / 3.0 and bool(got[f, 10, 11]) == (thresh < 1 / 3)  # exactly 1/3: strict >
        assert c[14, 15] == pytest.approx(1.0, abs=1e-5) and bool(got[f, 14, 15])


def test_suppression_kernel_variants_agree(triton_device):
    """The vertex ranking one column at a time (CUDA's default) and as one block (the interpreter's), 1 and 32 rows
    per candidate tile, 32 and 256 pairs per IoU chunk: the same matrix as the torch path."""
    dev = triton_device
    boxes = _boxes(1, 40, 3, spread=8.0, dev=dev)
    valid = torch.ones(1, 40, dtype=torch.bool, device=dev)
    ref, _ = N.suppression_matrix(boxes, valid, 0.2)
    assert int(ref.sum()) > 5
    for loop, rows, pairs, k in ((True, 32, 32, 40), (False, 1, 256, 40), (False, 1, 32, 40), (True, 1, 32, 12)):
        got = TN.suppression_bits(boxes[:, :k], valid[:, :k], 0.2, rows_per_program=rows, loop=loop,
                                  pairs_per_program=pairs)
        assert torch.equal(got, ref[:, :k, :k]), (loop, rows)


def test_greedy_walk_kernel_equals_greedy_keep(triton_device):
    dev = triton_device
    g = torch.Generator().manual_seed(4)
    B, K = 3, (1500 if dev == "cuda" else 90)
    sup = (torch.rand(B, K, K, generator=g) < torch.tensor([0.02, 0.2, 0.6])[:, None, None]).triu(1).to(dev)
    valid = (torch.rand(B, K, generator=g) > 0.15).to(dev)
    valid[2, : K // 2] = False
    for T in (1, 7, K // 3, K + 5):
        pos, kept, flag = TN.greedy_walk(sup, valid, T, with_flag=True)
        rpos, rkept = N.greedy_keep(sup, valid, T)
        assert torch.equal(pos, rpos) and torch.equal(kept, rkept), T
        assert not bool(flag)
    assert 0 < int(kept.sum(1).min()) and int(kept.sum(1).max()) < K   # rows keep some, suppress some
    none = TN.greedy_walk(sup, torch.zeros_like(valid), 5)
    assert not bool(none[1].any()) and torch.equal(none[0], torch.full_like(none[0], K - 1))


def test_suppression_kernel_extreme_boxes(shared_dir, triton_device):
    """The official reference's RPN output (random weights: sizes from 1e-4 to 1e5 m, extreme aspect ratios): the same
    matrix and candidate IoUs as the torch path (the tolerances scale with the box size)."""
    dev = triton_device
    inp = np.load(shared_dir / "official_roi" / "inputs.npz")
    bp = torch.from_numpy(inp["proposal_batch_box_preds"])
    top = torch.topk(torch.from_numpy(inp["proposal_batch_cls_preds"]).max(-1)[0], 600 if dev == "cuda" else 160)[1]
    boxes = bp.gather(1, top[..., None].expand(-1, -1, 7)).to(dev)
    valid = torch.ones(boxes.shape[:2], dtype=torch.bool, device=dev)
    ref, _ = N.suppression_matrix(boxes, valid, 0.01)
    got, iou = TN.suppression_bits(boxes, valid, 0.01, with_iou=True)
    assert torch.equal(got, ref) and int(ref.sum()) > 0
    want, cand = _torch_iou(boxes, valid)
    assert torch.equal(iou.cpu() >= 0, cand) and int(cand.sum()) > 100
    assert float((iou.cpu() - want).abs().max()) <= 1e-9


@pytest.fixture(scope="module")
def demo_proposals(kitti_samples):
    """The demo checkpoint's RPN output on real KITTI frame 000008 (camera + LiDAR, CPU), captured at the RoI head."""
    pytest.importorskip("spconv.pytorch")
    from cmfiou_core.pipeline import DEMO_CHECKPOINT, Pipeline
    from cmfiou_core.types import Frame

    if not DEMO_CHECKPOINT.is_file():
        pytest.skip("bundled demo checkpoint missing")
    pipe = Pipeline.from_config(None, None, "cpu")
    from conftest import kitti_object_frame

    pts, img, cal = kitti_object_frame(kitti_samples, "000008")
    seen = {}
    h = pipe.model.roi_head.register_forward_pre_hook(lambda m, args: seen.update(
        {"box": args[0]["batch_box_preds"].clone(), "cls": args[0]["batch_cls_preds"].clone()}))
    try:
        pipe(Frame(pts, img, cal))
    finally:
        h.remove()
    return seen["box"], seen["cls"]


def test_proposal_layer_triton_equals_torch_real_frame(demo_proposals, triton_device):
    """Real-frame proposals (demo checkpoint, KITTI 000008): the proposal layer through the Triton NMS equals the
    torch matrix walk and the per-row walk, and its suppression matrices (the proposal threshold 0.75 and the final
    0.1) equal the torch ones."""
    dev = triton_device
    bp, cp = (t.to(dev) for t in demo_proposals)
    pre, post = (2000, 50) if dev == "cuda" else (128, 30)
    got = N.proposal_layer_static(bp, cp, 0.75, pre, post, mode="triton")
    for mode in ("matrix", "rows"):
        ref = N.proposal_layer_static(bp, cp, 0.75, pre, post, mode=mode)
        for k in ("rois", "roi_scores", "roi_labels", "valid", "count"):
            assert torch.equal(getattr(got, k), getattr(ref, k)), (mode, k)
    assert not bool(got.overflow) and int(got.count[0]) == post
    top = torch.topk(cp.max(-1)[0], pre, dim=1)[1]
    boxes = bp.gather(1, top[..., None].expand(-1, -1, bp.shape[-1]))
    valid = torch.ones(boxes.shape[:2], dtype=torch.bool, device=dev)
    for thresh in (0.75, 0.1):
        ref, _ = N.suppression_matrix(boxes, valid, thresh)
        assert torch.equal(TN.suppression_bits(boxes, valid, thresh), ref) and int(ref.sum()) > 10, thresh


def test_default_dispatch_triton_kernels_and_post_processing(triton_device, monkeypatch):
    """``mode='auto'`` takes the Triton NMS where it runs (CUDA; here the CPU too with TRITON_ON_CPU): 3 Triton launches
    and a handful of torch ops per NMS instead of ~150 per pass + 3 per step, no host sync after the first call; the final post-processing (per class and
    class-agnostic) selects the same detections as the torch walk."""
    from cmfiou_core.model.postprocess import PostProcessConfig

    dev = triton_device
    monkeypatch.setattr(N, "TRITON_ON_CPU", True)
    boxes = _boxes(2, 64, 5, spread=10.0, dev=dev)
    valid = torch.ones(2, 64, dtype=torch.bool, device=dev)
    N.nms_sorted_static(boxes, valid, 0.3, 20)                       # warm-up: the kernel's constants
    with OpCounter(cuda_paths=False) as oc:
        pos, kept, ovf = N.nms_sorted_static(boxes, valid, 0.3, 20)
    names = oc.op_names["main"]
    assert names["triton.nms_candidates"] == names["triton.nms_iou"] == names["triton.nms_walk"] == 1
    assert oc.n_kernels() <= 8 and oc.n_syncs() == 0, (dict(names), oc.sync_sites())   # graph-capturable
    rpos, rkept, _ = N.nms_sorted_static(boxes, valid, 0.3, 20, mode="rows")
    assert torch.equal(pos, rpos) and torch.equal(kept, rkept) and not bool(ovf)
    g = torch.Generator().manual_seed(6)
    n = 64
    cls = torch.randn(2, n, 3, generator=g).to(dev)
    iou = torch.rand(2, n, 1, generator=g).to(dev)
    labels = torch.randint(1, 4, (2, n), generator=g).to(dev)
    for spec in ({"nms_type": "per_class", "nms_thresh": [0.1, 0.2, 0.05], "nms_pre_maxsize": [30, 40, 50],
                  "nms_post_maxsize": [5, 9, 20]}, {"nms_thresh": 0.1, "nms_pre_maxsize": 60, "nms_post_maxsize": 25}):
        cfg = PostProcessConfig.from_mapping({**spec, "score_thresh": 0.2})
        a = N.post_process_static(boxes, cls, labels, iou, cfg, mode="auto")
        b = N.post_process_static(boxes, cls, labels, iou, cfg, mode="rows")
        for k in ("boxes", "labels", "cls", "iou", "score", "valid", "count"):
            assert torch.equal(getattr(a, k), getattr(b, k)), (spec, k)
        assert 0 < int(a.count.min()) and not bool(a.overflow)
