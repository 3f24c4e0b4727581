"""
Benchmark: message conversions for one 640x480 frame, vectorised vs naive per-point Python.

Fast path: image_to_rgb(bgr8) + unproject_depth + pointcloud2_from_depth.
Naive path: the same image_to_rgb, then a per-point loop computing x, y, z from the depth and
packing each point with struct.pack into a list assigned to ``msg.data`` (what a
straightforward port of sensor_msgs_py.create_cloud does).

Prints milliseconds per frame and the ratio measured in this run; no assertions about time
(the machine is shared).  The naive cloud is checked against the fast one for correctness.

Run: .venv/bin/python bench/conversions.py [--width 640 --height 480 --repeats 20]
"""

import argparse
import math
import struct
import time

from marigold_ros.conversions import image_to_rgb, organized_cloud_msg
from marigold_ros.conversions import pointcloud2_from_depth
from marigold_ros.conversions import pointcloud2_to_xyz
from marigold_ros.conversions import rgb_to_image
from marigold_ros.geometry import unproject_depth
import numpy as np
from std_msgs.msg import Header


def _inputs(width, height):
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    v, u = np.mgrid[0:height, 0:width]
    depth = (2.0 + 0.002 * u + 0.001 * v).astype(np.float32)
    depth[::17, ::13] = np.nan  # some invalid pixels
    k = np.array([[525.0, 0.0, (width - 1) / 2], [0.0, 525.0, (height - 1) / 2],
                  [0.0, 0.0, 1.0]])
    header = Header(frame_id='camera_optical')
    return rgb_to_image(rgb, header, 'bgr8'), depth, k, header


def fast_frame(image_msg, depth, k, header):
    """
    Vectorised path: conversions as the node runs them.

    :return: PointCloud2.
    """
    rgb = image_to_rgb(image_msg)
    points = unproject_depth(depth, k)
    return pointcloud2_from_depth(points, rgb, header)


def naive_frame(image_msg, depth, k, header):
    """
    Per-point Python reference: struct.pack per point into a list.

    :return: PointCloud2.
    """
    rgb = image_to_rgb(image_msg).tolist()
    depth_rows = depth.tolist()
    fx, fy, cx, cy = k[0, 0], k[1, 1], k[0, 2], k[1, 2]
    height, width = depth.shape
    data = []
    for v in range(height):
        for u in range(width):
            z = depth_rows[v][u]
            if not (math.isfinite(z) and z > 0):
                x = y = z = math.nan
            else:
                x = (u - cx) * z / fx
                y = (v - cy) * z / fy
            r, g, b = rgb[v][u]
            data.extend(struct.pack('<fffI', x, y, z, (r << 16) | (g << 8) | b))
    return organized_cloud_msg(header, height, width, data)


def _time(func, repeats):
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        func()
        best = min(best, time.perf_counter() - start)
    return best * 1e3


def main():
    """Run the benchmark and print ms per frame and the speed-up."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument('--width', type=int, default=640)
    parser.add_argument('--height', type=int, default=480)
    parser.add_argument('--repeats', type=int, default=20)
    args = parser.parse_args()
    image_msg, depth, k, header = _inputs(args.width, args.height)

    fast = fast_frame(image_msg, depth, k, header)  # warms the ray cache
    naive_start = time.perf_counter()
    naive = naive_frame(image_msg, depth, k, header)
    naive_ms = (time.perf_counter() - naive_start) * 1e3
    np.testing.assert_allclose(pointcloud2_to_xyz(naive), pointcloud2_to_xyz(fast),
                               rtol=1e-5, atol=1e-6)
    assert naive.data[12::16] == fast.data[12::16], 'packed rgb differs'

    rgb = image_to_rgb(image_msg)
    points = unproject_depth(depth, k)
    parts = {
        'image_to_rgb(bgr8)': _time(lambda: image_to_rgb(image_msg), args.repeats),
        'unproject_depth': _time(lambda: unproject_depth(depth, k), args.repeats),
        'pointcloud2_from_depth': _time(lambda: pointcloud2_from_depth(points, rgb, header),
                                        args.repeats),
    }
    fast_ms = _time(lambda: fast_frame(image_msg, depth, k, header), args.repeats)

    print(f'frame {args.width}x{args.height}, best of {args.repeats} (naive: one run)')
    for name, ms in parts.items():
        print(f'  {name:<26s} {ms:8.2f} ms')
    print(f'  {"fast total":<26s} {fast_ms:8.2f} ms')
    print(f'  {"naive per-point builder":<26s} {naive_ms:8.1f} ms')
    print(f'  speed-up naive / fast: {naive_ms / fast_ms:.0f}x')


if __name__ == '__main__':
    main()
