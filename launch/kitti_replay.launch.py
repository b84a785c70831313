"""KITTI replay -> CMF-IOU detector (real ROS 2). The graph itself (nodes, parameters, remappings) lives in
``cmfiou_ros/graph.py`` and is shared with the pip-world runner ``python -m cmfiou_ros.run_graph``.

ros2 launch cmfiou_ros kitti_replay.launch.py data:=/path/to/kitti/object checkpoint:=ckpt.pth rate:=5 rviz:=true
"""
from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, OpaqueFunction
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import Node

from cmfiou_ros import graph


def _nodes(context, *args, **kwargs):
    values = {name: LaunchConfiguration(name).perform(context) for name, _, _ in graph.LAUNCH_ARGUMENTS}
    rviz = graph._bool(values.pop("rviz"))
    actions = []
    for spec in graph.replay_graph(dict(values, rviz="false")):
        actions.append(Node(
            package=spec.package,
            executable=spec.executable,
            name=spec.name,
            parameters=[spec.params_file, spec.parameters],
            remappings=spec.remappings,
            output="screen",
        ))
    if rviz:
        actions.append(Node(package=graph.RVIZ.package, executable=graph.RVIZ.executable, name=graph.RVIZ.name,
                            parameters=[{"use_sim_time": graph._bool(values["use_sim_time"])}], output="screen"))
    return actions


def generate_launch_description():
    args = [DeclareLaunchArgument(name, default_value=default, description=doc)
            for name, default, doc in graph.LAUNCH_ARGUMENTS]
    return LaunchDescription(args + [OpaqueFunction(function=_nodes)])
