"""
NYUv2 labeled set reader (Silberman et al., 2012): ``nyu_depth_v2_labeled.mat`` and its splits.

The .mat file is MATLAB v7.3 (HDF5), read lazily with h5py; ``splits.mat`` lists the 654
test and 795 training images (1-based). Depth is in-painted Kinect depth in meters.
"""

from marigold_model.data.image_io import require_file
from marigold_model.data.sample import DatasetError, make_sample
import numpy as np

# NYUv2 RGB camera (NYU Depth V2 toolbox, camera_params.m).
NYU_K = np.array([[518.8579, 0.0, 325.5824], [0.0, 519.4696, 253.7362], [0.0, 0.0, 1.0]])


def read_nyu_split(path, key='testNdxs'):
    """
    Read NYUv2's ``splits.mat`` (MATLAB v5 or v7.3) as an int64 array of 0-based indices.

    :param key: ``'testNdxs'`` (654 images) or ``'trainNdxs'`` (795 images)
    """
    from scipy.io import loadmat
    path = require_file(path, 'NYUv2 splits file')
    try:
        content = loadmat(str(path), variable_names=[key])
    except (NotImplementedError, ValueError):
        content = None  # MATLAB v7.3 is HDF5, which scipy refuses
    if content is None:
        import h5py
        try:
            with h5py.File(path, 'r') as stream:
                content = {key: stream[key][()]} if key in stream else {}
        except OSError as error:
            raise DatasetError(f'{path} is not a MATLAB file: {error}') from None
    if key not in content:
        raise DatasetError(f'{path} has no {key!r} entry')
    values = content[key]
    values = np.asarray(values).ravel()
    if values.size == 0 or not np.all(np.isfinite(values)) or np.any(values < 1) or np.any(
            values != np.round(values)):
        raise DatasetError(f'{path}: {key} must hold positive 1-based integer indices')
    return values.astype(np.int64) - 1


class NyuLabeled:
    """
    NYUv2 labeled set (``nyu_depth_v2_labeled.mat``) as a sequence of Samples, read lazily.

    The file is MATLAB v7.3 (HDF5) and stores arrays transposed: ``images`` is
    [N, 3, W, H] uint8 and ``depths`` [N, W, H] float meters (in-painted).
    """

    def __init__(self, path, indices=None):
        """Open the file and check its layout; ``indices`` (0-based, e.g. a split) restrict it."""
        import h5py
        path = require_file(path, 'NYUv2 labeled file')
        try:
            self._file = h5py.File(path, 'r')
        except OSError as error:
            raise DatasetError(f'{path} is not an HDF5 (MATLAB v7.3) file: {error}') from None
        for key in ('images', 'depths'):
            if key not in self._file:
                self.close()
                raise DatasetError(f'{path} has no {key!r} dataset; is it '
                                   'nyu_depth_v2_labeled.mat?')
        self._images, self._depths = self._file['images'], self._file['depths']
        images, depths = self._images.shape, self._depths.shape
        if len(images) != 4 or images[1] != 3 or len(depths) != 3 or depths[0] != images[0] or (
                depths[1:] != images[2:]):
            self.close()
            raise DatasetError(f'{path}: expected images [N, 3, W, H] and depths [N, W, H], '
                               f'got {images} and {depths}')
        count = images[0]
        self.indices = np.arange(count) if indices is None else np.asarray(indices, np.int64)
        if self.indices.size and (self.indices.min() < 0 or self.indices.max() >= count):
            self.close()
            raise DatasetError(f'{path}: split index out of range for {count} images')
        self.path = path

    def __len__(self):
        """Return the number of images served."""
        return len(self.indices)

    def __getitem__(self, position):
        """Read one image and its depth as a Sample named ``nyu_<1-based index>``."""
        if not 0 <= position < len(self):
            raise IndexError(f'NYUv2 position {position} out of range [0, {len(self)})')
        index = int(self.indices[position])
        rgb = np.asarray(self._images[index]).transpose(2, 1, 0)
        depth = np.asarray(self._depths[index]).T
        return make_sample(rgb, depth, NYU_K, f'nyu_{index + 1:04d}')

    def close(self):
        """Close the HDF5 file."""
        self._file.close()
