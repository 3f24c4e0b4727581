"""
Many bags on many workers: ``process_bags INPUTS... --output-dir DIR`` on Ray.

Each worker (a Ray actor) loads the model once and runs bag after bag through
:func:`~marigold_ros.bag_processor.process_bag`, with the same options (``process_bag``'s,
from :func:`~marigold_ros.bag_job.add_job_options`), so every output is the bag
``process_bag`` writes for it, written atomically the same way.

* Inputs: bags (rosbag2 folders, .mcap / .db3 files, ROS 1 .bag), folders holding bags
  (searched recursively), glob patterns, and manifest files (one path per line, ``#``
  comments, relative to the manifest).  ``DIR/<bag name>`` is the output of each.
* Workers: without ``--address`` a local Ray is started in this process (one worker per
  GPU, or ``--workers N`` CPU workers of ``--threads-per-worker`` torch threads each); with
  ``--address`` the workers join that cluster (the bags and DIR must be at the same path
  on every node, e.g. a shared file system).
* Resumable: an output that exists is complete (outputs appear only when complete) and is
  skipped; a run killed midway leaves hidden staging folders, removed when their bag is
  redone.  A failed bag is retried (``--retries``), then reported; the exit status is 1
  when any bag failed.
* ``--window-minutes M`` splits long bags into windows of about M minutes of images, each
  a task of its own, written to ``DIR/<bag name>.window-NNN``.  A window starts on a batch
  boundary of the whole run and the whole recording around it is read, so its batches and
  matches are the whole run's: the windows' messages, window after window, are exactly the
  messages (topic, bag time, bytes) of the bag processed whole.  Settings that carry state
  from frame to frame cannot be split and are refused: warm start, and scale recovery
  (sparse depth or LiDAR), whose tracker carries its smoothing, outlier gate, held estimate
  and RANSAC generator from frame to frame even with smoothing 1.0.
"""

import argparse
from dataclasses import dataclass, fields, replace
import glob
import math
import os
from pathlib import Path
import sys
import time

from .bag_io import BagError, BagReader
from .bag_job import add_job_options, BagJob
from .bag_processor import BagProcessor
from .bag_topics import resolve_topics
from .export import FrameExporter
from .node_params import read_node_params

#: Single-file bag formats (anything else given as a file is a manifest).
BAG_SUFFIXES = ('.mcap', '.db3', '.bag')

# Options of process_bag given per bag here (--export-dir makes each bag's --export).
_LEFT_OUT = ('export',)


@dataclass
class Task:
    """
    One output to make: a bag, or a window of it.

    :param name: bag name (+ window) for the table
    :param job: the BagJob
    :param frames: image frames the task covers (progress total), 0 when unknown
    :param status: 'todo', 'skipped', 'done' or 'failed'
    :param attempts: tries so far
    :param summary: BagSummary when done
    :param error: the last error text
    :param seconds: wall time of the successful try
    """

    name: str
    job: BagJob
    frames: int = 0
    status: str = 'todo'
    attempts: int = 0
    summary: object = None
    error: str = ''
    seconds: float = 0.0


# ---------------------------------------------------------------------------- inputs


def _is_bag(path):
    return (path.is_dir() and (path / 'metadata.yaml').is_file()) or \
        (path.is_file() and path.suffix in BAG_SUFFIXES)


def _bags_in(folder):
    """Bags under a folder (not the storage files inside a rosbag2 folder)."""
    found = []
    for child in sorted(folder.iterdir()):
        if _is_bag(child):
            found.append(child)
        elif child.is_dir():
            found += _bags_in(child)
    return found


def find_bags(inputs):
    """
    Expand bags, folders of bags, globs and manifests into a list of bags.

    :param inputs: paths or glob patterns
    :return: list of Paths in the order given (duplicates removed)
    :raises BagError: 'no_input' for a path that is not there or holds no bag
    """
    found = []
    for entry in inputs:
        if any(c in entry for c in '*?[') and not Path(entry).exists():
            matches = sorted(glob.glob(os.path.expanduser(entry)))
            if not matches:
                raise BagError('no_input', f'{entry!r} matches nothing')
            found += find_bags(matches)
            continue
        path = Path(entry).expanduser()
        if _is_bag(path):
            found.append(path)
        elif path.is_dir():
            bags = _bags_in(path)
            if not bags:
                raise BagError('no_input', f'folder {entry!r} holds no bag')
            found += bags
        elif path.is_file():  # a manifest
            lines = [line.strip() for line in path.read_text().splitlines()]
            found += find_bags([str(path.parent / line) for line in lines
                                if line and not line.startswith('#')])
        else:
            raise BagError('no_input', f'{entry!r} does not exist')
    unique = {}
    for bag in found:
        unique.setdefault(bag.absolute(), None)
    return list(unique)


