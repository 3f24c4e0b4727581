"""
RGB-D pairs from a rosbag2 directory / storage file or ROS 1 bag (e.g. simulator recordings).

Read with ``rosbags`` (pure Python, no ROS install). The colour topic carries
``sensor_msgs/msg/Image`` (rgb8, bgr8, rgba8, bgra8, mono8) or ``CompressedImage`` (JPEG / PNG);
the depth topic carries ``Image`` with 32FC1 (meters) or 16UC1 / mono16 (``depth_scale``
meters per unit, default 0.001 = millimetres). Colour and depth are matched by header stamp
(nearest, within ``tolerance`` seconds; the bag time when a stamp is zero). K comes from the
first message on an optional ``sensor_msgs/msg/CameraInfo`` topic, else from
``default_hfov_deg``.

The whole bag is decoded once at construction and kept in memory (use ``stride`` /
``max_frames`` for long recordings); a frame that fails to decode is kept as an error and
raises :class:`UnreadableSample` when indexed.
"""

import io
from pathlib import Path

from marigold_model.data.sample import intrinsics_from_hfov, make_sample, UnreadableSample
import numpy as np

try:  # torch is a dependency of marigold_model; the reader itself is numpy-only
    from torch.utils.data import Dataset as _Dataset
except ImportError:  # pragma: no cover
    _Dataset = object

# encoding -> (numpy dtype, channels)
ENCODINGS = {
    'rgb8': (np.uint8, 3), 'bgr8': (np.uint8, 3), 'rgba8': (np.uint8, 4),
    'bgra8': (np.uint8, 4), 'mono8': (np.uint8, 1), '8UC1': (np.uint8, 1),
    '8UC3': (np.uint8, 3), 'mono16': (np.uint16, 1), '16UC1': (np.uint16, 1),
    '32FC1': (np.float32, 1),
}


def image_to_numpy(msg):
    """
    Decode a ``sensor_msgs/Image``-like object into an array, honouring ``step`` padding.

    :param msg: object with height, width, encoding, is_bigendian, step and data.
    :return: HxW or HxWxC array (a copy) in the message's channel order.
    """
    encoding = str(msg.encoding)
    if encoding not in ENCODINGS:
        raise UnreadableSample(f'unsupported image encoding {encoding!r} (supported: '
                               f'{", ".join(sorted(ENCODINGS))})')
    dtype, channels = ENCODINGS[encoding]
    dtype = np.dtype(dtype).newbyteorder('>' if msg.is_bigendian else '<')
    h, w, step = int(msg.height), int(msg.width), int(msg.step)
    row_bytes = w * channels * dtype.itemsize
    data = np.frombuffer(bytes(msg.data) if not isinstance(msg.data, np.ndarray)
                         else msg.data.tobytes(), dtype=np.uint8)
    if step < row_bytes or data.size < h * step - (step - row_bytes):
        raise UnreadableSample(f'image {w}x{h} {encoding}: step {step} / {data.size} data bytes '
                               f'too small (need rows of {row_bytes} bytes)')
    if data.size < h * step:  # some publishers omit the padding after the last row
        data = np.concatenate([data, np.zeros(h * step - data.size, np.uint8)])
    rows = data[:h * step].reshape(h, step)[:, :row_bytes]
    array = np.ascontiguousarray(rows).view(dtype).reshape(h, w, channels)
    array = array.astype(dtype.newbyteorder('='))
    return array[..., 0] if channels == 1 else array


def rgb_from_image(msg):
    """
    Decode a colour Image message to HxWx3 uint8 RGB.

    :param msg: sensor_msgs/Image-like object.
    :return: HxWx3 uint8.
    """
    array = image_to_numpy(msg)
    encoding = str(msg.encoding)
    if encoding in ('mono16', '16UC1', '32FC1'):
        raise UnreadableSample(f'colour topic carries a depth-like encoding {encoding!r}')
    if array.ndim == 2:
        return np.repeat(array[..., None], 3, axis=2)
    if encoding.startswith('bgr'):
        array = array[..., 2::-1]
    return np.ascontiguousarray(array[..., :3])


