"""
The depth node and process_bag with backend onnxruntime: the torch backend's outputs.

The bundled tiny model is exported once for the module; each test runs the same input
through both backends (loaded from the node parameters or the params file, as users do) and
compares what was published or written.  Depth in [0, 1] is within 1e-4 (test_onnx.py's
bound); a cloud point is metric depth times the pixel's ray, so its bound is the depth bound
times the metric scale (the ray's largest component is z = 1), plus float32 rounding.
"""

from builders import SCENE_FRAMES
from marigold_model.networks import TorchNetworks
from marigold_model.onnx_backend import OnnxRuntimeNetworks
from marigold_ros.bag_job import BagJob
from marigold_ros.bag_processor import main, process_bag
from marigold_ros.conversions import image_to_depth, pointcloud2_to_xyz
from msg_builders import frame_messages, messages_by_topic, write_bag
import numpy as np
import pytest
from sensor_msgs.msg import Image, PointCloud2
from test_depth_node import _default_factory, Graph, H, TIMEOUT, W

pytest.importorskip('onnx')
pytest.importorskip('onnxruntime')

BUNDLED = 'bundled:marigold-tiny'
DEPTH_TOLERANCE = 1e-4  # |onnxruntime - torch| of depth in [0, 1], as in test_onnx.py
SCALE = 2.0  # fixed_scale of both tests: metric = 2 * relative + 0.5 (0.5 .. 2.5 m)
# A point is metric depth times its ray (z component 1, |x|, |y| <= 32 / 60 here): the error
# of a coordinate is at most SCALE * DEPTH_TOLERANCE, plus the float32 rounding of 2.5 m.
CLOUD_TOLERANCE = SCALE * DEPTH_TOLERANCE + 1e-6
PARAMS = """\
/**:
  ros__parameters:
    device: cpu
    batch_size: 3
    seed: 5
    processing_resolution: 64
    fixed_scale: {scale}
    model: {model}
    backend: {backend}
"""


@pytest.fixture(scope='module')
def bundled_export(tmp_path_factory):
    """Export the bundled tiny model once (as test_onnx.py does)."""
    from marigold_model.onnx_export import export_onnx
    return str(export_onnx(BUNDLED, tmp_path_factory.mktemp('onnx') / 'bundled'))


def _finite_max_difference(first, second):
    """Largest |difference| where both are finite; the non-finite pixels must agree."""
    assert first.shape == second.shape
    finite = np.isfinite(first)
    np.testing.assert_array_equal(finite, np.isfinite(second))
    assert finite.any()
    return float(np.abs(first[finite] - second[finite]).max())


def _node_outputs(context, model, backend):
    """Publish one frame to a depth node loading ``model``; return (relative, points)."""
    graph = Graph(context, None, factory=_default_factory, parameters=[
        ('model', model), ('backend', backend), ('fixed_scale', SCALE), ('fixed_shift', 0.5),
        ('ensemble_size', 2), ('seed', 3)])
    try:
        graph.subscribe(Image, 'depth/relative')
        graph.subscribe(PointCloud2, 'depth/points')
        assert graph.node.wait_until_ready(TIMEOUT)
        expected = OnnxRuntimeNetworks if backend == 'onnxruntime' else TorchNetworks
        assert isinstance(graph.node.estimator.networks, expected)
        graph.send()
        assert graph.spin_until(lambda: graph.count('depth/relative') and
                                graph.count('depth/points'))
        relative = image_to_depth(graph.received['depth/relative'][0])
        points = pointcloud2_to_xyz(graph.received['depth/points'][0]).reshape(H, W, 3)
        return relative, points
    finally:
        graph.close()


def test_depth_node_with_onnxruntime_publishes_the_torch_outputs(context, bundled_export):
    """Relative depth within 1e-4 and clouds within the scaled bound, per pixel."""
    torch_relative, torch_points = _node_outputs(context, BUNDLED, 'torch')
    onnx_relative, onnx_points = _node_outputs(context, bundled_export, 'onnxruntime')
    assert _finite_max_difference(torch_relative, onnx_relative) <= DEPTH_TOLERANCE
    assert _finite_max_difference(torch_points, onnx_points) <= CLOUD_TOLERANCE


def test_process_bag_params_file_with_onnxruntime(tmp_path, scenes, bundled_export, capsys):
    """`--params` with backend onnxruntime: the torch backend's depth and clouds, per frame."""
    bag = write_bag(tmp_path / 'in', 'mcap', frame_messages(scenes))
    torch_params, onnx_params = tmp_path / 'torch.yaml', tmp_path / 'onnx.yaml'
    torch_params.write_text(PARAMS.format(scale=SCALE, model=BUNDLED, backend='torch'))
    onnx_params.write_text(PARAMS.format(scale=SCALE, model=bundled_export,
                                         backend='onnxruntime'))
    assert main([bag, str(tmp_path / 'onnx'), '--params', str(onnx_params), '--quiet']) == 0
    assert f'frames: {SCENE_FRAMES} in on /cam/image_raw, {SCENE_FRAMES} with depth' in \
        capsys.readouterr().out
    summary = process_bag(BagJob(input=bag, output=str(tmp_path / 'torch'),
                                 params=str(torch_params), quiet=True))
    assert summary.frames_out == SCENE_FRAMES and not summary.errors
    torch_topics = messages_by_topic(tmp_path / 'torch')
    onnx_topics = messages_by_topic(tmp_path / 'onnx')
    assert {t: len(m) for t, m in onnx_topics.items()} == {
        t: len(m) for t, m in torch_topics.items()}
    assert len(onnx_topics['/cam/depth/points']) == SCENE_FRAMES
    for ours, theirs in zip(onnx_topics['/cam/depth/relative'],
                            torch_topics['/cam/depth/relative']):
        assert ours.header == theirs.header
        assert _finite_max_difference(image_to_depth(ours),
                                      image_to_depth(theirs)) <= DEPTH_TOLERANCE
    for ours, theirs in zip(onnx_topics['/cam/depth/points'],
                            torch_topics['/cam/depth/points']):
        assert (ours.height, ours.width) == (theirs.height, theirs.width)
        assert _finite_max_difference(pointcloud2_to_xyz(ours),
                                      pointcloud2_to_xyz(theirs)) <= CLOUD_TOLERANCE
