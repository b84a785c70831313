"""DistributedDataParallel through torchrun: 2 CPU processes (gloo) vs one process at the same global batch size.

The test launches this file under ``python -m torch.distributed.run --standalone --nproc_per_node=2``; the worker
(``__main__`` branch) trains the toy model and writes rank 0's loss curve.  It also trains a BatchNorm model to check
that SyncBatchNorm conversion is skipped on CPU and that the rank-0 checkpoint is saved unwrapped.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
GLOBAL_BATCH, N_FRAMES, EPOCHS = 8, 32, 3


def _cfg(out_dir, batch_size, **kw):
    from cmfiou_core.train import TrainConfig
    base = dict(epochs=EPOCHS, batch_size=batch_size, lr=0.01, workers=0, out_dir=str(out_dir), log_every=2,
                progress=False, tensorboard=False)
    base.update(kw)
    return TrainConfig(**base)


def _run(out_dir, batch_size, dist_info=None, norm="none", **kw):
    from cmfiou_core.train import Trainer, seed_everything
    from cmfiou_core.train.toy import ToyPointDataset, ToyPointNet, toy_collate
    seed_everything(0)
    model = ToyPointNet(norm=norm, dropout=0.0)
    tr = Trainer(model, ToyPointDataset(N_FRAMES), _cfg(out_dir, batch_size, **kw), collate_fn=toy_collate,
                 dist_info=dist_info)
    return tr, tr.fit()


def _worker(out_dir: Path) -> None:
    torch.set_num_threads(1)
    from cmfiou_core.train import cleanup_distributed, init_distributed
    info = init_distributed("cpu")
    assert info.world_size == 2 and info.backend == "gloo"
    tr, res = _run(out_dir / "ddp", GLOBAL_BATCH // 2, info)
    assert isinstance(tr.train_model, torch.nn.parallel.DistributedDataParallel)
    # BatchNorm model: SyncBN is CUDA-only, so on CPU the BN layers stay plain BatchNorm1d
    tr_bn, res_bn = _run(out_dir / "ddp_bn", GLOBAL_BATCH // 2, info, norm="bn", epochs=1, max_iters=2)
    n_sync = sum(isinstance(m, torch.nn.SyncBatchNorm) for m in tr_bn.model.modules())
    if info.rank == 0:
        (out_dir / "ddp_result.json").write_text(json.dumps({
            "losses": [h["loss"] for h in res.history], "checkpoint": res.checkpoint, "bn_checkpoint":
            res_bn.checkpoint, "n_syncbn": n_sync, "iters_per_epoch": tr.iters_per_epoch}))
    cleanup_distributed()


@pytest.mark.timeout(120)
def test_ddp_two_processes_match_single_process(tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(Path(__file__).resolve()), str(tmp_path)]
    p = subprocess.run(cmd, env=env, cwd=str(tmp_path), capture_output=True, text=True, timeout=110)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    ddp = json.loads((tmp_path / "ddp_result.json").read_text())

    tr, single = _run(tmp_path / "single", GLOBAL_BATCH)
    assert ddp["iters_per_epoch"] == tr.iters_per_epoch == N_FRAMES // GLOBAL_BATCH
    ref = [h["loss"] for h in single.history]
    assert len(ddp["losses"]) == len(ref) == EPOCHS * tr.iters_per_epoch
    assert ddp["losses"] == pytest.approx(ref, rel=1e-4, abs=1e-6)
    assert ddp["losses"][-1] < 0.7 * ddp["losses"][0]

    from cmfiou_core.train import load_model_weights
    from cmfiou_core.train.toy import ToyPointNet
    ck = torch.load(ddp["checkpoint"], weights_only=True)
    assert not any(k.startswith("module.") for k in ck["model_state"])
    assert ck["meta"]["world_size"] == 2 and len(ck["meta"]["rng"]) == 2 and ck["meta"]["global_batch_size"] == 8
    plain = ToyPointNet(norm="none")
    load_model_weights(plain, ck)  # strict: loads into a plain single-GPU model
    for k, v in plain.state_dict().items():
        assert torch.allclose(v.float(), single_state(tr)[k].float(), rtol=1e-3, atol=1e-5), k

    assert ddp["n_syncbn"] == 0
    ck_bn = torch.load(ddp["bn_checkpoint"], weights_only=True)
    load_model_weights(ToyPointNet(norm="bn"), ck_bn)


def single_state(tr):
    return tr.model.state_dict()


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    _worker(Path(sys.argv[1]))
