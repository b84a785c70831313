#!/usr/bin/env python3
"""One spconv submanifold convolution of the model, taken out of a real frame and checked against a dense reference.

The input of ``--module`` (a ``SparseSequential`` whose first child is a ``SubMConv2d`` / ``SubMConv3d``; default the
first ResVC image-plane convolution) is recorded while the eager pipeline runs a frame. The convolution is then run
again on fresh copies of that input (no cached kernel maps) with each spconv algorithm, several times, and compared
with the same convolution done densely by torch (scatter the sites into a dense grid, ``conv2d`` / ``conv3d`` in IEEE
fp32, read the sites back: a submanifold convolution is exactly that). Says whether spconv's result is reproducible and
whether it is right, per algorithm, and what the input looks like (sites, duplicates, index ranges).

    python bench/spconv_probe.py --device cuda --kitti KITTI/training --json out/spconv_probe.json
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Dict

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))


def dense_subm(weight, x):
    """Submanifold convolution of SparseConvTensor ``x`` with spconv weight ``weight`` (KRSC: (Cout, *k, Cin)),
    done densely in float64 -> (N, Cout) at x's rows."""
    import torch.nn.functional as F

    idx = x.indices.long()
    nd = idx.shape[1] - 1
    shape = [int(s) for s in x.spatial_shape]
    feats = x.features.double()
    grid = feats.new_zeros((int(x.batch_size), feats.shape[1], *shape))
    grid[(idx[:, 0], slice(None), *[idx[:, d + 1] for d in range(nd)])] = feats
    w = weight.double().permute(0, nd + 1, *range(1, nd + 1))        # (Cout, Cin, *k)
    pad = [int(k) // 2 for k in w.shape[2:]]
    out = (F.conv2d if nd == 2 else F.conv3d)(grid, w, padding=pad)
    return out[(idx[:, 0], slice(None), *[idx[:, d + 1] for d in range(nd)])].float()


def main(argv=None) -> int:
    from benchutil import pipeline_arg_parser

    ap = pipeline_arg_parser(__doc__)
    ap.add_argument("--frame", type=int, default=0, help="index of the frame among the inputs")
    ap.add_argument("--module", default="backbone_3d.vir_conv1.d2_conv1")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    import spconv.pytorch as spconv
    import torch
    from bench_pipeline import load_frames
    from spconv.core import ConvAlgo

    from cmfiou_core.engine.sparse import linear_keys
    from cmfiou_core.pipeline import Pipeline
    from cmfiou_core.provenance import write_report

    frames = load_frames(args.kitti, 0, Path("/tmp"), args.frame + 1)
    fname, frame = frames[args.frame]
    pipe = Pipeline.from_config(args.config, args.checkpoint, args.device, engine="eager", precision="fp32")
    seq = dict(pipe.model.named_modules())[args.module]
    conv = seq[0] if isinstance(seq, spconv.SparseSequential) else seq
    box: Dict[str, Any] = {}

    def pre(m, a):
        box.setdefault("x", a[0])
    h = conv.register_forward_pre_hook(pre)
    pipe(frame)
    h.remove()
    x = box["x"]
    idx = x.indices.long()
    shape = [int(s) for s in x.spatial_shape]
    key = linear_keys(idx, shape)
    info = {"frame": fname, "module": args.module, "conv": repr(conv), "algo": str(conv.algo),
            "sites": int(idx.shape[0]), "unique_sites": int(torch.unique(key).numel()),
            "spatial_shape": shape, "batch_size": int(x.batch_size),
            "index_min": idx.min(0).values.tolist(), "index_max": idx.max(0).values.tolist(),
            "features": [list(x.features.shape), str(x.features.dtype), bool(x.features.is_contiguous())],
            "indices": [list(x.indices.shape), str(x.indices.dtype), bool(x.indices.is_contiguous())]}
    print(info, flush=True)
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    with torch.no_grad():
        ref = dense_subm(conv.weight, x)
        scale = float(ref.abs().max())
        results = {}
        order = torch.argsort(key)
        for algo in (ConvAlgo.MaskImplicitGemm, ConvAlgo.MaskSplitImplicitGemm, ConvAlgo.Native):
            for sort in (False, True):
                name = f"{algo.name}{' sorted' if sort else ''}"
                try:
                    c = type(conv)(conv.in_channels, conv.out_channels, conv.kernel_size, bias=False,
                                   indice_key="probe", algo=algo).to(x.features.device)
                    c.load_state_dict(conv.state_dict())
                    c.eval()
                    runs = []
                    for _ in range(args.repeats):
                        f, i = (x.features[order], x.indices[order]) if sort else (x.features, x.indices)
                        t = spconv.SparseConvTensor(f.clone().contiguous(), i.clone().contiguous(), shape,
                                                    x.batch_size)
                        out = c(t).features
                        if sort:
                            out = out[torch.argsort(order)]
                        runs.append(out.float())
                    err = [float((r - ref).abs().max()) / scale for r in runs]
                    spread = max(float((r - runs[0]).abs().max()) for r in runs) / scale
                    results[name] = {"max_rel_err_vs_dense": err, "run_to_run_rel": spread}
                except Exception as e:   # an algorithm this build / shape does not take
                    results[name] = {"error": f"{type(e).__name__}: {e}"[:300]}
                print(name, results[name], flush=True)
    write_report(args.json, {"what": "one spconv SubM convolution of a real frame vs a dense torch convolution",
                             "input": info, "dense_scale": scale, "results": results},
                 config=args.config, checkpoint=args.checkpoint or None, device=args.device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
