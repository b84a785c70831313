"""Synchronisation policies: ApproxTimeSync (message_filters' greedy Python semantics) and LatestImagePolicy."""
import itertools
from types import SimpleNamespace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cmfiou_ros.sync import ApproxTimeSync, LatestImagePolicy, real_message_filters

MS = 1_000_000


def reference_add(queues, queue_size, slop, idx, stamp):
    """Literal transcription of ros2/message_filters ApproximateTimeSynchronizer.add (ns integers)."""
    my_queue = queues[idx]
    my_queue[stamp] = stamp
    while len(my_queue) > queue_size:
        del my_queue[min(my_queue)]
    search_queues = queues[:idx] + queues[idx + 1:]
    stamps = []
    for queue in search_queues:
        topic_stamps = []
        for s in queue:
            d = abs(s - stamp)
            if d > slop:
                continue
            topic_stamps.append((s, d))
        if not topic_stamps:
            return None
        topic_stamps = sorted(topic_stamps, key=lambda x: x[1])
        stamps.append(topic_stamps)
    for vv in itertools.product(*[list(zip(*s))[0] for s in stamps]):
        vv = list(vv)
        vv.insert(idx, stamp)
        qt = list(zip(queues, vv))
        if (max(vv) - min(vv)) < slop and len([1 for q, t in qt if t not in q]) == 0:
            msgs = [q[t] for q, t in qt]
            for q, t in qt:
                del q[t]
            return tuple(msgs)
    return None


def msg(stamp):
    return SimpleNamespace(header=SimpleNamespace(stamp=SimpleNamespace(sec=stamp // 10**9, nanosec=stamp % 10**9)),
                           s=stamp)


@settings(max_examples=300, deadline=None)
@given(st.integers(2, 3), st.integers(1, 5), st.integers(1, 80),
       st.lists(st.tuples(st.integers(0, 2), st.integers(0, 400)), max_size=60))
def test_approx_matches_message_filters_reference(n, qsize, slop_ms, events):
    got = []
    sync = ApproxTimeSync(n, qsize, slop_ms / 1000, lambda *m: got.append(tuple(x.s for x in m)))
    ref_q = [{} for _ in range(n)]
    want = []
    for idx, t in events:
        idx %= n
        stamp = t * MS
        sync.add(idx, msg(stamp))
        r = reference_add(ref_q, qsize, slop_ms * MS, idx, stamp)
        if r is not None:
            want.append(r)
    assert got == want
    assert sync.queue_sizes() == [len(q) for q in ref_q]


def test_approx_basic_pairs_and_slop_is_strict():
    got = []
    s = ApproxTimeSync(2, 5, 0.05, lambda a, b: got.append((a.s, b.s)))
    s.add(0, msg(1000 * MS))
    s.add(1, msg(1030 * MS))
    assert got == [(1000 * MS, 1030 * MS)]
    s.add(0, msg(2000 * MS))
    s.add(1, msg(2050 * MS))  # |dt| == slop: candidate, but max - min < slop fails
    assert len(got) == 1
    with pytest.raises(ValueError):
        ApproxTimeSync(2, 0, 0.1, print)


def test_real_message_filters_when_available():
    mf = real_message_filters()
    if mf is None:
        pytest.skip("message_filters not importable (not on PyPI); our ApproxTimeSync is used instead")
    from builtin_interfaces.msg import Time
    from std_msgs.msg import Header

    got = []
    inputs = [mf.SimpleFilter(), mf.SimpleFilter()]
    sync = mf.ApproximateTimeSynchronizer(inputs, 5, 0.05)
    key = lambda a, b: (a.header.stamp.sec, a.header.stamp.nanosec, b.header.stamp.sec, b.header.stamp.nanosec)  # noqa
    sync.registerCallback(lambda a, b: got.append(key(a, b)))
    ours = []
    o = ApproxTimeSync(2, 5, 0.05, lambda a, b: ours.append(key(a, b)))  # default stamp: msg.header.stamp
    for i, (sec, ns) in enumerate([(1, 0), (1, 20 * MS), (2, 0), (3, 0), (3, 90 * MS), (4, 0), (4, 10 * MS)]):
        m = SimpleNamespace(header=Header(stamp=Time(sec=sec, nanosec=ns)))  # a message: message_filters reads
        inputs[i % 2].signalMessage(m)                                        # msg.header.stamp
        o.add(i % 2, m)
    assert got == ours == [(1, 0, 1, 20 * MS), (4, 10 * MS, 4, 0)]  # (input 0, input 1)


# ------------------------------------------------------------------ LatestImagePolicy
def test_latest_image_pairs_exact_and_old_and_missing():
    p = LatestImagePolicy(max_age_s=0.15, match_tol_s=0.01, wait_s=0.0)
    out = p.add_lidar(1000 * MS, "c0", 0)
    assert out[0].image is None and "no image" in out[0].reason
    p.add_image(1100 * MS, "i1", 0)
    out = p.add_lidar(1100 * MS, "c1", 0)
    assert out[0].image == "i1" and out[0].reason == "" and out[0].image_age_s == 0
    out = p.add_lidar(1200 * MS, "c2", 0)  # image 0.1 s old, within max age
    assert out[0].image == "i1" and abs(out[0].image_age_s - 0.1) < 1e-9
    out = p.add_lidar(1300 * MS, "c3", 0)  # 0.2 s old -> LiDAR-only (camera stopped)
    assert out[0].image is None and "older than the cloud" in out[0].reason


def test_latest_image_waits_for_late_image_then_times_out():
    p = LatestImagePolicy(max_age_s=0.15, match_tol_s=0.01, wait_s=0.05)
    p.add_image(900 * MS, "old", 0)
    assert p.add_lidar(1000 * MS, "c", now_ns=0) == []  # waits: image for 1000 may still come
    out = p.add_image(1000 * MS, "new", now_ns=10 * MS)
    assert len(out) == 1 and out[0].image == "new"
    # no matching image: the wait expires and the cloud goes with the best candidate (0.1 s old)
    assert p.add_lidar(1100 * MS, "c2", now_ns=100 * MS) == []
    assert p.poll(120 * MS) == []
    out = p.poll(151 * MS)
    assert out[0].image == "new" and abs(out[0].image_age_s - 0.1) < 1e-9
    # a newer cloud resolves a waiting one at once (latest frame wins, none lost)
    assert p.add_lidar(1300 * MS, "c3", now_ns=200 * MS) == []
    out = p.add_lidar(1400 * MS, "c4", now_ns=201 * MS)
    # c3 resolved (its image never came); c4 does not wait: the camera looks dead (newest image 0.4 s old)
    assert [o.lidar for o in out] == ["c3", "c4"] and out[0].image is None and out[1].image is None


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["img", "lidar", "poll"]), st.integers(0, 2000)), max_size=80),
       st.floats(0, 0.3), st.floats(0, 0.05), st.floats(0, 0.1))
