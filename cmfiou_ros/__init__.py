"""cmfiou_ros: the thin ROS 2 layer of CMF-IOU (nodes, message conversion, replay, bag evaluation).

The generated message package ``cmfiou_ros.msg`` is not in the source tree: it is installed by the interface build
(colcon in a ROS workspace; ``scripts/setup.sh`` into the venv in the pip world). ``extend_path`` merges every
``cmfiou_ros`` directory on ``sys.path`` into this package, so with ``PYTHONPATH=<repo>`` the nodes come from the
source tree while ``cmfiou_ros.msg`` resolves from the install (and the other way round for the installed copy of
this file). Keep this module free of imports: it runs before anything is set up.
"""
from pkgutil import extend_path

__path__ = extend_path(__path__, __name__)
