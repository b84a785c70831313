"""One typed config tree: every section is validated when the YAML is loaded (not when a module is built), values the
code does not implement are refused, and a checkpoint's stored config and format are checked against the model."""
import copy
import logging

import pytest
import torch
import yaml

from cmfiou_core.config import ConfigError
from cmfiou_core.model.checkpoint import OUR_FORMAT, CheckpointError, load_checkpoint, save_checkpoint
from cmfiou_core.model.detector import build_model
from cmfiou_core.model.model_config import config_from_dict
from cmfiou_core.pipeline import default_config


@pytest.fixture(scope="module")
def raw():
    with open(default_config()) as f:
        return yaml.safe_load(f)


def _with(raw, path, value):
    d = copy.deepcopy(raw)
    node = d
    for k in path[:-1]:
        node = node.setdefault(k, {})
    node[path[-1]] = value
    return d


@pytest.mark.parametrize("path,value,match", [
    (("model", "roi_head", "grid_pool", "mlps"), [[[32, 32], [32, "x"]], [[32, 32], [32, 32]]],
     r"model.roi_head.grid_pool.mlps\[0\]\[1\]"),
    (("model", "roi_head", "grid_pool", "radii"), [[0.4, -0.8], [0.8, 1.6]], r"model.roi_head.grid_pool.radii\[0\]\[1\]"),
    (("model", "roi_head", "grid_pool_mm", "nsample"), [[16], [16, 16]], "one entry per neighbourhood group"),
    (("model", "roi_head", "grid_pool", "query_ranges"), [[[2, 2], [4, 4, 4]], [[2, 2, 2], [4, 4, 4]]],
     r"query_ranges\[0\]\[0\]"),
    (("model", "roi_head", "grid_pool", "sources"), ["x_conv3", "x_conv9"], "grid_pool.sources"),
    (("model", "rpn", "pos_fraction"), 0.5, "pos_fraction.*not implemented"),
    (("model", "rpn", "norm_by_num_examples"), True, "norm_by_num_examples.*not implemented"),
    (("model", "rpn", "match_height"), True, "match_height.*not implemented"),
    (("model", "post_processing", "class_agnostic_nms"), False, "unknown key"),
    (("data", "input_discard_rate"), 1.5, "data.input_discard_rate"),
    (("data", "input_discard_rte"), 0.5, "unknown key.*input_discard_rte"),
    (("data", "optimization", "lr_max"), 0.01, "unknown key.*data.optimization"),
    (("data", "augment", "world_flip"), "yes", "data.augment.world_flip"),
    (("inference", "precision"), "fp16", "inference.precision"),
    (("inference", "engine"), "tensorrt", "inference.engine"),
])
def test_bad_values_are_refused_at_load(raw, path, value, match):
    with pytest.raises(ConfigError, match=match):
        config_from_dict(_with(raw, path, value), "cfg.yaml")


def test_sections_are_typed_at_load(raw):
    from cmfiou_core.data.dataset_config import DatasetConfig
    from cmfiou_core.model.roi_head import RoIHeadConfig

    cfg = config_from_dict(_with(raw, ("data", "input_discard_rate"), 0.25))
    assert isinstance(cfg.model.roi_head, RoIHeadConfig) and cfg.model.roi_head.grid_pool.nsample == [[16, 16]] * 2
    assert isinstance(cfg.dataset, DatasetConfig) and cfg.dataset.discard_rate == 0.25
    assert cfg.optimization["lr"] == 0.005  # the default recipe
    # no input_discard_rate: None (the pipeline then uses depth.discard.rate)
    d = copy.deepcopy(raw)
    d["data"].pop("input_discard_rate")
    assert config_from_dict(d).dataset.discard_rate is None


@pytest.fixture(scope="module")
def dense_model(raw):
    torch.manual_seed(0)
    cfg = config_from_dict(raw)
    return cfg, build_model(cfg, with_roi_head=False)


