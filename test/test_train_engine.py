"""Training engine (cmfiou_core.train) on CPU with a small real torch model and synthetic point-cloud frames."""
import math
import time

import pytest
import torch

from cmfiou_core.train import (CKPT_KEYS, OneCycle, TrainConfig, Trainer, build_adam_onecycle, cos_anneal,
                               export_fp16, load_model_weights, seed_everything)
from cmfiou_core.train.data import ResumableDistributedSampler, SeededDataset
from cmfiou_core.train.toy import ToyPointDataset, ToyPointNet, toy_collate


def _trainer(tmp_path, name="run", *, model_seed=0, dropout=0.1, n=48, **kw):
    base = dict(epochs=3, batch_size=8, lr=0.01, workers=0, out_dir=str(tmp_path / name), log_every=5,
                progress=False, tensorboard=False)
    base.update(kw)
    seed_everything(model_seed)
    model = ToyPointNet(dropout=dropout)
    return Trainer(model, ToyPointDataset(n), TrainConfig(**base), collate_fn=toy_collate)


def _losses(history):
    return [h["loss"] for h in history]


# ------------------------------------------------------------------------------------------------------- optimizer
def test_onecycle_key_points():
    p = torch.nn.Parameter(torch.zeros(3))
    opt = build_adam_onecycle([p], 0.01)
    sch = OneCycle(opt, 100, 0.01, div_factor=10, final_div_factor=1e4, pct_start=0.4, moms=(0.95, 0.85))
    g = opt.param_groups[0]
    assert len(opt.param_groups) == 1 and g["weight_decay"] == 0.01 and g["betas"] == (0.95, 0.99)
    assert g["lr"] == pytest.approx(0.001)                       # start: LR / 10, beta1 0.95
    expect = {0: (0.001, 0.95), 20: (0.0055, 0.90), 40: (0.01, 0.85), 70: ((0.01 + 1e-7) / 2, 0.90),
              100: (1e-7, 0.95)}
    for it, (lr, mom) in expect.items():
        got_lr, got_mom = sch.step(it)
        assert got_lr == pytest.approx(lr, rel=1e-12) and got_mom == pytest.approx(mom, rel=1e-12), it
        assert g["lr"] == got_lr and g["betas"] == (got_mom, 0.99)
    # formula at an arbitrary point of each phase
    assert sch.lr_at(13) == pytest.approx(cos_anneal(0.001, 0.01, 13 / 40))
    assert sch.mom_at(77) == pytest.approx(cos_anneal(0.85, 0.95, 37 / 60))
    # monotone: up over phase 1, down over phase 2
    lrs = [sch.lr_at(i) for i in range(101)]
    assert all(a < b for a, b in zip(lrs[:40], lrs[1:41])) and all(a > b for a, b in zip(lrs[40:100], lrs[41:]))
    # official run: 20 epochs x 928 it, phase boundary int(0.4 * total) (OpenPCDet LRSchedulerStep)
    sch2 = OneCycle(opt, 20 * 928, 0.005)
    assert sch2.phase1_end == 7424 and sch2.lr_at(7424) == pytest.approx(0.005)
    # state round trip
    sch.step(57)
    sch3 = OneCycle(build_adam_onecycle([torch.nn.Parameter(torch.zeros(1))], 1.0), 5, 1.0)
    sch3.load_state_dict(sch.state_dict())
    assert sch3.values_at(sch3.last_it) == sch.values_at(57) and sch3.total_steps == 100


def test_adamw_decay_is_decoupled_and_on_all_params():
    bn = torch.nn.BatchNorm1d(4)
    with torch.no_grad():
        bn.weight.fill_(2.0)
        bn.bias.fill_(1.0)
    opt = build_adam_onecycle(bn, 0.1)
    sch = OneCycle(opt, 10, 0.1)
    lr = opt.param_groups[0]["lr"]
    for p in bn.parameters():
        p.grad = torch.zeros_like(p)  # zero gradient: Adam update is 0, only the decay acts
    opt.step()
    assert torch.allclose(bn.weight, torch.full((4,), 2.0 * (1 - lr * 0.01)))
    assert torch.allclose(bn.bias, torch.full((4,), 1.0 * (1 - lr * 0.01)))
    assert sch.progress == 0


# ------------------------------------------------------------------------------------------------------- data
def test_sampler_matches_distributed_sampler_and_resumes():
    ds = list(range(20))
    full = [i for _, i in ResumableDistributedSampler(ds, 2, 1, seed=3)]
    ref = torch.utils.data.DistributedSampler(ds, num_replicas=2, rank=1, seed=3)
    ref.set_epoch(0)
    assert full == list(ref)
    s = ResumableDistributedSampler(ds, 2, 1, seed=3)
    s.set_epoch(4, start=3)
    ref.set_epoch(4)
    assert [i for _, i in s] == list(ref)[3:] and len(s) == 7 and all(e == 4 for e, _ in s)


