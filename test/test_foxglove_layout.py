"""
Tests of config/foxglove_layout.json, the Foxglove view of a process_bag output.

Every topic the layout names must be one the node writes (the output table of
marigold_ros.node_params) or its input, so a renamed output cannot leave a blank panel.
"""

import json
from pathlib import Path

from marigold_ros.node_params import CAMERA_INFO_TOPIC, IMAGE_TOPIC, join_topic, OUTPUT_TOPICS

ROOT = Path(__file__).resolve().parents[1]
LAYOUT_FILE = ROOT / 'config' / 'foxglove_layout.json'


def _named_topics(value):
    """Collect the topics a layout names: keys of 'topics' maps and '...Topic' values."""
    found = set()
    if isinstance(value, dict):
        for key, item in value.items():
            if key == 'topics' and isinstance(item, dict):
                found.update(item)
            elif key.endswith('Topic') or key == 'topicToRender':
                found.add(item)
            found |= _named_topics(item)
    elif isinstance(value, list):
        for item in value:
            found |= _named_topics(item)
    return found


def _panel_ids(tree):
    """Return the panel ids placed in a layout tree (leaves are ids)."""
    if isinstance(tree, str):
        return {tree}
    return _panel_ids(tree['first']) | _panel_ids(tree['second'])


def test_layout_names_only_topics_the_node_publishes_or_reads():
    """Each topic is a node output under the root namespace, or the image / camera_info."""
    layout = json.loads(LAYOUT_FILE.read_text())
    outputs = {join_topic('/', output.topic) for output in OUTPUT_TOPICS}
    inputs = {join_topic('/', IMAGE_TOPIC), join_topic('/', CAMERA_INFO_TOPIC)}
    named = _named_topics(layout['configById'])
    assert named and named <= outputs | inputs, named - outputs - inputs


def test_layout_shows_image_depths_uncertainty_and_cloud():
    """The panels: camera image, both depths and uncertainty with a colormap, a 3D cloud."""
    layout = json.loads(LAYOUT_FILE.read_text())
    panels = layout['configById']
    assert _panel_ids(layout['layout']) == set(panels)  # every panel placed, none missing
    images = {config['imageMode']['imageTopic']: config['imageMode']
              for panel, config in panels.items() if panel.startswith('Image!')}
    assert join_topic('/', IMAGE_TOPIC) in images
    for output in ('depth/relative', 'depth/image', 'depth/uncertainty'):
        mode = images['/' + output]
        assert mode['colorMode'] == 'colormap' and mode['minValue'] < mode['maxValue']
        assert mode['calibrationTopic'] == '/depth/camera_info'
    assert images['/depth/relative']['maxValue'] == 1  # relative depth spans [0, 1]
    clouds = [config['topics'] for panel, config in panels.items() if panel.startswith('3D!')]
    assert any(topics.get('/depth/points', {}).get('visible') for topics in clouds)
    assert {'globalVariables', 'userNodes'} <= set(layout)


def test_layout_is_installed():
    """setup.py installs config/*.json next to depth.yaml (share/marigold_ros/config)."""
    setup = (ROOT / 'setup.py').read_text()
    assert "glob('config/*.json')" in setup
