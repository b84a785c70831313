"""Deterministic synthetic street scenes in the KITTI object layout (LiDAR + camera + labels).

Geometry (LiDAR frame, x forward, y left, z up, sensor at the origin, 1.73 m above a flat ground plane):
- a straight street (random width and yaw) with lane markings, sidewalks, buildings (boxes), poles (cylinders),
  trees (trunk + canopy cylinders);
- objects: Car (body + cabin boxes), Van (one box), Pedestrian (body + head cylinders), Cyclist (bike box + rider
  cylinder), each inside its label box.

Sensors share one ray caster (nearest hit per ray = occlusion): per primitive only the rays of its conservative
screen rectangle (LiDAR: beam x azimuth grid; camera: pixel grid) are intersected, all of them at once in numpy.
- LiDAR: HDL-64E-like, 64 beams (upper block 32 lasers +2.0..-8.33 deg, lower block 32 lasers -8.83..-24.9 deg),
  2083 azimuth steps (0.1728 deg), 120 m max range, intensity = material reflectivity x (0.35 + 0.65 |cos incidence|)
  + noise, random dropout, range noise.
- Camera: KITTI P2/R0/Tr (2011_09_26 calibration), 1242x375; each pixel's ray is the exact inverse of the P2
  projection, so projected 3D points land on the pixels that see them; Lambertian shading, sky gradient, road
  texture, lane markings, sensor noise.
- Labels: KITTI text (2 decimals). The object geometry is built from the *rounded* label values, so labels and
  sensors agree exactly. 2D box = min/max of the 8 projected corners clipped to the image (OpenPCDet), truncation =
  1 - clipped/unclipped 2D box area, occlusion from the fraction of the object's own pixels that stay visible in
  the z-buffer (>= 0.8 -> 0, >= 0.4 -> 1, else 2). Objects outside the camera view are not labelled (as in KITTI);
  objects seen only partly (corners behind the camera) or beyond 70 m become DontCare regions when ``dontcare``.

Every frame is generated from ``np.random.default_rng([seed, index])``: same seed -> identical bytes, independent
of the number of worker processes.
"""
from __future__ import annotations

from .synth.frame import SyntheticFrame, generate_frame
from .synth.scene import SceneConfig
from .synth.sensors import (GROUND_Z, IMAGE_H, IMAGE_W, KITTI_P2, KITTI_R0, KITTI_TR, LIDAR_HEIGHT, hdl64_elevations,
                            kitti_calibration)
from .synth.writer import default_demo_dir, ensure_demo_scenes, generate_dataset, write_frame

__all__ = ["SceneConfig", "SyntheticFrame", "generate_frame", "generate_dataset", "write_frame", "ensure_demo_scenes",
           "default_demo_dir", "kitti_calibration", "hdl64_elevations", "IMAGE_W", "IMAGE_H", "LIDAR_HEIGHT",
           "GROUND_Z", "KITTI_P2", "KITTI_R0", "KITTI_TR"]
