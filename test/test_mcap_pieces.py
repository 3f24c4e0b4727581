"""The piecewise serialization and mcap writer give exactly rosbags' bytes."""

from marigold_ros.bag_io import serialize_canonical, serialize_canonical_pieces
from marigold_ros.conversions import depth_to_image, pointcloud2_from_depth, rgb_to_image
from marigold_ros.mcap_pieces import CdrPieces, PiecewiseWriter
from msg_builders import header, STORE
import numpy as np
import pytest
from rosbags.highlevel import AnyReader
from rosbags.rosbag2 import CompressionFormat, CompressionMode, StoragePlugin, Writer
from sensor_msgs.msg import CameraInfo

IMAGE = 'sensor_msgs/msg/Image'
CLOUD = 'sensor_msgs/msg/PointCloud2'
INFO = 'sensor_msgs/msg/CameraInfo'


def _odd_length_header(index):
    """Frame ids of 11 to 13 characters: the fields after them start at every alignment."""
    return header(5, index, 'cam_optical' + 'x' * (index % 3))


def _odd_sized_messages(rng):
    """Messages of odd and large sizes: odd rgb8 widths, a >1 MB cloud, camera info."""
    out = []
    for index, (height, width) in enumerate([(3, 5), (240, 320), (7, 1), (480, 641)]):
        header = _odd_length_header(index)
        rgb = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        out.append((IMAGE, rgb_to_image(rgb, header)))
        out.append((IMAGE, depth_to_image(rng.random((height, width), np.float32), header)))
        points = rng.random((height, width, 3)).astype(np.float32)
        points[0, 0] = np.nan
        cloud = pointcloud2_from_depth(points, rgb, header)
        cloud.is_dense = index % 2 == 1  # the byte after the data: both values
        out.append((CLOUD, cloud))
        info = CameraInfo(header=header, width=width, height=height)
        info.k = [float(width), 0.0, width / 2, 0.0, float(width), height / 2, 0.0, 0.0, 1.0]
        out.append((INFO, info))
    return out


def test_pieces_concatenate_to_the_canonical_serialization():
    for msgtype, msg in _odd_sized_messages(np.random.default_rng(0)):
        pieces = serialize_canonical_pieces(msg, msgtype)
        assert isinstance(pieces, CdrPieces)
        assert pieces.join() == bytes(serialize_canonical(msg, msgtype))
        if msgtype != INFO:
            # The data buffer is the message's own, not a copy.
            assert len(pieces) == 3
            assert np.shares_memory(np.frombuffer(pieces[1], np.uint8),
                                    np.frombuffer(msg.data, np.uint8))


def _write(writer_class, path, messages, pieces, compression=None):
    writer = writer_class(path, version=9, storage_plugin=StoragePlugin.MCAP)
    if compression is not None:
        writer.set_compression(compression, CompressionFormat.ZSTD)
    with writer:
        connections = {}
        for index, (msgtype, msg) in enumerate(messages):
            # Topics are added as messages come (some only after the first chunks closed),
            # so schema and channel records land inside chunks between messages.
            topic = f'/t{index // 9}/{msgtype.rsplit("/", 1)[1].lower()}'
            if topic not in connections:
                connections[topic] = writer.add_connection(topic, msgtype, typestore=STORE)
            cdr = serialize_canonical_pieces(msg, msgtype) if pieces else \
                serialize_canonical(msg, msgtype)
            writer.write(connections[topic], 1000 + index, cdr)
    return (path / f'{path.name}.mcap').read_bytes()


@pytest.mark.parametrize('count, compression', [
    (48, None), (0, None), (48, CompressionMode.STORAGE), (20, CompressionMode.MESSAGE)])
def test_file_is_byte_identical_to_rosbags_writer(tmp_path, count, compression):
    messages = (_odd_sized_messages(np.random.default_rng(1)) * 3)[:count]
    # The same bag name: the file's metadata record names its storage file.
    folders = [tmp_path / name for name in ('rosbags', 'pieces', 'bytes')]
    for folder in folders:
        folder.mkdir()
    expected = _write(Writer, folders[0] / 'bag', messages, False, compression)
    if count == 48 and compression is None:
        assert len(expected) > 3 * 2 ** 20  # several chunks
    assert _write(PiecewiseWriter, folders[1] / 'bag', messages, True, compression) == expected
    assert _write(PiecewiseWriter, folders[2] / 'bag', messages, False, compression) == expected


def test_plain_buffers_are_copied_when_written(tmp_path):
    """Only CdrPieces are kept by reference: a caller may reuse any other buffer."""
    info = CameraInfo(header=_odd_length_header(0), width=4, height=3)
    cdr = bytearray(serialize_canonical(info, INFO))
    with PiecewiseWriter(tmp_path / 'bag', version=9,
                         storage_plugin=StoragePlugin.MCAP) as writer:
        connection = writer.add_connection('/info', INFO, typestore=STORE)
        writer.write(connection, 1, cdr)
        cdr[:] = bytes(len(cdr))
    with AnyReader([tmp_path / 'bag'], default_typestore=STORE) as reader:
        (raw,) = [bytes(raw) for _, _, raw in reader.messages()]
    assert raw == bytes(serialize_canonical(info, INFO))


def test_read_back_with_rosbags(tmp_path):
    messages = _odd_sized_messages(np.random.default_rng(2))
    _write(PiecewiseWriter, tmp_path / 'bag', messages, pieces=True)
    with AnyReader([tmp_path / 'bag'], default_typestore=STORE) as reader:
        read = [(c.msgtype, t, bytes(raw)) for c, t, raw in reader.messages()]
    expected = [(msgtype, 1000 + index) for index, (msgtype, _) in enumerate(messages)]
    assert [(msgtype, stamp) for msgtype, stamp, _ in read] == expected
    for (_, _, raw), (msgtype, msg) in zip(read, messages):
        assert raw == bytes(serialize_canonical(msg, msgtype))


@pytest.mark.parametrize('storage', ['mcap', 'sqlite3'])
def test_atomic_writer_takes_pieces_for_both_storages(tmp_path, storage):
    from marigold_ros.bag_io import BagReader
    from marigold_ros.bag_writer import AtomicBagWriter
    messages = _odd_sized_messages(np.random.default_rng(3))
    writer = AtomicBagWriter(tmp_path / 'out', storage)
    writer.open()
    for index, (msgtype, msg) in enumerate(messages):
        writer.write_msg(f'/{msgtype.rsplit("/", 1)[1].lower()}', 10 + index, msg, msgtype)
    writer.commit()
    with BagReader(tmp_path / 'out') as reader:
        got = [bytes(m.cdr) for m in reader.messages()]
    assert got == [bytes(serialize_canonical(msg, t)) for t, msg in messages]
