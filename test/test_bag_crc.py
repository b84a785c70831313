"""Bags written by cmfiou-kitti2bag carry real MCAP CRCs (checked with the independent ``mcap`` reader), a corrupted
bag is refused on read with exit code 2, and cmfiou-bag-eval exits 2 without a traceback on a bad checkpoint."""
import struct

import pytest
from rosutil import require  # noqa: E402  (pytest puts test/ on sys.path)

require("rosbags")


@pytest.fixture(scope="module")
def bag(kitti_samples, tmp_path_factory):
    from cmfiou_core.tools import kitti2bag

    d = tmp_path_factory.mktemp("crc")
    ids = d / "ids.txt"
    ids.write_text("000001\n000006\n")
    out = d / "bag"
    assert kitti2bag.main(["--object", str(kitti_samples / "object" / "training"), "--ids", str(ids),
                           "--out", str(out)]) in (0, None)
    return next(out.glob("*.mcap"))


def _chunks(data):
    pos, out = 8, []
    while pos < len(data) - 8:
        op, ln = data[pos], struct.unpack_from("<Q", data, pos + 1)[0]
        if op == 0x06:
            out.append((pos, struct.unpack_from("<I", data, pos + 9 + 24)[0]))
        pos += 9 + ln
    return out


def test_written_bag_has_crcs_an_independent_reader_accepts(bag):
    mcap_reader = require("mcap.reader")
    data = bag.read_bytes()
    chunks = _chunks(data)
    assert chunks and all(crc != 0 for _, crc in chunks)
    with open(bag, "rb") as f:  # chunk CRCs + the data-section CRC of the DataEnd record, computed by mcap itself
        n = sum(1 for _ in mcap_reader.NonSeekingReader(f, validate_crcs=True).iter_messages())
    assert n >= 2 * 5


def test_flipped_bytes_are_refused_on_read_and_by_bag_eval(bag, tmp_path, capsys):
    from cmfiou_core.eval import bag_io
    from cmfiou_ros import bag_eval

    data = bytearray(bag.read_bytes())
    start, _ = _chunks(data)[1]
    for k in range(200):  # 200 bytes inside the second chunk's records (the point cloud data of frame 1)
        data[start + 4000 + k] ^= 0x5A
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / bag.name).write_bytes(bytes(data))
    (bad / "metadata.yaml").write_text((bag.parent / "metadata.yaml").read_text())
    with pytest.raises(bag_io.BagError, match=r"chunk 1 \(byte \d+\) is corrupt: CRC32"):
        bag_io.read_frames(bad)
    assert bag_eval.main([str(bad), "--out", str(tmp_path / "rep"), "--empty"]) == 2
    err = capsys.readouterr().err
    assert "is corrupt" in err and "Traceback" not in err and not (tmp_path / "rep").exists()
    assert bag_eval.main([str(bag.parent), "--out", str(tmp_path / "ok"), "--empty"]) == 0  # the intact bag reads


def test_bag_eval_with_a_bad_checkpoint_exits_2_without_a_traceback(bag, tmp_path, capsys):
    from cmfiou_ros import bag_eval

    junk = tmp_path / "junk.pt"
    junk.write_bytes(bytes(range(256)) * 8)
    for ck in (junk, tmp_path / "missing.pt"):
        assert bag_eval.main([str(bag.parent), "--out", str(tmp_path / "rep"), "--checkpoint", str(ck)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("cmfiou-bag-eval: error:") and str(ck) in err and "Traceback" not in err
    assert not (tmp_path / "rep").exists()
