"""Depth completion and pseudo points (online, device-agnostic torch). See :mod:`cmfiou_core.depth.pseudo`."""
from .config import DepthConfig
from .io import VelodyneDepthError, input_point_discard, read_velodyne_depth, write_velodyne_depth
from .ipbasic import ipbasic_complete
from .projection import fov_flag, project_points, sparse_depth_map
from .pseudo import PseudoPointGenerator, PseudoResult, la_sampling2_order, lift_depth

__all__ = ["DepthConfig", "PseudoPointGenerator", "PseudoResult", "read_velodyne_depth", "write_velodyne_depth",
           "input_point_discard", "ipbasic_complete", "fov_flag", "project_points", "sparse_depth_map",
           "la_sampling2_order", "lift_depth", "VelodyneDepthError"]
