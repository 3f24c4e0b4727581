"""
Read ROS 1 / rosbag2 bags as rclpy messages; serialize messages canonically for writing.

Reading uses ``rosbags`` (pure Python): rosbag2 directories (sqlite3 or mcap), a bare
``.db3`` / ``.mcap`` storage file, or a ROS 1 ``.bag``.  Every message is handed on as CDR
bytes (ROS 1 bytes are converted on the byte level, dropping the ROS 1 header ``seq``), so
``rclpy.serialization.deserialize_message`` turns it into exactly the message class the live
node receives, and copying a topic through is a byte copy.

Writing is :mod:`marigold_ros.bag_writer`.
"""

import array
import dataclasses
from dataclasses import dataclass
import importlib
from pathlib import Path

from marigold_model.errors import ReasonError
import numpy as np
from rclpy.serialization import deserialize_message
from rosbags.convert.converter import is_same_wireformat
from rosbags.highlevel import AnyReader
from rosbags.interfaces import ConnectionExtRosbag2
from rosbags.interfaces import MessageDefinitionFormat
from rosbags.interfaces import Nodetype
from rosbags.rosbag2 import StoragePlugin
from rosbags.typesys import get_typestore
from rosbags.typesys import Stores

from .mcap_pieces import CdrPieces

IMAGE_TYPE = 'sensor_msgs/msg/Image'
COMPRESSED_TYPE = 'sensor_msgs/msg/CompressedImage'
CAMERA_INFO_TYPE = 'sensor_msgs/msg/CameraInfo'
POINTCLOUD_TYPE = 'sensor_msgs/msg/PointCloud2'
IMAGE_TYPES = (IMAGE_TYPE, COMPRESSED_TYPE)

#: Output storage formats (the rosbag2 storage identifiers).
STORAGES = {'mcap': StoragePlugin.MCAP, 'sqlite3': StoragePlugin.SQLITE3}

# The message definitions of the ROS 2 release whose Python wheels run this package; used
# for output topics and for input bags that carry no definitions.
ROS2_STORE = Stores.ROS2_KILTED


def _damaged_metadata(path, error):
    """
    Say that a bag folder's metadata.yaml is damaged, when that is why it did not open.

    :return: the message naming the file, or None when the metadata is not the problem
    """
    metadata = Path(path) / 'metadata.yaml'
    text = str(error)
    if not metadata.is_file() or not (isinstance(error, UnicodeDecodeError) or
                                      'yaml' in text.lower() or 'metadata' in text.lower()):
        return None
    detail = text.replace(f' from {metadata}', '').strip().splitlines()
    detail = detail[0].rstrip(':') if detail else type(error).__name__
    return (f'bag metadata {str(metadata)!r} is damaged ({detail}); restore it from a '
            f"copy, or move it away and run 'ros2 bag reindex {str(path)}' to rebuild it "
            'from the storage files')


class BagError(ReasonError):
    """
    A bag that cannot be read or written, or a topic that is not in it.

    Reasons: 'missing', 'unreadable', 'corrupt', 'no_topic', 'bad_topic', 'exists', 'bad_output'.
    """


@dataclass(frozen=True)
class TopicInfo:
    """
    One topic of an input bag.

    :param msgtype: rosbags type name, e.g. 'sensor_msgs/msg/Image'.
    :param count: messages recorded (from the bag index / metadata).
    """

    name: str
    msgtype: str
    count: int


@dataclass(frozen=True)
class BagMessage:
    """
    One recorded message, CDR-serialized (ROS 2 wire format).

    :param log_time: receive time recorded in the bag, integer nanoseconds.
    :param cdr: CDR bytes (converted from ROS 1 when the bag is a ROS 1 bag).
    """

    topic: str
    msgtype: str
    log_time: int
    cdr: bytes


_CLASSES = {}


def message_class(msgtype):
    """
    Return the rclpy message class of a rosbags type name, e.g. 'sensor_msgs/msg/Image'.

    :raises BagError: 'bad_topic' when the package / message is not installed.
    """
    cls = _CLASSES.get(msgtype)
    if cls is None:
        package, kind, name = (msgtype.split('/') + ['', ''])[:3]
        try:
            cls = getattr(importlib.import_module(f'{package}.{kind}'), name)
        except (ImportError, AttributeError, ValueError) as exc:
            raise BagError('bad_topic', f'message type {msgtype!r} is not available in this '
                                        f'Python environment: {exc}') from exc
        _CLASSES[msgtype] = cls
    return cls