def bag_name(bag):
    """Return the output name of a bag: its folder or file name without the suffix."""
    bag = Path(bag)
    return bag.stem if bag.is_file() and bag.suffix in BAG_SUFFIXES else bag.name


def window_frames(log_times, window_ns, batch):
    """
    Split frames into windows of ``window_ns`` of bag time, each starting on a batch boundary.

    :param log_times: bag times of the image frames, in order
    :param window_ns: window length
    :param batch: frames per estimator call of the run
    :return: list of (first, stop) frame indices covering every frame
    """
    bounds = [0]
    if log_times:
        edge = log_times[0] + window_ns
        for index, stamp in enumerate(log_times):
            if stamp >= edge:
                start = index - index % batch
                if start > bounds[-1]:
                    bounds.append(start)
                while stamp >= edge:
                    edge += window_ns
    bounds.append(len(log_times))
    return list(zip(bounds[:-1], bounds[1:]))


def check_windows(job, configs):
    """
    Refuse a split that would change the outputs (state carried from frame to frame).

    :param job: the BagJob of the options
    :param configs: the parameter configs (:func:`read_node_params`)
    :raises ValueError: naming the setting
    """
    from marigold_model.config import InferenceConfig

    from .scale_recovery import ScaleRecoveryConfig
    inference, scale = configs[InferenceConfig], configs[ScaleRecoveryConfig]
    if inference.warm_start_strength > 0:
        raise ValueError('--window-minutes: warm start (warm_start_strength '
                         f'{inference.warm_start_strength}) chains each frame to the one '
                         'before it, so a window would not start as in the whole run; set it '
                         'to 0 or process whole bags')
    if scale.source != 'none' or job.sparse_depth_topic or job.points_topic:
        raise ValueError('--window-minutes: scale recovery carries state from frame to frame '
                         f'(smoothing {scale.smoothing}, the outlier gate, the held '
                         "estimate and the RANSAC generator's sequence), so a window would "
                         'not start as in the whole run; process bags with metric scale '
                         'whole (one task per bag)')
    if job.copy_inputs:
        raise ValueError('--window-minutes with --copy-inputs would copy the recording into '
                         'every window; process whole bags to copy the inputs')


def _plan_bag(bag, job, window_minutes, configs):
    """Return the tasks of one bag (its windows, or the whole bag)."""
    from marigold_model.config import InferenceConfig

    from .scale_recovery import ScaleRecoveryConfig
    name = bag_name(bag)
    try:
        with BagReader(bag) as reader:
            topics = resolve_topics(reader, job, configs[ScaleRecoveryConfig].source)
            count = reader.topics[topics.image].count
            if not window_minutes:
                return [Task(name, job, count)]
            times = [m.log_time for m in reader.messages([topics.image])]
    except (BagError, OSError):
        return [Task(name, job)]  # the worker meets the error again and reports it
    batch = job.batch or configs[InferenceConfig].batch_size
    windows = window_frames(times, int(window_minutes * 60e9), batch)
    if len(windows) == 1:
        return [Task(name, job, count)]
    return [Task(f'{name} [{i + 1}/{len(windows)}]',
                 replace(job, output=f'{job.output}.window-{i:03d}', frames=(first, stop),
                         export=job.export and f'{job.export}.window-{i:03d}'),
                 stop - first) for i, (first, stop) in enumerate(windows)]


