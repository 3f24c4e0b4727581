"""
The parameters of the depth node, in one place: the node and the bag tools both read them.

NodeConfig and OutputConfig, how each config group becomes ROS parameters, config/depth.yaml,
params files read into configs, and the table of output topics.  The generic machinery is
:mod:`marigold_ros.params`; depth_node and bag_processor import this module, never each other.
"""

from dataclasses import dataclass, replace
import math

from marigold_model.config import BACKENDS, DTYPES, EstimatorConfig, GUIDANCE_LOSSES
from marigold_model.config import GUIDANCE_RANGES, GuidanceConfig, InferenceConfig
from marigold_model.config import INFERENCE_RANGES, ModelConfig, VAE_CHOICES
from marigold_model.scale_tracking import ScaleTrackerConfig
from sensor_msgs.msg import CameraInfo
from sensor_msgs.msg import Image
from sensor_msgs.msg import PointCloud2

from .params import ConfigGroup, configs_from_values, read_params_file, yaml_document

NODE_NAME = 'marigold_depth'
TRANSPORTS = ('raw', 'compressed')
RELIABILITIES = ('best_effort', 'reliable')

_YAML_HEADER = """\
Parameters of the marigold_depth node (ros2 launch marigold_ros depth.launch.py).
Every parameter is listed with its default (test/test_params.py keeps this file in sync with
the config dataclasses; regenerate with marigold_ros.node_params.default_params_yaml()).
Float parameters accept integers.  '/**' applies the file to the node whatever its name
and namespace.  Read-only parameters need a restart of the node; the others can be
changed at runtime, e.g.
  ros2 param set /marigold_depth ensemble_size 3"""


@dataclass(frozen=True)
class OutputTopic:
    """
    One output of the node.

    :param name: the FrameOutput attribute holding the message
    :param topic: topic name relative to the camera namespace
    :param msg_class: rclpy message class
    :param by_default: built when the caller does not choose the outputs (FrameInput.outputs
        None: the bag processor, a node without lazy outputs... see
        :data:`DEFAULT_OUTPUT_NAMES`); the others only when asked for
    """

    name: str
    topic: str
    msg_class: type
    by_default: bool = True

    @property
    def msgtype(self):
        """Return the message type name as bags store it, e.g. 'sensor_msgs/msg/Image'."""
        return f'{self.msg_class.__module__.split(".")[0]}/msg/{self.msg_class.__name__}'


#: The outputs per camera, in publishing order: the one table of names, topics and types.
OUTPUT_TOPICS = (
    OutputTopic('relative', 'depth/relative', Image),
    OutputTopic('metric', 'depth/image', Image),
    OutputTopic('uncertainty', 'depth/uncertainty', Image),
    OutputTopic('camera_info', 'depth/camera_info', CameraInfo),
    OutputTopic('points', 'depth/points', PointCloud2),
    # A picture for people (rviz, rqt_image_view), not data: only when subscribed to.
    OutputTopic('colored', 'depth/colored', Image, by_default=False),
)

#: The messages a frame can produce, in publishing order (FrameOutput attributes).
OUTPUT_NAMES = tuple(output.name for output in OUTPUT_TOPICS)

#: The messages built when nobody chose (FrameInput.outputs None), e.g. by process_bag.
DEFAULT_OUTPUT_NAMES = frozenset(output.name for output in OUTPUT_TOPICS if output.by_default)

#: Input topics relative to the camera namespace.
IMAGE_TOPIC = 'image'
COMPRESSED_IMAGE_TOPIC = 'image/compressed'
CAMERA_INFO_TOPIC = 'camera_info'


def join_topic(namespace, name):
    """Put a relative topic name under a namespace ('' keeps it relative, '/' the root)."""
    namespace = str(namespace or '')
    return f'{namespace.rstrip("/")}/{name}' if namespace else name


