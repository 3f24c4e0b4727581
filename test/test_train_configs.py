"""config/train: the examples load and train two steps; reference.yaml lists every setting."""

from dataclasses import fields
import json
from pathlib import Path

from builders import save_png
from marigold_model.training.config_reference import reference_yaml
from marigold_model.training.train_config import load_config, TrainConfig
from marigold_model.training.trainer import Trainer
import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ('paper.yaml', 'finetune_folder.yaml', 'finetune_bag.yaml')
SIZE = (24, 40)  # height, width of the generated frames


def _frame(index):
    """RGB and planar depth (metres) of one small generated frame."""
    rows, cols = np.mgrid[0:SIZE[0], 0:SIZE[1]]
    rgb = np.stack([cols * 6, rows * 10, np.full_like(cols, 50 * index)], -1).astype(np.uint8)
    return rgb, (2.0 + 0.1 * cols + 0.05 * index * rows).astype(np.float32)


def _hypersim(root, frames=3):
    """Raw Hypersim layout: HDF5 depth (distance, metres) and tone-mapped JPEG previews."""
    import h5py
    images = root / 'ai_001_001' / 'images'
    for i in range(frames):
        rgb, depth = _frame(i)
        geometry = images / 'scene_cam_00_geometry_hdf5'
        geometry.mkdir(parents=True, exist_ok=True)
        with h5py.File(geometry / f'frame.{i:04d}.depth_meters.hdf5', 'w') as f:
            f.create_dataset('dataset', data=depth.astype(np.float16))
        save_png(images / 'scene_cam_00_final_preview' / f'frame.{i:04d}.tonemap.jpg', rgb)
    return root


def _vkitti(root, frames=3):
    """Virtual KITTI 2 layout: JPEG colour, 16-bit PNG depth in centimetres."""
    for i in range(frames):
        rgb, depth = _frame(i)
        scene = root / 'Scene01' / 'clone' / 'frames'
        save_png(scene / 'rgb' / 'Camera_0' / f'rgb_{i:05d}.jpg', rgb)
        save_png(scene / 'depth' / 'Camera_0' / f'depth_{i:05d}.png',
                 (depth * 100).astype(np.uint16))
    return root


def _folder(root, frames=3):
    """RGB-D folder: PNG colour, 16-bit PNG depth in millimetres."""
    for i in range(frames):
        rgb, depth = _frame(i)
        save_png(root / 'rgb' / f'f{i}.png', rgb)
        save_png(root / 'depth' / f'f{i}.png', (depth * 1000).astype(np.uint16))
    return root


