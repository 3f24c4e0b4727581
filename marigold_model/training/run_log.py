"""
The log of a training run: log.csv (always) and TensorBoard (when chosen), resume-safe.

A resumed run drops the rows an interrupted run wrote after its checkpoint, so the log
reads as one uninterrupted run.
"""

import csv
import math
from pathlib import Path

from .train_config import TrainingError


LOG_COLUMNS = ('step', 'loss', 'lr', 'samples_per_s', 'skipped', 'no_depth', 'val_loss',
               'val_abs_rel')


class RunLog:
    """Loss and learning rate to CSV (always) and TensorBoard (when chosen)."""

    def __init__(self, output, logger, active, start=0):
        """
        Open the log files; rows after ``start`` (left by an interrupted run) are dropped.

        :param logger: 'csv' or 'tensorboard'
        :param active: False on non-main processes (nothing is written)
        :param start: step the run starts (or resumes) from
        """
        self.active = active
        self.writer = None
        if not active:
            return
        path = Path(output) / 'log.csv'
        self.columns = list(LOG_COLUMNS)
        rows = []
        if path.exists():
            with open(path, newline='') as stream:
                rows = list(csv.reader(stream))
        if rows and 'step' in rows[0]:
            self.columns = rows[0]
            kept = [row for row in rows[1:] if _row_step(row, self.columns) <= start]
            if len(kept) != len(rows) - 1:
                partial = path.with_name('.log.csv.partial')
                with open(partial, 'w', newline='') as stream:
                    csv.writer(stream).writerows([self.columns] + kept)
                partial.replace(path)
        else:
            with open(path, 'w', newline='') as stream:
                csv.writer(stream).writerow(self.columns)
        self.stream = open(path, 'a', newline='')
        self.csv = csv.DictWriter(self.stream, self.columns, extrasaction='ignore')
        if logger == 'tensorboard':
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as error:
                raise TrainingError('logger tensorboard needs the tensorboard package '
                                    '(pip install tensorboard)') from error
            self.writer = SummaryWriter(str(Path(output) / 'tensorboard'),
                                        purge_step=start + 1 if start else None)

    def write(self, step, loss, lr, rate, skipped, no_depth=0, val_loss=None,
              val_abs_rel=None):
        """
        Record one step's line.

        :param rate: samples per second
        :param skipped: unreadable samples so far
        :param no_depth: drawn samples without valid depth so far
        :param val_loss: the validation loss scored at this step, if it was (else left empty)
        :param val_abs_rel: the one-step estimate's validation AbsRel, likewise
        """
        if not self.active:
            return
        scores = {'val_loss': val_loss, 'val_abs_rel': val_abs_rel}
        self.csv.writerow({'step': step, 'loss': f'{loss:.6f}', 'lr': f'{lr:.3e}',
                           'samples_per_s': f'{rate:.2f}', 'skipped': skipped,
                           'no_depth': no_depth,
                           **{name: '' if value is None else f'{value:.6f}'
                              for name, value in scores.items()}})
        self.stream.flush()
        if self.writer is not None:
            self.writer.add_scalar('loss', loss, step)
            self.writer.add_scalar('lr', lr, step)
            for name, value in scores.items():
                if value is not None:
                    self.writer.add_scalar(name, value, step)

    def close(self):
        """Flush and close."""
        if self.active:
            self.stream.close()
            if self.writer is not None:
                self.writer.close()


def _row_step(row, columns):
    try:
        return int(row[columns.index('step')])
    except (ValueError, IndexError):
        return math.inf  # a torn or malformed row: drop it