def rgb_from_compressed(msg):
    """
    Decode a CompressedImage (JPEG / PNG) to HxWx3 uint8 RGB.

    :param msg: sensor_msgs/CompressedImage-like object.
    :return: HxWx3 uint8.
    """
    from PIL import Image

    try:
        with Image.open(io.BytesIO(bytes(msg.data))) as image:
            return np.asarray(image.convert('RGB'), dtype=np.uint8).copy()
    except (OSError, ValueError, SyntaxError) as exc:
        raise UnreadableSample(f'cannot decode compressed image ({msg.format!r}): {exc}') from exc


def depth_from_image(msg, depth_scale=0.001):
    """
    Decode a depth Image message to meters.

    :param msg: sensor_msgs/Image-like object with 32FC1 (m) or 16UC1 / mono16 encoding.
    :param depth_scale: meters per unit for integer encodings.
    :return: HxW float32 meters (0 / non-finite = invalid).
    """
    encoding = str(msg.encoding)
    if encoding not in ('32FC1', '16UC1', 'mono16'):
        raise UnreadableSample(f'depth encoding {encoding!r} is not 32FC1, 16UC1 or mono16')
    array = image_to_numpy(msg)
    if encoding == '32FC1':
        return array.astype(np.float32)
    return array.astype(np.float32) * np.float32(depth_scale)


def _stamp_ns(msg, bag_time_ns):
    header = getattr(msg, 'header', None)
    if header is not None:
        stamp = header.stamp
        ns = int(stamp.sec) * 1_000_000_000 + int(stamp.nanosec)
        if ns > 0:
            return ns
    return int(bag_time_ns)


def _open_reader(path):
    from rosbags.highlevel import AnyReader
    from rosbags.typesys import get_typestore, Stores

    # Bags without embedded definitions (older rosbag2) fall back to the Humble types.
    return AnyReader([path], default_typestore=get_typestore(Stores.ROS2_HUMBLE))