@dataclass(frozen=True)
class OutputConfig:
    """
    Node settings that shape the outputs (each one is a ROS parameter of the node).

    :param publish_points: publish the organized point cloud (needs camera info and a
        metric scale)
    :param publish_uncertainty: publish the ensemble spread (only exists with ensemble > 1)
    :param fixed_scale: > 0: the user knows the metric scale of the scene and metric depth is
        fixed_scale * relative + fixed_shift (meters); 0: the scale comes from scale recovery,
        or the node stays relative
    :param fixed_shift: metric offset in meters used with fixed_scale
    :param max_depth: metric depths beyond this many meters become NaN (no reading) in the
        depth image and the cloud; 0 means no limit
    :param max_input_pixels: refuse images with more pixels (width * height) than this before
        decoding them
    :param rectified_input: the images are rectified (image_rect): the camera is the
        camera_info's P with no distortion, as depth_image_proc assumes; false: raw images,
        whose rays are undistorted with K and D
    :param colored_range_min: depth/colored: the depth shown yellow (near) when
        colored_range_max > colored_range_min, in meters for metric depth, else in relative
        units
    :param colored_range_max: depth/colored: the depth shown dark purple (far); not above
        colored_range_min: each frame's 1st to 99th percentile instead
    """

    publish_points: bool = True
    publish_uncertainty: bool = True
    fixed_scale: float = 0.0
    fixed_shift: float = 0.0
    max_depth: float = 0.0
    max_input_pixels: int = ModelConfig.max_input_pixels
    rectified_input: bool = False
    colored_range_min: float = 0.0
    colored_range_max: float = 0.0

    @property
    def colored_range(self):
        """Return the fixed (near, far) range of depth/colored, or None (per frame)."""
        if self.colored_range_max > self.colored_range_min:
            return self.colored_range_min, self.colored_range_max
        return None

    def __post_init__(self):
        """
        Validate the settings.

        :raises ValueError: a setting is out of range, naming it
        """
        if not (math.isfinite(self.fixed_scale) and self.fixed_scale >= 0):
            raise ValueError(f'fixed_scale must be finite and >= 0 (0 = not fixed), got '
                             f'{self.fixed_scale}')
        if not math.isfinite(self.fixed_shift):
            raise ValueError(f'fixed_shift must be finite, got {self.fixed_shift}')
        if not (math.isfinite(self.max_depth) and self.max_depth >= 0):
            raise ValueError(f'max_depth must be finite and >= 0 (0 = no limit), got '
                             f'{self.max_depth}')
        if self.max_input_pixels <= 0:
            raise ValueError(f'max_input_pixels must be > 0, got {self.max_input_pixels}')
        for name in ('colored_range_min', 'colored_range_max'):
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f'{name} must be finite, got {getattr(self, name)}')


