"""cmfiou_core: the CMF-IOU camera+LiDAR 3D detector in pure PyTorch + spconv (no ROS imports here)."""
__version__ = "0.1.0"
