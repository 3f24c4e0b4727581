"""
Per-frame files for people who look at depth outside ROS: 16-bit PNG, colour preview, PLY.

* Metric depth -> ``depth_NNNNNN.png``, 16-bit millimeters (0 = no reading), the format of
  RGB-D data sets.
* Relative depth -> ``relative_NNNNNN.png``, the [0, 1] values times 65535 (NOT a unit), under
  its own name so the two can never be mistaken for each other.
* Previews map depth to colour (near = yellow, far = dark purple, invalid = black).
* PLY clouds are binary little endian with x y z float and red green blue uchar, valid
  points only; they are written only from metric clouds.
"""

import os

from marigold_model.data.synthetic import colorize_depth
import numpy as np
from PIL import Image as PILImage

MM_PER_M = 1000.0
UINT16_MAX = 65535


def metric_to_png16(depth_m):
    """
    Convert meters to uint16 millimeters (0 marks no reading or out of range).

    :param depth_m: HxW float depth in meters, NaN / <= 0 invalid.
    :return: HxW uint16.
    """
    depth = np.asarray(depth_m, dtype=np.float64)
    mm = np.rint(depth * MM_PER_M)
    valid = np.isfinite(mm) & (mm > 0) & (mm <= UINT16_MAX)
    out = np.zeros(depth.shape, np.uint16)
    out[valid] = mm[valid].astype(np.uint16)
    return out


def relative_to_png16(relative):
    """
    Convert relative depth in [0, 1] to uint16 (value * 65535, NaN -> 0).

    :param relative: HxW float in [0, 1].
    :return: HxW uint16.
    """
    rel = np.asarray(relative, dtype=np.float64)
    scaled = np.rint(np.clip(np.nan_to_num(rel, nan=0.0), 0.0, 1.0) * UINT16_MAX)
    return scaled.astype(np.uint16)


def write_png(path, array):
    """
    Write an HxW uint16 / uint8 or HxWx3 uint8 array as PNG.

    :param path: file path.
    :param array: the image.
    """
    array = np.ascontiguousarray(array)
    if array.dtype == np.uint16:
        array = array.astype('<u2', copy=False)  # Pillow maps native uint16 to 'I;16'
    PILImage.fromarray(array).save(path, format='PNG')


def colorize(depth):
    """
    Colour-map depth for previews (percentile-stretched, invalid = black).

    :param depth: HxW float depth (meters or relative).
    :return: HxWx3 uint8.
    """
    return colorize_depth(depth)


def write_ply(path, points, colors=None):
    """
    Write points as a binary little-endian PLY, dropping non-finite points.

    :param path: file path.
    :param points: (..., 3) float coordinates (meters).
    :param colors: optional (..., 3) uint8 RGB of the same leading shape.
    :return: number of points written.
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
    """
    Read a PLY written by :func:`write_ply` (tests and tools).

    :param path: file path.
    :return: (N x 3 float32 points, N x 3 uint8 colours or None).
    """
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
    """
    Return the export file names of frame ``index``.

    :param folder: export folder.
    :param index: 0-based frame number in the bag.
    :return: dict with keys 'metric', 'relative', 'preview' and 'cloud'.
    """
    def name(prefix, suffix):
        return os.path.join(folder, f'{prefix}_{index:06d}.{suffix}')

    return {'metric': name('depth', 'png'), 'relative': name('relative', 'png'),
            'preview': name('preview', 'png'), 'cloud': name('cloud', 'ply')}