@dataclass(frozen=True)
class NodeConfig:
    """
    Settings of the node itself (read-only at runtime: they shape the subscriptions).

    :param cameras: camera namespaces served by this node, relative to the node namespace
        ('' = the node namespace itself); each gets <ns>/image (or <ns>/image/compressed),
        <ns>/camera_info and <ns>/depth/* topics, and all cameras share one model call
    :param image_transport: 'raw' subscribes sensor_msgs/Image on image, 'compressed'
        sensor_msgs/CompressedImage (jpeg or png) on image/compressed
    :param input_reliability: QoS reliability of the image and camera_info subscriptions:
        'best_effort' receives from every publisher (camera drivers publish best effort);
        'reliable' only from reliable publishers, but avoids the loss of large images
        (above about 0.5 MB) across processes on Fast DDS
    :param input_depth: QoS history depth of the input subscriptions (the node keeps only
        the newest image per camera anyway)
    :param output_depth: QoS history depth of the outputs (which are reliable)
    :param camera_info_tolerance: largest gap in seconds between the camera_info stamp and
        the image stamp for a match
    :param camera_info_use_latest: when no camera_info matches by stamp, use the newest one
        whatever its stamp, without waiting (for static camera_info publishers)
    :param camera_info_transient_local: subscribe to camera_info with transient local
        durability, to receive a latched camera_info published once (a transient local
        subscription does not match volatile publishers: leave false for camera drivers)
    :param camera_info_wait: seconds the worker waits for a camera_info that has not
        arrived yet (drivers often publish it just after the image); not with
        camera_info_use_latest
    :param diagnostics_period: seconds between two /diagnostics messages
    :param error_log_period: at most one log line per camera and problem per this many
        seconds (every occurrence is still counted in diagnostics)
    :param shutdown_timeout: seconds to wait at shutdown for a model call in progress
    :param lazy_outputs: build and publish only the outputs that have subscribers, as
        image_pipeline's nodes do (the cloud is most of the node's own work per frame);
        false builds every output every frame
    :param keep_buffers_in_heap: raise glibc's malloc mmap and trim thresholds at start so
        that multi-megabyte images and clouds reuse heap memory instead of fresh pages
        (serializing a 640x480 depth image: 2.4 ms -> 0.2 ms); process-wide, so freed memory
        stays in the process
    :param warmup: run the model once on a blank 640x480 frame after loading, before
        reporting ready, so that the first camera frame does not pay for one-time
        initialisation (CUDA context, cuDNN autotuning, torch.compile, CPU kernels)
    """

    cameras: tuple = ('',)
    image_transport: str = 'raw'
    input_reliability: str = 'best_effort'
    input_depth: int = 2
    output_depth: int = 5
    camera_info_tolerance: float = 0.01
    camera_info_use_latest: bool = False
    camera_info_transient_local: bool = False
    camera_info_wait: float = 0.05
    diagnostics_period: float = 1.0
    error_log_period: float = 5.0
    shutdown_timeout: float = 60.0
    lazy_outputs: bool = True
    keep_buffers_in_heap: bool = True
    warmup: bool = True

    def __post_init__(self):
        """
        Normalise the camera namespaces and validate the settings.

        :raises ValueError: a setting is not allowed, naming it
        """
        cameras = tuple(str(c).strip().strip('/') for c in self.cameras)
        if not cameras:
            raise ValueError("cameras must name at least one namespace ('' = the node's)")
        if len(set(cameras)) != len(cameras):
            raise ValueError(f'cameras has duplicate namespaces: {list(self.cameras)}')
        object.__setattr__(self, 'cameras', cameras)
        if self.image_transport not in TRANSPORTS:
            raise ValueError(f'image_transport must be one of {TRANSPORTS}, got '
                             f'{self.image_transport!r}')
        if self.input_reliability not in RELIABILITIES:
            raise ValueError(f'input_reliability must be one of {RELIABILITIES}, got '
                             f'{self.input_reliability!r}')
        if self.input_depth < 1 or self.output_depth < 1:
            raise ValueError('input_depth and output_depth must be >= 1')
        for name in ('camera_info_tolerance', 'camera_info_wait', 'error_log_period',
                     'shutdown_timeout'):
            if not getattr(self, name) >= 0:
                raise ValueError(f'{name} must be >= 0, got {getattr(self, name)}')
        if not self.diagnostics_period > 0:
            raise ValueError(f'diagnostics_period must be > 0, got {self.diagnostics_period}')


# Descriptions for fields whose comments in marigold_model.config are shared or missing.
_MODEL_DESCRIPTIONS = {
    'device': "torch device: 'auto' (CUDA when available, else CPU), 'cpu', 'cuda' or "
              "'cuda:N'",
    'dtype': "weights and activations: 'auto' is float16 on CUDA and float32 on CPU",
    'channels_last': 'channels-last memory layout on CUDA (faster convolutions); ignored '
                     'on CPU',
    'compile': 'torch.compile the U-Net on CUDA (slow first frames, faster afterwards); '
               'ignored on CPU',
    'cuda_graphs': 'record CUDA graphs per input size (helps at small resolutions); '
                   'ignored on CPU',
    'tiny_vae': "TAESD weights used when vae is 'tiny' (HF id from the local cache, or a "
                'local folder)',
}
_INFERENCE_DESCRIPTIONS = {
    'denoising_steps': "DDIM steps per prediction; 0 = the model's default (from "
                       'model_index.json)',
    'ensemble_size': 'predictions per frame, combined by affine-aligned median; > 1 also '
                     'publishes depth/uncertainty; the cost grows linearly',
    'seed': 'seed of the initial noise (the same for every frame: reproducible output)',
    'ensemble_regularizer': 'ensembling: weight of the regulariser pulling the result to '
                            '[0, 1]',
    'ensemble_max_iter': 'ensembling: BFGS iterations of the affine alignment',
    'ensemble_tol': 'ensembling: convergence tolerance of the affine alignment',
    'ensemble_max_res': 'ensembling: resolution the affine alignment is solved at',
}
_OUTPUT_RANGES = {
    'fixed_scale': (0.0, 1.0e6), 'fixed_shift': (-1.0e6, 1.0e6), 'max_depth': (0.0, 1.0e6),
    'max_input_pixels': (1, 2 ** 31 - 1),
    'colored_range_min': (-1.0e6, 1.0e6), 'colored_range_max': (-1.0e6, 1.0e6),
}
# Descriptions of GuidanceConfig fields that share one comment in marigold_model.config.
_GUIDANCE_DESCRIPTIONS = {
    'robust_weights': 'give sparse points off the global fit by more than '
                      'outlier_threshold_rel no weight in the loss',
    'outlier_threshold_rel': 'relative error off the global fit beyond which a point gets no '
                             "weight (with robust_weights); wider than the fit's inlier "
                             'threshold, so points the guidance must correct towards count',
    'min_points': 'fewest valid sparse points for guidance; fewer: the frame falls back to '
                  'the global fit (guidance_too_few_points)',
    'inlier_threshold_rel': 'relative inlier threshold of the robust global fit that starts '
                            "scale and shift (looser than the tracker's)",
    'min_inlier_ratio': 'fewest inliers / points of that global fit; fewer: the frame falls '
                        'back (guidance_<reason>)',
    'fit_seed': 'RANSAC seed of that global fit',
}
_NODE_RANGES = {
    'input_depth': (1, 1000), 'output_depth': (1, 1000),
    'camera_info_tolerance': (0.0, 3600.0), 'camera_info_wait': (0.0, 10.0),
    'diagnostics_period': (0.01, 3600.0), 'error_log_period': (0.0, 3600.0),
    'shutdown_timeout': (0.0, 3600.0),
}


