"""
Which topics of a bag process_bag reads and writes.

The input topics are checked when named and found when not (the colour image, its camera
info, the scale input the parameters ask for); the outputs go under the image's camera
namespace with the node's relative names (:data:`marigold_ros.node_params.OUTPUT_TOPICS`).
"""

from dataclasses import dataclass

from .bag_io import BagError, CAMERA_INFO_TYPE, IMAGE_TYPE, IMAGE_TYPES, POINTCLOUD_TYPE
from .bag_io import to_rclpy
from .conversions import DEPTH_ENCODINGS
from .node_params import CAMERA_INFO_TOPIC, join_topic, OUTPUT_TOPICS
from .scale_inputs import TOPICS as SCALE_TOPICS


def camera_namespace(image_topic):
    """
    Return the camera namespace of an image topic (where the node's outputs go).

    '/cam/image_raw' -> '/cam', '/cam/image_raw/compressed' -> '/cam', '/image' -> ''.

    :param image_topic: topic name
    :return: namespace without trailing slash ('' for the root)
    """
    parts = [p for p in image_topic.split('/') if p]
    if len(parts) > 1 and parts[-1] == 'compressed':
        parts = parts[:-1]
    return '/' + '/'.join(parts[:-1]) if len(parts) > 1 else ''


def output_topic_names(namespace):
    """Map each output name to its topic under a namespace ('/cam'; '' for the root)."""
    return {output.name: join_topic(namespace or '/', output.topic) for output in OUTPUT_TOPICS}


def _require(reader, topic, types, what, option):
    if topic not in reader.topics:
        candidates = reader.topics_of_type(*types)
        raise BagError('no_topic', f'{what} topic {topic!r} ({option}) is not in '
                                   f'{str(reader.path)!r}; its {what} topics are:\n'
                                   + reader.describe_topics(candidates))
    msgtype = reader.topics[topic].msgtype
    if msgtype not in types:
        raise BagError('bad_topic', f'{what} topic {topic!r} ({option}) carries {msgtype}, '
                                    f'expected {" or ".join(types)}')
    return topic


def colour_image_topics(reader, exclude=()):
    """
    List the image topics that can be depth inputs: not depth images (16UC1 / 32FC1).

    The encoding is read from each Image topic's first message, so a sparse depth or depth
    camera topic is never taken for the colour camera.

    :param reader: BagReader
    :param exclude: topic names to leave out
    :return: sorted topic names
    """
    out = []
    for topic in reader.topics_of_type(*IMAGE_TYPES):
        if topic in exclude:
            continue
        if reader.topics[topic].msgtype == IMAGE_TYPE:
            first = reader.first_message(topic)
            if first is not None and \
                    str(to_rclpy(first).encoding).strip().upper() in DEPTH_ENCODINGS:
                continue
        out.append(topic)
    return out


@dataclass(frozen=True)
class Topics:
    """
    The input topics of a run and the output namespace.

    :param image: image topic
    :param camera_info: CameraInfo topic or None
    :param sparse_depth: sparse depth topic or None
    :param points: LiDAR topic or None
    :param namespace: output namespace
    """

    image: str
    camera_info: str = None
    sparse_depth: str = None
    points: str = None
    namespace: str = ''


def resolve_topics(reader, job, scale_source='none'):
    """
    Choose the input topics: given names are checked, missing ones found.

    Without a scale topic option, a params file whose ``scale_recovery.source`` is
    'sparse_depth' or 'points' selects the node's topic for it ('<camera>/sparse_depth' or
    '<camera>/points_in'), which must then be in the bag.

    :param reader: BagReader
    :param job: BagJob
    :param scale_source: ``scale_recovery.source`` from the parameters
    :return: Topics
    :raises BagError: 'no_topic' listing the candidates, or 'bad_topic' for a wrong type
    """
    images = colour_image_topics(reader, exclude=(job.sparse_depth_topic,))
    if job.image_topic:
        image = _require(reader, job.image_topic, IMAGE_TYPES, 'image', '--image-topic')
    elif len(images) == 1:
        image = images[0]
    elif not images:
        raise BagError('no_topic', f'{str(reader.path)!r} has no colour Image or '
                                   'CompressedImage topic; its topics are:\n'
                                   + reader.describe_topics())
    else:
        raise BagError('no_topic', f'{str(reader.path)!r} has {len(images)} image topics; '
                                   'choose one with --image-topic:\n'
                                   + reader.describe_topics(images))
    namespace = camera_namespace(image)
    if job.camera_info_topic:
        info = _require(reader, job.camera_info_topic, (CAMERA_INFO_TYPE,), 'camera info',
                        '--camera-info-topic')
    elif job.camera_info_topic == '':
        info = None
    else:
        infos = reader.topics_of_type(CAMERA_INFO_TYPE)
        sibling = join_topic(namespace or '/', CAMERA_INFO_TOPIC)
        # The only CameraInfo of a one-camera bag is that camera's; with several cameras
        # only the image's own namespace is trusted.
        info = sibling if sibling in infos else \
            (infos[0] if len(infos) == 1 and len(images) == 1 else None)
    sparse = points = None
    if job.sparse_depth_topic:
        sparse = _require(reader, job.sparse_depth_topic, (IMAGE_TYPE,), 'sparse depth',
                          '--sparse-depth-topic')
    if job.points_topic:
        points = _require(reader, job.points_topic, (POINTCLOUD_TYPE,), 'point cloud',
                          '--points-topic')
    if not (sparse or points) and scale_source != 'none':
        wanted = join_topic(namespace or '/', SCALE_TOPICS[scale_source])
        types = (IMAGE_TYPE,) if scale_source == 'sparse_depth' else (POINTCLOUD_TYPE,)
        option = '--sparse-depth-topic' if scale_source == 'sparse_depth' else '--points-topic'
        if wanted not in reader.topics or reader.topics[wanted].msgtype not in types:
            raise BagError('no_topic', f'the parameters set scale_recovery.source '
                                       f'{scale_source!r} but the bag has no {wanted!r}; '
                                       f'name the topic with {option}; candidates:\n'
                                       + reader.describe_topics(reader.topics_of_type(*types)))
        if scale_source == 'sparse_depth':
            sparse = wanted
        else:
            points = wanted
    if sparse and points:
        raise BagError('bad_topic', 'give either --sparse-depth-topic or --points-topic, '
                                    'not both (the node uses one scale source)')
    if job.output_namespace is not None:
        namespace = job.output_namespace.rstrip('/')
        if namespace and not namespace.startswith('/'):
            namespace = '/' + namespace
    return Topics(image, info, sparse, points, namespace)
