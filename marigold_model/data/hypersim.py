"""
Hypersim reader (Roberts et al., 2021), raw download layout or Marigold's preprocessed PNGs.

On-disk formats (assumptions, as in Hypersim's own tools and Marigold's preprocessing):

* Raw layout, per scene ``ai_XXX_YYY/images/``:
  ``scene_cam_ZZ_final_hdf5/frame.NNNN.color.hdf5`` (HDR linear RGB, HxWx3 float16 under the
  key ``dataset``), ``scene_cam_ZZ_final_preview/frame.NNNN.tonemap.jpg`` (tone-mapped RGB),
  ``scene_cam_ZZ_geometry_hdf5/frame.NNNN.depth_meters.hdf5`` (HxW float16, Euclidean
  *distance* from the camera centre in meters, NaN where nothing was hit) and
  ``frame.NNNN.render_entity_id.hdf5`` (int, -1 where nothing was hit).
* Distance is converted to planar z with the Hypersim pinhole: 60 degree horizontal field of
  view (f = 886.81 px at 1024x768), square pixels, principal point at the image centre:
  ``z = dist * f / sqrt((u - cx)^2 + (v - cy)^2 + f^2)``. A few Hypersim scenes use tilt-shift
  cameras (``metadata_camera_parameters.csv``); like Marigold we ignore that.
* HDR colour is tone-mapped like Hypersim's ``scene_generate_images_tonemap.py``: scale so the
  90th percentile of brightness (0.3 R + 0.59 G + 0.11 B over valid pixels) becomes 0.8 after
  gamma 1/2.2, clip to [0, 1]. The ``.tonemap.jpg`` preview (same operator) is used instead
  when present and ``prefer_jpg`` is set (much faster to read).
* A list file (Marigold's ``filename_list_train.txt``, or any CSV / whitespace file) holds
  ``rgb_path depth_path`` rows relative to the root. Depth may be ``.depth_meters.hdf5``
  (distance, converted) or a 16-bit PNG of planar depth in millimetres (Marigold's
  preprocessed ``depth_plane_cam_ZZ_frNNNN.png``, 0 = invalid).
"""

import re

from marigold_model.data.image_io import read_list_file, read_png16, read_rgb, require_dir
from marigold_model.data.sample import intrinsics_from_hfov, make_sample, UnreadableSample
import numpy as np

try:  # torch is a dependency of marigold_model; the reader itself is numpy-only
    from torch.utils.data import Dataset as _Dataset
except ImportError:  # pragma: no cover
    _Dataset = object

HYPERSIM_WIDTH = 1024
HYPERSIM_HEIGHT = 768
HYPERSIM_HFOV_DEG = 60.0
# f = 512 / tan(30 deg) = 886.81 px at full resolution.
HYPERSIM_FOCAL = 0.5 * HYPERSIM_WIDTH / np.tan(np.deg2rad(HYPERSIM_HFOV_DEG) / 2.0)

_FRAME_RE = re.compile(r'frame\.(\d+)\.depth_meters\.hdf5$')


def hypersim_intrinsics(height, width):
    """Return Hypersim's pinhole K (60 degree horizontal fov, centred) at a given resolution."""
    return intrinsics_from_hfov(width, height, HYPERSIM_HFOV_DEG)


def distance_to_planar(distance, K):
    """Convert HxW Euclidean distance from the camera centre to float32 planar z (K: fx == fy)."""
    distance = np.asarray(distance, dtype=np.float64)
    h, w = distance.shape
    fx, fy, cx, cy = K[0, 0], K[1, 1], K[0, 2], K[1, 2]
    x = (np.arange(w) - cx) / fx
    y = (np.arange(h) - cy) / fy
    norm = np.sqrt(x[None, :] ** 2 + y[:, None] ** 2 + 1.0)
    return (distance / norm).astype(np.float32)


def tone_map(rgb_hdr, valid=None):
    """
    Tone-map HxWx3 linear HDR colour to [0, 1] the way Hypersim (and Marigold) do.

    ``valid`` optionally masks the pixels used for the brightness percentile.
    """
    rgb = np.nan_to_num(np.asarray(rgb_hdr, dtype=np.float64), nan=0.0, posinf=0.0)
    gamma = 1.0 / 2.2
    mask = np.ones(rgb.shape[:2], dtype=bool) if valid is None else np.asarray(valid, bool)
    if not mask.any():
        scale = 1.0
    else:
        brightness = 0.3 * rgb[..., 0] + 0.59 * rgb[..., 1] + 0.11 * rgb[..., 2]
        current = np.percentile(brightness[mask], 90)
        scale = 0.0 if current < 1e-4 else np.power(0.8, 1.0 / gamma) / current
    return np.clip(np.power(np.maximum(scale * rgb, 0.0), gamma), 0.0, 1.0)


def _read_hdf5(path):
    import h5py  # imported here: only the raw Hypersim layout needs it

    try:
        with h5py.File(path, 'r') as f:
            return np.asarray(f['dataset'])
    except (OSError, KeyError, ValueError) as exc:
        raise UnreadableSample(f'cannot read Hypersim file {str(path)!r}: {exc}') from exc


