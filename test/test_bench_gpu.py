"""bench/gpu.py: the smoke run prints every row with finite positive figures."""

import math
import os
from pathlib import Path
import subprocess
import sys

from builders import load_script
import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / 'bench' / 'gpu.py'


gpu = load_script(SCRIPT, 'bench_gpu')


def _table(text):
    """Rows of the first Markdown table of the output, as lists of cells."""
    lines = [line for line in text.splitlines() if line.startswith('|')]
    assert lines, f'no table in the output:\n{text}'
    header = [cell.strip() for cell in lines[0].strip('|').split('|')]
    assert tuple(header) == gpu.COLUMNS
    assert set(lines[1].replace('|', '')) == {'-'}
    return [[cell.strip() for cell in line.strip('|').split('|')] for line in lines[2:]]


@pytest.fixture(scope='module')
def smoke_output():
    env = dict(os.environ, OMP_NUM_THREADS='1', MKL_NUM_THREADS='1')
    env['PYTHONPATH'] = os.pathsep.join(p for p in (str(ROOT), env.get('PYTHONPATH')) if p)
    done = subprocess.run([sys.executable, str(SCRIPT), '--smoke'], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_smoke_table_has_every_row_with_finite_positive_figures(smoke_output):
    """One row per variant, size and step count; every figure finite and positive."""
    rows = _table(smoke_output)
    ran = [v for v in gpu.VARIANTS if gpu.skip_reason(v, smoke=True) is None]
    assert 'ort_cpu' in [v.key for v in ran]  # onnxruntime is in requirements.txt
    labels = ['fp32 eager' if v.key == 'eager' else v.label for v in ran]
    expected = {label: [(label, f'{w}x{h}', str(steps)) for w, h in gpu.SMOKE_SIZES
                        for steps in gpu.STEPS] for label in labels}
    # ONNX Runtime's GPU rows: one line saying why they did not run (here: not installed).
    for variant in gpu.VARIANTS:
        if variant not in ran:
            expected[variant.label] = [(variant.label, '-', '-')]
    assert [tuple(r[:3]) for r in rows] == [
        row for v in gpu.VARIANTS for row in expected[
            'fp32 eager' if v.key == 'eager' else v.label]]
    for cells in rows:
        if cells[1] == '-':
            assert cells[3].startswith('skipped: ') and cells[4:] == ['-'] * 7, cells
            continue
        figures = [float(cell) for cell in cells[3:]]
        assert all(math.isfinite(f) and f > 0 for f in figures), cells
        fps, total_ms = figures[0], figures[4]
        assert fps == pytest.approx(1e3 / total_ms, rel=0.01)
    gflop = {tuple(r[:3]): float(r[9]) for r in rows if r[1] != '-'}
    for label in labels:
        for w, h in gpu.SMOKE_SIZES:
            # Three more U-Net forwards in 4 steps than in 1.
            assert gflop[(label, f'{w}x{h}', '4')] > gflop[(label, f'{w}x{h}', '1')]
    assert 'not run' not in smoke_output


def test_floor_figures_are_the_design_notes():
    """Frame GFLOP (1 step) and floor FPS at 800 TFLOPS are DESIGN.md's."""
    frames = {((768, 576), False): 7694, ((512, 384), False): 3285,
              ((768, 576), True): 1932, ((512, 384), True): 773}
    for (size, tiny), total in frames.items():
        gflop, source = gpu.floor_gflop(size, tiny)
        assert source == 'DESIGN.md'
        assert gflop['encode'] + gflop['unet'] + gflop['decode'] == total
    gflop, _ = gpu.floor_gflop((768, 576), False)
    at_floor = {'total': 7694e9 / 800e12, 'encode': 1e-3, 'unet': 1e-3, 'decode': 1e-3,
                'peak_mib': 1.0}
    cells = gpu.row(gpu.VARIANTS[0], (768, 576), 1, at_floor, gflop, 800.0, 'fp16')
    assert cells[0] == 'fp16 eager' and float(cells[3]) == pytest.approx(104, abs=0.5)
    assert float(cells[-1]) == pytest.approx(100.0)
    counted = {'encode': 1.0, 'unet': 2.0, 'decode': 3.0}
    assert gpu.floor_gflop((64, 48), False, counted) == (counted, 'counted')


def test_full_run_refuses_a_cpu():
    """The full-size run on a CPU would take hours: it says so and exits 2."""
    assert gpu.main(['--device', 'cpu']) == 2
    with pytest.raises(SystemExit):
        gpu.parse_args(['--variants', 'eager,warp'])


def test_full_size_architecture_matches_the_design_floor():
    """On the meta device (no memory, no compute): 866 M U-Net parameters, DESIGN's GFLOP."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode
    with torch.device('meta'):
        unet, vae, tiny = gpu.build_sd2_unet(), gpu.build_sd_vae(), gpu.build_tiny_vae()
        assert sum(p.numel() for p in unet.parameters()) == pytest.approx(866e6, rel=1e-3)
        assert vae.config.scaling_factor == 0.18215
        text = torch.zeros(1, 2, 1024)  # the empty prompt: BOS and EOS
        for (width, height), table in gpu.FLOOR_GFLOP.items():
            image = torch.zeros(1, 3, height, width)
            latent = torch.zeros(1, 4, height // 8, width // 8)
            stages = {
                'sd_encode': lambda: vae.encode(image),
                'unet': lambda: unet(torch.cat([latent, latent], 1), torch.tensor(999),
                                     encoder_hidden_states=text),
                'sd_decode': lambda: vae.decode(latent),
                'tiny_encode': lambda: tiny.encode(image),
                'tiny_decode': lambda: tiny.decode(latent)}
            for name, forward in stages.items():
                with FlopCounterMode(display=False) as counter:
                    forward()
                assert counter.get_total_flops() / 1e9 == pytest.approx(table[name], abs=1)


def test_onnx_rows_say_why_a_provider_did_not_run():
    """A provider missing from ONNX Runtime is named with the package that has it."""
    variants = {v.key: v for v in gpu.VARIANTS}
    cpu_only = ['CPUExecutionProvider']
    reason = gpu.skip_reason(variants['ort_trt'], False, cpu_only)
    assert 'TensorrtExecutionProvider is not installed' in reason and 'onnxruntime-gpu' in reason
    assert 'CUDAExecutionProvider' in gpu.skip_reason(variants['ort_cuda'], False, cpu_only)
    every = ['TensorrtExecutionProvider', 'CUDAExecutionProvider', 'CPUExecutionProvider']
    assert gpu.skip_reason(variants['ort_trt'], False, every) is None
    assert gpu.skip_reason(variants['ort_cuda'], True, every) == '--smoke runs on the CPU'
    assert gpu.skip_reason(variants['ort_cpu'], True, cpu_only) is None
    assert 'CPU' in gpu.skip_reason(variants['ort_cpu'], False, every)
    assert gpu.skip_reason(variants['eager'], False, []) is None
    cells = gpu.skipped_row(variants['ort_trt'], reason)
    assert len(cells) == len(gpu.COLUMNS) and cells[3] == f'skipped: {reason}'


def test_fixed_shape_exports_per_size_and_a_provider_that_does_not_start(monkeypatch, capsys):
    """The TensorRT row's path on the CPU provider: one export per size; a failure is a row."""
    static = gpu.Variant('cpu_static', 'fixed-shape CPU', provider='CPUExecutionProvider',
                         static=True, warmup=0)
    absent = gpu.Variant('absent', 'absent CUDA', provider='CUDAExecutionProvider')
    monkeypatch.setattr(gpu, 'VARIANTS', (static, absent))
    monkeypatch.setattr(gpu, 'RUN_ORDER', ('cpu_static', 'absent'))
    monkeypatch.setattr(gpu, 'skip_reason', lambda variant, smoke: None)
    rows = gpu.run(gpu.parse_args(['--smoke', '--repeats', '1']))
    assert [tuple(r[:3]) for r in rows] == [
        ('fixed-shape CPU', f'{w}x{h}', str(steps)) for w, h in gpu.SMOKE_SIZES
        for steps in gpu.STEPS] + [('absent CUDA', '-', '-')]
    assert all(float(cell) > 0 for r in rows[:-1] for cell in r[3:])
    assert rows[-1][3].startswith('skipped: CUDAExecutionProvider did not start')
    out = capsys.readouterr().out
    for w, h in gpu.SMOKE_SIZES:
        assert f'fixed-shape CPU {w}x{h}: exported' in out