def to_rclpy(message):
    """Deserialize a :class:`BagMessage` into its rclpy message (BagError 'corrupt')."""
    try:
        return deserialize_message(message.cdr, message_class(message.msgtype))
    except BagError:
        raise
    except Exception as exc:  # noqa: B902 - rclpy raises plain RuntimeError / TypeError
        raise BagError('corrupt', f'cannot deserialize a {message.msgtype} message on '
                                  f'{message.topic!r} at {message.log_time} ns: {exc}') from exc


def _rosbags_value(value, desc, store):
    """Convert one rclpy field value to what rosbags' serializer expects."""
    kind, sub = desc
    if kind == Nodetype.BASE:
        return value
    if kind == Nodetype.NAME:
        return _rosbags_message(value, sub, store)
    element_kind, element = sub[0]
    if element_kind == Nodetype.NAME:
        return [_rosbags_message(v, element, store) for v in value]
    if element[0] == 'string':
        return list(value)
    dtype = {'bool': np.bool_, 'char': np.uint8}.get(element[0], element[0])
    if isinstance(value, (array.array, bytes, bytearray, memoryview)):
        return np.frombuffer(value, dtype=dtype)  # no copy of image / cloud buffers
    return np.asarray(value, dtype=dtype)


def _rosbags_message(msg, msgtype, store):
    """Build the rosbags message equal to an rclpy message, field by field."""
    values = {}
    for name, desc in store.fielddefs[msgtype][1]:
        if name == 'structure_needs_at_least_one_member':
            values[name] = 0
        else:
            values[name] = _rosbags_value(getattr(msg, name), desc, store)
    return store.types[msgtype](**values)


def serialize_canonical(msg, msgtype, store=None):
    """Serialize an rclpy message to little-endian CDR with zeroed padding bytes."""
    # rclpy's serialize_message (Fast DDS) leaves the alignment padding uninitialised, so
    # the same message gives different bytes in different processes; rosbags' serializer
    # writes zeros, which makes output bags reproducible bit for bit.
    store = store or ros2_store()
    return store.serialize_cdr(_rosbags_message(msg, msgtype, store), msgtype)


# Types whose bulk is the uint8[] field ``data``, with the number of serialized bytes after
# it: only 1-byte-aligned fields follow (PointCloud2's bool is_dense), so those bytes do
# not depend on the data's length and the message can be cut around the data.
_DATA_TAIL_BYTES = {IMAGE_TYPE: 0, POINTCLOUD_TYPE: 1}


def serialize_canonical_pieces(msg, msgtype, store=None):
    """
    Serialize like :func:`serialize_canonical`, leaving the data buffer where it is.

    For Image and PointCloud2 the result is (head, data, tail): the message serialized
    with an empty ``data`` (its length field then set), the message's own data buffer (not
    copied) and the bytes after it; other types are one piece.  The pieces' concatenation
    equals :func:`serialize_canonical` (tested); :class:`marigold_ros.mcap_pieces.
    PiecewiseMcapWriter` writes them without joining.

    :param msg: rclpy message (its data must not change until written).
    """
    store = store or ros2_store()
    tail = _DATA_TAIL_BYTES.get(msgtype)
    if tail is None:
        return CdrPieces((serialize_canonical(msg, msgtype, store),))
    data = memoryview(msg.data).cast('B')
    hollow = dataclasses.replace(_rosbags_message(msg, msgtype, store),
                                 data=np.empty(0, np.uint8))
    cdr = store.serialize_cdr(hollow, msgtype)
    length = len(cdr) - tail - 4  # where the data's u32 length sits
    head = bytearray(cdr[:length + 4])
    if head[length:] != bytes(4):
        raise RuntimeError(f'{msgtype} does not serialize as expected around its data')
    head[length:] = len(data).to_bytes(4, 'little')
    return CdrPieces((head, data, cdr[len(cdr) - tail:]))


