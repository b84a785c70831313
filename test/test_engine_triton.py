"""The fused Triton sparse conv (cmfiou_core/engine/triton_conv.py) against the torch gather + GEMM path on CUDA,
for fp32 (IEEE or TF32 products) and bf16 inputs, Cin 8 and 64, absent taps and padding rows. Collected only where CUDA and
Triton exist (the GPU host); the CPU always runs the torch path, tested in test_engine_backbone.py."""
import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs CUDA (the fused kernel runs on the GPU only)", allow_module_level=True)
triton_conv = pytest.importorskip("cmfiou_core.engine.triton_conv")
if not triton_conv.AVAILABLE:
    pytest.skip("Triton is not installed", allow_module_level=True)


@pytest.mark.parametrize("cin,cout,dtype", [(8, 64, torch.float32), (64, 64, torch.float32), (64, 64, torch.bfloat16),
                                            (64, 32, torch.float16)])
def test_fused_conv_equals_gather_gemm(cin, cout, dtype):
    g = torch.Generator(device="cuda").manual_seed(0)
    n, m, k = 5000, 7000, 27
    x = torch.randn(n, cin, device="cuda", generator=g).to(dtype)
    rows = torch.randint(0, n, (m, k), device="cuda", generator=g)
    rows[torch.rand(m, k, device="cuda", generator=g) < 0.6] = n        # absent taps
    rows[-100:] = n                                                     # padding rows: every tap absent
    w = torch.randn(k * cin, cout, device="cuda", generator=g) / (k * cin) ** 0.5
    b = torch.randn(cout, device="cuda", generator=g)
    xp = torch.cat([x.float(), x.new_zeros((1, cin)).float()])
    ref = torch.relu(xp[rows].reshape(m, -1).double() @ w.to(dtype).double() + b.double())
    got = triton_conv.sparse_conv(x, rows, w, b, relu=True).double()
    tol = 2e-2 if dtype == torch.float32 else 5e-2     # TF32 / bf16 / fp16 products, fp32 accumulation
    assert (got - ref).abs().max() <= tol * max(1.0, float(ref.abs().max()))
    assert torch.equal(got[-100:], torch.relu(b).to(dtype).double().expand(100, -1))


@pytest.mark.parametrize("tf32,tol", [(False, 1e-5), (True, 2e-2)])
def test_fused_conv_fp32_follows_torchs_tf32_switch(tf32, tol, monkeypatch):
    """fp32 inputs: IEEE products (spconv's CUDA kernels, inference.precision fp32) unless torch's matmul switch
    allows TF32 (inference.precision tf32), whose 10-bit mantissa products are ~1e-3 off."""
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", tf32)
    g = torch.Generator(device="cuda").manual_seed(2)
    n, m, k, c = 4000, 4000, 27, 64
    x = torch.randn(n, c, device="cuda", generator=g)
    rows = torch.randint(0, n + 1, (m, k), device="cuda", generator=g)
    w = torch.randn(k * c, c, device="cuda", generator=g) / (k * c) ** 0.5
    b = torch.randn(c, device="cuda", generator=g)
    xp = torch.cat([x, x.new_zeros((1, c))]).double()
    ref = xp[rows].reshape(m, -1) @ w.double() + b.double()
    err = float((triton_conv.sparse_conv(x, rows, w, b).double() - ref).abs().max() / ref.abs().max())
    assert err <= tol
    if tf32:
        assert err > 1e-5          # TF32 really was used


def test_fused_conv_residual_and_padding_rows():
    """residual added before the ReLU, rows >= count zeroed (the engine's masked basic-block epilogue)."""
    g = torch.Generator(device="cuda").manual_seed(1)
    n, m, k, c = 3000, 3000, 27, 32
    x = torch.randn(n, c, device="cuda", generator=g)
    rows = torch.randint(0, n + 1, (m, k), device="cuda", generator=g)
    w = torch.randn(k * c, c, device="cuda", generator=g) / (k * c) ** 0.5
    b = torch.randn(c, device="cuda", generator=g)
    res = torch.randn(m, c, device="cuda", generator=g)
    count = torch.tensor(2500, device="cuda")
    xp = torch.cat([x, x.new_zeros((1, c))]).double()
    ref = torch.relu(xp[rows].reshape(m, -1) @ w.double() + b.double() + res.double())
    ref[2500:] = 0
    got = triton_conv.sparse_conv(x, rows, w, b, relu=True, residual=res, count=count).double()
    assert (got - ref).abs().max() <= 2e-2 * float(ref.abs().max())
    assert torch.equal(got[2500:], torch.zeros_like(got[2500:]))


def _random_sites(shape, batch, n, cap, seed):
    """A key-sorted PaddedSparse of n unique random sites (capacity cap) built by the torch reference path."""
    from cmfiou_core.engine import sparse as S

    g = torch.Generator().manual_seed(seed)
    space = batch * int(torch.tensor(shape).prod())
    keys = torch.randperm(space, generator=g)[:n].cuda()
    idx = S.keys_to_indices(keys, shape)
    feats = torch.zeros((n, 1), device="cuda")
    return S.sort_sites(feats, idx, shape, batch, cap)


@pytest.mark.parametrize("shape,batch", [((41, 160, 140), 2), ((30, 50), 3)])
def test_triton_kernel_maps_equal_torch_maps(shape, batch, monkeypatch):
    """subm / strided / inverse maps and the strided output sites: the Triton kernels give the same integers as the
    torch dense-grid path (identical rows, identical output indices, counts and overflow)."""
    from cmfiou_core.engine import sparse as S

    nd = len(shape)
    sites = _random_sites(shape, batch, 4000, 5000, 0)
    k3 = (3,) * nd
    cases = [("subm", lambda s: S.subm_map(s, k3)),
             ("subm5", lambda s: S.subm_map(s, (5,) * nd if nd == 2 else (3, 5, 5))),
             ("down", lambda s: S.conv_map(s, k3, (2,) * nd, (1,) * nd, 6000)),
             ("down_overflow", lambda s: S.conv_map(s, k3, (2,) * nd, (1,) * nd, 1500)),
             ("down_p0", lambda s: S.conv_map(s, k3, (2,) * nd, (0,) * nd, 6000)),
             ("dilate", lambda s: S.conv_map(s, k3, (1,) * nd, (1,) * nd, 40000))]
    for name, fn in cases:
        got = {}
        for flag in (True, False):
            monkeypatch.setattr(S, "USE_TRITON_MAPS", flag)
            s = S.PaddedSparse(sites.features, sites.indices, sites.count, sites.spatial_shape, sites.batch_size)
            r = fn(s)
            km, ov = r if isinstance(r, tuple) else (r, torch.zeros((), device="cuda"))
            inv = None
            if name.startswith("down") or name == "dilate":
                ks = (3,) * nd
                st = (2,) * nd if name.startswith("down") else (1,) * nd
                pd = (0,) * nd if name == "down_p0" else (1,) * nd
                out = S.PaddedSparse(km.out.features, km.out.indices, km.out.count, km.out.spatial_shape, batch)
                inv = S.inverse_map(out, s, ks, st, pd).rows
                # the Triton path's grid is the one its emission kernel wrote; the torch path builds it here
                grid = km.out.__dict__.get("_row_grid") if flag else S.row_grid(out)
                got[flag] = (km.rows, km.out.indices, km.out.count, ov, inv, grid)
            else:
                got[flag] = (km.rows,)
        for a, b in zip(got[True], got[False]):
            assert torch.equal(a.long(), b.long()), name
    assert int(got[True][2]) > 0
