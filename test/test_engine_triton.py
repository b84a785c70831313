"""The Triton kernels of the engine (cmfiou_core/engine/triton_conv.py, triton_maps.py) against their torch paths:
the fused sparse conv against gather + GEMM for fp32 (IEEE or TF32 products), bf16 and fp16 inputs, Cin 8 and 64,
absent taps and padding rows; the kernel maps against the torch dense-grid maps (identical integers).

On the GPU host the kernels compile (CUDA); elsewhere they run on CPU tensors under Triton's interpreter (fixture
``triton_device`` in conftest.py) at smaller sizes. The interpreter computes tl.dot in numpy: IEEE fp32 products
only (no TF32) and no bf16, so those two cases run on CUDA only."""
import pytest
import torch

from cmfiou_core.engine import triton_conv
from cmfiou_core.opcount import OpCounter


def _gen(dev, seed):
    return torch.Generator(device=dev).manual_seed(seed)


@pytest.mark.parametrize("cin,cout,dtype", [(8, 64, torch.float32), (64, 64, torch.float32), (64, 64, torch.bfloat16),
                                            (64, 32, torch.float16)])
def test_fused_conv_equals_gather_gemm(cin, cout, dtype, triton_device):
    dev = triton_device
    if dev == "cpu" and dtype == torch.bfloat16:
        pytest.skip("Triton's interpreter has no bf16 tl.dot (it multiplies the raw bits): CUDA only")
    g = _gen(dev, 0)
    n, m, k = (5000, 7000, 27) if dev == "cuda" else (300, 200, 27)
    x = torch.randn(n, cin, device=dev, generator=g).to(dtype)
    rows = torch.randint(0, n, (m, k), device=dev, generator=g)
    rows[torch.rand(m, k, device=dev, generator=g) < 0.6] = n        # absent taps
    rows[-100:] = n                                                     # padding rows: every tap absent
    w = torch.randn(k * cin, cout, device=dev, generator=g) / (k * cin) ** 0.5
    b = torch.randn(cout, device=dev, generator=g)
    xp = torch.cat([x.float(), x.new_zeros((1, cin)).float()])
    ref = torch.relu(xp[rows].reshape(m, -1).double() @ w.to(dtype).double() + b.double())
    got = triton_conv.sparse_conv(x, rows, w, b, relu=True).double()
    tol = 2e-2 if dtype == torch.float32 else 5e-2     # TF32 / bf16 / fp16 products, fp32 accumulation
    assert (got - ref).abs().max() <= tol * max(1.0, float(ref.abs().max()))
    assert torch.equal(got[-100:], torch.relu(b).to(dtype).double().expand(100, -1))


@pytest.mark.parametrize("tile", [(32, 32, 16, 4, 1), (128, 64, 32, 8, 3), (64, 64, 64, 4, 2), (32, 32, 16, 4, 2, 1),
                                  (32, 32, 16, 4, 2, 2), (64, 32, 16, 4, 3, 3)])
def test_every_tile_computes_the_same_conv(tile, monkeypatch, triton_device):
    """bench/bench_sparse_conv.py's candidate tiles (and TILES entries) change the blocking only: IEEE fp32 results
    equal gather + GEMM for Cin / Cout smaller and larger than the tile's blocks, with absent taps and a residual."""
    dev = triton_device
    if dev == "cuda":   # (a CPU build's cuBLAS module cannot be monkeypatched back; its switch is off anyway)
        monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    else:
        assert not torch.backends.cuda.matmul.allow_tf32
    g = _gen(dev, 3)
    for cin, cout in ((16, 32), (64, 96)):
        n, m, k = 150, 130, 27
        x = torch.randn(n, cin, device=dev, generator=g)
        rows = torch.randint(0, n, (m, k), device=dev, generator=g)
        rows[torch.rand(m, k, device=dev, generator=g) < 0.5] = n
        w = torch.randn(k * cin, cout, device=dev, generator=g) / (k * cin) ** 0.5
        b = torch.randn(cout, device=dev, generator=g)
        res = torch.randn(m, cout, device=dev, generator=g)
        xp = torch.cat([x, x.new_zeros((1, cin))]).double()
        ref = torch.relu(xp[rows].reshape(m, -1) @ w.double() + b.double() + res.double())
        got = triton_conv.sparse_conv(x, rows, w, b, relu=True, residual=res, tile=tile).double()
        assert (got - ref).abs().max() <= 1e-5 * max(1.0, float(ref.abs().max())), (tile, cin, cout)


