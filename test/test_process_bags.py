"""
Many bags on Ray (issue 19): process_bags on a local Ray of two one-thread workers.

Ray starts once for the module.  Every output is compared with ``process_bag`` run on the
same bag in this process, one bag after the other: the messages (topic, bag time, bytes)
and the storage files must be the same bytes.  Resuming, a corrupt bag among good ones,
and windows of a long bag (their messages one after the other are the whole bag's) are
checked the same way.
"""

import hashlib
import os
from pathlib import Path
import shutil
import socket

from marigold_ros.bag_io import BagError
from marigold_ros.bag_job import BagJob
from marigold_ros.bag_processor import process_bag
from marigold_ros.process_bags import find_bags, main, window_frames
import pytest
from test_bag_processor import _messages, _read, _write_bag, PARAMS

ray = pytest.importorskip('ray')


@pytest.fixture(scope='module')
def local_ray():
    """Start a light local Ray once for the module (two CPUs, no dashboard)."""
    os.environ.setdefault('RAY_USAGE_STATS_ENABLED', '0')
    ray.init(num_cpus=2, num_gpus=0, include_dashboard=False, _node_ip_address='127.0.0.1',
             log_to_driver=True,
             configure_logging=True, logging_level='warning',
             object_store_memory=100 * 2 ** 20)
    yield
    ray.shutdown()


@pytest.fixture(scope='module')
def inputs(tmp_path_factory, scenes, random_model_dir, one_torch_thread):
    """
    Three different six-frame bags, a twelve-frame bag, the params and their references.

    The references run on one torch thread, as the workers do: the float sums of a model
    call, and so the last bits of the outputs, depend on the thread count.
    """
    root = tmp_path_factory.mktemp('bags')
    params = root / 'depth.yaml'
    params.write_text(PARAMS)
    bags = []
    for k in range(3):
        order = scenes[k:] + scenes[:k]  # different content in each bag
        bags.append(_write_bag(root / 'in' / f'bag{k}', 'mcap', _messages(order)))
    long_bag = _write_bag(root / 'long' / 'long', 'mcap', _messages(scenes + scenes))
    (root / 'ref').mkdir()
    for bag in bags + [long_bag]:
        process_bag(BagJob(input=bag, output=str(root / 'ref' / Path(bag).name),
                           params=str(params), model=random_model_dir, quiet=True))
    return root, bags, long_bag, str(params), random_model_dir


def _hashes(folder):
    """Bytes of every file under an output bag, by relative path."""
    folder = Path(folder)
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob('*')) if p.is_file()}


def _run(capsys, *argv):
    status = main([*map(str, argv), '--workers', '2', '--threads-per-worker', '1', '--quiet'])
    return status, capsys.readouterr()


def test_three_bags_on_two_workers_equal_sequential_runs(local_ray, inputs, tmp_path, capsys):
    root, bags, _, params, model = inputs
    out = tmp_path / 'out'
    status, captured = _run(capsys, root / 'in', '--output-dir', out, '--params', params,
                            '--model', model)
    assert status == 0, captured.err
    for bag in bags:
        name = Path(bag).name
        assert _read(out / name) == _read(root / 'ref' / name)
        assert _hashes(out / name) == _hashes(root / 'ref' / name)
    table = [line.split() for line in captured.out.splitlines()]
    header = table.index(['bag', 'frames', 'failed', 'seconds', 'output'])
    assert sorted(row[:3] for row in table[header + 1:header + 4]) == \
        [[f'bag{k}', '6', '0'] for k in range(3)]
    assert all(row[4] == str(out / row[0]) for row in table[header + 1:header + 4])


def _dead_pid():
    for pid in range(4_194_000, 4_194_304):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return pid
        except PermissionError:
            continue
    pytest.skip('no free process id found')


def test_a_rerun_skips_complete_outputs_and_redoes_the_rest(local_ray, inputs, tmp_path,
                                                            capsys):
    root, bags, _, params, model = inputs
    out = tmp_path / 'out'
    out.mkdir()
    # bag0 finished before the interruption; bag1 was being written by a process now gone.
    shutil.copytree(root / 'ref' / 'bag0', out / 'bag0')
    before = {p: p.stat().st_mtime_ns for p in (out / 'bag0').rglob('*')}
    stage = out / f'.bag1.partial-{socket.gethostname()}-{_dead_pid()}'
    (stage / 'bag1').mkdir(parents=True)
    (stage / 'bag1' / 'bag1_0.mcap').write_bytes(b'half written')
    manifest = tmp_path / 'bags.txt'
    manifest.write_text('# the three bags\n' + '\n'.join(bags) + '\n')
    status, captured = _run(capsys, manifest, '--output-dir', out, '--params', params,
                            '--model', model)
    assert status == 0, captured.err
    assert {p: p.stat().st_mtime_ns for p in (out / 'bag0').rglob('*')} == before
    assert 'bag0' in captured.out and '(complete: skipped)' in captured.out
    assert not stage.exists()
    for name in ('bag1', 'bag2'):
        assert _hashes(out / name) == _hashes(root / 'ref' / name)
    assert sorted(p.name for p in out.iterdir()) == ['bag0', 'bag1', 'bag2']


