"""Data: synthetic KITTI-layout scenes (``synthetic``), KITTI label I/O (``labels``), infos + dataset (``kitti``),
GT database (``gt_database``), training augmentation (``augment``) and batching (``collate``).

Submodules are imported explicitly (``from cmfiou_core.data.kitti import KittiDataset``) to keep imports light.
"""
