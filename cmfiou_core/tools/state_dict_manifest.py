"""Print the model's state_dict manifest: one ``key shape dtype`` line per entry, in order, in the format of the
official key list (``(64, 3, 3, 3, 8) float32``, ``() int64`` for scalars).

    python -m cmfiou_core.tools.state_dict_manifest --config config/cmfiou_kitti_official.yaml [--dense-only]
"""
from __future__ import annotations

import argparse
import sys
from typing import Iterable, List

import torch


def manifest_lines(state_dict) -> List[str]:
    out = []
    for k, v in state_dict.items():
        shape = "(" + ", ".join(str(int(s)) for s in v.shape) + ("," if v.dim() == 1 else "") + ")"
        out.append(f"{k} {shape} {str(v.dtype).replace('torch.', '')}")
    return out


def main(argv: Iterable[str] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", required=True, help="model YAML (e.g. config/cmfiou_kitti_official.yaml)")
    ap.add_argument("--dense-only", action="store_true", help="build without the RoI head")
    args = ap.parse_args(list(argv) if argv is not None else None)
    from ..model.detector import build_model
    from ..model.model_config import load_config

    with torch.device("meta"):
        model = build_model(load_config(args.config), with_roi_head=not args.dense_only)
    for line in manifest_lines(model.state_dict()):
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