def deserialized(messages, topics):
    """
    Pair each BagMessage with its rclpy message (None for topics that are only copied).

    A message that does not deserialize is paired with its BagError instead, so that one
    damaged message costs its frame, not the run.

    :param topics: names of the topics to deserialize
    """
    for message in messages:
        if message.topic not in topics:
            yield message, None
            continue
        try:
            yield message, to_rclpy(message)
        except BagError as error:
            yield message, error


_STORES = {}


def ros2_store():
    """Return the rosbags type store of the ROS 2 release these wheels are (built once)."""
    store = _STORES.get(ROS2_STORE)
    if store is None:
        store = _STORES[ROS2_STORE] = get_typestore(ROS2_STORE)
    return store


def _storage_files(path):
    return sorted(path.glob('*.db3')) + sorted(path.glob('*.mcap'))


class BagReader:
    """
    Read an input bag (rosbag2 directory, .db3 / .mcap file, or ROS 1 .bag), read-only.

    Use as a context manager.  Topics are listed by :attr:`topics`; :meth:`messages` yields
    :class:`BagMessage` in recording order.
    """

    def __init__(self, path):
        """Open the bag (BagError 'missing', 'unreadable' or 'corrupt' naming the path)."""
        self.path = Path(path).expanduser()
        if not self.path.exists():
            raise BagError('missing', f'input bag {str(self.path)!r} does not exist')
        self._reader = None
        self._open(self.path)
        if self.path.is_dir() and self._hides_messages():
            # A QoS mismatch between metadata.yaml and the storage file makes rosbags match
            # no connection for that topic; the storage file alone is consistent.
            files = _storage_files(self.path)
            if len(files) == 1:
                self.close()
                self._open(files[0])

    def _open(self, path):
        try:
            reader = AnyReader([path], default_typestore=get_typestore(ROS2_STORE))
            reader.open()
        except Exception as exc:  # noqa: B902 - rosbags raises many unrelated types
            metadata = _damaged_metadata(path, exc)
            if metadata is not None:
                raise BagError('unreadable', metadata) from exc
            raise BagError('unreadable', f'cannot open bag {str(path)!r} (not a rosbag2 '
                                         f'directory, .db3, .mcap or ROS 1 .bag, or damaged): '
                                         f'{type(exc).__name__}: {exc}') from exc
        self._reader = reader
        self.source = path
        self.is_ros1 = not reader.is2
        self._ros1_store = None
        if self.is_ros1:
            # ROS 1 -> CDR at byte level needs the ROS 2 Header (no seq) in the typestore,
            # as `rosbags-convert` does.
            header = get_typestore(ROS2_STORE).fielddefs['std_msgs/msg/Header']
            store = get_typestore(Stores.EMPTY)
            store.register({**reader.typestore.fielddefs, 'std_msgs/msg/Header': header})
            self._ros1_store = store
        types = {}
        for connection in reader.connections:
            types.setdefault(connection.topic, set()).add(connection.msgtype)
        self.topics = {}
        #: Topics recorded with several message types (rosbags lists them with one of them):
        #: not listed, never read.
        self.mixed_type_topics = sorted(name for name, kinds in types.items() if len(kinds) > 1)
        for name, info in reader.topics.items():
            if info.msgtype is None or name in self.mixed_type_topics:
                continue
            self.topics[name] = TopicInfo(name, info.msgtype, int(info.msgcount))

    def _hides_messages(self):
        """Tell whether a listed topic yields no message (a metadata / storage mismatch)."""
        for topic, info in self.topics.items():
            if not info.count:
                continue
            connections = [c for c in self._reader.connections if c.topic == topic]
            try:
                next(self._reader.messages(connections=connections))
            except StopIteration:
                return True
            except Exception:  # noqa: B902 - a damaged file shows up properly on the real read
                return False
        return False

    def close(self):
        """Close the bag (idempotent)."""
        reader, self._reader = self._reader, None
        if reader is not None:
            try:
                reader.close()
            except Exception:  # noqa: B902 - closing a damaged bag must not mask the error
                pass

    def __enter__(self):
        """Return self."""
        return self

    def __exit__(self, *exc):
        """Close the bag."""
        self.close()
        return False

    def topics_of_type(self, *msgtypes):
        """Return the sorted names of the topics carrying one of the given rosbags types."""
        return sorted(t.name for t in self.topics.values() if t.msgtype in msgtypes)

    def describe_topics(self, names=None):
        """Format topics (default all) as 'name (type, N msgs)' lines, for error messages."""
        names = sorted(self.topics) if names is None else names
        return '\n'.join(f'  {n} ({self.topics[n].msgtype}, {self.topics[n].count} msgs)'
                         for n in names) or '  (none)'

    def connection_info(self, topic):
        """
        Return what a writer needs to record a topic exactly as in this bag.

        :return: dict with msgtype, msgdef, rihs01, serialization_format, qos (for
            :meth:`AtomicBagWriter.add_topic`).
        """
        connections = [c for c in self._reader.connections if c.topic == topic]
        if not connections:
            raise BagError('no_topic', f'topic {topic!r} is not in {str(self.source)!r}')
        conn = connections[0]
        ext = conn.ext
        info = {'msgtype': conn.msgtype, 'msgdef': None, 'rihs01': None, 'qos': ()}
        if isinstance(ext, ConnectionExtRosbag2):
            info['qos'] = tuple(ext.offered_qos_profiles)
            if conn.digest and conn.msgdef.format != MessageDefinitionFormat.NONE:
                info['msgdef'] = conn.msgdef.data
                info['rihs01'] = conn.digest
        if info['msgdef'] is None:
            store = self._ros1_store or self._reader.typestore
            ros2 = ros2_store()
            # A ROS 1 type known to ROS 2 with the same wire format (sensor_msgs etc.) is
            # recorded with its ROS 2 definition and hash, as ROS 2 tools expect.
            if conn.msgtype not in store.fielddefs or (
                    conn.msgtype in ros2.fielddefs
                    and is_same_wireformat(store, ros2, conn.msgtype, conn.msgtype)):
                store = ros2
            info['msgdef'] = store.generate_msgdef(conn.msgtype, ros_version=2)[0]
            info['rihs01'] = store.hash_rihs01(conn.msgtype)
        return info

    def deserialize(self, message):
        """
        Deserialize a :class:`BagMessage` into a rosbags message object.

        For types without rclpy classes in this environment (e.g. tf2_msgs/TFMessage).

        :raises BagError: 'corrupt' when the bytes do not parse
        """
        store = self._ros1_store or self._reader.typestore
        if message.msgtype not in store.fielddefs:
            store = ros2_store()
        try:
            return store.deserialize_cdr(message.cdr, message.msgtype)
        except Exception as exc:  # noqa: B902 - rosbags raises several types
            raise BagError('corrupt', f'cannot deserialize a {message.msgtype} message on '
                                      f'{message.topic!r}: {exc}') from exc

    def first_message(self, topic):
        """Return the first recorded BagMessage of a topic, or None when it has none."""
        for message in self.messages([topic]):
            return message
        return None

    def messages(self, topics=None):
        """
        Yield messages in recording order.

        :param topics: topic names to read, default all in :attr:`topics`.
        :raises BagError: 'no_topic' for an unknown topic, 'corrupt' for damaged data.
        """
        if topics is not None:
            missing = [t for t in topics if t not in self.topics]
            if missing:
                raise BagError('no_topic', f'topics {missing} are not in '
                                           f'{str(self.path)!r}; it has:\n'
                                           + self.describe_topics())
            wanted = set(topics)
            connections = [c for c in self._reader.connections if c.topic in wanted]
        else:
            connections = [c for c in self._reader.connections if c.topic in self.topics]
        if not connections:
            return
        iterator = self._reader.messages(connections=connections)
        while True:
            try:
                conn, log_time, raw = next(iterator)
                if self.is_ros1:
                    raw = self._ros1_store.ros1_to_cdr(raw, conn.msgtype)
            except StopIteration:
                return
            except Exception as exc:  # noqa: B902 - rosbags raises many unrelated types
                raise BagError('corrupt', f'bag {str(self.path)!r} is damaged or truncated: '
                                          f'{type(exc).__name__}: {exc}') from exc
            yield BagMessage(conn.topic, conn.msgtype, int(log_time), bytes(raw))
