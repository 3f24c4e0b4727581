"""
The depth node's inputs: subscriptions with their QoS, QoS events, the newest frame per camera.

The callbacks never block: each camera's newest image waits in a slot with the camera_info
matched to it by stamp on arrival, kept however long the frame waits.
"""

import math
import time

from rclpy.event_handler import SubscriptionEventCallbacks
from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSPolicyKind, QoSProfile
from rclpy.qos import ReliabilityPolicy
from sensor_msgs.msg import CameraInfo
from sensor_msgs.msg import CompressedImage
from sensor_msgs.msg import Image

from .diagnostics import LOST_ADVICE, MAX_LATENCY_S
from .node_params import CAMERA_INFO_TOPIC, COMPRESSED_IMAGE_TOPIC, IMAGE_TOPIC, join_topic
from .node_threads import Handoff
from .stamp_matcher import NS_PER_S, stamp_to_ns


# camera_info messages kept per camera for stamp matching (3 s at 10 Hz).  A frame waiting
# for the model keeps the camera_info matched on arrival, however many come meanwhile.
CAMERA_INFO_QUEUE = 30


class NodeInputs:
    """
    Subscribe to every camera's inputs and keep its newest frame; mixed into the node's core.

    The slots, reservations and matchers live on the node, created by its ``_core_init``.
    """

    def _input_qos(self, depth, latched=False):
        reliability = ReliabilityPolicy.RELIABLE \
            if self._node_config.input_reliability == 'reliable' else \
            ReliabilityPolicy.BEST_EFFORT
        durability = DurabilityPolicy.TRANSIENT_LOCAL if latched else \
            DurabilityPolicy.VOLATILE
        return QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=depth,
                          reliability=reliability, durability=durability)

    def _input_events(self, camera, what):
        """Handle the QoS events of an input: incompatible publishers, messages lost."""
        return SubscriptionEventCallbacks(
            incompatible_qos=lambda event: self._incompatible_qos(camera, what, event),
            message_lost=lambda info: self._messages_lost(camera, what, info))

    def _create_inputs(self):
        """Subscribe to the images, camera_info and sparse inputs of every camera."""
        cfg = self._node_config
        compressed = cfg.image_transport == 'compressed'
        for camera in self._cameras:
            # Profiles per subscription: rclpy applies the qos_overrides to them in place.
            image_qos = self._input_qos(cfg.input_depth)
            info_qos = self._input_qos(max(cfg.input_depth, 10),
                                       latched=cfg.camera_info_transient_local)
            # camera_info and the sparse inputs are subscribed before the image: the executor
            # serves ready subscriptions in creation order, so a camera_info that arrived with
            # its image is stored before the image reserves it.
            info = self.create_subscription(
                CameraInfo, join_topic(camera, CAMERA_INFO_TOPIC),
                lambda msg, camera=camera: self._on_camera_info(camera, msg), info_qos,
                event_callbacks=self._input_events(camera, 'camera_info'),
                qos_overriding_options=self._qos_overrides())
            self._info_topics[camera] = info.topic_name
            self._inputs.append(info)
            self._scale_source.attach(self, camera, self._input_qos(max(cfg.input_depth, 10)))
            topic = join_topic(camera, COMPRESSED_IMAGE_TOPIC if compressed else IMAGE_TOPIC)
            subscription = self.create_subscription(
                CompressedImage if compressed else Image, topic,
                lambda msg, camera=camera: self._on_image(camera, msg), image_qos,
                event_callbacks=self._input_events(camera, 'image'),
                qos_overriding_options=self._qos_overrides())
            self._image_topics[camera] = subscription.topic_name
            self._inputs.append(subscription)
        self._diag.set_listening(True)

    def _destroy_inputs(self):
        self._diag.set_listening(False)  # an inactive lifecycle node is not missing images
        inputs, self._inputs = self._inputs, []
        for subscription in inputs:
            self.destroy_subscription(subscription)
        self._scale_source.detach()

    def _topic(self, camera, what):
        """Return the resolved name of a camera's 'image' or 'camera_info' input."""
        topics = self._image_topics if what == 'image' else self._info_topics
        return topics.get(camera) or join_topic(camera, what)

    def _incompatible_qos(self, camera, what='image', event=None):
        """Report a publisher this input cannot receive from, with the policy to change."""
        topic = self._topic(camera, what)
        try:
            policy = QoSPolicyKind(int(event.last_policy_kind)).name.lower()
        except (AttributeError, TypeError, ValueError):
            policy = 'reliability'
        advice = {
            'reliability': "set input_reliability to 'best_effort'",
            'durability': 'set camera_info_transient_local to false (the publisher is '
                          'volatile)',
        }.get(policy, f'check the qos_overrides.{topic}.subscription.* parameters')
        self._report(camera, 'incompatible_qos', f'a publisher on {topic} offers a QoS '
                     f'{policy} this subscription cannot receive; {advice}')

    def _messages_lost(self, camera, what, info):
        """
        Count the messages of an input that the middleware lost (QoS message_lost event).

        :param camera: camera namespace
        :param what: 'image' or 'camera_info'
        :param info: QoSMessageLostInfo (total_count, total_count_change)
        """
        count = int(info.total_count_change)
        if count <= 0:
            return
        self._diag.messages_lost(camera, what, count)
        line = self._throttle.report(
            (camera, 'message_lost', what),
            f'{self._topic(camera, what)}: the middleware lost {count} message(s) '
            f'({int(info.total_count)} in all); {LOST_ADVICE}')
        if line is not None and not self._stop.is_set():
            self.get_logger().warning(line)

    def _check_stamp(self, camera, stamp, received):
        """Warn (throttled) about image stamps far from the node's clock."""
        offset = (received - stamp) / NS_PER_S
        if abs(offset) <= MAX_LATENCY_S:
            return
        line = self._throttle.report(
            (camera, 'stamp_off_clock'),
            f'{self._image_topics.get(camera, camera)}: image stamp is {offset:+.0f} s from '
            f'this node\'s clock (use_sim_time {self.get_parameter("use_sim_time").value}): '
            'a sim time / wall time mix-up or an unsynchronised camera clock?  Latency of '
            'these frames is not measured.')
        if line is not None and not self._stop.is_set():
            self.get_logger().warning(line)

    @staticmethod
    def _gap(info, stamp):
        return math.inf if info is None else abs(stamp_to_ns(info.header.stamp) - stamp)

    def _on_camera_info(self, camera, msg):
        """Store a camera_info; a waiting frame it fits better reserves it."""
        matcher = self._matchers[camera]
        matcher.add_msg(msg)
        with self._slot_lock:
            slot = self._slots.get(camera)
            if slot is None:
                return
            image = slot[0]
            reserved = self._reserved[camera].get(id(image), (image, None))[1]
            stamp = stamp_to_ns(image.header.stamp)
            info = matcher.match(stamp)
            if info is not None and self._gap(info, stamp) < self._gap(reserved, stamp):
                self._reserved[camera][id(image)] = (image, info)

    def _on_image(self, camera, msg):
        """Keep only the newest image per camera, with its camera_info; never block."""
        received = self.get_clock().now().nanoseconds
        stamp = stamp_to_ns(msg.header.stamp)
        self._check_stamp(camera, stamp, received)
        info = self._matchers[camera].match(stamp)
        with self._slot_lock:
            old = self._slots.get(camera)
            self._slots[camera] = (msg, received)
            reserved = self._reserved[camera]
            if old is not None:
                reserved.pop(id(old[0]), None)
            reserved[id(msg)] = (msg, info)
            # The slot's frame and the frames past it not yet finished keep theirs.
            while len(reserved) > 1 + Handoff.MAX_IN_FLIGHT:
                del reserved[next(iter(reserved))]
        if old is not None:
            self._diag.frame_dropped(camera)
        self._diag.image_received(camera)
        self._wake.set()

    def _camera_info_for(self, camera, msg):
        """
        Return the camera_info of a frame: the one it reserved, else one matched now.

        Without a reservation, wait briefly for a camera_info that may follow the image.
        """
        with self._slot_lock:
            image, info = self._reserved[camera].pop(id(msg), (None, None))
        if image is msg and info is not None:
            return info
        wait = self._node_config.camera_info_wait
        matcher = self._matchers[camera]
        stamp = stamp_to_ns(msg.header.stamp)
        info = matcher.match(stamp)
        if info is None and wait > 0 and matcher.may_follow(stamp):
            deadline = time.monotonic() + wait
            while info is None and time.monotonic() < deadline and not self._stop.is_set():
                self._stop.wait(0.002)
                info = matcher.match(stamp)
        return info
