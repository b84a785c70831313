"""The synthetic scene generator in parts: ``raycast`` (ray caster), ``sensors`` (calibration, LiDAR and camera ray
grids), ``scene`` (scene sampler), ``frame`` (one frame: sensors + labels) and ``writer`` (KITTI layout on disk).
The public entry points are re-exported by :mod:`cmfiou_core.data.synthetic`."""
