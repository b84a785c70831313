"""Every spconv convolution of a built detector runs ConvAlgo.Native (the GPU wheels' implicit-GEMM default is not
reproducible for this model: cmfiou_core/model/spconv_compat.py), and switching a conv's algorithm keeps its output."""
import spconv.pytorch as spconv
import torch
from spconv.core import ConvAlgo
from spconv.pytorch.conv import SparseConvolution

from cmfiou_core.model.spconv_compat import use_native_algorithm


def test_built_model_convs_are_native():
    from cmfiou_core.model.detector import build_model
    from cmfiou_core.model.model_config import load_config
    from cmfiou_core.pipeline import default_config

    model = build_model(load_config(default_config()))
    convs = [m for m in model.modules() if isinstance(m, SparseConvolution)]
    assert len(convs) > 50
    assert all(m.algo == ConvAlgo.Native for m in convs)


def test_use_native_algorithm_switches_and_keeps_output():
    torch.manual_seed(0)
    conv = spconv.SubMConv3d(4, 8, 3, bias=False, indice_key="t")
    idx = torch.unique(torch.randint(0, 6, (60, 3)), dim=0)
    x = spconv.SparseConvTensor(torch.randn(idx.shape[0], 4), torch.cat([torch.zeros_like(idx[:, :1]), idx], 1).int(),
                                [6, 6, 6], 1)
    ref = conv(x).features
    seq = spconv.SparseSequential(conv)
    conv.algo = ConvAlgo.MaskImplicitGemm    # what a GPU wheel picks by default
    assert use_native_algorithm(seq) == 1 and conv.algo == ConvAlgo.Native
    assert use_native_algorithm(seq) == 0
    x2 = spconv.SparseConvTensor(x.features, x.indices, [6, 6, 6], 1)
    assert torch.equal(conv(x2).features, ref)
