"""Checkpoint reading/loading: OpenPCDet files (legacy + zip), our format, weights_only refusal, spconv-1 layout,
fp16, strictness (only IoU-branch keys may be missing when loading an official file into our config)."""
from pathlib import Path

import pytest
import torch

from cmfiou_core.model.checkpoint import (CheckpointError, load_checkpoint, load_official, read_checkpoint,
                                          save_checkpoint)
from cmfiou_core.model.detector import build_model
from cmfiou_core.model.model_config import load_config

REPO = Path(__file__).resolve().parents[1]


class _Evil:  # any non-allowlisted class makes the file need unpickling
    pass


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    off = build_model(load_config(REPO / "config/cmfiou_kitti_official.yaml"))
    ours = build_model(load_config(REPO / "config/cmfiou_kitti.yaml"))
    with torch.no_grad():   # make the official weights distinguishable from a fresh init
        for p in off.parameters():
            p.add_(0.5)
    return off, ours


def _pcdet_file(tmp_path, state, zip_format):
    p = tmp_path / ("zip.pth" if zip_format else "legacy.pth")
    torch.save({"epoch": 20, "it": 18560, "model_state": state, "optimizer_state": {},
                "version": "pcdet+0.3.0+abc"}, str(p), _use_new_zipfile_serialization=zip_format)
    return p


@pytest.mark.parametrize("zip_format", [False, True])
def test_official_file_into_official_config_strict(tmp_path, models, zip_format):
    off, _ = models
    p = _pcdet_file(tmp_path, off.state_dict(), zip_format)
    fresh = build_model(load_config(REPO / "config/cmfiou_kitti_official.yaml"))
    _, rep = load_checkpoint(p, fresh, strict=True)
    assert rep.source_format == "openpcdet" and not rep.missing_iou_branch and rep.meta["epoch"] == 20
    for k, v in off.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v), k


def test_official_file_into_our_config_reports_iou_branch(tmp_path, models, caplog):
    off, ours = models
    p = _pcdet_file(tmp_path, off.state_dict(), True)
    with caplog.at_level("WARNING"):
        _, rep = load_checkpoint(p, ours, strict=True)
    assert rep.missing_iou_branch and all(k.startswith("roi_head.iou_layers.") for k in rep.missing_iou_branch)
    assert len(rep.missing_iou_branch) == len([k for k in ours.state_dict() if k.startswith("roi_head.iou_layers.")])
    assert "IoU-branch" in caplog.text
    assert torch.equal(ours.state_dict()["dense_head.conv_cls.weight"], off.state_dict()["dense_head.conv_cls.weight"])


def test_other_missing_or_unexpected_keys_are_errors(models):
    off, ours = models
    sd = dict(off.state_dict())
    del sd["backbone_3d.conv1.0.weight"]
    sd["roi_head.something_new.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError) as e:
        load_official(ours, sd, strict=True)
    assert "backbone_3d.conv1.0.weight" in str(e.value) and "roi_head.something_new.weight" in str(e.value)
    sd = dict(off.state_dict())
    sd["dense_head.conv_cls.weight"] = torch.zeros(3, 3)
    with pytest.raises(CheckpointError, match="shapes"):
        load_official(off, sd, strict=True)


def test_refuses_pickled_objects(tmp_path, models):
    p = tmp_path / "evil.pth"
    torch.save({"model_state": {}, "payload": _Evil()}, str(p))
    with pytest.raises(CheckpointError, match="refusing to load"):
        read_checkpoint(p)


def test_spconv1_layout_and_fp16_are_converted(tmp_path, models):
    off, _ = models
    sd = {}
    sp1 = []
    for k, v in off.state_dict().items():
        if k.startswith("backbone_3d.") and k.endswith(".weight") and v.dim() in (4, 5):
            v = v.permute(*range(1, v.dim() - 1), v.dim() - 1, 0).contiguous()   # (Cout,*k,Cin) -> (*k,Cin,Cout)
            sp1.append(k)
        sd[k] = v.half() if v.dtype == torch.float32 else v
    assert any(".d2_conv1.0." in k for k in sp1) and "backbone_3d.conv_out.0.weight" in sp1
    p = _pcdet_file(tmp_path, sd, False)
    fresh = build_model(load_config(REPO / "config/cmfiou_kitti_official.yaml"))
    _, rep = load_checkpoint(p, fresh, strict=True)
    assert sorted(rep.converted_spconv1) == sorted(sp1) and rep.cast_dtype
    for k, v in off.state_dict().items():
        w = fresh.state_dict()[k]
        assert w.dtype == v.dtype and w.shape == v.shape, k
        assert torch.allclose(w.float(), v.half().float() if v.is_floating_point() else v.float()), k


def test_our_format_roundtrip(tmp_path, models):
    _, ours = models
    cfg = load_config(REPO / "config/cmfiou_kitti.yaml")
    p = save_checkpoint(tmp_path / "ours.pth", ours, config=cfg.raw, meta={"git": "abc", "epoch_loss": 1.5}, epoch=3)
    obj = torch.load(str(p), weights_only=True)   # plain types only
    assert obj["config"]["model"]["post_processing"]["score_mode"] == "rectified"
    fresh = build_model(cfg)
    _, rep = load_checkpoint(p, fresh)
    assert rep.source_format == "cmfiou" and not rep.missing_iou_branch and rep.meta["meta"]["git"] == "abc"
    for k, v in ours.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v), k


def test_trainer_checkpoint_is_recognised(tmp_path, models):
    tc = pytest.importorskip("cmfiou_core.train.checkpoint")
    _, ours = models
    cfg = load_config(REPO / "config/cmfiou_kitti.yaml")
    p = tc.save_checkpoint(tmp_path / "trainer.pth", ours, epoch=2, it=10, config=cfg.raw)
    fresh = build_model(cfg)
    _, rep = load_checkpoint(p, fresh)
    assert rep.source_format == "cmfiou" and rep.meta["epoch"] == 2
    assert torch.equal(fresh.state_dict()["roi_head.iou_layers.0.0.weight"], ours.state_dict()["roi_head.iou_layers.0.0.weight"])
