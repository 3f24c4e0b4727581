"""
KITTI depth reader (Geiger et al.): the Eigen split of projected LiDAR depth.

The split file lists ``rgb_path depth_path [focal]`` per line; depth PNGs are uint16 meters
times 256, 0 where the LiDAR gave nothing.
"""

from pathlib import Path

from marigold_model.data.image_io import read_png16, read_rgb, require_file
from marigold_model.data.sample import DatasetError, make_sample
import numpy as np

# KITTI left colour camera focal length, used when the split file has no focal column.
KITTI_DEFAULT_FOCAL = 721.5377


def read_kitti_depth(path):
    """Read a KITTI depth PNG (uint16 meters * 256) as float32 meters, 0 where invalid."""
    return read_png16(path).astype(np.float32) / np.float32(256.0)


class KittiEigen:
    """
    KITTI Eigen split as a sequence of Samples.

    Each split line is ``rgb_path depth_path [focal]``, relative to the root(s); lines whose
    depth path is ``None`` (no ground truth) are left out and counted in ``no_ground_truth``.
    """

    def __init__(self, root, split_file, depth_root=None):
        """
        Parse the split file and check that every listed file exists.

        :param depth_root: folder the depth paths are relative to (default ``root``)
        """
        self.root = Path(root)
        self.depth_root = Path(depth_root) if depth_root else self.root
        for folder in {self.root, self.depth_root}:
            if not folder.is_dir():
                raise DatasetError(f'KITTI root folder not found: {folder}')
        split_file = require_file(split_file, 'KITTI split file')
        self.entries = []
        self.no_ground_truth = 0
        with open(split_file) as stream:
            for number, line in enumerate(stream, 1):
                fields = line.split()
                if not fields or fields[0].startswith('#'):
                    continue
                if len(fields) < 2:
                    raise DatasetError(f'{split_file}:{number}: expected "rgb_path depth_path '
                                       f'[focal]", got {line.strip()!r}')
                if fields[1] == 'None':
                    self.no_ground_truth += 1
                    continue
                try:
                    focal = float(fields[2]) if len(fields) > 2 else KITTI_DEFAULT_FOCAL
                except ValueError:
                    raise DatasetError(f'{split_file}:{number}: focal {fields[2]!r} is not a '
                                       'number') from None
                self.entries.append((self.root / fields[0], self.depth_root / fields[1], focal))
        if not self.entries:
            raise DatasetError(f'{split_file} lists no image with ground truth')
        missing = [str(p) for entry in self.entries for p in entry[:2] if not p.is_file()]
        if missing:
            raise DatasetError(f'{len(missing)} file(s) of {split_file} not found, e.g. '
                               + ', '.join(missing[:3]))

    def __len__(self):
        """Return the number of images with ground truth."""
        return len(self.entries)

    def __getitem__(self, position):
        """Read one image and its projected LiDAR depth as a Sample named after the RGB path."""
        if not 0 <= position < len(self):
            raise IndexError(f'KITTI position {position} out of range [0, {len(self)})')
        rgb_path, depth_path, focal = self.entries[position]
        rgb = read_rgb(rgb_path)
        depth = read_kitti_depth(depth_path)
        if depth.shape != rgb.shape[:2]:
            raise DatasetError(f'{depth_path} is {depth.shape} but {rgb_path} is '
                               f'{rgb.shape[:2]}')
        height, width = depth.shape
        k = np.array([[focal, 0.0, (width - 1) / 2.0], [0.0, focal, (height - 1) / 2.0],
                      [0.0, 0.0, 1.0]])
        name = str(rgb_path.relative_to(self.root).with_suffix(''))
        return make_sample(rgb, depth, k, name)
