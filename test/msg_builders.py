"""
Shared test helpers with ROS: message builders, and bags written and read with rosbags.

A "frame" here is frame i of a 10 Hz sequence from T0 (the bag tests' timing).  Bags are
written with rosbags directly, not with the code under test.
"""

from builtin_interfaces.msg import Time
from marigold_ros.conversions import rgb_to_compressed, rgb_to_image
import numpy as np
from rclpy.serialization import deserialize_message, serialize_message
from rosbags.rosbag1 import Writer as Writer1
from rosbags.rosbag2 import Reader, StoragePlugin, Writer
from rosbags.typesys import get_typestore, Stores
from sensor_msgs.msg import CameraInfo, Image, PointCloud2
from std_msgs.msg import Header

FRAME_ID = 'cam_optical'
T0 = 100 * 10 ** 9
PERIOD = 10 ** 8  # 10 Hz
STORE = get_typestore(Stores.ROS2_KILTED)
PLUGINS = {'sqlite3': StoragePlugin.SQLITE3, 'mcap': StoragePlugin.MCAP}


def header(sec=0, nanosec=0, frame_id=FRAME_ID):
    """Return a Header of a given stamp and frame."""
    return Header(stamp=Time(sec=sec, nanosec=nanosec), frame_id=frame_id)


def frame_stamp(i):
    """Return the stamp of frame i in nanoseconds."""
    return T0 + i * PERIOD


def frame_header(i, frame_id=FRAME_ID):
    """Return the Header of frame i."""
    ns = frame_stamp(i)
    return header(ns // 10 ** 9, ns % 10 ** 9, frame_id)


def camera_info(K, width, height, /, header=None, **fields):
    """
    Return the CameraInfo of an undistorted pinhole camera: plumb_bob, d = 0, R = I, P = [K|0].

    :param K: 3x3 intrinsics
    :param width: image width in pixels
    :param height: image height in pixels
    :param header: the message's header (default: zero stamp, FRAME_ID)
    :param fields: message fields set last, as given (width, height and k too)
    """
    info = CameraInfo(header=header if header is not None else Header(frame_id=FRAME_ID),
                      width=width, height=height, distortion_model='plumb_bob', d=[0.0] * 5)
    K = np.asarray(K, np.float64)
    info.k = K.reshape(-1).tolist()
    info.r = np.eye(3).reshape(-1).tolist()
    info.p = np.hstack([K, np.zeros((3, 1))]).reshape(-1).tolist()
    for name, value in fields.items():
        setattr(info, name, value)
    return info


def frame_camera_info(sample, i):
    """Return the CameraInfo of a synthetic sample (its K and size) stamped as frame i."""
    height, width = sample.depth.shape
    return camera_info(sample.K, width, height, header=frame_header(i))


def frame_sparse_depth(sample, i, step=4):
    """16UC1 millimeters on every ``step``-th pixel of the true depth, zero elsewhere."""
    mm = np.zeros(sample.depth.shape, np.uint16)
    grid = np.zeros(sample.depth.shape, bool)
    grid[::step, ::step] = True
    grid &= sample.valid
    mm[grid] = np.rint(sample.depth[grid] * 1000.0).astype(np.uint16)
    msg = rgb_to_image(mm, frame_header(i), 'mono16')
    msg.encoding = '16UC1'
    return msg


def frame_messages(scenes, compressed=False, sparse=False, late_s=0.0, second_camera=False,
                   sparse_step=4):
    """(topic, type, bag time, CDR) in recording order; extras arrive ``late_s`` late."""
    image_topic = '/cam/image_raw/compressed' if compressed else '/cam/image_raw'
    out = []
    for i, sample in enumerate(scenes):
        if compressed:
            image = rgb_to_compressed(sample.rgb, frame_header(i), 'png')
            out.append((image_topic, 'sensor_msgs/msg/CompressedImage', frame_stamp(i) + 5000,
                        serialize_message(image)))
        else:
            out.append((image_topic, 'sensor_msgs/msg/Image', frame_stamp(i) + 5000,
                        serialize_message(rgb_to_image(sample.rgb, frame_header(i)))))
        late = int(late_s * 1e9)
        out.append(('/cam/camera_info', 'sensor_msgs/msg/CameraInfo',
                    frame_stamp(i) + 6000 + late,
                    serialize_message(frame_camera_info(sample, i))))
        if sparse:
            out.append(('/cam/sparse_depth', 'sensor_msgs/msg/Image',
                        frame_stamp(i) + 7000 + late,
                        serialize_message(frame_sparse_depth(sample, i, sparse_step))))
        if second_camera:
            out.append(('/left/image_raw', 'sensor_msgs/msg/Image', frame_stamp(i) + 8000,
                        serialize_message(rgb_to_image(sample.rgb, frame_header(i)))))
    return sorted(out, key=lambda m: m[2])


def write_bag(path, storage, messages):
    """Write (topic, type, bag time, CDR) messages to a rosbag2 ('sqlite3' or 'mcap')."""
    with Writer(path, version=9, storage_plugin=PLUGINS[storage]) as writer:
        connections = {}
        for topic, msgtype, log_time, raw in messages:
            if topic not in connections:
                connections[topic] = writer.add_connection(topic, msgtype, typestore=STORE)
            writer.write(connections[topic], log_time, raw)
    return str(path)


def write_ros1_bag(path, messages):
    """Write the same messages to a ROS 1 bag (CDR converted to ROS 1 serialization)."""
    ros1 = get_typestore(Stores.ROS1_NOETIC)
    with Writer1(path) as writer:
        connections = {}
        for topic, msgtype, log_time, raw in messages:
            if topic not in connections:
                connections[topic] = writer.add_connection(topic, msgtype, typestore=ros1)
            writer.write(connections[topic], log_time, STORE.cdr_to_ros1(raw, msgtype))
    return str(path)


def read_bag(path):
    """Every message of a rosbag2 (rosbags directly): (topic, bag time, raw CDR), in order."""
    with Reader(path) as reader:
        return [(c.topic, t, bytes(raw)) for c, t, raw in reader.messages()]


def messages_by_topic(path):
    """Messages per topic, deserialized by rclpy into the classes the node uses."""
    classes = {'sensor_msgs/msg/Image': Image, 'sensor_msgs/msg/CameraInfo': CameraInfo,
               'sensor_msgs/msg/PointCloud2': PointCloud2}
    out = {}
    with Reader(path) as reader:
        for connection, _, raw in reader.messages():
            out.setdefault(connection.topic, []).append(
                deserialize_message(bytes(raw), classes[connection.msgtype]))
    return out