def plan(bags, base_job, output_dir, window_minutes=0.0, export_dir=None):
    """
    Make the tasks of a run: one per bag, or per window of each bag.

    :param bags: list of Paths
    :param base_job: BagJob with the options (input, output and export are replaced)
    :param output_dir: output folder
    :param window_minutes: window length, 0 for whole bags
    :param export_dir: folder of the per-frame exports (export_dir/<bag name>), or None
    :return: list of Task
    :raises BagError: 'bad_output' when two bags have the same name
    """
    names = {}
    for bag in bags:
        names.setdefault(bag_name(bag), []).append(str(bag))
    clashes = {n: p for n, p in names.items() if len(p) > 1}
    if clashes:
        raise BagError('bad_output', 'bags with the same name would share an output in '
                                     f'{str(output_dir)!r}: {clashes}; process them with '
                                     'separate --output-dir')
    configs = read_node_params(base_job.params)
    if window_minutes:
        check_windows(base_job, configs)
    tasks = []
    for bag in bags:
        job = replace(base_job, input=str(bag), output=str(Path(output_dir) / bag_name(bag)),
                      export=None if export_dir is None else str(Path(export_dir) /
                                                                 bag_name(bag)))
        tasks += _plan_bag(bag, job, window_minutes, configs)
    return tasks


def is_complete(job):
    """Tell whether a job's output bag and export are there (each appears only complete)."""
    return (Path(job.output) / 'metadata.yaml').is_file() and (
        job.export is None or (Path(job.export) / FrameExporter.TABLE).is_file())


def is_started(job):
    """Tell whether either output of an incomplete job is there (then it is made again)."""
    return any(path is not None and Path(path).exists() for path in (job.output, job.export))


# ---------------------------------------------------------------------------- workers


class BagWorker:
    """
    A Ray actor that loads the model once and processes bag after bag.

    :param threads: torch threads
    :param counter: the ProgressCounter actor
    """

    def __init__(self, threads, counter):
        """Set the torch threads; the model is loaded with the first bag."""
        import torch
        if threads:
            torch.set_num_threads(threads)
        self.counter = counter
        self.estimator = None

    def process(self, key, job):
        """
        Process one task like ``process_bag``; frames done are counted under ``key``.

        :param key: task index
        :param job: BagJob
        :return: (BagSummary, seconds)
        """
        clock = time.perf_counter()
        processor = BagProcessor(job, self.estimator,
                                 lambda count: self.counter.add.remote(key, count))
        try:
            summary = processor.run()
        finally:
            self.estimator = processor.estimator  # loaded once, kept for the next bag
        return summary, time.perf_counter() - clock


class ProgressCounter:
    """Frames done per task (a retry starts its task from zero)."""

    def __init__(self):
        """Start at zero."""
        self.done = {}

    def add(self, key, count):
        """Count frames of a task."""
        self.done[key] = self.done.get(key, 0) + count

    def reset(self, key):
        """Forget a task's frames (before a retry)."""
        self.done.pop(key, None)

    def reset_all(self):
        """Start a new run."""
        self.done = {}

    def total(self):
        """Return the frames done over all tasks."""
        return sum(self.done.values())


def start_ray(args):
    """
    Join ``--address`` or start a light local Ray; return the actor options of the workers.

    :param args: parsed arguments
    :return: (number of workers, actor options dict, whether Ray was started here)
    """
    import ray
    started = False
    if not ray.is_initialized():
        options = {'include_dashboard': False, 'log_to_driver': True,
                   'configure_logging': True, 'logging_level': 'warning'}
        if args.address:
            ray.init(address=args.address, **options)
        else:
            os.environ.setdefault('RAY_USAGE_STATS_ENABLED', '0')
            if args.workers:  # CPU workers: just the cores they use
                options.update(num_cpus=args.workers * args.threads_per_worker, num_gpus=0)
            # On loopback: a local Ray has no business on the machine's network address.
            ray.init(object_store_memory=100 * 2 ** 20, _node_ip_address='127.0.0.1',
                     **options)
        started = True
    gpus = int(ray.cluster_resources().get('GPU', 0))
    if args.workers or not gpus:
        count = args.workers or 1
        return count, {'num_cpus': args.threads_per_worker, 'num_gpus': 0}, started
    return gpus, {'num_cpus': 0, 'num_gpus': 1}, started


def _error_text(error):
    cause = getattr(error, 'cause', None) or error
    return f'{type(cause).__name__}: {cause}'.strip()


