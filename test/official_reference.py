"""The official_roi reference inputs as a fresh RoI-head batch dict (shared by test_roi_head and test_engine_roi)."""
import numpy as np
import spconv.pytorch as spconv
import torch


def reference_batch_factory(shared_dir):
    """-> ``batch()``: a new batch dict per call: the official dense outputs as spconv tensors (x_conv3/x_conv4 of
    both modalities), ``st_features_2d`` and the proposal-layer inputs of ``../shared/official_roi``."""
    inp = dict(np.load(shared_dir / "official_roi" / "inputs.npz"))
    dense = np.load(shared_dir / "official_dense" / "outputs.npz")

    def sp(p):
        return spconv.SparseConvTensor(torch.from_numpy(dense[p + "_features"]), torch.from_numpy(dense[p + "_indices"]),
                                       [int(x) for x in dense[p + "_spatial_shape"]], 1)

    def batch():
        return {"batch_size": 1,
                "multi_scale_3d_features": {"x_conv3": sp("raw_x_conv3"), "x_conv4": sp("raw_x_conv4")},
                "multi_scale_3d_features_mm": {"x_conv3": sp("mm_x_conv3"), "x_conv4": sp("mm_x_conv4")},
                "st_features_2d": torch.from_numpy(dense["st_features_2d"]),
                "batch_box_preds": torch.from_numpy(inp["proposal_batch_box_preds"]),
                "batch_cls_preds": torch.from_numpy(inp["proposal_batch_cls_preds"])}
    return batch
