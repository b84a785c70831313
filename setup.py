"""pip packaging of cmfiou (pip world). In a ROS 2 workspace colcon builds CMakeLists.txt instead.

scripts/setup.sh installs this editable with --no-deps (dependencies come from requirements*.txt) to get the console
scripts; the message interfaces are built separately (CMakeLists.txt with -DCMFIOU_INTERFACES_ONLY=ON).
"""
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).resolve().parent


def _files(folder: str) -> list:
    return sorted(str(p.relative_to(ROOT)) for p in (ROOT / folder).glob("*") if p.is_file())


setup(
    name="cmfiou",
    version="0.1.0",
    description="CMF-IOU camera+LiDAR 3D object detector with a ROS 2 node",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["cmfiou_core", "cmfiou_core.*", "cmfiou_ros", "cmfiou_ros.*"]),
    package_data={"cmfiou_core": ["**/*.yaml"]},
    # The resources, where cmfiou_core.resources finds them in a non-editable install (<prefix>/share/cmfiou_ros);
    # the editable install of scripts/setup.sh links them there instead.
    data_files=[
        ("share/cmfiou_ros", ["package.xml"]),
        ("share/cmfiou_ros/launch", _files("launch")),
        ("share/cmfiou_ros/config", _files("config")),
        ("share/cmfiou_ros/models", _files("models")),
        ("share/cmfiou_ros/msg", _files("msg")),
        ("share/cmfiou_ros/compat/vision_msgs/msg", _files("compat/vision_msgs/msg")),
    ],
    entry_points={
        "console_scripts": [
            "cmfiou-train=cmfiou_core.tools.train:main",
            "cmfiou-eval-kitti=cmfiou_core.tools.eval_kitti:main",
            "cmfiou-kitti2bag=cmfiou_core.tools.kitti2bag:main",
            "cmfiou-bag-eval=cmfiou_ros.bag_eval:main",
            "cmfiou-gen-scenes=cmfiou_core.tools.gen_scenes:main",
            "cmfiou-demo=cmfiou_ros.demo:main",
        ],
    },
)
