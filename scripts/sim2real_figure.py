"""Side-by-side picture: a generated frame (BEV of the LiDAR + camera image) next to a real KITTI frame.

    python scripts/sim2real_figure.py --out docs/sim2real_kitti_v2.png [--seed 5 --index 0 --profile kitti_v2]
        [--real ../shared/kitti_samples/object/training --real-id 000001]

Only looks at the real frame (points + image); its labels are not read.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np


def bev(ax, pts, title, boxes=None):
    m = (pts[:, 0] > -5) & (pts[:, 0] < 70) & (np.abs(pts[:, 1]) < 35)
    p = pts[m]
    ax.scatter(-p[:, 1], p[:, 0], s=0.4, c=p[:, 3], cmap="viridis", vmin=0, vmax=0.6, linewidths=0)
    if boxes is not None:
        from cmfiou_core.geometry.boxes import boxes_to_corners_3d

        for c in boxes_to_corners_3d(np.asarray(boxes, dtype=np.float64))[:, :4, :2]:
            c = np.r_[c, c[:1]]
            ax.plot(-c[:, 1], c[:, 0], "r-", lw=0.6)
    ax.set_xlim(-35, 35)
    ax.set_ylim(-5, 70)
    ax.set_aspect("equal")
    ax.set_title(title, fontsize=8)
    ax.tick_params(labelsize=6)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=5)
    ap.add_argument("--index", type=int, default=0)
    ap.add_argument("--profile", default="kitti_v2")
    ap.add_argument("--real", default=str(Path(__file__).resolve().parents[1].parent / "shared" / "kitti_samples" /
                                          "object" / "training"))
    ap.add_argument("--real-id", default="000001")
    a = ap.parse_args(argv)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    from cmfiou_core.data.synth.scene import profile_config
    from cmfiou_core.data.synthetic import generate_frame

    fr = generate_frame(a.seed, a.index, profile_config(a.profile))
    real = Path(a.real)
    rp = np.fromfile(real / "velodyne" / f"{a.real_id}.bin", dtype=np.float32).reshape(-1, 4)
    rimg = np.asarray(Image.open(real / "image_2" / f"{a.real_id}.png").convert("RGB"))
    fig, ax = plt.subplots(2, 2, figsize=(12, 8), gridspec_kw={"height_ratios": [1, 2.2]})
    ax[0, 0].imshow(fr.image)
    ax[0, 0].set_title(f"generated ({a.profile}, seed {a.seed}, frame {a.index}): camera", fontsize=8)
    ax[0, 1].imshow(rimg)
    ax[0, 1].set_title(f"real KITTI object/training {a.real_id}: camera", fontsize=8)
    for x in ax[0]:
        x.axis("off")
    bev(ax[1, 0], fr.points, f"generated: LiDAR BEV ({fr.points.shape[0]} points; red = labelled boxes)",
        fr.boxes_lidar[fr.labelled])
    bev(ax[1, 1], rp, f"real: LiDAR BEV ({rp.shape[0]} points; labels not shown)")
    fig.tight_layout()
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(a.out, dpi=110)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