class WorkerPool:
    """
    The Ray actors of a run and their progress counter (kept for further runs).

    :param workers: number of actors
    :param actor_options: Ray options of each actor (num_cpus, num_gpus)
    :param threads: torch threads of each worker
    """

    def __init__(self, workers, actor_options, threads=1):
        """Start the actors (each loads the model with its first bag)."""
        import ray
        self.counter = ray.remote(num_cpus=0)(ProgressCounter).remote()
        self._class = ray.remote(BagWorker)
        self._options, self._threads = actor_options, threads
        self.actors = [self.new_actor() for _ in range(workers)]

    def new_actor(self):
        """Start one more actor (to replace one that died)."""
        return self._class.options(max_restarts=0, **self._options).remote(self._threads,
                                                                           self.counter)


def run_tasks(tasks, pool, retries=1, quiet=False):
    """
    Process the tasks on a WorkerPool, retrying failures; fill each Task in.

    :param tasks: list of Task (those not 'todo' are left alone)
    :param pool: WorkerPool
    :param retries: extra tries of a failed task
    :param quiet: no progress bar
    :return: the tasks
    """
    import ray
    todo = [i for i, t in enumerate(tasks) if t.status == 'todo']
    counter, idle = pool.counter, list(pool.actors)
    ray.get(counter.reset_all.remote())
    running = {}  # ObjectRef -> (task index, actor)
    bar = None
    if not quiet and todo:
        from tqdm import tqdm
        bar = tqdm(total=sum(tasks[i].frames for i in todo), unit='frame', file=sys.stderr,
                   dynamic_ncols=True, desc='process_bags')
    try:
        while todo or running:
            while todo and idle:
                index, actor = todo.pop(0), idle.pop(0)
                tasks[index].attempts += 1
                running[actor.process.remote(index, tasks[index].job)] = (index, actor)
            ready, _ = ray.wait(list(running), num_returns=1, timeout=0.5)
            for ref in ready:
                index, actor = running.pop(ref)
                task = tasks[index]
                try:
                    task.summary, task.seconds = ray.get(ref)
                    task.status = 'done'
                    idle.append(actor)
                except ray.exceptions.RayActorError as error:  # the worker died: a new one
                    _failed(task, error, todo, index, retries, counter)
                    idle.append(pool.new_actor())
                except ray.exceptions.RayTaskError as error:
                    _failed(task, error, todo, index, retries, counter)
                    idle.append(actor)
            if bar is not None:
                done = ray.get(counter.total.remote())
                if done != bar.n:
                    bar.update(done - bar.n)
    finally:
        pool.actors = idle + [actor for _, actor in running.values()]
        if bar is not None:
            bar.close()
    return tasks


def _failed(task, error, todo, index, retries, counter):
    task.error = _error_text(error)
    counter.reset.remote(index)
    if task.attempts <= retries:
        print(f'process_bags: {task.name} failed ({task.error}); retrying', file=sys.stderr)
        todo.append(index)
    else:
        task.status = 'failed'


# ---------------------------------------------------------------------------- summary


def format_table(tasks):
    """
    Return the summary table: bag, frames, failed frames, seconds, output (or the error).

    :param tasks: list of Task
    :return: multi-line str
    """
    rows = [('bag', 'frames', 'failed', 'seconds', 'output')]
    for task in tasks:
        summary = task.summary
        if task.status == 'done':
            rows.append((task.name, str(summary.frames_in),
                         str(summary.frames_in - summary.frames_out), f'{task.seconds:.1f}',
                         summary.output))
        elif task.status == 'skipped':
            rows.append((task.name, '-', '-', '-', f'{task.job.output} (complete: skipped)'))
        else:
            rows.append((task.name, '-', '-', '-', f'FAILED after {task.attempts} tries: '
                                                   f'{task.error.splitlines()[0][:200]}'))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = []
    for row in rows:
        cells = [row[0].ljust(widths[0])] + [row[i].rjust(widths[i]) for i in (1, 2, 3)]
        lines.append('  '.join(cells + [row[4]]))
    return '\n'.join(lines)


# ---------------------------------------------------------------------------- command line