def _bag(root, options, frames=3):
    """Write a rosbag2 with the colour, depth (32FC1) and camera-info topics named."""
    from rosbags.rosbag2 import Writer
    from rosbags.typesys import get_typestore, Stores
    store = get_typestore(Stores.ROS2_HUMBLE)
    types = store.types
    image, info_type = types['sensor_msgs/msg/Image'], types['sensor_msgs/msg/CameraInfo']
    header_type, time_type = types['std_msgs/msg/Header'], types['builtin_interfaces/msg/Time']
    roi = types['sensor_msgs/msg/RegionOfInterest']
    height, width = SIZE

    def header(ns):
        return header_type(stamp=time_type(sec=ns // 10 ** 9, nanosec=ns % 10 ** 9),
                           frame_id='camera')
    with Writer(root, version=9) as writer:
        rgb_topic = writer.add_connection(options['rgb_topic'], image.__msgtype__,
                                          typestore=store)
        depth_topic = writer.add_connection(options['depth_topic'], image.__msgtype__,
                                            typestore=store)
        info_topic = writer.add_connection(options['camera_info_topic'],
                                           info_type.__msgtype__, typestore=store)
        info = info_type(header=header(1), height=height, width=width,
                         distortion_model='plumb_bob', d=np.zeros(5),
                         k=np.array([30.0, 0, width / 2, 0, 30.0, height / 2, 0, 0, 1]),
                         r=np.eye(3).ravel(), p=np.zeros(12), binning_x=0, binning_y=0,
                         roi=roi(x_offset=0, y_offset=0, height=0, width=0, do_rectify=False))
        writer.write(info_topic, 1, store.serialize_cdr(info, info_type.__msgtype__))
        for i in range(frames):
            rgb, depth = _frame(i)
            stamp = (i + 1) * 10 ** 8
            for topic, encoding, array in ((rgb_topic, 'rgb8', rgb),
                                           (depth_topic, '32FC1', depth)):
                data = np.frombuffer(array.tobytes(), np.uint8)
                message = image(header=header(stamp), height=height, width=width,
                                encoding=encoding, is_bigendian=0, step=data.size // height,
                                data=data)
                writer.write(topic, stamp, store.serialize_cdr(message, image.__msgtype__))
    return root


def _stand_ins(config, folder):
    """Replace every data root of the example by tiny generated data of its kind."""
    sources = []
    for index, spec in enumerate(config.data):
        root = folder / f'{index}_{spec.kind}'
        if spec.kind == 'bag':
            _bag(root, spec.options)
        else:
            {'hypersim': _hypersim, 'vkitti': _vkitti, 'folder': _folder}[spec.kind](root)
        sources.append({'kind': spec.kind, 'root': str(root), 'probability': spec.probability,
                        'options': dict(spec.options)})
    return sources


def test_the_paper_example_is_the_paper_recipe():
    """Hypersim 0.9 + Virtual KITTI 0.1, lr 3e-5, batch 2 x 16, pyramid noise, 30k steps."""
    config = load_config(ROOT / 'config' / 'train' / 'paper.yaml')
    assert [(spec.kind, spec.probability) for spec in config.data] == [
        ('hypersim', 0.9), ('vkitti', 0.1)]
    assert (config.lr, config.batch_size, config.grad_accumulation) == (3e-5, 2, 16)
    assert (config.max_steps, config.lr_schedule, config.lr_final_ratio) == (
        30000, 'exponential', 0.01)
    assert config.pyramid_noise and config.pyramid_anneal and config.pyramid_strength == 0.9
    assert (config.height, config.width) == (480, 640)
    assert 'stable-diffusion-2' in config.base_model


@pytest.mark.parametrize('name', EXAMPLES)
def test_example_config_trains_two_steps(name, tmp_path):
    """The bundled tiny model and generated data stand in for the base and the data sets."""
    path = ROOT / 'config' / 'train' / name
    example = load_config(path)
    data = _stand_ins(example, tmp_path / 'data')
    overrides = ['base_model=bundled:marigold-tiny', f'data={json.dumps(data)}',
                 f'output_dir={tmp_path / "run"}', 'max_steps=2', 'height=16', 'width=24',
                 'batch_size=1', 'grad_accumulation=2', 'progress=false',
                 'export_resolution=32']
    config = load_config(path, overrides)
    trainer = Trainer(config)
    before = [p.detach().clone() for p in trainer.unet.parameters()]
    trainer.run()
    assert trainer.step == 2 and len(trainer.losses) == 2
    assert all(np.isfinite(trainer.losses))
    assert trainer.skipped == 0 and trainer.no_depth == 0
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.unet.parameters()))
    assert (tmp_path / 'run' / 'model' / 'model_index.json').is_file()
    # Everything but the overridden keys is the example's.
    kept = ('lr', 'optimizer', 'lr_schedule', 'pyramid_noise', 'ema_decay', 'seed')
    assert {key: getattr(config, key) for key in kept} == {
        key: getattr(example, key) for key in kept}


def test_reference_lists_every_setting_with_its_meaning_and_default():
    """config/train/reference.yaml is what TrainConfig renders, and loads as the defaults."""
    import yaml
    path = ROOT / 'config' / 'train' / 'reference.yaml'
    assert path.read_text() == reference_yaml(), (
        'regenerate: python -m marigold_model.training.config_reference > '
        'config/train/reference.yaml')
    assert list(yaml.safe_load(path.read_text())) == [f.name for f in fields(TrainConfig)]
    assert load_config(path) == TrainConfig()
    text = path.read_text()
    for name in ('folder', 'bag', 'hypersim', 'vkitti', 'synthetic'):
        assert f'#   {name} (' in text  # each data kind's options are listed
