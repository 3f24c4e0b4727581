"""
RGB-D pairs from a rosbag2 directory / storage file or ROS 1 bag (e.g. simulator recordings).

Read with ``rosbags`` (no ROS install) and decoded by
:mod:`marigold_model.data.image_decoding`, the ROS node's decoder, so a bag the node reads
is a bag this reader reads. Colour and depth are matched by header stamp (nearest, within
``tolerance`` seconds; the bag time when a stamp is zero). K comes from the first message on
an optional CameraInfo topic, else from ``default_hfov_deg``.

The whole bag is decoded once at construction and kept in memory (use ``stride`` /
``max_frames`` for long recordings); a frame that fails to decode is kept as an error and
raises :class:`UnreadableSample` when indexed.
"""

from pathlib import Path

from marigold_model.data.image_decoding import decode_compressed_rgb, decode_depth, decode_rgb
from marigold_model.data.image_decoding import ImageConversionError
from marigold_model.data.sample import intrinsics_from_hfov, make_sample, UnreadableSample
import numpy as np

try:  # torch is a dependency of marigold_model; the reader itself is numpy-only
    from torch.utils.data import Dataset as _Dataset
except ImportError:  # pragma: no cover
    _Dataset = object

# Depth recorded as mono16 carries no unit of its own: read it as 16UC1 at ``depth_scale``.
_DEPTH_ALIASES = {'mono16': '16UC1'}


def rgb_from_image(msg):
    """Decode a colour Image message to HxWx3 uint8 RGB (ImageConversionError if it cannot)."""
    return decode_rgb(msg.data, msg.height, msg.width, msg.step, msg.encoding,
                      msg.is_bigendian)


def rgb_from_compressed(msg):
    """Decode a CompressedImage (JPEG / PNG) to HxWx3 uint8 RGB (not compressedDepth)."""
    return decode_compressed_rgb(msg.data, msg.format)


def depth_from_image(msg, depth_scale=0.001):
    """Decode a 32FC1 (m) or 16UC1 / mono16 (``depth_scale`` m per unit) Image to HxW meters."""
    encoding = _DEPTH_ALIASES.get(str(msg.encoding).strip().lower(), msg.encoding)
    return decode_depth(msg.data, msg.height, msg.width, msg.step, encoding,
                        msg.is_bigendian, unit=depth_scale)


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

        :param path: rosbag2 directory, rosbag2 storage file (.db3 / .mcap) or ROS 1 .bag
        :param rgb_topic: colour topic (Image or CompressedImage)
        :param depth_topic: depth topic (Image, 32FC1 / 16UC1 / mono16)
        :param tolerance: largest stamp difference in seconds for a colour / depth match
        :param depth_scale: meters per unit of 16-bit depth (default millimetres)
        :param stride: keep every ``stride``-th matched pair
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
                except ImageConversionError as exc:
                    value = str(exc)
                (rgb_msgs if conn.topic == rgb_topic else depth_msgs).append((stamp, value))
        finally:
            reader.close()
        return rgb_msgs, depth_msgs

    def __len__(self):
        """Return the number of matched pairs."""
        return len(self.frames)

    def __getitem__(self, index):
        """Return pair ``index`` (colour stamp order) as a Sample named by its stamp in ns."""
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