@pytest.mark.parametrize("tf32,tol", [(False, 1e-5), (True, 2e-2)])
def test_fused_conv_fp32_follows_torchs_tf32_switch(tf32, tol, monkeypatch, triton_device):
    """fp32 inputs: IEEE products (spconv's CUDA kernels, inference.precision fp32) unless torch's matmul switch
    allows TF32 (inference.precision tf32), whose 10-bit mantissa products are ~1e-3 off."""
    dev = triton_device
    if dev == "cpu" and tf32:
        pytest.skip("Triton's interpreter computes tl.dot with IEEE fp32 products only: the TF32 case is CUDA only")
    if dev == "cuda":   # (a CPU build's cuBLAS module cannot be monkeypatched back; its switch is off anyway)
        monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", tf32)
    else:
        assert not torch.backends.cuda.matmul.allow_tf32
    g = _gen(dev, 2)
    n, m, k, c = (4000, 4000, 27, 64) if dev == "cuda" else (300, 130, 27, 64)
    x = torch.randn(n, c, device=dev, generator=g)
    rows = torch.randint(0, n + 1, (m, k), device=dev, generator=g)
    w = torch.randn(k * c, c, device=dev, generator=g) / (k * c) ** 0.5
    b = torch.randn(c, device=dev, generator=g)
    xp = torch.cat([x, x.new_zeros((1, c))]).double()
    ref = xp[rows].reshape(m, -1) @ w.double() + b.double()
    err = float((triton_conv.sparse_conv(x, rows, w, b).double() - ref).abs().max() / ref.abs().max())
    assert err <= tol
    if tf32:
        assert err > 1e-5          # TF32 really was used


def test_fused_conv_residual_and_padding_rows(triton_device):
    """residual added before the ReLU, rows >= count zeroed (the engine's masked basic-block epilogue)."""
    dev = triton_device
    g = _gen(dev, 1)
    n, m, k, c = (3000, 3000, 27, 32) if dev == "cuda" else (300, 150, 27, 32)
    cnt = m - m // 6
    x = torch.randn(n, c, device=dev, generator=g)
    rows = torch.randint(0, n + 1, (m, k), device=dev, generator=g)
    w = torch.randn(k * c, c, device=dev, generator=g) / (k * c) ** 0.5
    b = torch.randn(c, device=dev, generator=g)
    res = torch.randn(m, c, device=dev, generator=g)
    count = torch.tensor(cnt, device=dev)
    xp = torch.cat([x, x.new_zeros((1, c))]).double()
    ref = torch.relu(xp[rows].reshape(m, -1) @ w.double() + b.double() + res.double())
    ref[cnt:] = 0
    got = triton_conv.sparse_conv(x, rows, w, b, relu=True, residual=res, count=count).double()
    assert (got - ref).abs().max() <= 2e-2 * float(ref.abs().max())
    assert torch.equal(got[cnt:], torch.zeros_like(got[cnt:]))


def _random_sites(shape, batch, n, cap, seed, dev):
    """A key-sorted PaddedSparse of n unique random sites (capacity cap) built by the torch reference path."""
    from cmfiou_core.engine import sparse as S

    g = torch.Generator().manual_seed(seed)
    space = batch * int(torch.tensor(shape).prod())
    keys = torch.randperm(space, generator=g)[:n].to(dev)
    idx = S.keys_to_indices(keys, shape)
    feats = torch.zeros((n, 1), device=dev)
    return S.sort_sites(feats, idx, shape, batch, cap)