def test_seeded_dataset_is_order_independent():
    ds = SeededDataset(ToyPointDataset(8), seed=5)
    a = ds[(2, 3)]["points"]
    _ = ds[(2, 4)]
    torch.rand(3)
    assert (ds[(2, 3)]["points"] == a).all() and not (ds[(3, 3)]["points"] == a).all()


# ------------------------------------------------------------------------------------------------------- training
def test_loss_goes_down(tmp_path):
    tr = _trainer(tmp_path, epochs=5, dropout=0.0)
    res = tr.fit()
    ipe = tr.iters_per_epoch
    first, last = _losses(res.history[:ipe]), _losses(res.history[-ipe:])
    assert res.status == "completed" and res.it == 5 * ipe
    assert sum(last) / len(last) < 0.5 * sum(first) / len(first)
    assert int(tr.model.global_step) == res.it
    assert (tmp_path / "run" / "metrics.jsonl").read_text().count("train/grad_norm") >= 1


def test_resume_is_bit_identical_and_checkpoint_is_weights_only(tmp_path):
    ref = _trainer(tmp_path, "ref").fit()                        # uninterrupted: 3 epochs x 6 it
    stop_at = 8                                                 # mid-epoch 2
    part = _trainer(tmp_path, "part", max_iters=stop_at).fit()
    assert part.status == "max_iters" and part.it == stop_at
    assert _losses(part.history) == _losses(ref.history[:stop_at])

    ckpt = torch.load(part.checkpoint, weights_only=True, map_location="cpu")
    assert set(ckpt) == set(CKPT_KEYS) and ckpt["it"] == stop_at and ckpt["epoch"] == 1
    assert not any(k.startswith("module.") for k in ckpt["model_state"])
    plain = ToyPointNet(dropout=0.1)
    load_model_weights(plain, ckpt)  # strict

    # fresh process state: different init seed and RNG, 2 workers instead of 0 -> must not matter
    resumed = _trainer(tmp_path, "part", model_seed=99, workers=2)
    torch.manual_seed(12345)
    res = resumed.fit(resume=part.checkpoint)
    assert res.status == "completed" and res.it == ref.it
    assert _losses(res.history) == _losses(ref.history[stop_at:])            # bit-identical
    assert [h["lr"] for h in res.history] == [h["lr"] for h in ref.history[stop_at:]]
    a, b = torch.load(res.checkpoint, weights_only=True), torch.load(ref.checkpoint, weights_only=True)
    for k, v in a["model_state"].items():
        assert torch.equal(v, b["model_state"][k]), k


def test_max_minutes_stops_and_saves(tmp_path):
    budget_min = 0.04  # 2.4 s
    t0 = time.time()
    tr = _trainer(tmp_path, epochs=10_000, max_minutes=budget_min, n=32)
    res = tr.fit()
    elapsed = time.time() - t0
    assert res.status == "time_budget" and 0 < res.it < tr.total_iters
    assert elapsed < budget_min * 60 + 2.0
    ckpt = torch.load(res.checkpoint, weights_only=True)
    assert ckpt["it"] == res.it and ckpt["meta"]["status"] == "time_budget"
    # the saved state continues (a second budgeted run resumes from it)
    tr2 = _trainer(tmp_path, epochs=10_000, max_minutes=0.01, n=32)
    res2 = tr2.fit(resume=res.checkpoint)
    assert res2.it >= res.it


def test_time_schedule_anneals_within_budget(tmp_path):
    tr = _trainer(tmp_path, epochs=10_000, max_minutes=0.03, time_schedule=True, n=32, lr=0.01)
    res = tr.fit()
    lrs = [h["lr"] for h in res.history]
    assert res.status == "time_budget"
    assert max(lrs) > 0.009 and lrs[-1] < 0.002 and lrs[0] < 0.002


def test_eval_hook_every_n_epochs(tmp_path):
    calls = []

    def eval_fn(model, epoch):
        calls.append((epoch, model.training, torch.is_grad_enabled()))
        return {"score": float(epoch)}

    seed_everything(0)
    tr = Trainer(ToyPointNet(), ToyPointDataset(16), TrainConfig(epochs=4, batch_size=8, workers=0, eval_every=2,
                 out_dir=str(tmp_path / "ev"), progress=False, tensorboard=False), collate_fn=toy_collate,
                 eval_fn=eval_fn)
    res = tr.fit()
    assert calls == [(2, False, False), (4, False, False)] and res.evals == {2: {"score": 2.0}, 4: {"score": 4.0}}
    assert tr.model.training and (tmp_path / "ev" / "eval_epoch_4.json").is_file()


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_amp_on_cpu_runs(tmp_path, amp):
    tr = _trainer(tmp_path, epochs=1, amp=amp, max_iters=3)
    res = tr.fit()
    assert res.it == 3 and all(math.isfinite(h["loss"]) for h in res.history)
    ckpt = torch.load(res.checkpoint, weights_only=True)
    assert (ckpt["meta"]["scaler_state"] is not None) == (amp == "fp16")