def parameter_groups():
    """
    Return the parameter groups of the node, in declaration order.

    ModelConfig (read-only: a change needs a reload), InferenceConfig (runtime), OutputConfig
    (runtime except max_input_pixels, which also limits the model), NodeConfig (read-only)
    ScaleRecoveryConfig under the 'scale_recovery.' prefix (read-only: it shapes
    subscriptions) and GuidanceConfig under 'guidance.' (runtime: the settings of sparse
    guidance, used when scale_recovery.guidance is true).
    """
    groups = [
        ConfigGroup(ModelConfig, read_only=True, exclude=('max_input_pixels',),
                    choices={'dtype': DTYPES, 'vae': VAE_CHOICES, 'backend': BACKENDS},
                    descriptions=_MODEL_DESCRIPTIONS),
        ConfigGroup(InferenceConfig, ranges=INFERENCE_RANGES,
                    descriptions=_INFERENCE_DESCRIPTIONS),
        ConfigGroup(OutputConfig, ranges=_OUTPUT_RANGES,
                    read_only_fields=('max_input_pixels',)),
        ConfigGroup(NodeConfig, read_only=True, ranges=_NODE_RANGES,
                    choices={'image_transport': TRANSPORTS,
                             'input_reliability': RELIABILITIES}),
    ]
    # Imported here: scale recovery's input module takes join_topic from this one.
    from .scale_recovery import ScaleRecoveryConfig, SOURCES
    groups.append(ConfigGroup(ScaleRecoveryConfig, prefix='scale_recovery.', read_only=True,
                              choices={'source': SOURCES}, doc_sources=(ScaleTrackerConfig,)))
    groups.append(ConfigGroup(GuidanceConfig, prefix='guidance.', ranges=GUIDANCE_RANGES,
                              choices={'loss': GUIDANCE_LOSSES},
                              descriptions=_GUIDANCE_DESCRIPTIONS))
    return groups


def default_params_yaml():
    """Render config/depth.yaml: every parameter of the node with its default and description."""
    return yaml_document(parameter_groups(), '/**', _YAML_HEADER)


def estimator_config(model, inference, output):
    """Combine the configs into an EstimatorConfig; the output pixel limit is the model's too."""
    return EstimatorConfig(replace(model, max_input_pixels=output.max_input_pixels), inference)


def configs_from_parameters(values):
    """Map {parameter name: value} onto {config class: instance} (ValueError naming a bad one)."""
    return configs_from_values(parameter_groups(), values, NODE_NAME)


def read_node_params(path):
    """Read {config class: instance} from a ROS 2 params file (None: every default)."""
    return configs_from_parameters(read_params_file(path, NODE_NAME) if path else {})
