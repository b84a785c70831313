"""KITTI replay -> CMF-IOU detector (real ROS 2). The graph itself (nodes, parameters, remappings) lives in
``cmfiou_ros/graph.py`` and is shared with the pip-world runner ``python -m cmfiou_ros.run_graph``.

ros2 launch cmfiou_ros kitti_replay.launch.py data:=/path/to/kitti/object [checkpoint:=ckpt.pth] [rate:=5] [rviz:=true]

Semantics equal to run_graph: any node of the graph exiting ends the launch -- with an error (a non-zero exit of
``ros2 launch``) when it failed, cleanly when the replay finished with ``exit_on_end:=true`` (it exits only once the
detector answered its last frame).
"""
from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, OpaqueFunction, RegisterEventHandler, Shutdown
from launch.event_handlers import OnProcessExit
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import Node

from cmfiou_ros import graph


def on_node_exit(event, context):
    """A graph node ended: a failure raises (launch logs it, shuts everything down and returns 1), a clean exit
    shuts the launch down."""
    name = getattr(event.action, "name", "node")
    if event.returncode != 0:
        raise RuntimeError(f"{name} died with exit code {event.returncode}: the graph is shut down")
    return [Shutdown(reason=f"{name} finished")]


def _nodes(context, *args, **kwargs):
    values = {name: LaunchConfiguration(name).perform(context) for name, _, _ in graph.LAUNCH_ARGUMENTS}
    rviz = graph._bool(values.pop("rviz"))
    actions = []
    for spec in graph.replay_graph(dict(values, rviz="false")):
        node = Node(
            package=spec.package,
            executable=spec.executable,
            name=spec.name,
            parameters=[spec.params_file, spec.parameters],
            remappings=spec.remappings,
            output="screen",
        )
        actions += [node, RegisterEventHandler(OnProcessExit(target_action=node, on_exit=on_node_exit))]
    if rviz:
        actions.append(Node(package=graph.RVIZ.package, executable=graph.RVIZ.executable, name=graph.RVIZ.name,
                            parameters=[{"use_sim_time": graph._bool(values["use_sim_time"])}], output="screen"))
    return actions


def generate_launch_description():
    args = [DeclareLaunchArgument(name, default_value=default, description=doc)
            for name, default, doc in graph.LAUNCH_ARGUMENTS]
    return LaunchDescription(args + [OpaqueFunction(function=_nodes)])
