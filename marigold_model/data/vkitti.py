"""
Virtual KITTI 2 reader (Cabon et al., 2020).

On-disk format (assumptions, as distributed in ``vkitti_2.0.3_{rgb,depth,textgt}.tar``):

* ``SceneXX/<variation>/frames/rgb/Camera_N/rgb_NNNNN.jpg`` (1242x375 RGB) and
  ``SceneXX/<variation>/frames/depth/Camera_N/depth_NNNNN.png``: 16-bit PNG of planar z depth
  (distance to the camera plane) in centimetres. 65535 (655.35 m) is the far plane, i.e. the
  sky, and is invalid (as is 0).
* The rgb and depth trees may live under different roots (one per tar): pass ``depth_root``.
* ``SceneXX/<variation>/intrinsic.txt`` (from the textgt tar, looked up under the rgb root,
  the depth root and ``intrinsics_root``): a header line then rows
  ``frame cameraID fx fy cx cy``. Without it the documented default K is used
  (fx = fy = 725.0087, cx = 620.5, cy = 187).
* A list file (Marigold's ``vkitti_train.txt`` style) of ``rgb_path depth_path`` rows relative
  to the root may replace the directory scan.
"""

from pathlib import Path
import re

from marigold_model.data.image_io import read_list_file, read_png16, read_rgb, require_dir
from marigold_model.data.sample import make_sample, UnreadableSample
import numpy as np

try:  # torch is a dependency of marigold_model; the reader itself is numpy-only
    from torch.utils.data import Dataset as _Dataset
except ImportError:  # pragma: no cover
    _Dataset = object

VKITTI2_K = np.array([[725.0087, 0.0, 620.5], [0.0, 725.0087, 187.0], [0.0, 0.0, 1.0]])
FAR_PLANE_CM = 65535
_RGB_RE = re.compile(r'rgb_(\d+)\.jpg$')


def read_intrinsics_file(path):
    """Parse a vKITTI 2 ``intrinsic.txt`` into {(frame, camera id): 3x3 K}."""
    table = {}
    for line in Path(path).read_text().splitlines():
        fields = line.split()
        if len(fields) != 6:
            continue
        try:
            frame, cam = int(fields[0]), int(fields[1])
            fx, fy, cx, cy = (float(x) for x in fields[2:])
        except ValueError:
            continue  # the header row
        table[(frame, cam)] = np.array([[fx, 0.0, cx], [0.0, fy, cy], [0.0, 0.0, 1.0]])
    return table


def decode_depth(raw_cm, max_depth=None):
    """
    Convert a vKITTI 2 depth PNG (uint16 centimetres) to meters with the far plane invalid.

    :param max_depth: optional extra cut-off in meters (e.g. 80 as Marigold evaluates)
    :return: HxW float32 meters, 0 where invalid
    """
    raw = np.asarray(raw_cm)
    depth = raw.astype(np.float32) / 100.0
    invalid = (raw == FAR_PLANE_CM) | (raw == 0)
    if max_depth is not None:
        invalid |= depth > max_depth
    return np.where(invalid, np.float32(0.0), depth).astype(np.float32)


class VKITTI2Dataset(_Dataset):
    """Virtual KITTI 2 frames as :class:`Sample` (depth in meters, sky invalid)."""

    def __init__(self, root, depth_root=None, list_file=None, scenes=None, variations=None,
                 cameras=('Camera_0',), intrinsics_root=None, max_depth=None):
        """
        Index the frames.

        :param root: folder holding ``SceneXX`` (the rgb tree)
        :param depth_root: folder holding the depth tree (default: root)
        :param list_file: optional ``rgb depth`` rows relative to root instead of a scan
        :param scenes: optional scene names to keep, e.g. ('Scene01',)
        :param variations: optional variations to keep, e.g. ('clone', 'fog')
        :param intrinsics_root: extra folder holding ``SceneXX/<variation>/intrinsic.txt``
        :param max_depth: optional cut-off in meters beyond which depth is invalid
        """
        self.root = require_dir(root, 'VKITTI2Dataset')
        self.depth_root = (self.root if depth_root is None
                           else require_dir(depth_root, 'VKITTI2Dataset depth_root'))
        self.intrinsics_roots = [self.root, self.depth_root]
        if intrinsics_root is not None:
            self.intrinsics_roots.append(require_dir(intrinsics_root,
                                                     'VKITTI2Dataset intrinsics_root'))
        self.max_depth = max_depth
        if list_file is not None:
            pairs = read_list_file(list_file, self.root)
            # Depth paths in a list file are relative to the depth root.
            pairs = [(rgb, self.depth_root / depth.relative_to(self.root)) for rgb, depth in pairs]
        else:
            pairs = self._scan(scenes, variations, cameras)
        self._intrinsics = {}
        self.items = [(rgb, depth, self._lookup_k(rgb)) for rgb, depth in pairs]
        if not self.items:
            raise ValueError(f'VKITTI2Dataset: no frames found under {str(self.root)!r} '
                             f'(expected SceneXX/<variation>/frames/rgb/Camera_0/rgb_NNNNN.jpg '
                             f'with depth under {str(self.depth_root)!r})')

    def _scan(self, scenes, variations, cameras):
        pairs = []
        for rgb in sorted(self.root.glob('Scene*/*/frames/rgb/*/rgb_*.jpg')):
            cam_dir = rgb.parent.name
            variation = rgb.parents[3].name
            scene = rgb.parents[4].name
            if scenes is not None and scene not in scenes:
                continue
            if variations is not None and variation not in variations:
                continue
            if cameras is not None and cam_dir not in cameras:
                continue
            match = _RGB_RE.search(rgb.name)
            if match is None:
                continue
            depth = (self.depth_root / scene / variation / 'frames' / 'depth' / cam_dir
                     / f'depth_{match.group(1)}.png')
            if depth.is_file():
                pairs.append((rgb, depth))
        return pairs

    def _lookup_k(self, rgb):
        """Return the K of one frame from intrinsic.txt when found, else the default."""
        parts = rgb.parts
        try:
            i = parts.index('frames')
            scene, variation = parts[i - 2], parts[i - 1]
            cam = int(parts[i + 2].split('_')[-1])
            frame = int(_RGB_RE.search(rgb.name).group(1))
        except (ValueError, IndexError, AttributeError):
            return VKITTI2_K
        key = (scene, variation)
        if key not in self._intrinsics:
            self._intrinsics[key] = {}
            for base in self.intrinsics_roots:
                path = base / scene / variation / 'intrinsic.txt'
                if path.is_file():
                    self._intrinsics[key] = read_intrinsics_file(path)
                    break
        return self._intrinsics[key].get((frame, cam), VKITTI2_K)

    def __len__(self):
        """Return the number of frames."""
        return len(self.items)

    def __getitem__(self, index):
        """Read frame ``index`` as a Sample named ``SceneXX/<variation>/Camera_N/NNNNN``."""
        rgb_path, depth_path, k = self.items[index]
        rgb = read_rgb(rgb_path)
        depth = decode_depth(read_png16(depth_path), self.max_depth)
        if rgb.shape[:2] != depth.shape:
            raise UnreadableSample(f'vKITTI frame {str(rgb_path)!r}: rgb {rgb.shape[:2]} and '
                                   f'depth {depth.shape} sizes differ')
        parts = rgb_path.parts
        name = '/'.join(parts[-6:-4] + parts[-2:-1] + (rgb_path.stem[4:],))
        return make_sample(rgb, depth, k, name)


# Alternative spelling used by marigold_model.training.
VirtualKitti2Dataset = VKITTI2Dataset
