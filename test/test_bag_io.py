"""Tests of marigold_ros.bag_io's error messages."""

from marigold_ros.bag_io import BagError, BagReader
import pytest


@pytest.mark.parametrize('content', [
    b'rosbag2_bagfile_information: [unclosed\n  x: {',  # not YAML
    b'rosbag2_bagfile_information:\n  version: 5\n',   # YAML without the bag's keys
    b'\x00\x01garbage\xff',                              # not text
])
def test_damaged_metadata_yaml_is_named(tmp_path, content):
    """An unreadable metadata.yaml: the error names the file, says damaged and the fix."""
    bag = tmp_path / 'bag'
    bag.mkdir()
    (bag / 'metadata.yaml').write_bytes(content)
    with pytest.raises(BagError) as error:
        BagReader(bag)
    text = str(error.value)
    assert error.value.reason == 'unreadable'
    assert str(bag / 'metadata.yaml') in text and 'is damaged' in text, text
    assert 'ros2 bag reindex' in text, text


def test_a_folder_that_is_no_bag_is_not_called_damaged_metadata(tmp_path):
    """Without a metadata.yaml the general message stays."""
    with pytest.raises(BagError, match='cannot open bag') as error:
        BagReader(tmp_path)
    assert 'is damaged' not in str(error.value)
