"""Messages between a replica's server process and its worker processes.

One connected Unix socket per worker carries length-prefixed messages
``<length:u32><type:u8><payload>`` (length counts type and payload). A small shared memory
block per worker (:class:`Progress`) tells the server which item the worker is running and
since when, so timeouts and crashes are charged to exactly that item without a message per
item.

This module is imported by worker processes and must stay free of heavy imports.
"""

from __future__ import annotations

import mmap
import os
import struct
import tempfile

HDR = struct.Struct("<IB")

# worker -> server
M_READY = 1  # payload: JSON {"pid": ...}
M_LOG = 2  # payload: TASK_LOG + utf-8 text
M_OUTCOME = 3  # payload: TASK_OUTCOME + outcome payload (protocol.encode_outcome_payload)
# server -> worker
M_TASK = 10  # payload: TASK_HEAD + forget hashes + skip indices + fn + items

TASK_LOG = struct.Struct("<QIB")  # task id, item index, stream
TASK_OUTCOME = struct.Struct("<QIIB")  # task id, first item, item count, flags
OUTCOME_LAST = 1  # the task's last outcome: the worker is done with it
OUTCOME_FN_FAILED = 2  # the function could not be loaded: do not assume the worker has it
# task id, first item, item count, flags, forget count, skip count, fn hash, fn length
TASK_HEAD = struct.Struct("<QIIBBH32sI")
FLAG_HAS_FN = 1
U32 = struct.Struct("<I")

MAX_MESSAGE = 2**32 - 1


def message(mtype: int, *parts: bytes | bytearray | memoryview) -> bytes:
    size = 1 + sum(len(p) for p in parts)
    if size > MAX_MESSAGE:
        raise ValueError(f"message of {size} bytes exceeds the IPC limit of {MAX_MESSAGE}")
    return b"".join((HDR.pack(size, mtype), *parts))


# ---------------------------------------------------------------------------------------
# progress block

PROGRESS = struct.Struct("<QIdB")  # task id, item index, since (time.monotonic()), state
STATE_IDLE = 0
STATE_RUNNING = 1  # running user code for (task, index) since started
STATE_PREPARING = 2  # unpickling the function or the items of task
STATE_REPORTING = 3  # pickling and sending outcomes of task up to index
#: Tries at a whole read before giving up (a worker that died mid-write leaves the sequence
#: odd for ever; a worker on a batch of very fast calls writes almost without pause).
_READ_TRIES = 1000


class Progress:
    """A few bytes of memory shared by the server and one worker (the only writer).

    The server reads the block from another process at any moment, so a write is guarded by a
    sequence number (a seqlock): odd while the worker writes, the record after it. Without it
    a read could take the new task id with a half-written start time (``struct.pack_into``
    zeroes its bytes first), and the watchdog killed a worker for "running past its timeout of
    3600 s" a few milliseconds into a big fast map. The sequence is one aligned 8-byte word
    written and read through a memoryview: one 8-byte store, one load, never ``pack_into``,
    which passes through 0 and partial values. That is correct where stores are seen in the
    order made (x86-64); a weakly ordered CPU (arm64) would need barriers Python does not give,
    and a torn read there stays possible, if rarer."""

    def __init__(self, fd: int | None = None) -> None:
        if fd is None:
            memfd = getattr(os, "memfd_create", None)
            if memfd is not None:
                fd = memfd("acx-progress", getattr(os, "MFD_CLOEXEC", 0))
            else:  # macOS: an unlinked temporary file does the same job
                fd = os.dup(tempfile.TemporaryFile().fileno())
            os.ftruncate(fd, mmap.PAGESIZE)
        self.fd = fd
        self.mm = mmap.mmap(fd, mmap.PAGESIZE)
        #: ``words[0]`` is the sequence (the worker, its only writer, reads it back to write).
        self.words = memoryview(self.mm).cast("Q")

    def set(self, task_id: int, index: int, started: float, state: int) -> None:
        words = self.words
        seq = words[0] | 1  # odd: a write under way (| 1: after a writer that died mid-write too)
        words[0] = seq
        PROGRESS.pack_into(self.mm, 8, task_id, index, started, state)
        words[0] = seq + 1

    def read(self) -> tuple[int, int, float, int] | None:
        """One whole write, or None if every try met the worker in the middle of one (it is
        writing progress as fast as it can: busy, not stuck)."""
        words, mm = self.words, self.mm
        for _ in range(_READ_TRIES):
            before = words[0]
            if before & 1:
                continue
            value = PROGRESS.unpack_from(mm, 8)
            if words[0] == before:
                return value  # type: ignore[return-value]
        return None

    def get(self) -> tuple[int, int, float, int]:
        """:meth:`read`, or else what the block holds (for a worker that is gone: it may have
        died in the middle of a write)."""
        value = self.read()
        return value if value is not None else PROGRESS.unpack_from(self.mm, 8)  # type: ignore[return-value]

    def close(self) -> None:
        self.words.release()
        self.mm.close()
        try:
            os.close(self.fd)
        except OSError:
            pass
