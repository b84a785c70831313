"""The fused grid-pooling kernel (cmfiou_core/engine/triton_pool.py) against the torch static path
(engine.roi.fused_grid_pool, itself tested against the eager RoI head in test_engine_roi.py).

Neighbour selection is compared exactly (the integer rows of the first nsample hits in scan order and the hit
counts); the pooled features to float32 rounding: |kernel - torch| <= 1e-5 * max(1, max |torch|) (the position
MLP's 3-term product and the 32-term output product round differently from torch's batched matmuls; the max is
exact). Inputs: random voxel sets with dense blobs (more than nsample hits), empty neighbourhoods, queries outside
the grid or of a batch index without voxels, poisoned padding rows, a source without voxels, a source without
padding; the official reference's real KITTI backbone features and weights with its real proposals; the whole static
head with both implementations; and the launch count (one kernel per modality and stage).

On the GPU host the kernel compiles (CUDA); elsewhere it runs on CPU tensors under Triton's interpreter (fixture
``triton_device``), at small sizes."""
import numpy as np
import pytest
import torch

from cmfiou_core.engine import roi as R
from cmfiou_core.engine import triton_pool
from cmfiou_core.engine.padded import PaddedSparse
from cmfiou_core.model.grid_pool import global_grid_points
from cmfiou_core.model.roi_head import RoIHead
from cmfiou_core.opcount import OpCounter

spconv = pytest.importorskip("spconv.pytorch")

POISON = 1e6


def _close(got, ref, rel=1e-5):
    err = float((got.double() - ref.double()).abs().max()) if ref.numel() else 0.0
    return err <= rel * max(1.0, float(ref.abs().max()) if ref.numel() else 0.0), err


def _source(sites, shape, batch, cin, extra, seed, dev):
    """PaddedSparse of the given (N, 4) [b, z, y, x] sites with random features and ``extra`` padding rows whose
    features are POISON (a padding row that reached the pooling would show at once)."""
    g = torch.Generator().manual_seed(seed)
    n = sites.shape[0]
    t = spconv.SparseConvTensor(torch.randn(n, cin, generator=g), sites.int(), list(shape), batch)
    p = PaddedSparse.from_spconv(t, n + extra)
    p.features[n:] = POISON
    return PaddedSparse(p.features.to(dev), p.indices.to(dev), p.count.to(dev), p.spatial_shape, batch)


