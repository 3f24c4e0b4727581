"""
Benchmark: the node's organized x y z rgb cloud for one 640x480 frame, against fair references.

Builders, all from the same depth, camera and RGB to the same fields (x, y, z, rgb float32):
ours (``marigold_ros.pipeline.organized_cloud``, what the node publishes), the conversions
path (``pointcloud2_from_depth(unproject_depth(...))``), create_cloud (sensor_msgs_py's
structured-array path, written out below: not a dependency here) and the floor (a plain
copy of the cloud's bytes into a fresh array('B')).  The outputs are checked against each
other first.  Medians of thread CPU time (the work done, page faults included; the figures
to compare on a shared machine) and of wall time, in two runs: interleaved (each call gets
a freshly mapped buffer, as a node publishing per frame does) and alone (the allocator
hands the freed buffer back: the floor is a bare memcpy into warm memory).

Run: .venv/bin/python bench/conversions.py [--width 640 --height 480 --repeats 30]
"""

import argparse
import array
import statistics
import sys
import time

from marigold_ros.conversions import pack_rgb, pointcloud2_from_depth, pointcloud2_to_xyz
from marigold_ros.geometry import CameraModel, unproject_depth
from marigold_ros.pipeline import organized_cloud
import numpy as np
from sensor_msgs.msg import PointCloud2, PointField
from std_msgs.msg import Header

FIELDS = [PointField(name=name, offset=4 * index, datatype=PointField.FLOAT32, count=1)
          for index, name in enumerate(('x', 'y', 'z', 'rgb'))]
POINT_DTYPE = np.dtype([(f.name, '<f4') for f in FIELDS])
OURS, REFERENCE, FLOOR = ('ours (pipeline.organized_cloud)', 'reference (create_cloud)',
                          'floor (plain copy)')


def _inputs(width, height):
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    v, u = np.mgrid[0:height, 0:width]
    depth = (2.0 + 0.002 * u + 0.001 * v).astype(np.float32)
    depth[::17, ::13] = np.nan  # some invalid pixels
    k = np.array([[525.0, 0.0, (width - 1) / 2], [0.0, 525.0, (height - 1) / 2],
                  [0.0, 0.0, 1.0]])
    camera = CameraModel(width, height, k, frame_id='camera_optical')
    return depth, camera, rgb, Header(frame_id='camera_optical')


def create_cloud(header, fields, points):
    """Do what sensor_msgs_py.point_cloud2.create_cloud does with an HxW structured array."""
    height, width = points.shape if points.ndim == 2 else (1, points.shape[0])
    data = array.array('B')
    data.frombytes(memoryview(points).cast('B'))
    cloud = PointCloud2(header=header, height=height, width=width, is_dense=False,
                        is_bigendian=sys.byteorder != 'little', fields=fields,
                        point_step=points.dtype.itemsize,
                        row_step=points.dtype.itemsize * width)
    cloud._data = data  # create_cloud assigns the slot: the data setter would copy again
    return cloud


def reference_cloud(depth, camera, rgb, header):
    """Build the structured-array cloud: vectorised points and colours, then create_cloud."""
    xyz = unproject_depth(depth, camera.K)
    points = np.empty(depth.shape, dtype=POINT_DTYPE)
    points['x'] = xyz[..., 0]
    points['y'] = xyz[..., 1]
    points['z'] = xyz[..., 2]
    points['rgb'] = pack_rgb(rgb).view('<f4')
    return create_cloud(header, FIELDS, points)


def conversions_cloud(depth, camera, rgb, header):
    """Build the cloud the library way: unproject_depth then pointcloud2_from_depth."""
    return pointcloud2_from_depth(unproject_depth(depth, camera.K), rgb, header)


def plain_copy(source):
    """Copy a cloud's worth of bytes into a fresh array('B'): the floor."""
    out = array.array('B')
    out.frombytes(memoryview(source).cast('B'))
    return out


def median_ms(func, repeats):
    """Call once to warm up, then return the median wall ms of ``repeats`` timed calls."""
    return 1e3 * statistics.median(wall for wall, _ in timed({'f': func}, repeats)['f'])


def report(title, times):
    """Print the CPU and wall medians of each builder and the two ratios the issue asks for."""
    cpu = {name: 1e3 * statistics.median(c for _, c in values) for name, values in times.items()}
    wall = {name: 1e3 * statistics.median(w for w, _ in values) for name, values in times.items()}
    print(f'  {title:<34s} {"CPU":>8s} {"wall":>8s}  (ms, medians)')
    for name in times:
        print(f'  {name:<34s} {cpu[name]:8.2f} {wall[name]:8.2f}')
    print(f'  reference / ours: {cpu[REFERENCE] / cpu[OURS]:.2f}x faster '
          f'(wall: {wall[REFERENCE] / wall[OURS]:.2f}x)')
    print(f'  ours / plain copy: {cpu[OURS] / cpu[FLOOR]:.2f}x the floor '
          f'(wall: {wall[OURS] / wall[FLOOR]:.2f}x)')


def timed(funcs, repeats):
    """
    Warm each function up once, then time ``repeats`` rounds of one call each, interleaved.

    :param funcs: name -> function of no argument
    :return: name -> list of (wall, CPU of this thread) seconds
    """
    for func in funcs.values():
        func()
    times = {name: [] for name in funcs}
    for _ in range(repeats):
        for name, func in funcs.items():
            wall, cpu = time.perf_counter(), time.thread_time()
            func()
            times[name].append((time.perf_counter() - wall, time.thread_time() - cpu))
    return times


def main():
    """Check the builders agree, then print the median ms per frame and the ratios."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument('--width', type=int, default=640)
    parser.add_argument('--height', type=int, default=480)
    parser.add_argument('--repeats', type=int, default=30)
    args = parser.parse_args()
    depth, camera, rgb, header = _inputs(args.width, args.height)

    ours = organized_cloud(depth, camera, rgb, header)
    for other in (reference_cloud(depth, camera, rgb, header),
                  conversions_cloud(depth, camera, rgb, header)):
        assert (other.point_step, other.row_step, other.height, other.width) == \
            (ours.point_step, ours.row_step, ours.height, ours.width)
        assert [f.name for f in other.fields] == [f.name for f in ours.fields]
        np.testing.assert_array_equal(pointcloud2_to_xyz(other), pointcloud2_to_xyz(ours))
        assert other.data[12::16] == ours.data[12::16], 'packed rgb differs'
    source = np.zeros(16 * args.height * args.width, np.uint8)

    funcs = {
        OURS: lambda: organized_cloud(depth, camera, rgb, header),
        'conversions path': lambda: conversions_cloud(depth, camera, rgb, header),
        REFERENCE: lambda: reference_cloud(depth, camera, rgb, header),
        FLOOR: lambda: plain_copy(source),
    }
    print(f'cloud {args.width}x{args.height} x y z rgb, {source.size} B; {args.repeats} '
          'timed calls each after one warm-up call, ms per frame')
    report('interleaved', timed(funcs, args.repeats))
    report('alone', {name: timed({name: func}, args.repeats)[name]
                     for name, func in funcs.items()})


if __name__ == '__main__':
    main()
