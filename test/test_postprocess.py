"""Post-processing and IoU-joint scoring: official_roi pred_* as sets; score modes; per-class NMS; config handling."""
import numpy as np
import pytest
import torch

from cmfiou_core.config import ConfigError
from cmfiou_core.model.iou_joint import combine_scores, decode_iou_pred, encode_iou_target
from cmfiou_core.model.postprocess import PostProcessConfig, post_process


def _match_sets(got_boxes, got_scores, got_labels, ref_boxes, ref_scores, ref_labels):
    assert got_boxes.shape == ref_boxes.shape
    d = np.abs(ref_boxes[:, None, :] - got_boxes[None]).max(-1) / (1 + np.abs(ref_boxes[:, None, :]).max(-1))
    j = d.argmin(1)
    assert d.min(1).max() < 1e-5 and len(set(j.tolist())) == len(j)  # one-to-one
    assert np.abs(got_scores[j] - ref_scores).max() < 1e-5
    assert np.array_equal(got_labels[j], ref_labels)


def test_official_post_processing_sets(shared_dir):
    out = np.load(shared_dir / "official_roi" / "outputs.npz")
    bd = {"batch_size": 1, "batch_box_preds": torch.from_numpy(out["final_batch_box_preds"]),
          "batch_cls_preds": torch.from_numpy(out["final_batch_cls_preds"]),
          "roi_labels": torch.from_numpy(out["roi_labels"]), "cls_preds_normalized": False, "has_class_labels": True}
    det = post_process(bd, PostProcessConfig())  # official: cls, thr 0.4, class-agnostic NMS 0.1/4096/500
    assert len(det) == 1
    d = det[0]
    _match_sets(d.boxes.numpy(), d.score.numpy(), d.labels.numpy(), out["pred_boxes"], out["pred_scores"],
                out["pred_labels"])
    assert torch.isnan(d.iou).all() and torch.equal(d.cls, d.score)
    # scores are sorted descending (NMS order)
    assert torch.all(d.score[:-1] >= d.score[1:])


def test_score_modes():
    cls = torch.tensor([0.9, 0.5, 0.2])
    iou = torch.tensor([0.4, 0.9, 0.5])
    lab = torch.tensor([1, 2, 3])
    r = combine_scores(cls, iou, lab, "rectified", (0.68, 0.71, 0.65))
    a = torch.tensor([0.68, 0.71, 0.65])
    assert torch.allclose(r, cls ** (1 - a) * iou ** a)
    assert torch.allclose(combine_scores(cls, iou, lab, "add"), (cls + iou) / 2)
    assert torch.equal(combine_scores(cls, iou, lab, "cls"), cls)
    with pytest.raises(ValueError):
        combine_scores(cls, iou, lab, "mul")
    t = torch.tensor([0.0, 0.5, 1.0])
    assert torch.allclose(decode_iou_pred(encode_iou_target(t)), t)
    assert decode_iou_pred(torch.tensor([5.0, -5.0])).tolist() == [1.0, 0.0]


def _toy_batch(with_iou=True):
    boxes = torch.tensor([[[10.0, 0, -1, 4, 2, 1.5, 0], [10.5, 0, -1, 4, 2, 1.5, 0], [20.0, 0, -1, 1, 1, 1.7, 0],
                           [20.2, 0, -1, 1, 1, 1.7, 0], [0.0, 0, 0, 0, 0, 0, 0]]])
    logits = torch.logit(torch.tensor([[[0.9], [0.8], [0.7], [0.6], [0.95]]]))
    bd = {"batch_size": 1, "batch_box_preds": boxes, "batch_cls_preds": logits,
          "roi_labels": torch.tensor([[1, 2, 2, 2, 1]]), "has_class_labels": True}
    if with_iou:
        bd["batch_iou_preds"] = torch.tensor([[[0.3], [0.9], [0.8], [0.2], [0.9]]])
    return bd


def test_rectified_ranking_and_per_class_nms():
    bd = _toy_batch()
    # rectified: box 1 (cls .8, iou .9) beats box 0 (cls .9, iou .3); class-agnostic NMS removes box 0
    d = post_process(bd, {"score_mode": "rectified", "score_thresh": 0.1, "nms_thresh": 0.1})[0]
    assert d.boxes.shape[0] == 2 and torch.allclose(d.boxes[0], bd["batch_box_preds"][0, 1])
    assert torch.allclose(d.iou, torch.tensor([0.9, 0.8]))
    # degenerate (zero-size, padded) box 4 never appears
    assert not (d.boxes[:, 3:6] == 0).all(1).any()
    # per-class NMS: box 0 (Car) and box 1 (Ped) overlap but do not suppress each other
    d = post_process(bd, {"score_mode": "rectified", "score_thresh": 0.1, "nms_type": "per_class",
                          "nms_thresh": [0.1, 0.1, 0.1]})[0]
    assert sorted(d.labels.tolist()) == [1, 2, 2]
    # score threshold uses >=
    s = combine_scores(torch.tensor([0.8]), torch.tensor([0.9]), torch.tensor([2]), "rectified")
    d = post_process(bd, {"score_mode": "rectified", "score_thresh": float(s), "nms_thresh": 0.1})[0]
    assert d.boxes.shape[0] == 1


def test_config_errors_and_one_config_class():
    with pytest.raises(ConfigError):
        PostProcessConfig.from_mapping({"score_mode": "mul"})
    with pytest.raises(ConfigError):
        PostProcessConfig.from_mapping({"nms_type": "per_class", "nms_thresh": [0.1, 0.2]})
    with pytest.raises(ConfigError, match="unknown"):
        PostProcessConfig.from_mapping({"nms_thres": 0.1})
    with pytest.raises(ConfigError, match="unknown"):  # the old second dialect's keys are gone
        PostProcessConfig.from_mapping({"class_agnostic_nms": False})
    with pytest.raises(ValueError, match="iou"):
        post_process(_toy_batch(with_iou=False), {"score_mode": "add"})
    from cmfiou_core.model import model_config as mc

    assert PostProcessConfig is mc.PostProcessConfig  # one class: the YAML's model.post_processing
    c = PostProcessConfig.from_any(None)
    assert c.score_mode == "cls" and c.class_agnostic_nms and c.nms_thresh == (0.1,) and c.score_thresh == 0.4
    # per-class NMS: one value expands to one per class of the model (2 classes here, not a hard-coded 3)
    c = PostProcessConfig.from_mapping({"nms_type": "per_class", "nms_thresh": 0.2, "rectifier_alpha": [0.5, 0.6]},
                                       num_class=2)
    assert c.nms_thresh == (0.2, 0.2) and c.nms_pre_maxsize == (4096, 4096) and not c.class_agnostic_nms
    assert c.alpha == (0.5, 0.6)
