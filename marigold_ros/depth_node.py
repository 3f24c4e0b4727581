"""
The live depth node ``marigold_depth``: camera in, depth and point clouds out.

Topics per camera namespace ``<ns>`` (relative names, so namespaces and remapping place
them; see the table in DESIGN.md): ``<ns>/image`` (or ``<ns>/image/compressed``) and
``<ns>/camera_info`` in; ``<ns>/depth/relative``, ``<ns>/depth/image`` (meters, only with a
metric scale), ``<ns>/depth/uncertainty``, ``<ns>/depth/camera_info``,
``<ns>/depth/points`` and ``<ns>/depth/colored`` (a colour-mapped picture, only when
subscribed) out, each reusing the image header; ``/diagnostics`` at 1 Hz.  Every input and
output takes ``qos_overrides.<topic>.<subscription|publisher>.<policy>`` parameters
(history, depth, reliability); the messages the middleware reports lost on the inputs are
counted in /diagnostics.

Never blocks: subscription callbacks only store the newest image per camera, with the
camera_info matched to it by stamp on arrival (kept however long the frame waits).  Two
threads run the stages of the shared :class:`~marigold_ros.pipeline.DepthPipeline`: the
model thread takes the newest image of every camera, decodes them and makes one model call
for all cameras; the finisher thread takes each frame's camera_info (the one kept with it,
or one that arrived since), builds the outputs (scale, depth images, cloud) and publishes
them.  The model thread infers batch k+1 while the
finisher publishes batch k, so the outputs cost no model time; batches pass both threads
in order.  Images replaced before the model thread took them are counted as dropped.
The model loads on a background thread (the plain node) or in ``configure`` (the
lifecycle node); a failure is logged and reported on /diagnostics while the node keeps
running.

Two executables: ``depth_node`` (:func:`main`, :class:`DepthNode`) and
``depth_lifecycle_node`` (:func:`lifecycle_main`, :class:`DepthLifecycleNode`: configure
loads the model, activate starts the subscriptions and publishing).
"""

import math
import signal
import sys
import threading
import time

from diagnostic_msgs.msg import DiagnosticArray
from marigold_model.config import GuidanceConfig, InferenceConfig
import numpy as np
from rcl_interfaces.msg import SetParametersResult
import rclpy
from rclpy.clock import Clock, ClockType
from rclpy.exceptions import ParameterException
from rclpy.executors import ExternalShutdownException
from rclpy.lifecycle import LifecycleNode, TransitionCallbackReturn
from rclpy.node import Node
from rclpy.qos import HistoryPolicy, QoSProfile, ReliabilityPolicy
from rclpy.qos_overriding_options import QoSOverridingOptions

from .diagnostics import DiagnosticsCollector, KeyedThrottle, MODEL_ERROR, MODEL_LOADING
from .diagnostics import MODEL_READY, MODEL_UNCONFIGURED
from .gil import quick_gil_handover
from .heap import keep_large_buffers_in_heap
from .node_inputs import CAMERA_INFO_QUEUE, NodeInputs
from .node_params import estimator_config, join_topic, NODE_NAME, OUTPUT_TOPICS
from .node_params import OutputConfig, parameter_groups
from .node_threads import NodeThreads
from .params import declare_groups
from .pipeline import DepthPipeline
from .scale_recovery import ScaleRecovery
from .stamp_matcher import CameraInfoMatcher


def warmup_frame(max_pixels):
    """
    Return the blank frame the model is warmed up with: 640x480, smaller under a pixel limit.

    :param max_pixels: the input pixel limit (0 or None: no limit)
    :return: HxWx3 uint8 grey image
    """
    height, width = 480, 640
    if max_pixels and height * width > max_pixels:
        factor = math.sqrt(max_pixels / (height * width))
        height, width = max(1, int(height * factor)), max(1, int(width * factor))
    return np.full((height, width, 3), 128, np.uint8)