def build_parser():
    """
    Return the command-line parser of ``process_bags``.

    :return: argparse.ArgumentParser
    """
    parser = argparse.ArgumentParser(
        prog='process_bags', description='Run process_bag over many bags on Ray workers '
        '(a local Ray, or a cluster with --address); resumable.')
    parser.add_argument('inputs', nargs='+', metavar='INPUT',
                        help='bags, folders of bags, glob patterns or manifest files (one '
                        'path per line)')
    parser.add_argument('--output-dir', required=True, help='folder of the output bags '
                        '(created); DIR/<bag name> per bag')
    parser.add_argument('--address', help="Ray cluster to join (e.g. 'auto' or "
                        "'ray://head:10001'); default: a local Ray in this process")
    parser.add_argument('--workers', type=int, help='CPU workers (default: one per GPU, else '
                        'one)')
    parser.add_argument('--threads-per-worker', type=int, default=1,
                        help='torch threads (and Ray CPUs) of each CPU worker (default 1)')
    parser.add_argument('--window-minutes', type=float, default=0.0,
                        help='split bags into windows of this many minutes of images (one '
                        'output each: DIR/<bag name>.window-NNN); default: whole bags')
    parser.add_argument('--retries', type=int, default=1,
                        help='tries again of a failed bag before it is reported (default 1)')
    parser.add_argument('--export-dir', metavar='DIR',
                        help="also write each bag's per-frame files (process_bag --export: "
                        '16-bit PNG depth, previews, PLY clouds) to DIR/<bag name>')
    add_job_options(parser, leave_out=_LEFT_OUT)
    return parser


def run(args):
    """
    Plan, skip what is complete, process the rest and report.

    :param args: parsed arguments
    :return: list of Task
    """
    if args.workers is not None and args.workers < 1:
        raise ValueError(f'--workers must be >= 1, got {args.workers}')
    if args.threads_per_worker < 1:
        raise ValueError(f'--threads-per-worker must be >= 1, got {args.threads_per_worker}')
    if args.window_minutes < 0 or not math.isfinite(args.window_minutes):
        raise ValueError(f'--window-minutes must be >= 0, got {args.window_minutes}')
    base = BagJob(**{f.name: getattr(args, f.name) for f in fields(BagJob)
                     if f.name not in ('input', 'output', 'quiet') + _LEFT_OUT},
                  input='', output='', quiet=True)
    output_dir = Path(args.output_dir).expanduser().absolute()
    output_dir.mkdir(parents=True, exist_ok=True)
    export_dir = None if args.export_dir is None else \
        Path(args.export_dir).expanduser().absolute()
    if export_dir == output_dir:
        raise ValueError('--export-dir must differ from --output-dir: a bag and its export '
                         'would share DIR/<bag name>')
    tasks = plan(find_bags(args.inputs), base, output_dir, args.window_minutes, export_dir)
    for task in tasks:
        if base.overwrite:
            continue
        if is_complete(task.job):
            task.status = 'skipped'
        elif is_started(task.job):
            # One of the two outputs is missing (--export-dir added, or a stop between the
            # two commits): the task makes both again, replacing the one that is there.
            task.job = replace(task.job, overwrite=True)
    todo = sum(task.status == 'todo' for task in tasks)
    if not todo:
        return tasks
    workers, options, started = start_ray(args)
    try:
        pool = WorkerPool(min(workers, todo), options, args.threads_per_worker)
        return run_tasks(tasks, pool, args.retries, args.quiet)
    finally:
        if started:
            import ray
            ray.shutdown()


def main(argv=None):
    """
    Command line entry point of ``process_bags``.

    :param argv: arguments (default sys.argv[1:])
    :return: exit status: 0 every bag done or complete, 1 a bag failed or bad arguments,
        130 interrupted (finished outputs stay; a rerun does the rest)
    """
    args = build_parser().parse_args(argv)
    try:
        tasks = run(args)
    except KeyboardInterrupt:
        print('process_bags: interrupted; complete outputs are kept, rerun to finish',
              file=sys.stderr)
        return 130
    except (BagError, ValueError, OSError) as error:
        print(f'process_bags: error: {error}', file=sys.stderr)
        return 1
    print(format_table(tasks))
    failed = [t for t in tasks if t.status == 'failed']
    if failed:
        print(f'process_bags: {len(failed)} of {len(tasks)} failed', file=sys.stderr)
    return 1 if failed else 0


if __name__ == '__main__':
    sys.exit(main())