def test_nonfinite_gradients_skip_the_step(tmp_path):
    tr = _trainer(tmp_path, epochs=1, max_iters=2)
    orig = tr.model.forward

    def bad_forward(batch):
        loss, tb = orig(batch)
        return loss * float("nan"), tb

    tr.model.forward = bad_forward
    before = {k: v.clone() for k, v in tr.model.state_dict().items() if v.is_floating_point()}
    res = tr.fit()
    after = tr.model.state_dict()
    assert tr.skipped_steps == 2 and res.it == 2
    for k, v in before.items():
        if "running" not in k:  # BN running stats still update in the forward pass
            assert torch.equal(v, after[k]), k


def test_nonfinite_gradients_are_named(tmp_path):
    """A skipped step reports exactly the parameters whose gradients are non-finite (jsonl + warning)."""
    import json

    tr = _trainer(tmp_path, epochs=1, max_iters=3, nonfinite_reports=2)
    name, param = list(tr.model.named_parameters())[-1]
    param.register_hook(lambda g: g * float("inf"))
    tr.fit()
    assert tr.skipped_steps == 3
    recs = [json.loads(line) for line in (tmp_path / "run" / "nonfinite_steps.jsonl").read_text().splitlines()]
    assert len(recs) == 2  # capped by nonfinite_reports
    assert all(r["n_params_nonfinite"] == 1 for r in recs)
    assert recs[0]["modules"] == [name.rsplit(".", 2)[0]] and math.isfinite(recs[0]["loss"])