def test_a_corrupt_bag_is_reported_and_the_good_ones_complete(local_ray, inputs, tmp_path,
                                                              capsys):
    root, bags, _, params, model = inputs
    broken = tmp_path / 'in' / 'broken'
    shutil.copytree(bags[0], broken)
    for storage in broken.glob('*.mcap'):
        storage.rename(broken / 'broken_0.mcap')
    (broken / 'broken_0.mcap').write_bytes(b'\x89MCAP0\r\n' + b'\0' * 64)
    (broken / 'metadata.yaml').write_text(
        (broken / 'metadata.yaml').read_text().replace('bag0_0.mcap', 'broken_0.mcap'))
    status, captured = _run(capsys, *bags[1:], broken, '--output-dir', tmp_path / 'out',
                            '--params', params, '--model', model, '--retries', '1')
    assert status == 1
    failed = [line for line in captured.out.splitlines() if line.startswith('broken')]
    assert len(failed) == 1 and 'FAILED after 2 tries' in failed[0], captured.out
    assert 'broken failed' in captured.err and 'retrying' in captured.err
    for bag in bags[1:]:
        name = Path(bag).name
        assert _hashes(tmp_path / 'out' / name) == _hashes(root / 'ref' / name)
    assert sorted(p.name for p in (tmp_path / 'out').iterdir()) == ['bag1', 'bag2']


def test_windows_together_are_the_whole_bag(local_ray, inputs, tmp_path, capsys):
    """Four windows of a twelve-frame bag: their messages in order are the whole output's."""
    root, _, long_bag, params, model = inputs
    out = tmp_path / 'out'
    # 0.25 s windows of 10 Hz images, batch 3: windows start at frames 3, 6 and 9.
    status, captured = _run(capsys, long_bag, '--output-dir', out, '--params', params,
                            '--model', model, '--window-minutes', 0.25 / 60,
                            '--export-dir', tmp_path / 'exports')
    assert status == 0, captured.err
    windows = sorted(p.name for p in out.iterdir())
    assert windows == [f'long.window-{i:03d}' for i in range(4)]
    together = [m for name in windows for m in _read(out / name)]
    assert together == _read(root / 'ref' / 'long')
    assert len(together) > 12
    # Each window's export has its frames, numbered as in the whole bag.
    assert sorted(p.name for p in (tmp_path / 'exports').iterdir()) == windows
    rows = [line.split(',')[0] for name in windows
            for line in (tmp_path / 'exports' / name / 'frames.csv').read_text().splitlines()[1:]]
    assert rows == [str(i) for i in range(12)]
    # State carried over frames cannot be split: refused before anything runs.
    warm = tmp_path / 'warm.yaml'
    warm.write_text(PARAMS + '    warm_start_strength: 0.5\n')
    status, captured = _run(capsys, long_bag, '--output-dir', tmp_path / 'warm', '--params',
                            warm, '--model', model, '--window-minutes', 0.1)
    assert status == 1 and 'warm start' in captured.err
    status, captured = _run(capsys, long_bag, '--output-dir', tmp_path / 'lidar', '--params',
                            params, '--model', model, '--window-minutes', 0.1,
                            '--points-topic', '/lidar/points')
    assert status == 1 and 'scale recovery carries state' in captured.err
    assert not any((tmp_path / 'warm').iterdir()) and not any((tmp_path / 'lidar').iterdir())


def test_window_bounds_and_inputs(tmp_path):
    second = 10 ** 9
    times = [i * second // 10 for i in range(12)]
    assert window_frames(times, second // 4, 3) == [(0, 3), (3, 6), (6, 9), (9, 12)]
    assert window_frames(times, 10 * second, 3) == [(0, 12)]
    assert window_frames(times, second // 4, 1) == [(0, 3), (3, 5), (5, 8), (8, 10),
                                                    (10, 12)]
    assert window_frames([], second, 3) == [(0, 0)]
    (tmp_path / 'a.mcap').write_bytes(b'')
    (tmp_path / 'deep' / 'r2').mkdir(parents=True)
    (tmp_path / 'deep' / 'r2' / 'metadata.yaml').write_text('')
    (tmp_path / 'deep' / 'r2' / 'r2_0.db3').write_bytes(b'')
    (tmp_path / 'b.bag').write_bytes(b'')
    found = find_bags([str(tmp_path / '*.mcap'), str(tmp_path / 'deep'), str(tmp_path)])
    assert [p.name for p in found] == ['a.mcap', 'r2', 'b.bag']
    with pytest.raises(BagError, match='does not exist'):
        find_bags([str(tmp_path / 'nope')])
    with pytest.raises(BagError, match='matches nothing'):
        find_bags([str(tmp_path / '*.nope')])


def test_export_dir_gives_each_bag_its_export_and_a_rerun_adds_a_missing_one(
        local_ray, inputs, tmp_path, capsys):
    """--export-dir: DIR/<bag> as process_bag --export writes it; bag without export redone."""
    root, bags, _, params, model = inputs
    reference = tmp_path / 'reference'
    process_bag(BagJob(input=bags[0], output=str(tmp_path / 'reference_bag'), params=params,
                       model=model, quiet=True, export=str(reference)))
    out, exports = tmp_path / 'out', tmp_path / 'exports'
    out.mkdir()
    # bag0's output bag is there from an earlier run without --export-dir.
    shutil.copytree(root / 'ref' / 'bag0', out / 'bag0')
    options = ['--params', params, '--model', model]
    status, captured = _run(capsys, root / 'in', '--output-dir', out, '--export-dir', exports,
                            *options)
    assert status == 0, captured.err
    assert '(complete: skipped)' not in captured.out
    assert _hashes(exports / 'bag0') == _hashes(reference)
    for bag in bags:
        name = Path(bag).name
        assert (exports / name / 'frames.csv').read_text().count('\n') == 7  # 6 frames
        assert _hashes(out / name) == _hashes(root / 'ref' / name)
    status, captured = _run(capsys, root / 'in', '--output-dir', out, '--export-dir', exports,
                            *options)
    assert status == 0 and captured.out.count('(complete: skipped)') == 3
    status, captured = _run(capsys, root / 'in', '--output-dir', out, '--export-dir', out,
                            *options)
    assert status == 1 and '--export-dir must differ from --output-dir' in captured.err