def _entity_file(depth_path):
    """Return the render_entity_id file beside a raw depth file, or None."""
    match = _FRAME_RE.search(depth_path.name)
    if match is None:
        return None
    entity = depth_path.parent / f'frame.{match.group(1)}.render_entity_id.hdf5'
    return entity if entity.is_file() else None


class HypersimDataset(_Dataset):
    """
    Hypersim frames as :class:`Sample` (planar depth in meters, K from the 60 degree fov).

    Without a list file the root is scanned for the raw layout (root = the folder holding the
    ``ai_XXX_YYY`` scenes, or one scene folder). Frames need a depth file and a colour source
    (``.color.hdf5`` or ``.tonemap.jpg``).
    """

    def __init__(self, root, list_file=None, prefer_jpg=True, use_entity_mask=True):
        """
        Index the frames.

        :param list_file: optional list of ``rgb depth`` rows (relative to root)
        :param prefer_jpg: use ``.tonemap.jpg`` when present instead of tone-mapping HDF5
        :param use_entity_mask: also mark pixels with render_entity_id == -1 invalid
        """
        self.root = require_dir(root, 'HypersimDataset')
        self.prefer_jpg = bool(prefer_jpg)
        self.use_entity_mask = bool(use_entity_mask)
        if list_file is not None:
            self.items = [(rgb, depth, _entity_file(depth))
                          for rgb, depth in read_list_file(list_file, self.root)]
        else:
            self.items = self._scan()
        if not self.items:
            raise ValueError(f'HypersimDataset: no frames found under {str(self.root)!r} '
                             f'(expected ai_XXX_YYY/images/scene_cam_ZZ_geometry_hdf5/'
                             f'frame.NNNN.depth_meters.hdf5 with a matching colour file)')

    def _scan(self):
        pattern = 'images/scene_cam_*_geometry_hdf5/frame.*.depth_meters.hdf5'
        depth_files = sorted(set(self.root.glob('*/' + pattern)) | set(self.root.glob(pattern)))
        items = []
        for depth in depth_files:
            match = _FRAME_RE.search(depth.name)
            if match is None:
                continue
            frame = match.group(1)
            cam = depth.parent.name[:-len('_geometry_hdf5')]  # scene_cam_ZZ
            images = depth.parent.parent
            hdf5 = images / f'{cam}_final_hdf5' / f'frame.{frame}.color.hdf5'
            jpg = images / f'{cam}_final_preview' / f'frame.{frame}.tonemap.jpg'
            candidates = (jpg, hdf5) if self.prefer_jpg else (hdf5, jpg)
            rgb = next((c for c in candidates if c.is_file()), None)
            if rgb is None:
                continue
            items.append((rgb, depth, _entity_file(depth)))
        return items

    def __len__(self):
        """Return the number of frames."""
        return len(self.items)

    def _name(self, depth_path):
        try:
            rel = depth_path.relative_to(self.root)
        except ValueError:
            rel = depth_path
        return str(rel.with_suffix('')).replace('.depth_meters', '')

    def __getitem__(self, index):
        """Read frame ``index`` as a Sample; UnreadableSample on a broken file."""
        rgb_path, depth_path, entity_path = self.items[index]
        valid = None
        if entity_path is not None and self.use_entity_mask:
            valid = _read_hdf5(entity_path) != -1

        if depth_path.suffix == '.hdf5':
            distance = _read_hdf5(depth_path)
            if distance.ndim != 2:
                raise UnreadableSample(f'{str(depth_path)!r}: expected HxW distances, got '
                                       f'shape {distance.shape}')
            K = hypersim_intrinsics(*distance.shape)
            depth = distance_to_planar(distance, K)
        elif depth_path.suffix == '.png':
            depth = read_png16(depth_path).astype(np.float32) / 1000.0
            K = hypersim_intrinsics(*depth.shape)
        else:
            raise UnreadableSample(f'{str(depth_path)!r}: unknown Hypersim depth format')

        if rgb_path.suffix == '.hdf5':
            hdr = _read_hdf5(rgb_path)
            if hdr.ndim != 3 or hdr.shape[2] != 3:
                raise UnreadableSample(f'{str(rgb_path)!r}: expected HxWx3 colour, got '
                                       f'shape {hdr.shape}')
            # Same quantisation as Marigold's preprocessing (truncation).
            rgb = (tone_map(hdr, valid) * 255.0).astype(np.uint8)
        else:
            rgb = read_rgb(rgb_path)
        if rgb.shape[:2] != depth.shape or (valid is not None and valid.shape != depth.shape):
            raise UnreadableSample(f'Hypersim frame {str(depth_path)!r}: colour {rgb.shape[:2]}'
                                   f' and depth {depth.shape} sizes differ')
        return make_sample(rgb, depth, K, self._name(depth_path), valid=valid)
