"""Training engine (model-agnostic): Adam one-cycle, Trainer (AMP, clipping, checkpoints, resume, DDP, budgets),
fp16 export.  See ``cmfiou_core/tools/train.py`` for the ``cmfiou-train`` CLI that plugs in the detector."""
from .checkpoint import CKPT_KEYS, load_checkpoint, load_model_weights, save_checkpoint, unwrap_model
from .dist import DistInfo, cleanup_distributed, init_distributed, seed_everything
from .export import export_fp16
from .optim import OneCycle, build_adam_onecycle, cos_anneal
from .trainer import FitResult, TrainConfig, Trainer, unpack_model_output

__all__ = ["CKPT_KEYS", "load_checkpoint", "load_model_weights", "save_checkpoint", "unwrap_model", "DistInfo",
           "cleanup_distributed", "init_distributed", "seed_everything", "export_fp16", "OneCycle",
           "build_adam_onecycle", "cos_anneal", "FitResult", "TrainConfig", "Trainer", "unpack_model_output"]