def _sites(shape, batch, n_random, blobs, seed):
    """Unique sites: ``n_random`` scattered ones plus fully occupied boxes ``blobs`` [(b, z0, y0, x0, dz, dy, dx)]."""
    g = torch.Generator().manual_seed(seed)
    Z, Y, X = shape
    keys = [torch.randperm(batch * Z * Y * X, generator=g)[:n_random]]
    for b, z0, y0, x0, dz, dy, dx in blobs:
        zz, yy, xx = torch.meshgrid(torch.arange(z0, z0 + dz), torch.arange(y0, y0 + dy), torch.arange(x0, x0 + dx),
                                    indexing="ij")
        keys.append(((b * Z + zz) * Y + yy).reshape(-1) * X + xx.reshape(-1))
    k = torch.unique(torch.cat(keys))
    return torch.stack([k // (Z * Y * X), (k // (Y * X)) % Z, (k // X) % Y, k % X], 1)


def _head(seed=0, cfg=None):
    """Default RoIHead (x_conv3 / x_conv4 at strides 4 / 8, ranges 2 / 4, nsample 16; ``cfg`` overrides), random
    weights and random BatchNorm statistics in the pooling layers (so the folded BNs are not the identity)."""
    torch.manual_seed(seed)
    head = RoIHead(cfg).eval()
    g = torch.Generator().manual_seed(seed + 1)
    for layers in (head.roi_grid_pool_layers, head.roi_grid_pool_layers_mm):
        for m in layers.modules():
            if isinstance(m, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)):
                c = m.num_features
                m.running_mean.copy_(torch.randn(c, generator=g) * 0.3)
                m.running_var.copy_(torch.rand(c, generator=g) + 0.5)
                m.weight.data.copy_(torch.rand(c, generator=g) + 0.5)
                m.bias.data.copy_(torch.randn(c, generator=g) * 0.2)
    return head


def _queries(fm_sources, head, n_near, n_far, frames, offset, seed, dev):
    """Query points of ``frames`` frames, frame f pooling sample ``offset + f``: ``n_near`` around valid voxel
    centres of that sample in the first source (0.3 m noise), ``n_far`` anywhere in and around the grid (many
    empty, some outside it), and pairs exactly on / just outside the first scale's radius around voxels of the
    sample. A sample past the sources' batch has no voxels (its queries are empty). -> coords (F, P, 3) integral
    stride-1 grid coordinates, xyz (F*P, 3)."""
    c = head.cfg
    g = torch.Generator().manual_seed(seed)
    sp = fm_sources[c.grid_pool.sources[0]]
    n = int(sp.count)
    ind = sp.indices[:n].cpu()
    vs = torch.tensor(c.voxel_size) * c.grid_pool.strides[0]
    pc = torch.tensor(c.point_cloud_range[:3])
    span = torch.tensor(sp.spatial_shape[::-1], dtype=torch.float32) * vs
    n_edge = max(1, n_near // 8)
    parts = []
    for f in range(frames):
        mine = torch.nonzero(ind[:, 0] == offset + f)[:, 0]
        pool = mine if len(mine) else torch.arange(n)        # no voxels in this sample: any geometry (all empty)
        rows = pool[torch.randint(0, len(pool), (n_near,), generator=g)]
        near = (ind[rows][:, [3, 2, 1]].float() + 0.5) * vs + pc + torch.randn(n_near, 3, generator=g) * 0.3
        far = pc - 1.0 + torch.rand(n_far, 3, generator=g) * (span + 2.0)
        edge = _on_the_sphere(head, sp, rows[:4 * n_edge])[:2 * n_edge]
        assert edge.shape[0] == 2 * n_edge
        # just left of the grid (negative coordinates, rounded down) beside the sample's lowest-x voxels
        low = pool[torch.argsort(ind[pool][:, 3], stable=True)[:n_edge]]
        left = (ind[low][:, [3, 2, 1]].float() + 0.5) * vs + pc
        left[:, 0] = pc[0] - 0.01 - torch.rand(n_edge, generator=g) * 0.2
        parts.append(torch.cat([near, far, edge, left]).float())
    xyz = torch.stack(parts)                                  # (F, P, 3)
    coords = torch.floor_divide(xyz - pc, torch.tensor(c.voxel_size))
    return coords.to(dev), xyz.reshape(-1, 3).contiguous().to(dev)


def _on_the_sphere(head, sp, rows):
    """Queries exactly on the first scale's sphere around voxels ``rows`` of ``sp`` (the first source): z at the
    voxel centre, y 0.1 m off and x chosen (searching a few float32 steps of x and y) so that the float32
    ``(dx*dx + dy*dy) + dz*dz`` equals the float32 radius^2 (a hit: ``not d2 > r2``), and the closest x further out
    (no hit), for the voxels where the search finds such a point (most). -> xyz (2R', 3)."""
    c = head.cfg
    f = np.float32
    vs = np.asarray(c.voxel_size, f) * f(c.grid_pool.strides[0])
    pc = np.asarray(c.point_cloud_range[:3], f)
    r = f(c.grid_pool.radii[0][0])
    r2 = f(r * r)
    steps = np.arange(-16, 17, dtype=f)

    def d2(ctr, qx, qy):
        dx, dy = (ctr[0] - qx).astype(f), (ctr[1] - qy).astype(f)
        return ((dx * dx).astype(f) + (dy * dy).astype(f)).astype(f)

    out = []
    for i in rows.tolist():
        _, z, y, x = (int(v) for v in sp.indices[i].cpu())
        ctr = ((np.array([x, y, z], f) + f(0.5)) * vs + pc).astype(f)
        qy0 = f(ctr[1] - f(0.1))
        qx0 = f(ctr[0] - f(np.sqrt(f(r2 - f(0.01)))))
        qx = (qx0 + steps * np.spacing(qx0)).astype(f)[:, None]
        qy = (qy0 + steps * np.spacing(qy0)).astype(f)[None, :]
        on = np.argwhere(d2(ctr, qx, qy) == r2)
        if not len(on):
            continue
        hx, hy = qx[on[0][0], 0], qy[0, on[0][1]]
        beyond = np.nextafter(hx, f(-np.inf))
        while d2(ctr, beyond, hy) <= r2:
            beyond = np.nextafter(beyond, f(-np.inf))
        out += [[hx, hy, ctr[2]], [beyond, hy, ctr[2]]]
    return torch.tensor(np.array(out, f)).reshape(-1, 3)


@torch.no_grad()
def _compare(fm, coords, xyz, offset=0, blocks=None):
    """Kernel against the torch path: identical rows / counts, features within the documented tolerance."""
    cur = R.fused_coords(fm, coords, R.frame_index(coords.shape[0], coords.shape[1], offset, coords.dtype,
                                                    coords.device))
    counts = []
    rows, keep = R._fused_query(fm, cur, xyz, counts)
    S, Kn, M, ns = rows.shape
    ref = R.fused_grid_pool(fm, coords, xyz, "torch", offset)
    out, (idx, cnt) = triton_pool.grid_pool(fm, coords, xyz, offset, with_rows=True, blocks=blocks)
    want_cnt = counts[0].clamp(max=ns).reshape(S * Kn, M)
    assert torch.equal(cnt.long(), want_cnt), "hit counts differ"
    slot = torch.arange(ns, device=xyz.device)
    valid = slot < want_cnt[..., None]
    want_rows = rows.reshape(S * Kn, M, ns) - fm.off.reshape(S * Kn, 1, 1)
    assert torch.equal(torch.where(valid, idx[..., :ns].long(), -1), torch.where(valid, want_rows, -1)), "rows differ"
    assert torch.equal(want_cnt > 0, keep.reshape(S * Kn, M))
    ok, err = _close(out, ref)
    assert ok, err
    assert torch.isfinite(out).all() and float(out.abs().max()) < 1e4       # no poisoned padding row was pooled
    return want_cnt


@pytest.mark.parametrize("case", ["blobs", "empty_coarse_source", "no_padding", "sample_offset", "wide_radius"])
def test_pool_kernel_equals_torch_on_random_voxels(case, triton_device):
    """'wide_radius': radii beyond the query cubes (0.6 m on a 0.4 m half-cube), where the cube's position itself
    decides hits (so the rounding of negative coordinates to a cell shows)."""
    dev = triton_device
    head = _head(0, {"grid_pool": {"radii": [[0.6, 1.2], [1.2, 2.4]]}} if case == "wide_radius" else None).to(dev)
    st = R.StaticRoIHead(head)
    B = 2
    s3, s4 = (11, 40, 44), (5, 20, 22)
    sites3 = _sites(s3, B, 300, [(0, 3, 10, 10, 4, 6, 6), (1, 5, 30, 30, 3, 5, 5)], seed=1)
    sites4 = _sites(s4, B, 120, [(0, 1, 5, 5, 3, 4, 4)], seed=2)
    extra = 0 if case == "no_padding" else 37
    feats = {"x_conv3": _source(sites3, s3, B, 64, extra, 3, dev)}
    if case == "empty_coarse_source":
        feats["x_conv4"] = PaddedSparse(torch.full((5, 64), POISON, device=dev),
                                        torch.full((5, 4), -1, dtype=torch.int32, device=dev),
                                        torch.zeros((), dtype=torch.long, device=dev), s4, B)
    else:
        feats["x_conv4"] = _source(sites4, s4, B, 64, extra, 4, dev)
    fm = st.prepare(feats, mm=False)
    assert isinstance(fm, R.FusedModality)
    offset = 1 if case == "sample_offset" else 0            # frame 1 then pools sample 2: past the batch
    coords, xyz = _queries(feats, head, 80, 50, 2, offset, seed=5, dev=dev)
    cnt = _compare(fm, coords, xyz, offset)
    # the inputs reach every branch: empty neighbourhoods, partly filled, exactly / more than nsample (capped)
    assert (cnt == 0).any() and ((cnt > 0) & (cnt < 16)).any() and (cnt == 16).any()
    if case == "empty_coarse_source":
        assert (cnt[2:] == 0).all()           # (s=1, k=0/1): no voxels at all
    if case == "sample_offset":
        assert (cnt[:, cnt.shape[1] // 2:] == 0).all()


def test_pool_kernel_with_the_cuda_block_sizes(triton_device):
    """The compiled block sizes (16 queries, 64 cells a step: several scan steps a cube, early stops) on the CPU
    too, on fewer queries."""
    dev = triton_device
    head = _head(1).to(dev)
    st = R.StaticRoIHead(head)
    s3, s4 = (11, 40, 44), (5, 20, 22)
    feats = {"x_conv3": _source(_sites(s3, 1, 200, [(0, 3, 10, 10, 5, 6, 6)], 7), s3, 1, 64, 11, 8, dev),
             "x_conv4": _source(_sites(s4, 1, 80, [(0, 1, 5, 5, 3, 4, 4)], 9), s4, 1, 64, 11, 10, dev)}
    fm = st.prepare(feats, mm=False)
    coords, xyz = _queries(feats, head, 40, 8, 1, 0, seed=11, dev=dev)
    cnt = _compare(fm, coords, xyz, blocks=triton_pool.BLOCKS_CUDA)
    assert (cnt == 16).any() and (cnt < 16).any()


from test_engine_roi import _padded, official  # noqa: E402,F401  (fixture: official_roi weights + real features)


def _proposal_grid(head, rois, gp):
    c = head.cfg
    B = rois.shape[0]
    xyz = global_grid_points(rois.reshape(-1, rois.shape[-1]), gp.grid_size).view(B, -1, 3)
    pc, vs = c.point_cloud_range, c.voxel_size
    coords = torch.cat([(xyz[:, :, a:a + 1] - pc[a]) // vs[a] for a in range(3)], dim=-1)
    return coords, xyz.reshape(-1, 3)


def _real_rois(bd, n):
    """n car-size boxes (3.9 x 1.6 x 1.56 m, headings 0.3 + 1.1 i) centred on real x_conv3 voxels of the frame (rows
    spread over its sorted voxels): the neighbourhoods a detector's RoIs see (the reference's own proposals are the
    random-weight RPN's, mostly tiny boxes in empty space)."""
    from cmfiou_core.model.grid_pool import get_voxel_centers

    head = RoIHead()
    t = bd["multi_scale_3d_features"]["x_conv3"]
    rows = torch.linspace(0, t.indices.shape[0] - 1, n + 2)[1:-1].long()
    ctr = get_voxel_centers(t.indices[rows, 1:4], 4, head.cfg.voxel_size, head.cfg.point_cloud_range)
    size = torch.tensor([3.9, 1.6, 1.56]).expand(n, 3)
    yaw = 0.3 + 1.1 * torch.arange(n, dtype=torch.float32)[:, None]
    return torch.cat([ctr, size, yaw], 1)[None]


def test_pool_kernel_equals_torch_on_a_real_frame(official, triton_device):
    """official_roi weights, the real KITTI backbone features (15k / 7k raw, 27k / 9k pseudo voxels, poisoned
    padding rows) and 4 car-size boxes on real voxels: both modalities."""
    head, batch = official
    bd = batch()
    rois = _real_rois(bd, 4).to(triton_device)
    st = R.StaticRoIHead(head)
    for mm, key, gp in ((False, "multi_scale_3d_features", head.cfg.grid_pool),
                        (True, "multi_scale_3d_features_mm", head.cfg.grid_pool_mm)):
        feats = {k: PaddedSparse(p.features.to(triton_device), p.indices.to(triton_device), p.count.to(triton_device),
                                 p.spatial_shape, p.batch_size) for k, p in _padded(bd[key]).items()}
        fm = st.prepare(feats, mm=mm)
        coords, xyz = _proposal_grid(head, rois, gp)
        cnt = _compare(fm, coords, xyz)
        assert (cnt == 16).any() and (cnt > 0).float().mean() > 0.2, mm   # real neighbourhoods, not empty ones


def test_static_head_with_the_pool_kernel_equals_torch(official, triton_device):
    """The whole static head (3 stages, both modalities, official_roi weights, real features) with pool_kernel
    'triton' against 'torch' on 2 car-size boxes on real voxels, each stage fed the torch run's input RoIs: 1e-4
    (the pooled features differ by float rounding only; chained stages could differ more, since the pooling is
    discontinuous in the box: see test_engine_roi). One kernel launch per stage and modality, no host sync."""
    import copy

    from cmfiou_core.engine.nms import StaticProposals

    head, batch = official
    dev = triton_device
    head = copy.deepcopy(head).to(dev)
    bd = batch()
    n = 2
    props = StaticProposals(_real_rois(bd, n).to(dev), torch.full((1, n), 0.9, device=dev),
                            torch.ones((1, n), dtype=torch.long, device=dev),
                            torch.ones(1, n, dtype=torch.bool, device=dev), torch.tensor([n], device=dev),
                            torch.tensor(False, device=dev))

    def to(d):
        return {k: PaddedSparse(p.features.to(dev), p.indices.to(dev), p.count.to(dev), p.spatial_shape, p.batch_size)
                for k, p in _padded(d).items()}
    args = (to(bd["multi_scale_3d_features"]), to(bd["multi_scale_3d_features_mm"]), bd["st_features_2d"].to(dev),
            bd["batch_box_preds"].to(dev), bd["batch_cls_preds"].to(dev))
    ref = R.StaticRoIHead(head, pool_kernel="torch")(*args, proposals=props)
    with OpCounter(cuda_paths=True) as oc:    # each stage fed the torch run's input RoIs: isolated stages
        iso = R.StaticRoIHead(head, pool_kernel="triton")(*args, proposals=props,
                                                            stage_rois=[props.rois] + ref["stage_box_preds"][:2])
    assert oc.n_syncs() == 0, oc.sync_sites()  # graph-capturable: no host synchronisation on the CUDA path
    for t in range(3):
        for sec in ("pool_raw", "pool_mm"):
            assert oc.op_names[f"s{t}.{sec}"]["triton.grid_pool"] == 1, (t, sec)
            # the grid points + their stride-1 coordinates (~22 ops) + the one launch (the torch path: 138); the
            # interpreter's own argument copies are not counted (opcount.kernel_launch)
            assert oc.kernels[f"s{t}.{sec}"] <= 30, (t, sec, oc.kernels[f"s{t}.{sec}"])
        assert _close(iso["stage_box_preds"][t], ref["stage_box_preds"][t], 1e-4)[0], t
        assert _close(iso["stage_cls_preds"][t], ref["stage_cls_preds"][t], 1e-4)[0], t
    for k in ("batch_box_preds", "batch_cls_preds", "batch_iou_preds"):
        if k in ref:
            ok, err = _close(iso[k], ref[k], 1e-4)
            assert ok, (k, err)


def test_auto_runs_the_kernel_on_cuda_only():
    """'auto' picks the kernel for fp32 CUDA tensors with Triton; CPU tensors keep the torch path (the interpreter is
    for tests); unknown modes are refused."""
    head = _head(2)
    s3, s4 = (11, 40, 44), (5, 20, 22)
    feats = {"x_conv3": _source(_sites(s3, 1, 50, [], 1), s3, 1, 64, 3, 1, "cpu"),
             "x_conv4": _source(_sites(s4, 1, 20, [], 2), s4, 1, 64, 3, 2, "cpu")}
    fm = R.StaticRoIHead(head).prepare(feats, mm=False)
    q = torch.zeros((4, 3))
    assert not R.use_pool_kernel("auto", fm, q) and not R.use_pool_kernel("torch", fm, q)
    assert R.use_pool_kernel("triton", fm, q)
    with pytest.raises(ValueError, match="pool_kernel"):
        R.StaticRoIHead(head, pool_kernel="cuda")
    if torch.cuda.is_available():
        fmc = R.StaticRoIHead(head.to("cuda")).prepare(
            {k: PaddedSparse(p.features.cuda(), p.indices.cuda(), p.count.cuda(), p.spatial_shape, 1)
             for k, p in feats.items()}, mm=False)
        from cmfiou_core.engine.triton_conv import AVAILABLE
        assert R.use_pool_kernel("auto", fmc, q.cuda()) == AVAILABLE
        head.cpu()


def test_folded_pool_weights_are_kept_until_the_weights_change():
    """The folded position / output MLPs are computed once per weight state: the same tensors while the weights are
    unchanged, recomputed (equal to a fresh fold) after an in-place change (an optimizer step, load_state_dict)."""
    head = _head(3)
    layers = head.roi_grid_pool_layers
    first = R.folded_pool_weights(layers)
    assert all(a is b for a, b in zip(first, R.folded_pool_weights(layers)))
    with torch.no_grad():
        layers[1].mlps_out[0][1].running_var.mul_(2.0)
        layers[0].mlps_pos[1][0].weight.add_(0.1)
    again = R.folded_pool_weights(layers)
    w, b = R.fold_bn(layers[1].mlps_out[0])
    assert torch.equal(again[2][2], w.t()) and torch.equal(again[3][2, 0], b)
    a, _ = R.fold_bn(layers[0].mlps_pos[1])
    assert torch.equal(again[0][1], a.t())
    assert not torch.equal(again[2][2], first[2][2]) and not torch.equal(again[0][1], first[0][1])
    assert torch.equal(again[2][0], first[2][0])          # untouched pairs fold to the same values
