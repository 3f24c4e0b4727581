"""
Per-frame files for people who look at depth outside ROS: 16-bit PNG, colour preview, PLY.

* Metric depth -> ``depth_NNNNNN.png``, 16-bit millimeters (0 = no reading), the format of
  RGB-D data sets.
* Relative depth -> ``relative_NNNNNN.png``, ``1 + round(value * 65534)`` for the [0, 1]
  values (NOT a unit; 0 = no depth, as in the metric files, so the nearest point is not
  mistaken for a hole), under its own name so the two can never be mistaken for each other.
* Previews map depth to colour (near = yellow, far = dark purple, invalid = black).
* PLY clouds are binary little endian with x y z float and red green blue uchar, valid
  points only; they are written only from metric clouds.
* ``frames.csv`` lists every frame: index, stamps, frame id, metric or relative (or the
  error), scale, shift and the notes.

:class:`FrameExporter` writes a folder of these aside and moves it into place when complete.
"""

import csv
import os
from pathlib import Path
import shutil

from marigold_model.data.image_io import relative_to_uint16
from marigold_model.data.synthetic import colorize_depth
import numpy as np
from PIL import Image as PILImage

from .bag_io import BagError
from .bag_writer import remove_stale_stages, staging_path
from .conversions import image_to_depth, pointcloud2_to_xyz
from .stamp_matcher import stamp_to_ns

MM_PER_M = 1000.0
UINT16_MAX = 65535


def metric_to_png16(depth_m):
    """Convert HxW meters (NaN / <= 0 invalid) to uint16 millimeters, 0 if invalid or too far."""
    depth = np.asarray(depth_m, dtype=np.float64)
    mm = np.rint(depth * MM_PER_M)
    valid = np.isfinite(mm) & (mm > 0) & (mm <= UINT16_MAX)
    out = np.zeros(depth.shape, np.uint16)
    out[valid] = mm[valid].astype(np.uint16)
    return out


#: Relative depth in [0, 1] to uint16, ``1 + round(value * 65534)`` (0 = no depth).
relative_to_png16 = relative_to_uint16


def write_png(path, array):
    """Write an HxW uint16 / uint8 or HxWx3 uint8 array as PNG."""
    array = np.ascontiguousarray(array)
    if array.dtype == np.uint16:
        array = array.astype('<u2', copy=False)  # Pillow maps native uint16 to 'I;16'
    PILImage.fromarray(array).save(path, format='PNG')


def colorize(depth, relative=False):
    """Return an HxWx3 uint8 preview; ``relative``: 0 is the nearest point, not a missing one."""
    return colorize_depth(depth, np.isfinite(depth) if relative else None)


def write_ply(path, points, colors=None):
    """
    Write (..., 3) points in meters, optional uint8 RGB, as binary PLY; return the count.

    Non-finite points are dropped.
    """
    xyz = np.asarray(points, dtype=np.float32).reshape(-1, 3)
    keep = np.isfinite(xyz).all(axis=1)
    fields = [('x', '<f4'), ('y', '<f4'), ('z', '<f4')]
    header = ['ply', 'format binary_little_endian 1.0', f'element vertex {int(keep.sum())}',
              'property float x', 'property float y', 'property float z']
    if colors is not None:
        rgb = np.asarray(colors, dtype=np.uint8).reshape(-1, 3)
        if rgb.shape[0] != xyz.shape[0]:
            raise ValueError(f'write_ply: {rgb.shape[0]} colours for {xyz.shape[0]} points')
        fields += [('red', 'u1'), ('green', 'u1'), ('blue', 'u1')]
        header += ['property uchar red', 'property uchar green', 'property uchar blue']
    record = np.zeros(int(keep.sum()), dtype=fields)
    record['x'], record['y'], record['z'] = xyz[keep].T
    if colors is not None:
        record['red'], record['green'], record['blue'] = rgb[keep].T
    with open(path, 'wb') as stream:
        stream.write(('\n'.join(header + ['end_header']) + '\n').encode('ascii'))
        stream.write(record.tobytes())
    return int(record.shape[0])