def test_latest_image_invariants(events, max_age, tol, wait):
    """Every cloud comes out exactly once; a chosen image is never older than max_age nor newer than tol."""
    p = LatestImagePolicy(max_age, tol, wait, buffer=3)
    clouds, out, now = [], [], 0
    for kind, t in events:
        now += 7 * MS
        if kind == "img":
            out += p.add_image(t * MS, t, now)
        elif kind == "lidar":
            clouds.append(len(clouds))
            out += p.add_lidar(t * MS, len(clouds) - 1, now)
        else:
            out += p.poll(now)
    out += p.poll(now + 10**12)
    assert sorted(o.lidar for o in out) == clouds
    for o in out:
        if o.image is not None:
            age = o.lidar_stamp_ns - o.image_stamp_ns
            assert -round(tol * 1e9) <= age <= round(max_age * 1e9)
        else:
            assert o.reason


def test_latest_image_slow_stream_still_waits_for_its_image():
    """A 1 Hz (or lock-stepped) stream: the newest image is 1 s old when the next cloud arrives first; the camera
    is alive (period-aware), so the cloud waits for its image instead of going LiDAR-only."""
    p = LatestImagePolicy(max_age_s=0.15, match_tol_s=0.01, wait_s=0.05)
    for k in range(3):
        p.add_image(k * 1000 * MS, f"i{k}", now_ns=k * 1000 * MS)
        out = p.add_lidar(k * 1000 * MS, f"c{k}", now_ns=k * 1000 * MS)
        assert out[0].image == f"i{k}"
    assert p.add_lidar(3000 * MS, "c3", now_ns=3000 * MS) == []  # image 3 not there yet: wait
    out = p.add_image(3000 * MS, "i3", now_ns=3001 * MS)
    assert out[0].lidar == "c3" and out[0].image == "i3"
    # camera really stopped: after ~1.5 periods without images clouds no longer wait
    assert p.add_lidar(4000 * MS, "c4", now_ns=4000 * MS) == []
    assert p.poll(4100 * MS)[0].image is None
    out = p.add_lidar(5000 * MS, "c5", now_ns=5000 * MS)
    assert out and out[0].image is None
