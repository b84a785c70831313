"""The fused Triton sparse conv (cmfiou_core/engine/triton_conv.py) against the torch gather + GEMM path on CUDA,
for fp32 (TF32 products) and bf16 inputs, Cin 8 and 64, absent taps and padding rows. Collected only where CUDA and
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
