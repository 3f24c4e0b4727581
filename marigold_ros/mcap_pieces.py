"""
Write mcap bags from messages in pieces, with one copy of their large buffers instead of five.

rosbags' mcap storage copies each message through several in-memory buffers (the message
record, the chunk, the chunk's value, the chunk record, the file), all under the GIL. Here a
message can be handed over as :class:`CdrPieces` (see
:func:`marigold_ros.bag_io.serialize_canonical_pieces`); the chunk keeps references to the
pieces and closing it writes each piece straight to the file, with the GIL released.

The file is byte for byte the one rosbags' :class:`McapWriter` writes (a test compares
them). Only uncompressed mcap takes this path; sqlite3 and compressed bags get the pieces
joined. rosbags is pinned (requirements.txt) because this builds on its internals.
"""

from collections import defaultdict
from io import BytesIO
import struct

from rosbags.rosbag2 import CompressionMode
from rosbags.rosbag2 import StoragePlugin
from rosbags.rosbag2 import Writer
from rosbags.rosbag2.storage_mcap import McapWriter, PendingChunk

_OP_MESSAGE = 0x05
_OP_CHUNK = 0x06
_OP_MESSAGE_INDEX = 0x07
_MESSAGE_HEAD = struct.Struct('<BQHIQQ')  # op, record length, channel, sequence, 2 times
_MESSAGE_FIELDS = 2 + 4 + 8 + 8  # the record's bytes before the data
_CHUNK_LIMIT = 2 ** 20  # rosbags closes a chunk once it holds more than this


class CdrPieces(tuple):
    """
    A serialized message as consecutive byte buffers (their concatenation is the CDR).

    The buffers are referenced, not copied: they must not change until the chunk holding
    the message is written (at the latest when the bag is closed).
    """

    __slots__ = ()

    def __new__(cls, pieces):
        """Keep byte views of the bytes-like ``pieces``, in order (no copy)."""
        return super().__new__(cls, (memoryview(p).cast('B') for p in pieces))

    @property
    def nbytes(self):
        """Return the total size in bytes."""
        return sum(p.nbytes for p in self)

    def join(self):
        """Return the message as one bytes object (a copy)."""
        return b''.join(self)


def as_bytes(data):
    """Return serialized data as one bytes-like object (joining :class:`CdrPieces`)."""
    return data.join() if isinstance(data, CdrPieces) else data


class PiecewiseMcapWriter(McapWriter):
    """rosbags' mcap storage, taking messages as CdrPieces and writing them with one copy."""

    def __init__(self, path, compression):
        """Open the storage as rosbags does; chunks are kept as lists of pieces."""
        super().__init__(path, compression)
        self._pieces = []
        self._size = 0

    def _take_records(self):
        """Move the schema / channel records rosbags wrote into the chunk to the pieces."""
        if self.chunk.bio.tell():
            records = self.chunk.bio.getvalue()
            self.chunk.bio.seek(0)
            self.chunk.bio.truncate()
            self._pieces.append(records)
            self._size += len(records)

    def write(self, connection, timestamp, data):
        """Add a message record (bytes-like or CdrPieces; log time in ns) to the open chunk."""
        if self.compression:
            super().write(connection, timestamp, as_bytes(data))
            return
        if not isinstance(data, CdrPieces):
            # Only pieces are kept by reference; anything else is copied now, as rosbags
            # does, since the caller may reuse its buffer.
            data = CdrPieces((bytes(data),))
        self._take_records()
        self.message_start_time = min(timestamp, self.message_start_time)
        self.message_end_time = max(timestamp, self.message_end_time)
        self.channel_stats[connection.id] += 1
        self.chunk.message_start_time = min(timestamp, self.chunk.message_start_time)
        self.chunk.message_end_time = max(timestamp, self.chunk.message_end_time)
        self.chunk.msgs[connection.id].append((timestamp, self._size))
        size = data.nbytes
        self._pieces.append(_MESSAGE_HEAD.pack(_OP_MESSAGE, _MESSAGE_FIELDS + size,
                                               connection.id, 0, timestamp, timestamp))
        self._pieces.extend(data)
        self._size += _MESSAGE_HEAD.size + size
        if self._size > _CHUNK_LIMIT:
            self.close_chunk()

    def close_chunk(self):
        """Write the open chunk, its message indexes, and queue its chunk index."""
        if self.compression:
            super().close_chunk()
            return
        self._take_records()
        pieces, size, chunk = self._pieces, self._size, self.chunk
        self._pieces, self._size = [], 0
        self.chunk = PendingChunk(2 ** 63 - 1, 0, BytesIO(), defaultdict(list))
        # The records below are rosbags' close_chunk ones, field for field; only the chunk's
        # content is written from its pieces instead of from one in-memory copy.
        # Chunk: start / end time, uncompressed size, crc 0 (not computed), compression ''
        # (u32 length 0), compressed size, the records.
        chunk_start = self.bio.tell()
        head = struct.pack('<QQQIIQ', chunk.message_start_time, chunk.message_end_time, size,
                           0, 0, size)
        self.bio.write(struct.pack('<BQ', _OP_CHUNK, len(head) + size) + head)
        for piece in pieces:
            self.bio.write(piece)
        chunk_end = self.bio.tell()
        # One message index per channel: (log time, offset in the chunk) of its messages.
        offsets = []
        for cid, msgs in chunk.msgs.items():
            offsets.append((cid, self.bio.tell()))
            body = struct.pack('<HI', cid, len(msgs) * 16) + b''.join(
                struct.pack('<QQ', ts, offset) for ts, offset in msgs)
            self.bio.write(struct.pack('<BQ', _OP_MESSAGE_INDEX, len(body)) + body)
        # Chunk index, written by rosbags' close() into the summary section.
        index = BytesIO()
        index.write(struct.pack('<QQQQI', chunk.message_start_time, chunk.message_end_time,
                                chunk_start, chunk_end - chunk_start, len(offsets) * 10))
        for cid, offset in offsets:
            index.write(struct.pack('<HQ', cid, offset))
        index.write(struct.pack('<QIQQ', self.bio.tell() - chunk_end, 0, size, size))
        self.chunks.append(index)

    def close(self, version, metadata):
        """Close the open chunk, then finish the file as rosbags does."""
        if not self.compression and (self._pieces or self.chunk.bio.tell()):
            self.close_chunk()
        super().close(version, metadata)


class PiecewiseWriter(Writer):
    """rosbags' rosbag2 Writer with the piecewise mcap storage (sqlite3 unchanged)."""

    STORAGE_PLUGINS = {**Writer.STORAGE_PLUGINS, StoragePlugin.MCAP: PiecewiseMcapWriter}

    def write(self, connection, timestamp, data):
        """Write a message; CdrPieces are joined where the storage or compression needs bytes."""
        if self.storage_plugin != StoragePlugin.MCAP or \
                self.compression_mode != CompressionMode.NONE:
            data = as_bytes(data)
        super().write(connection, timestamp, data)
