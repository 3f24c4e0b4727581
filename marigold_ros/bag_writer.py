"""
Write rosbag2 bags atomically, and the staging folders that make outputs appear only whole.

Writing goes to a hidden staging folder next to the output and is moved into place only by
:meth:`AtomicBagWriter.commit`; any exception (Ctrl-C included) removes the staging folder, so
a half-written bag never appears under the output name.  The storage file inside is named
after the final output (as ``ros2 bag record`` names it), and the writer records no wall-clock
time, so the same messages give byte-identical files.
"""

import os
from pathlib import Path
import shutil
import socket

from .bag_io import BagError, ros2_store, serialize_canonical_pieces, STORAGES
from .mcap_pieces import PiecewiseWriter


def _stage_prefix(final):
    # The host name keeps a shared (network) folder's stages of other machines, whose
    # process ids mean nothing here, out of remove_stale_stages' reach.
    return f'.{final.name}.partial-{socket.gethostname()}-'


def staging_path(final):
    """Return the hidden sibling staging folder of ``final``, unique to host and process."""
    final = Path(final)
    return final.parent / f'{_stage_prefix(final)}{os.getpid()}'


def _process_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


def remove_stale_stages(final):
    """
    Remove the staging folders of ``final`` left by processes of this host that are gone.

    A run killed outright (SIGKILL, out of memory, power loss) cannot clean up after
    itself; the next run for the same output does it.  Stages of live processes (another
    run writing the same output) and of other hosts are left alone.

    :return: list of the removed Paths.
    """
    final = Path(final)
    prefix = _stage_prefix(final)
    removed = []
    if not final.parent.is_dir():
        return removed
    for path in final.parent.iterdir():
        if not path.name.startswith(prefix):
            continue
        pid = path.name[len(prefix):].split('.', 1)[0]  # exports add '.old' while replacing
        if pid.isdigit() and int(pid) != os.getpid() and not _process_alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


class AtomicBagWriter:
    """
    Write a rosbag2 bag that appears under its name only when complete.

    Use as a context manager (or :meth:`open` ... :meth:`commit`, :meth:`abort` in a
    ``finally``): leaving the block normally does nothing by itself; call :meth:`commit` to
    finish.  Leaving it by an exception (KeyboardInterrupt included) or without commit
    removes everything written.  Every call must come from the thread that opened it (a
    sqlite3 connection is bound to its thread).
    """

    def __init__(self, path, storage='mcap', overwrite=False):
        """
        Prepare the writer (nothing is created yet).

        :param storage: 'mcap' or 'sqlite3'.
        :param overwrite: replace an existing output on commit.
        :raises BagError: 'exists' or 'bad_output'.
        """
        if storage not in STORAGES:
            raise BagError('bad_output', f'unknown storage {storage!r}; use one of '
                                         f'{sorted(STORAGES)}')
        self.path = Path(path).expanduser().absolute()
        if self.path.exists() and not overwrite:
            raise BagError('exists', f'output {str(self.path)!r} already exists; choose '
                                     'another name or pass --overwrite')
        if not self.path.parent.is_dir():
            raise BagError('bad_output', f'output folder {str(self.path.parent)!r} does not '
                                         'exist')
        self.storage = storage
        self.overwrite = overwrite
        self.stage = staging_path(self.path)
        self._writer = None
        self._connections = {}
        self.counts = {}
        self._store = ros2_store()

    def __enter__(self):
        """Open (see :meth:`open`)."""
        return self.open()

    def open(self):  # noqa: A003 - the usual name, as rosbags Writer.open
        """
        Create the staging folder and open the storage.

        The sqlite3 storage must then be used from this thread only.
        """
        remove_stale_stages(self.path)
        if self.stage.exists():
            shutil.rmtree(self.stage)
        self.stage.mkdir()
        try:
            # The bag folder inside the stage carries the final name, so the storage file and
            # metadata.yaml reference '<name>.mcap' exactly as a direct write would.
            self._writer = PiecewiseWriter(self.stage / self.path.name,
                                           version=PiecewiseWriter.VERSION_LATEST,
                                           storage_plugin=STORAGES[self.storage])
            self._writer.open()
        except BaseException:
            self.abort()
            raise
        return self

    def __exit__(self, exc_type, exc, traceback):
        """Remove the staging folder unless committed."""
        self.abort()
        return False

    @property
    def topics(self):
        """Return the topic names added so far, in order."""
        return list(self._connections)

    def add_topic(self, topic, msgtype, msgdef=None, rihs01=None, qos=()):
        """
        Register a topic (once; later calls for the same topic are ignored).

        :param msgdef: message definition text (default: the ROS 2 store's).
        :param rihs01: type hash matching ``msgdef``.
        :param qos: offered QoS profiles (rosbags Qos objects) to record.
        """
        if topic in self._connections:
            if self._connections[topic].msgtype != msgtype:
                raise BagError('bad_output', f'topic {topic!r} written with two types: '
                                             f'{self._connections[topic].msgtype} and '
                                             f'{msgtype}')
            return
        if msgdef is None or rihs01 is None:
            msgdef, _ = self._store.generate_msgdef(msgtype, ros_version=2)
            rihs01 = self._store.hash_rihs01(msgtype)
        self._connections[topic] = self._writer.add_connection(
            topic, msgtype, msgdef=msgdef, rihs01=rihs01, serialization_format='cdr',
            offered_qos_profiles=list(qos))
        self.counts[topic] = 0

    def write(self, topic, log_time, cdr):
        """Write CDR bytes or CdrPieces (unchanged until commit) at ``log_time`` ns on a topic."""
        self._writer.write(self._connections[topic], int(log_time), cdr)
        self.counts[topic] += 1

    def write_msg(self, topic, log_time, msg, msgtype):
        """Serialize an rclpy message canonically and write it, registering the topic first."""
        self.add_topic(topic, msgtype)
        self.write(topic, log_time, serialize_canonical_pieces(msg, msgtype, self._store))

    def finish(self):
        """
        Close the bag in the staging folder (the step that can fail on a full disk).

        :raises BagError: 'exists' when the output appeared meanwhile and may not be replaced
        """
        if self._writer is not None:
            self._writer.close()  # on failure it stays set, for abort() to drop
            self._writer = None
        if self.path.exists() and not self.overwrite:
            raise BagError('exists', f'output {str(self.path)!r} appeared while writing; '
                                     'nothing was written')

    def commit(self):
        """Close the bag (:meth:`finish`), move it over any old output and return its Path."""
        self.finish()
        if self.path.exists():
            os.replace(self.path, self.stage / '.replaced')
        os.replace(self.stage / self.path.name, self.path)
        shutil.rmtree(self.stage, ignore_errors=True)
        return self.path

    def abort(self):
        """Drop everything written (no-op after a commit)."""
        writer, self._writer = self._writer, None
        if writer is not None:
            try:
                writer.abort()
            except Exception:  # noqa: B902 - cleaning up after another error
                pass
        if self.stage.exists():
            shutil.rmtree(self.stage, ignore_errors=True)
