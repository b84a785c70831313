#!/usr/bin/env python3
"""``python scripts/checkpoint_meta.py [--checkpoint CKPT] --json OUT``: write what a checkpoint records about its own
training (iterations, epochs, training time, skipped steps, batch size, the trainer's command line, torch, date: the
trainer's ``meta`` block and ``it`` / ``epoch``) as a results JSON with provenance (the checkpoint's SHA-256).

Default checkpoint: the bundled demo checkpoint. Only what the file itself holds is reported; nothing is derived.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", default="", help="weights file ('' = the bundled demo checkpoint)")
    ap.add_argument("--json", required=True)
    a = ap.parse_args(argv)
    from cmfiou_core.model.checkpoint import read_checkpoint
    from cmfiou_core.pipeline import demo_checkpoint
    from cmfiou_core.provenance import write_report

    path = Path(a.checkpoint) if a.checkpoint else demo_checkpoint()
    ck = read_checkpoint(path)
    meta = ck.get("meta")
    if not isinstance(meta, dict):
        print(f"checkpoint_meta: {path} has no trainer 'meta' block (not a cmfiou-train checkpoint)", file=sys.stderr)
        return 2
    report = {
        "what": "the training record the checkpoint file itself holds (cmfiou-train meta)",
        "iterations": ck.get("it"), "epochs": ck.get("epoch"),
        "time_used_s": meta.get("time_used_s"), "skipped_steps": meta.get("skipped_steps"),
        "batch_size": meta.get("batch_size"), "world_size": meta.get("world_size"),
        "iters_per_epoch": meta.get("iters_per_epoch"), "amp": meta.get("amp"), "no_pseudo": meta.get("no_pseudo"),
        "status": meta.get("status"), "export": meta.get("export"), "trained_with_torch": meta.get("torch"),
        "created": meta.get("created"), "train_argv": meta.get("argv"),
        "training_config": ck.get("config"),
    }
    write_report(a.json, report, config=None, checkpoint=str(path), device="cpu")
    print({k: v for k, v in report.items() if k not in ("training_config", "train_argv")})
    return 0


if __name__ == "__main__":
    sys.exit(main())