@pytest.mark.parametrize("shape,batch", [((41, 160, 140), 2), ((30, 50), 3)])
def test_triton_kernel_maps_equal_torch_maps(shape, batch, monkeypatch, triton_device):
    """subm / strided / inverse maps and the strided output sites: the Triton kernels give the same integers as the
    torch dense-grid path (identical rows, identical output indices, counts and overflow)."""
    from cmfiou_core.engine import sparse as S

    dev = triton_device
    monkeypatch.setattr(S, "TRITON_ON_CPU", True)
    monkeypatch.setattr(S, "_FORCE_DENSE", True)
    nd = len(shape)
    f = 1 if dev == "cuda" else 10                                   # the interpreter: a tenth of the sites
    sites = _random_sites(shape, batch, 4000 // f, 5000 // f, 0, dev)
    k3 = (3,) * nd
    cases = [("subm", lambda s: S.subm_map(s, k3)),
             ("subm5", lambda s: S.subm_map(s, (5,) * nd if nd == 2 else (3, 5, 5))),
             ("down", lambda s: S.conv_map(s, k3, (2,) * nd, (1,) * nd, 6000 // f)),
             ("down_overflow", lambda s: S.conv_map(s, k3, (2,) * nd, (1,) * nd, 1500 // f)),
             ("down_p0", lambda s: S.conv_map(s, k3, (2,) * nd, (0,) * nd, 6000 // f)),
             ("dilate", lambda s: S.conv_map(s, k3, (1,) * nd, (1,) * nd, 40000 // f))]
    for name, fn in cases:
        got = {}
        for flag in (True, False):
            monkeypatch.setattr(S, "USE_TRITON_MAPS", flag)
            s = S.PaddedSparse(sites.features, sites.indices, sites.count, sites.spatial_shape, sites.batch_size)
            with OpCounter(cuda_paths=False) as oc:
                r = fn(s)
                km, ov = r if isinstance(r, tuple) else (r, torch.zeros((), device=dev))
                got[flag] = (km.rows,)
                if name.startswith("down") or name == "dilate":
                    ks = (3,) * nd
                    st = (2,) * nd if name.startswith("down") else (1,) * nd
                    pd = (0,) * nd if name == "down_p0" else (1,) * nd
                    out = S.PaddedSparse(km.out.features, km.out.indices, km.out.count, km.out.spatial_shape, batch)
                    inv = S.inverse_map(out, s, ks, st, pd).rows
                    # the Triton path's grid is the one its emission kernel wrote; the torch path builds it here
                    grid = km.out.__dict__.get("_row_grid") if flag else S.row_grid(out)
                    got[flag] = (km.rows, km.out.indices, km.out.count, ov, inv, grid)
            launches = sum(v for k, v in oc.op_names["main"].items() if k.startswith("triton."))
            assert (launches > 0) == flag, (name, flag, launches)     # the Triton path really ran (and only it)
        for a, b in zip(got[True], got[False]):
            assert torch.equal(a.long(), b.long()), name
    assert int(got[True][2]) > 0


def test_tiles_entry_torch_routes_foldedconv_to_gather_gemm(monkeypatch, triton_device):
    """TILES[dtype] = "torch" (a bench_sparse_conv winner can be cuBLAS): FoldedConv launches no fused kernel for
    that dtype and returns gather + GEMM; with the tile restored it launches one per call again."""
    import spconv.pytorch as spconv

    from cmfiou_core.engine import sparse as S

    dev = triton_device
    monkeypatch.setattr(S, "TRITON_ON_CPU", True)
    torch.manual_seed(5)
    conv = spconv.SubMConv3d(16, 32, 3, bias=False, indice_key="t")
    fc = S.FoldedConv(conv).to(dev)
    n, m = 120, 90
    x = torch.randn(n, 16, device=dev)
    rows = torch.randint(0, n + 1, (m, 27), device=dev)
    km = S.KernelMap(rows, None)
    xp = torch.cat([x, x.new_zeros((1, 16))]).double()
    ref = xp[rows].reshape(m, -1) @ fc.weight.double() + fc.bias.double()
    for entry, launches in (("torch", 0), (triton_conv.TILES[torch.float32], 1)):
        monkeypatch.setitem(triton_conv.TILES, torch.float32, entry)
        with OpCounter() as oc:
            y = fc(x, km)
        assert oc.op_names["main"]["triton.sparse_conv"] == launches, (entry, dict(oc.op_names["main"]))
        assert (y.double() - ref).abs().max() <= 1e-4 * max(1.0, float(ref.abs().max()))


@pytest.mark.parametrize("tile", [(64, 64, 32, 4, 3, 5), (64, 64, 32, 4, 3, 7)])
def test_split_tile_is_finer_than_tf32_on_cuda(tile, monkeypatch, triton_device):
    """SPLIT tiles (fp32 as bf16 hi + lo pairs, three bf16 products) replace TF32 products at precision tf32: within
    1e-4 of the float64 conv (TF32 is ~1e-3 off, see above), and IEEE products again when TF32 is switched off."""
    if triton_device != "cuda":
        pytest.skip("Triton's interpreter has no bf16 tl.dot (it multiplies the raw bits): CUDA only")
    g = _gen("cuda", 4)
    n, m, k, c = 4000, 4000, 27, 64
    x = torch.randn(n, c, device="cuda", generator=g)
    rows = torch.randint(0, n + 1, (m, k), device="cuda", generator=g)
    w = torch.randn(k * c, c, device="cuda", generator=g) / (k * c) ** 0.5
    b = torch.randn(c, device="cuda", generator=g)
    xp = torch.cat([x, x.new_zeros((1, c))]).double()
    ref = xp[rows].reshape(m, -1) @ w.double() + b.double()
    for tf32, tol in ((True, 1e-4), (False, 1e-5)):
        monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", tf32)
        got = triton_conv.sparse_conv(x, rows, w, b, tile=tile).double()
        assert float((got - ref).abs().max() / ref.abs().max()) <= tol, (tile, tf32)