def test_export_fp16(tmp_path, capsys):
    res = _trainer(tmp_path, epochs=1).fit()
    info = export_fp16(res.checkpoint, tmp_path / "demo.pth", max_mb=40)
    ex = torch.load(tmp_path / "demo.pth", weights_only=True)
    assert ex["optimizer_state"] is None and ex["meta"]["export"] == "fp16" and "rng" not in ex["meta"]
    st = ex["model_state"]
    assert st["head.weight"].dtype == torch.float16 and st["point_mlp.1.running_var"].dtype == torch.float32
    assert st["global_step"].dtype == torch.int64 and info["size_mb"] < 1
    m = ToyPointNet()
    load_model_weights(m, tmp_path / "demo.pth")
    full = torch.load(res.checkpoint, weights_only=True)["model_state"]
    assert m.head.weight.dtype == torch.float32
    assert torch.allclose(m.head.weight, full["head.weight"], rtol=1e-3, atol=1e-4)
    with pytest.raises(ValueError):
        export_fp16(res.checkpoint, tmp_path / "small.pth", max_mb=1e-4)
    assert not (tmp_path / "small.pth").exists()
    # the command line: the summary line, or one error line and exit code 1
    from cmfiou_core.train import export
    assert export.main([str(res.checkpoint), str(tmp_path / "cli.pth")]) == 0
    assert capsys.readouterr().out.startswith(f"wrote {tmp_path / 'cli.pth'}: ")
    assert export.main([str(res.checkpoint), str(tmp_path / "small.pth"), "--max-mb", "1e-4"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("export failed: fp16 export is ") and "> limit 0.0001 MB" in err and "Traceback" not in err
    assert not (tmp_path / "small.pth").exists()


def test_resume_rejects_changed_schedule(tmp_path):
    res = _trainer(tmp_path, epochs=2, max_iters=3).fit()
    with pytest.raises(ValueError, match="schedule"):
        _trainer(tmp_path, epochs=3).fit(resume=res.checkpoint)
    with pytest.raises(ValueError, match="iterations/epoch"):
        _trainer(tmp_path, epochs=2, batch_size=4).fit(resume=res.checkpoint)


def test_cli_toy_end_to_end(tmp_path):
    from cmfiou_core.tools.train import main
    out = tmp_path / "cli"
    assert main(["--toy", "--epochs", "1", "--out", str(out), "--no-progress", "--no-tensorboard",
                 "--export-fp16", str(out / "demo.pth")]) == 0
    assert (out / "ckpt" / "latest.pth").is_file() and (out / "demo.pth").is_file()
    assert main(["--toy", "--epochs", "1", "--out", str(out), "--no-progress", "--no-tensorboard",
                 "--resume", str(out / "ckpt" / "latest.pth")]) == 0  # already complete: returns at once


def test_optimization_section_validation():
    from cmfiou_core.config import ConfigError
    from cmfiou_core.tools.train import optimization_settings
    s = optimization_settings({"optimization": {"lr": 0.01, "epochs": 3}})
    assert s["lr"] == 0.01 and s["epochs"] == 3 and s["moms"] == [0.95, 0.85] and s["pct_start"] == 0.4
    with pytest.raises(ConfigError, match="unknown"):
        optimization_settings({"optimization": {"lr_max": 0.01}})


def test_sigterm_stops_cleanly_and_saves(tmp_path):
    import os
    import signal
    tr = _trainer(tmp_path, epochs=50, workers=2)
    orig = tr.model.forward

    def fwd(batch):
        if tr.it == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return orig(batch)

    tr.model.forward = fwd
    prev = signal.getsignal(signal.SIGTERM)
    res = tr.fit()
    assert res.status == "signal" and res.it == 4
    assert signal.getsignal(signal.SIGTERM) is prev  # handler restored
    assert torch.load(res.checkpoint, weights_only=True)["meta"]["status"] == "signal"


def test_cli_prepare_adapter_feeds_prepare_batch():
    """cmfiou-train's glue: collate_batch output -> model.detector.prepare_batch (with/without pseudo points)."""
    pytest.importorskip("spconv")
    import numpy as np
    from cmfiou_core.data.collate import collate_batch
    from cmfiou_core.data.synthetic import kitti_calibration
    from cmfiou_core.model.model_config import load_config
    from cmfiou_core.tools.train import _make_prepare_fn, default_config
    full = load_config(default_config())
    rng = np.random.default_rng(0)

    def item(n_raw, n_ps, n_gt):
        pts = np.concatenate([rng.uniform([1, -30, -2], [60, 30, 0.5], (n_raw + n_ps, 3)),
                              rng.uniform(0, 1, (n_raw + n_ps, 4))], 1).astype(np.float32)
        flag = np.r_[np.full(n_raw, 2.0), np.full(n_ps, 1.0)].astype(np.float32)[:, None]
        pts = np.concatenate([pts, flag], 1)
        gt = np.concatenate([rng.uniform([5, -10, -1, 3, 1.5, 1.4, -3], [40, 10, -0.5, 4.5, 2, 1.7, 3], (n_gt, 7)),
                             np.ones((n_gt, 1))], 1).astype(np.float32)
        return {"points": pts[:n_raw], "points_mm": pts[n_raw:], "gt_boxes": gt, "aug_param": [0.1, 0, 1.0],
                "image_shape": [375, 1242], "calib": kitti_calibration(), "frame_id": "000000"}

    batch = collate_batch([item(500, 300, 2), item(400, 200, 3)])
    out = _make_prepare_fn(full, no_pseudo=False)(batch, torch.device("cpu"))
    assert out["batch_size"] == 2 and out["points"].shape == (900, 9) and out["points_mm"].shape == (500, 9)
    assert set(out["voxel_coords"][:, 0].tolist()) == {0, 1} and out["gt_boxes"].shape == (2, 3, 8)
    assert out["gt_boxes"][0, 2].abs().sum() == 0 and out["aug_param"].shape == (2, 3)
    lidar_only = _make_prepare_fn(full, no_pseudo=True)(batch, torch.device("cpu"))
    assert lidar_only["voxels_mm"].shape[0] == 0 and lidar_only["points_mm"].shape == (0, 9)
    assert torch.equal(lidar_only["voxels"], out["voxels"])


def test_grad_probe_locates_the_exploding_module(tmp_path):
    """A step whose gradient explodes gets a per-module record; reading it from the loss end backwards, the gradients
    are ordinary down to the module whose output gradient was blown up (a hook multiplies it by 1e12) and huge
    upstream of it -- the jump names the place."""
    import json

    tr = _trainer(tmp_path, epochs=1, max_iters=2, grad_probe=1e6, grad_clip=0)
    target = dict(tr.model.named_modules())["point_mlp.4"]  # Linear inside point_mlp; the head comes after it
    target.register_forward_hook(lambda m, i, o: o.register_hook(lambda g: g * 1e12) and None)
    tr.fit()
    recs = [json.loads(x) for x in (tmp_path / "run" / "grad_probe.jsonl").read_text().splitlines()]
    assert len(recs) == 2 and recs[0]["grad_norm"] > 1e6
    rows = {r["module"]: r["grad_max"] for r in recs[0]["modules"]}
    assert [r["module"] for r in recs[0]["modules"]][-1] == "head"  # forward order
    assert rows["head"] < 1e3 and rows["point_mlp.5"] < 1e3 and rows["point_mlp.4"] < 1e3  # downstream: ordinary
    assert rows["point_mlp.3"] > 1e6 and rows["point_mlp.0"] > 1e6                          # upstream: exploded