class BagRGBDDataset(_Dataset):
    """Time-matched colour / depth frames from a bag as :class:`Sample`."""

    def __init__(self, path, rgb_topic, depth_topic, camera_info_topic=None, tolerance=0.02,
                 depth_scale=0.001, default_hfov_deg=60.0, stride=1, max_frames=None):
        """
        Read and match the bag.

        :param path: rosbag2 directory, rosbag2 storage file (.db3 / .mcap) or ROS 1 .bag.
        :param rgb_topic: colour topic (Image or CompressedImage).
        :param depth_topic: depth topic (Image, 32FC1 / 16UC1 / mono16).
        :param camera_info_topic: optional CameraInfo topic for K.
        :param tolerance: largest stamp difference in seconds for a colour / depth match.
        :param depth_scale: meters per unit of 16-bit depth.
        :param default_hfov_deg: horizontal fov used without camera info.
        :param stride: keep every ``stride``-th matched pair.
        :param max_frames: keep at most this many pairs.
        """
        self.path = Path(path).expanduser()
        if not self.path.exists():
            raise ValueError(f'BagRGBDDataset: bag path {str(self.path)!r} does not exist')
        if tolerance < 0 or stride < 1:
            raise ValueError(f'BagRGBDDataset: need tolerance >= 0 and stride >= 1, got '
                             f'{tolerance} and {stride}')
        self.depth_scale = float(depth_scale)
        self.default_hfov_deg = float(default_hfov_deg)
        self.K = None
        rgb_msgs, depth_msgs = self._read(rgb_topic, depth_topic, camera_info_topic)
        if not rgb_msgs or not depth_msgs:
            # Some rosbag2 directories' metadata hides the messages; try the storage file.
            files = (sorted(self.path.glob('*.db3')) + sorted(self.path.glob('*.mcap'))
                     if self.path.is_dir() else [])
            if len(files) == 1:
                self.path = files[0]
                rgb_msgs, depth_msgs = self._read(rgb_topic, depth_topic, camera_info_topic)
        if not rgb_msgs or not depth_msgs:
            raise ValueError(f'BagRGBDDataset: {str(path)!r} has {len(rgb_msgs)} messages on '
                             f'{rgb_topic!r} and {len(depth_msgs)} on {depth_topic!r}; need both')

        depth_stamps = np.array([s for s, _ in depth_msgs], dtype=np.int64)
        order = np.argsort(depth_stamps, kind='stable')
        depth_stamps = depth_stamps[order]
        pairs = []
        for stamp, rgb in rgb_msgs:
            j = int(np.searchsorted(depth_stamps, stamp))
            best = min((k for k in (j - 1, j) if 0 <= k < len(depth_stamps)),
                       key=lambda k: abs(int(depth_stamps[k]) - stamp))
            if abs(int(depth_stamps[best]) - stamp) <= tolerance * 1e9:
                pairs.append((stamp, rgb, depth_msgs[order[best]][1]))
        pairs = pairs[::int(stride)]
        if max_frames is not None:
            pairs = pairs[:int(max_frames)]
        if not pairs:
            raise ValueError(f'BagRGBDDataset: no {rgb_topic!r} / {depth_topic!r} pair within '
                             f'{tolerance} s in {str(path)!r}')
        self.frames = pairs

    def _read(self, rgb_topic, depth_topic, camera_info_topic):
        """Decode all colour / depth messages: lists of (stamp ns, array or error str)."""
        rgb_msgs, depth_msgs = [], []
        try:
            reader = _open_reader(self.path)
            reader.open()
        except Exception as exc:  # noqa: B902 - rosbags raises several unrelated types
            raise ValueError(f'BagRGBDDataset: cannot open bag {str(self.path)!r}: '
                             f'{exc}') from exc
        try:
            topics = {c.topic for c in reader.connections}
            for topic in (rgb_topic, depth_topic):
                if topic not in topics:
                    raise ValueError(f'BagRGBDDataset: topic {topic!r} not in '
                                     f'{str(self.path)!r} (topics: {sorted(topics)})')
            wanted = [c for c in reader.connections
                      if c.topic in (rgb_topic, depth_topic, camera_info_topic)]
            for conn, bag_time, raw in reader.messages(connections=wanted):
                try:
                    msg = reader.deserialize(raw, conn.msgtype)
                except Exception as exc:  # noqa: B902 - a corrupt message is skipped later
                    target = rgb_msgs if conn.topic == rgb_topic else depth_msgs
                    if conn.topic != camera_info_topic:
                        target.append((int(bag_time), f'cannot deserialize: {exc}'))
                    continue
                if conn.topic == camera_info_topic:
                    if self.K is None:
                        k = np.asarray(msg.k, dtype=np.float64).reshape(3, 3)
                        if k[0, 0] > 0 and k[1, 1] > 0:
                            self.K = k
                    continue
                stamp = _stamp_ns(msg, bag_time)
                try:
                    if conn.topic == rgb_topic:
                        compressed = conn.msgtype.endswith('CompressedImage')
                        value = rgb_from_compressed(msg) if compressed else rgb_from_image(msg)
                    else:
                        value = depth_from_image(msg, self.depth_scale)
                except UnreadableSample as exc:
                    value = str(exc)
                (rgb_msgs if conn.topic == rgb_topic else depth_msgs).append((stamp, value))
        finally:
            reader.close()
        return rgb_msgs, depth_msgs

    def __len__(self):
        """Return the number of matched pairs."""
        return len(self.frames)

    def __getitem__(self, index):
        """
        Return pair ``index``.

        :param index: pair number (in colour stamp order of the bag).
        :return: Sample named by the colour stamp in nanoseconds.
        """
        stamp, rgb, depth = self.frames[index]
        for value, what in ((rgb, 'colour'), (depth, 'depth')):
            if isinstance(value, str):
                raise UnreadableSample(f'bag {str(self.path)!r} {what} frame at {stamp} ns: '
                                       f'{value}')
        if rgb.shape[:2] != depth.shape:
            raise UnreadableSample(f'bag frame at {stamp} ns: colour {rgb.shape[:2]} and depth '
                                   f'{depth.shape} sizes differ')
        k = self.K
        if k is None:
            k = intrinsics_from_hfov(rgb.shape[1], rgb.shape[0], self.default_hfov_deg)
        return make_sample(rgb, depth, k, f'{stamp:019d}')