def read_ply(path):
    """Read a PLY of :func:`write_ply`: (N x 3 float32 points, N x 3 uint8 colours or None)."""
    with open(path, 'rb') as stream:
        lines = []
        while not lines or lines[-1] != 'end_header':
            line = stream.readline()
            if not line:
                raise ValueError(f'read_ply: {path!r} has no end_header')
            lines.append(line.decode('ascii').strip())
        body = stream.read()
    if lines[0] != 'ply' or lines[1] != 'format binary_little_endian 1.0':
        raise ValueError(f'read_ply: {path!r} is not a binary little-endian PLY')
    count = int(next(x for x in lines if x.startswith('element vertex')).split()[-1])
    has_color = 'property uchar red' in lines
    fields = [('x', '<f4'), ('y', '<f4'), ('z', '<f4')]
    if has_color:
        fields += [('red', 'u1'), ('green', 'u1'), ('blue', 'u1')]
    record = np.frombuffer(body, dtype=fields, count=count)
    points = np.stack([record['x'], record['y'], record['z']], axis=1)
    colors = np.stack([record['red'], record['green'], record['blue']], axis=1) \
        if has_color else None
    return points, colors


def frame_paths(folder, index):
    """Return the file names ('metric', 'relative', 'preview', 'cloud') of frame ``index``."""
    def name(prefix, suffix):
        return os.path.join(folder, f'{prefix}_{index:06d}.{suffix}')

    return {'metric': name('depth', 'png'), 'relative': name('relative', 'png'),
            'preview': name('preview', 'png'), 'cloud': name('cloud', 'ply')}


def cloud_colors(cloud):
    """Return the (N, 3) uint8 RGB of an x y z rgb PointCloud2 (point_step 16), or None."""
    if 'rgb' not in [f.name for f in cloud.fields]:
        return None
    packed = np.frombuffer(cloud.data, dtype='<u4').reshape(-1, int(cloud.point_step) // 4)
    packed = packed[:, 3]
    return np.stack([(packed >> 16) & 255, (packed >> 8) & 255, packed & 255],
                    axis=1).astype(np.uint8)


class FrameExporter:
    """
    Per-frame files of a run in a folder that appears only when complete.

    :param folder: export folder (must not exist, or be empty, unless ``overwrite``)
    :param overwrite: replace an existing folder on commit
    :raises BagError: 'exists' for a non-empty folder without ``overwrite``
    """

    COLUMNS = ('index', 'stamp_ns', 'log_time_ns', 'frame_id', 'depth', 'scale', 'shift',
               'notes')
    #: The frame table, in every committed folder.
    TABLE = 'frames.csv'

    def __init__(self, folder, overwrite=False):
        """Create the staging folder next to ``folder``."""
        self.folder = Path(folder).expanduser().absolute()
        if self.folder.exists() and any(self.folder.iterdir()) and not overwrite:
            raise BagError('exists', f'export folder {str(self.folder)!r} exists and is not '
                                     'empty; choose another or pass --overwrite')
        self.stage = staging_path(self.folder)
        remove_stale_stages(self.folder)
        if self.stage.exists():
            shutil.rmtree(self.stage)
        self.stage.mkdir(parents=True)
        self.rows = []

    def write(self, index, log_time, output):
        """Write the files of frame ``index`` (0-based; ``log_time`` in ns) from a FrameOutput."""
        paths = frame_paths(str(self.stage), index)
        relative = image_to_depth(output.relative)
        write_png(paths['relative'], relative_to_png16(relative))
        if output.metric is not None:
            metric = image_to_depth(output.metric)
            write_png(paths['metric'], metric_to_png16(metric))
            write_png(paths['preview'], colorize(metric))
        else:
            write_png(paths['preview'], colorize(relative, relative=True))
        if output.points is not None:
            write_ply(paths['cloud'], pointcloud2_to_xyz(output.points),
                      cloud_colors(output.points))
        scale = output.scale
        self.rows.append((index, stamp_to_ns(output.header.stamp), log_time,
                          output.header.frame_id,
                          'metric' if output.metric is not None else 'relative',
                          '' if scale is None else repr(float(scale.scale)),
                          '' if scale is None else repr(float(scale.shift)),
                          ' '.join(output.notes)))

    def error(self, index, log_time, header, reason):
        """Record frame ``index`` that failed with FrameError ``reason`` (``log_time`` in ns)."""
        self.rows.append((index, stamp_to_ns(header.stamp), log_time, header.frame_id,
                          f'error:{reason}', '', '', ''))

    def commit(self):
        """Write frames.csv, move the folder into place and return its Path."""
        with open(self.stage / self.TABLE, 'w', encoding='utf-8', newline='') as stream:
            table = csv.writer(stream)
            table.writerow(self.COLUMNS)
            table.writerows(self.rows)
        if self.folder.exists():
            old = self.stage.with_name(self.stage.name + '.old')
            os.replace(self.folder, old)
            shutil.rmtree(old, ignore_errors=True)
        os.replace(self.stage, self.folder)
        return self.folder

    def abort(self):
        """Remove everything written (no-op after a commit)."""
        shutil.rmtree(self.stage, ignore_errors=True)
