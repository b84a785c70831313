"""The model's state_dict reproduces the official key list exactly (all 874 ``key shape dtype`` lines, in order)."""
from pathlib import Path

import torch

from cmfiou_core.model.detector import build_model
from cmfiou_core.model.model_config import load_config
from cmfiou_core.tools.state_dict_manifest import main, manifest_lines

REPO = Path(__file__).resolve().parents[1]


def _official_lines(shared_dir):
    p = shared_dir / "cmfiou_mm_state_dict_keys.txt"
    return [ln.rstrip("\n") for ln in p.read_text().splitlines() if ln.strip() and not ln.startswith("#")]


def test_manifest_cli_equals_official_key_file(shared_dir, capsys):
    ref = _official_lines(shared_dir)
    assert len(ref) == 874
    assert main(["--config", str(REPO / "config/cmfiou_kitti_official.yaml")]) == 0
    got = capsys.readouterr().out.splitlines()
    assert got == ref   # full comparison, roi_head.* included


def test_our_config_adds_only_the_iou_branch(shared_dir):
    ref = _official_lines(shared_dir)
    with torch.device("meta"):
        m = build_model(load_config(REPO / "config/cmfiou_kitti.yaml"))
    got = manifest_lines(m.state_dict())
    extra = [ln for ln in got if ln not in ref]
    assert [ln for ln in got if ln in ref] == ref
    assert extra and all(ln.startswith("roi_head.iou_layers.") for ln in extra)
