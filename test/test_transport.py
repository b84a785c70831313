"""The message-size limit: read from the active Fast DDS profile (cmfiou_ros.transport), configurable by writing a
profile with other SHM sizes, and warned about where messages are published (the replay node, the detector's outputs)
and received (the detector's inputs). The measured behaviour behind the limit is in docs/results/message_size_cpu.json
(bench/bench_message_size.py)."""
import re
import subprocess
import sys
from pathlib import Path


from cmfiou_ros import transport as T
from rosutil import require  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
MIB = 1 << 20


def test_shipped_profile_limits():
    lim = T.read_profile(str(REPO / "config" / "fastdds_shm.xml"))
    assert (lim.max_message_bytes, lim.segment_bytes) == (16 * MIB, 32 * MIB)
    assert lim.warn_bytes() == 16 * MIB and lim.warn_bytes(0.5) == MIB // 2
    assert "maxMessageSize 16 MiB" in lim.describe()


def test_written_profile_reads_back_and_bad_sizes_fail(tmp_path, capsys):
    out = T.write_profile(100, 300, tmp_path / "big.xml")
    lim = T.read_profile(str(out))
    assert (lim.max_message_bytes, lim.segment_bytes) == (100 * MIB, 300 * MIB)
    capsys.readouterr()
    assert T.main(["--max-message-mb", "4", "--out", str(tmp_path / "cli.xml")]) == 0
    assert T.read_profile(str(tmp_path / "cli.xml")).segment_bytes == 8 * MIB  # default: 2 x max message
    assert f"export FASTDDS_DEFAULT_PROFILES_FILE={(tmp_path / 'cli.xml').resolve()}" in capsys.readouterr().out
    assert T.main(["--max-message-mb", "8", "--segment-mb", "4", "--out", str(tmp_path / "bad.xml")]) == 2
    assert not (tmp_path / "bad.xml").exists()
    err = capsys.readouterr().err
    assert err.startswith("error: need 0 < max_message_mb <= segment_mb (got 8, 4)") and "Traceback" not in err


def test_active_limit_sources(tmp_path):
    assert T.active_limit({"RMW_IMPLEMENTATION": "rmw_cyclonedds_cpp"}).max_message_bytes is None
    none = T.active_limit({"RMW_IMPLEMENTATION": "rmw_fastrtps_cpp"})
    assert none.max_message_bytes is None and "no FASTDDS_DEFAULT_PROFILES_FILE" in none.source
    assert none.warn_bytes() == 16 * MIB  # the fallback
    bad = tmp_path / "bad.xml"
    bad.write_text("<dds><profiles>")
    got = T.active_limit({"FASTDDS_DEFAULT_PROFILES_FILE": str(bad)})
    assert got.max_message_bytes is None and "unreadable Fast DDS profile" in got.source and str(bad) in got.source
    udp = tmp_path / "udp.xml"
    udp.write_text('<dds xmlns="http://www.eprosima.com"><profiles><transport_descriptors><transport_descriptor>'
                   "<transport_id>u</transport_id><type>UDPv4</type></transport_descriptor></transport_descriptors>"
                   "</profiles></dds>")
    assert "no shared-memory transport" in T.read_profile(str(udp)).source


def test_replay_warns_when_publishing_above_the_profiles_limit(tmp_path, kitti_samples):
    """The replay node with a profile whose maxMessageSize is 1 MiB publishes a ~1.8 MiB KITTI cloud: it says, on the
    publishing side, that best-effort subscribers will likely not get it (they would not be told)."""
    require("rclpy")
    require("cmfiou_ros.msg")
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from rosutil import fresh_domain  # noqa: E402

    from cmfiou_ros.run_graph import child_env

    profile = T.write_profile(1, 4, tmp_path / "small.xml")
    env = child_env({"ROS_DOMAIN_ID": str(fresh_domain()), "FASTDDS_DEFAULT_PROFILES_FILE": str(profile)})
    r = subprocess.run([sys.executable, "-m", "cmfiou_ros.replay_node", "--ros-args",
                        "-p", f"data_dir:={kitti_samples / 'object'}", "-p", "max_frames:=1",
                        "-p", "wait_for_subscribers:=0", "-p", "exit_on_end:=true", "-p", "publish_image:=false"],
                       env=env, capture_output=True, text=True, timeout=120)
    log = r.stdout + r.stderr
    assert r.returncode == 0, log[-3000:]
    assert re.search(r"\[/kitti/velo/pointcloud\] message of 1\.\d MiB > maxMessageSize 1 MiB of ", log), log[-3000:]
    assert str(profile) in log and "best-effort subscribers will likely not receive it" in log