def test_checkpoint_with_another_model_config_is_refused(raw, dense_model, tmp_path, caplog):
    cfg, model = dense_model
    other = _with(raw, ("model", "point_cloud_range"), [0, -40, -3, 70.4, 40, 2])  # same shapes, other geometry
    ck = save_checkpoint(tmp_path / "a.pt", model, config=other)
    with pytest.raises(CheckpointError, match=r"model.point_cloud_range: checkpoint \[0.0, -40.0, -3.0, 70.4, 40.0, "
                                              r"2.0\] vs model"):
        load_checkpoint(ck, model)
    with caplog.at_level(logging.WARNING):
        load_checkpoint(ck, model, strict=False)
    assert "point_cloud_range" in caplog.text
    # inference-only settings (post-processing, test views) may differ
    same = _with(raw, ("model", "post_processing", "score_thresh"), 0.3)
    load_checkpoint(save_checkpoint(tmp_path / "b.pt", model, config=same), model)


def test_checkpoint_of_another_format_version_is_refused(raw, dense_model, tmp_path):
    cfg, model = dense_model
    ck = tmp_path / "v2.pt"
    torch.save({"model_state": model.state_dict(), "config": raw, "meta": {"format": "cmfiou-ckpt-v2"}}, str(ck))
    with pytest.raises(CheckpointError, match=f"cmfiou-ckpt-v2.*{OUR_FORMAT}"):
        load_checkpoint(ck, model)


def test_parameter_doc_is_generated_from_the_validating_code_and_up_to_date(tmp_path):
    """docs/config_parameters.md is what ``cmfiou_core.tools.config_doc`` writes from the Section reads of the
    validating code (regenerate it after adding or changing a key)."""
    from pathlib import Path

    from cmfiou_core.tools import config_doc

    text = config_doc.render(config_doc.collect())
    assert "| `nms_type` | string | `class_agnostic` | `class_agnostic` / `per_class` |" in text
    assert "| `input_discard_rate` | number |  | 0.0 .. 1.0 |" in text
    assert "## `model.roi_head.grid_pool` (cmfiou_core/model/roi_head.py)" in text
    doc = Path(__file__).resolve().parents[1] / "docs" / "config_parameters.md"
    assert doc.read_text() == text, "docs/config_parameters.md is stale: run python -m cmfiou_core.tools.config_doc"
    assert config_doc.main(["--check", str(doc)]) == 0
    stale = tmp_path / "stale.md"
    stale.write_text(text.replace("nms_type", "nms_kind"))
    assert config_doc.main(["--check", str(stale)]) == 1


def test_overrides_are_applied_then_validated():
    """load_config(..., overrides): KEY.PATH=VALUE (VALUE as YAML) before validation; malformed items are refused."""
    from cmfiou_core.config import ConfigError, apply_overrides
    from cmfiou_core.model.model_config import load_config
    from cmfiou_core.resources import config as config_path

    cfg = load_config(config_path("cmfiou_kitti.yaml"), ["data.augment.photometric=true",
                                                         "data.augment.photo_noise_std=3.5",
                                                         "data.augment.photo_gain_range=[0.9, 1.1]"])
    aug = cfg.dataset.augment
    assert aug.photometric and aug.photo_noise_std == 3.5 and aug.photo_gain_range == (0.9, 1.1)
    assert "--set data.augment.photometric=true" in cfg.source
    for bad, match in (("data.augment.photometric", "KEY.PATH=VALUE"), ("data..x=1", "KEY.PATH=VALUE"),
                       ("data.use_van.x=1", "'data.use_van' is a bool"), ("data.augment.photometric=[1,", "YAML")):
        with pytest.raises(ConfigError, match=match):
            apply_overrides({"data": {"use_van": True}}, [bad])
    with pytest.raises(ConfigError, match="photo_noise_std"):
        load_config(config_path("cmfiou_kitti.yaml"), ["data.augment.photo_noise_std=-1"])
