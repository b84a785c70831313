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


def test_align_rows_matches_voxels_not_row_numbers():
    """ResVC adds two strided convs' features row by row; align_rows puts the second in the first one's voxel order."""
    import pytest

    from cmfiou_core.model.resvc import align_rows

    torch.manual_seed(1)
    idx = torch.unique(torch.randint(0, 9, (80, 3)), dim=0)
    idx = torch.cat([torch.randint(0, 2, (idx.shape[0], 1)), idx], 1).int()
    feats = torch.randn(idx.shape[0], 5)
    perm = torch.randperm(idx.shape[0])
    # the same voxels in another row order (what a GPU conv may return): aligned back to the target's rows
    assert torch.equal(align_rows(feats[perm], idx[perm], idx, [9, 9, 9]), feats)
    # same order: untouched
    assert align_rows(feats, idx, idx, [9, 9, 9]) is feats
    # different voxel sets are an error, not a silent mix-up
    with pytest.raises(ValueError, match="different voxels"):
        align_rows(feats[1:], idx[1:], idx[:-1], [9, 9, 9])


def test_resvc_block_adds_the_residual_per_voxel():
    """A ResConvBlock whose residual conv returns its rows in another order gives the same output."""
    from cmfiou_core.model.resvc import ResConvBlock

    torch.manual_seed(2)
    block = ResConvBlock(8, 8, stride=1, indice_key="a", image_plane_duplicates="mean").eval()
    idx = torch.unique(torch.randint(0, 12, (300, 3)), dim=0)
    idx = torch.cat([torch.zeros_like(idx[:, :1]), idx], 1).int()
    x = spconv.SparseConvTensor(torch.randn(idx.shape[0], 8), idx, [12, 12, 12], 1)

    from cmfiou_core.calib import Calibration
    import numpy as np

    P2 = np.array([[700.0, 0, 620, 0], [0, 700.0, 187, 0], [0, 0, 1, 0]])
    Tr = np.array([[0, -1, 0, 0], [0, 0, -1, 0], [1, 0, 0, 0]], dtype=np.float64)
    cal = Calibration(P2, np.eye(3), Tr, 1242, 375)
    with torch.no_grad():
        ref = block(x, 1, [cal], 1, None)
        inner = block.resnet_layer

        class Shuffled(torch.nn.Module):   # the residual conv's rows come back reversed
            def forward(self, t):
                out = inner(t)
                r = torch.arange(out.indices.shape[0] - 1, -1, -1)
                return spconv.SparseConvTensor(out.features[r], out.indices[r], out.spatial_shape, out.batch_size)
        block.resnet_layer = Shuffled()
        got = block(spconv.SparseConvTensor(x.features, x.indices, [12, 12, 12], 1), 1, [cal], 1, None)
    assert torch.equal(got.indices, ref.indices)
    assert torch.allclose(got.features, ref.features, atol=1e-6)