def default_estimator_factory(config):
    """Load a DepthEstimator (imported here: torch is heavy and only the worker needs it)."""
    from marigold_model.estimator import DepthEstimator
    return DepthEstimator(config)


class _DepthCore(NodeInputs, NodeThreads):
    """
    Everything the plain and the lifecycle node share; mixed into an rclpy Node.

    Threads: the executor runs the subscription, timer and parameter callbacks; the worker
    thread runs the model, the finisher thread builds and publishes the outputs; one
    loader thread (plain node) loads the model.  The inputs (:class:`NodeInputs`) and the
    two processing threads (:class:`NodeThreads`) live in their own modules.
    """

    def _core_init(self, estimator_factory):
        """Declare the parameters and create the state, the diagnostics and its timer."""
        self._groups = parameter_groups()
        configs = declare_groups(self, self._groups)
        (self._model_config, self._inference, self._output, self._node_config,
         self._scale_config, self._guidance) = configs
        self._group_of = {group.cls: group for group in self._groups}
        self._estimator_factory = estimator_factory or default_estimator_factory
        cfg = self._node_config
        if cfg.keep_buffers_in_heap:
            keep_large_buffers_in_heap()
        self._cameras = cfg.cameras
        self._diag = DiagnosticsCollector(self.get_fully_qualified_name())
        # Relative depth only is what the user asked for unless a scale source is set.
        self._diag.metric_expected = self._scale_config.source != 'none'
        for camera in self._cameras:
            self._diag.add_stream(camera)
        self._throttle = KeyedThrottle(cfg.error_log_period)
        self._matchers = {camera: CameraInfoMatcher(cfg.camera_info_tolerance,
                                                    CAMERA_INFO_QUEUE,
                                                    cfg.camera_info_use_latest)
                          for camera in self._cameras}
        self._slots = {}
        # camera -> {id(image): (image, camera_info or None)}: the camera_info of each frame
        # waiting in a slot or just taken by the worker, reserved when the frame arrives.
        self._reserved = {camera: {} for camera in self._cameras}
        self._slot_lock = threading.Lock()
        self._config_lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._worker_stop = threading.Event()
        self._worker = None
        self._finisher = None
        self._loader = None
        self._estimator = None
        self._pipeline = None
        self._applied_inference = None
        self._inputs = []
        self._outputs = {}
        self._image_topics = {}
        self._info_topics = {}
        self._closed = False
        self._scale_source = ScaleRecovery(self._scale_config)
        self.add_on_set_parameters_callback(self._check_parameters)
        self.add_post_set_parameters_callback(self._apply_parameters)
        self._diag_publisher = self.create_publisher(DiagnosticArray, '/diagnostics', 10)
        # A steady clock: with use_sim_time and no /clock yet, diagnostics still flow.
        self._diag_timer = self.create_timer(
            cfg.diagnostics_period, self._publish_diagnostics,
            clock=Clock(clock_type=ClockType.STEADY_TIME))

    # ------------------------------------------------------------------ properties

    @property
    def diagnostics(self):
        """Return the DiagnosticsCollector (counters for tests and the demo)."""
        return self._diag

    @property
    def estimator(self):
        """Return the loaded estimator, or None while loading / after a failure."""
        return self._estimator

    @property
    def cameras(self):
        """Return the camera namespaces served."""
        return self._cameras

    @property
    def scale_source(self):
        """Return the ScaleRecovery of the node."""
        return self._scale_source

    def wait_until_ready(self, timeout=None):
        """
        Block until the model is loaded or failed (tests, demo; not from a callback).

        :param timeout: seconds, None for no limit
        :return: True when the model is ready
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while self._diag.model_state in (MODEL_LOADING, MODEL_UNCONFIGURED):
            if deadline is not None and time.monotonic() > deadline:
                break
            time.sleep(0.01)
        return self._diag.model_state == MODEL_READY

    # ------------------------------------------------------------------ model

    def _load_model(self):
        """
        Load the estimator and build the pipeline; report failure without raising.

        :return: True on success
        """
        config = estimator_config(self._model_config, self._inference, self._output)
        name = config.model.model
        self._diag.set_model_state(MODEL_LOADING, model=name, device=config.model.device,
                                   dtype=config.model.dtype)
        self.get_logger().info(f'loading model {name!r} (device {config.model.device}, '
                               f'dtype {config.model.dtype})')
        start = time.monotonic()
        try:
            estimator = self._estimator_factory(config)
            if self._node_config.warmup:
                self._diag.set_model_state(MODEL_LOADING, 'warming up')
                estimator.set_inference(self._inference)
                estimator.estimate([warmup_frame(self._output.max_input_pixels)])
        except Exception as error:  # noqa: B902 - any load failure is reported, not raised
            message = f'{type(error).__name__}: {error}'
            self._diag.set_model_state(MODEL_ERROR, message)
            if not self._stop.is_set():
                self.get_logger().error(
                    f'could not load model {name!r}: {message}\nThe node keeps running '
                    'without publishing depth (see /diagnostics); fix the model parameter and '
                    'restart it.')
            return False
        with self._config_lock:
            self._estimator = estimator
            self._applied_inference = None  # the worker applies the current settings
            self._pipeline = DepthPipeline(estimator, self._output, self._scale_source,
                                           self._guidance_setting())
        seconds = time.monotonic() - start
        device = str(getattr(estimator, 'device', config.model.device))
        dtype = str(getattr(estimator, 'dtype', config.model.dtype)).replace('torch.', '')
        self._diag.set_model_state(MODEL_READY, '', model=name, device=device, dtype=dtype,
                                   load_time_s=f'{seconds:.2f}')
        self._update_settings_info()
        if not self._stop.is_set():
            self.get_logger().info(f'model {name!r} ready on {device} ({dtype}) after '
                                   f'{seconds:.1f} s')
        self._wake.set()
        return True

    def _start_loading(self):
        self._loader = threading.Thread(target=self._load_model, name='marigold_load',
                                        daemon=True)
        self._loader.start()

    def _unload_model(self):
        with self._config_lock:
            self._pipeline = None
            self._estimator = None
        self._diag.set_model_state(MODEL_UNCONFIGURED)

    def _update_settings_info(self):
        estimator = self._estimator
        inference = self._inference
        info = {'ensemble_size': inference.ensemble_size}
        if estimator is not None and hasattr(estimator, 'resolved_settings'):
            steps, resolution = estimator.resolved_settings(inference)
            info.update(denoising_steps=steps,
                        processing_resolution=resolution or 'input size')
        output = self._output
        info['fixed_scale'] = output.fixed_scale if output.fixed_scale > 0 else 'off'
        info['scale_recovery'] = self._scale_config.source
        guidance = self._guidance_setting()
        info['guidance'] = 'off' if guidance is None else \
            f'{guidance.denoising_steps} steps x {guidance.iterations_per_step}'
        # Only the details: reading the state and writing it back could undo the loader's
        # 'ready' set in between (a parameter change during loading).
        self._diag.update_model_info(**info)

    # ------------------------------------------------------------------ parameters

    def _guidance_setting(self):
        """Return the GuidanceConfig the pipeline uses, or None when guidance is off."""
        return self._guidance if self._scale_config.guidance else None

    def _candidate_configs(self, parameters):
        inference, _ = self._group_of[InferenceConfig].apply(self._inference, parameters)
        output, _ = self._group_of[OutputConfig].apply(self._output, parameters)
        guidance, _ = self._group_of[GuidanceConfig].apply(self._guidance, parameters)
        return inference, output, guidance

    def _check_parameters(self, parameters):
        """Reject runtime changes that the configs refuse (read-only / ranges: rclpy)."""
        try:
            self._candidate_configs(parameters)
        except ValueError as error:
            return SetParametersResult(successful=False, reason=str(error))
        return SetParametersResult(successful=True)

    def _apply_parameters(self, parameters):
        """Apply accepted changes; the worker hands them to the model between calls."""
        names = {name for group in self._groups for name in group.names()}
        parameters = [p for p in parameters if p.name in names]
        if not parameters:
            return  # rclpy's own (qos_overrides.* declared with the topics, use_sim_time)
        inference, output, guidance = self._candidate_configs(parameters)
        with self._config_lock:
            self._inference = inference
            self._output = output
            self._guidance = guidance
            if self._pipeline is not None:
                self._pipeline.output_config = output
                self._pipeline.guidance = self._guidance_setting()
        self._update_settings_info()
        self.get_logger().info('parameters changed: ' + ', '.join(
            f'{p.name}={p.value}' for p in parameters))

    # ------------------------------------------------------------------ outputs

    @staticmethod
    def _qos_overrides():
        """Let read-only qos_overrides./<topic>.<endpoint>.<history|depth|reliability> set QoS."""
        return QoSOverridingOptions.with_default_policies()

    def _create_outputs(self, create):
        """Create the publishers of every camera with ``create`` (plain or lifecycle)."""
        for camera in self._cameras:
            # A profile per publisher: rclpy applies the qos_overrides to it in place.
            self._outputs[camera] = {
                output.name: create(output.msg_class, join_topic(camera, output.topic),
                                    QoSProfile(history=HistoryPolicy.KEEP_LAST,
                                               depth=self._node_config.output_depth,
                                               reliability=ReliabilityPolicy.RELIABLE),
                                    qos_overriding_options=self._qos_overrides())
                for output in OUTPUT_TOPICS}

    def _destroy_outputs(self, destroy):
        outputs, self._outputs = self._outputs, {}
        for publishers in outputs.values():
            for publisher in publishers.values():
                destroy(publisher)

    # ------------------------------------------------------------------ diagnostics

    def _report(self, camera, reason, message, warning=False):
        """
        Count a problem in diagnostics and log it, at most once per period per reason.

        :param warning: log a warning (the input was used all the same), not an error
        """
        self._diag.bad_message(camera, reason)
        where = self._image_topics.get(camera, camera or 'node')
        line = self._throttle.report((camera, reason), f'{where}: {reason}: {message}')
        if line is not None and not self._stop.is_set():
            logger = self.get_logger()
            (logger.warning if warning else logger.error)(line)

    def _publish_diagnostics(self):
        msg = self._diag.to_msg(self.get_clock().now().to_msg(),
                                hardware_id=self._diag.model_info.get('device', ''))
        self._diag_publisher.publish(msg)

    # ------------------------------------------------------------------ shutdown

    def shutdown(self):
        """Stop the worker and the subscriptions (idempotent); call before destroy_node."""
        if self._closed:
            return
        self._closed = True
        self._stop_worker()
        self._scale_source.detach()

    def destroy_node(self):
        """Stop and join the worker, then destroy the node (no InvalidHandle on shutdown)."""
        self.shutdown()
        super().destroy_node()


class DepthNode(_DepthCore, Node):
    """
    The live depth node: subscribes, loads the model in the background and publishes.

    :param node_name: node name
    :param estimator_factory: callable EstimatorConfig -> estimator (default: load a
        DepthEstimator); tests inject wrappers here
    :param load_async: load the model on a background thread (the executor keeps running
        and diagnostics say 'loading'); False loads in the constructor
    :param kwargs: passed to rclpy.node.Node (context, parameter_overrides, namespace, ...)
    """

    def __init__(self, node_name=NODE_NAME, *, estimator_factory=None, load_async=True,
                 **kwargs):
        """Declare parameters, create topics, start the worker and the model loading."""
        Node.__init__(self, node_name, **kwargs)
        self._core_init(estimator_factory)
        self._create_outputs(self.create_publisher)
        self._create_inputs()
        self._start_worker()
        if load_async:
            self._start_loading()
        else:
            self._load_model()


class DepthLifecycleNode(_DepthCore, LifecycleNode):
    """
    The depth node as a managed (lifecycle) node.

    configure loads the model (failure: the transition fails and the error is logged),
    activate subscribes and starts publishing, deactivate stops both, cleanup drops the
    model and the publishers.  /diagnostics is published in every state.

    :param node_name: node name
    :param estimator_factory: as for DepthNode
    :param kwargs: passed to rclpy.lifecycle.LifecycleNode
    """

    def __init__(self, node_name=NODE_NAME, *, estimator_factory=None, **kwargs):
        """Declare parameters and diagnostics; everything else waits for the transitions."""
        LifecycleNode.__init__(self, node_name, **kwargs)
        self._core_init(estimator_factory)

    def on_configure(self, state):
        """
        Load the model and create the (lifecycle) publishers.

        :param state: previous state
        :return: SUCCESS, or FAILURE when the model cannot be loaded
        """
        self._stop.clear()  # set by an earlier deactivate; a load failure must be logged
        if not self._load_model():
            return TransitionCallbackReturn.FAILURE
        self._create_outputs(self.create_lifecycle_publisher)
        return super().on_configure(state)

    def on_activate(self, state):
        """
        Activate the publishers, then subscribe and start the worker.

        :param state: previous state
        :return: SUCCESS
        """
        result = super().on_activate(state)
        if result == TransitionCallbackReturn.SUCCESS:
            self._closed = False
            self._start_worker()
            self._create_inputs()
        return result

    def on_deactivate(self, state):
        """Unsubscribe and stop the worker, then deactivate the publishers."""
        self._destroy_inputs()
        self._stop_worker()
        return super().on_deactivate(state)

    def on_cleanup(self, state):
        """Drop the publishers and the model."""
        self._destroy_outputs(self.destroy_lifecycle_publisher)
        self._unload_model()
        return super().on_cleanup(state)

    def on_shutdown(self, state):
        """Stop everything."""
        self._destroy_inputs()
        self._stop_worker()
        return super().on_shutdown(state)


def _run(node_class, args):
    """Spin a node until Ctrl-C / shutdown; return the process exit code."""
    interrupted = threading.Event()
    previous = None
    if threading.current_thread() is threading.main_thread():
        # Installed before rclpy.init, whose SIGINT handler shuts the context down (ending
        # spin with ExternalShutdownException) and then chains to this one.  Not raising
        # KeyboardInterrupt keeps Ctrl-C from landing on an arbitrary line: inside rclpy's
        # executor it can leave a half-built Task whose __del__ prints a traceback at exit.
        previous = signal.signal(signal.SIGINT, lambda signum, frame: interrupted.set())
    rclpy.init(args=args)
    try:
        try:
            node = node_class()
        except (ValueError, ParameterException) as error:
            # Bad parameters: a clear message, not a traceback.
            rclpy.logging.get_logger(NODE_NAME).fatal(f'cannot start: {error}')
            return 1
        except Exception:  # noqa: B902 - only a shutdown during construction is expected
            if interrupted.is_set():
                return 0  # Ctrl-C while the node was being created
            raise
        try:
            with quick_gil_handover():
                rclpy.spin(node)
        except (KeyboardInterrupt, ExternalShutdownException):
            pass
        except Exception:  # noqa: B902 - see below
            # A shutdown between two executor iterations surfaces as an RCLError ('context
            # is not valid') from the next wait set: also a clean stop, anything else is not.
            if not interrupted.is_set() and rclpy.ok():
                raise
        finally:
            node.destroy_node()
    except KeyboardInterrupt:  # Ctrl-C while the node was being created (no handler here)
        pass
    finally:
        rclpy.try_shutdown()
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
    return 0


def main(args=None):
    """Run the depth node (console script ``depth_node``; args default to sys.argv)."""
    return _run(DepthNode, args)


def lifecycle_main(args=None):
    """Run the lifecycle depth node (console script ``depth_lifecycle_node``)."""
    return _run(DepthLifecycleNode, args)


if __name__ == '__main__':
    sys.exit(main())
