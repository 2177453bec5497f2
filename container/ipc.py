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


class Progress:
    """A few bytes of memory shared by the server and one worker."""

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

    def set(self, task_id: int, index: int, started: float, state: int) -> None:
        PROGRESS.pack_into(self.mm, 0, task_id, index, started, state)

    def get(self) -> tuple[int, int, float, int]:
        return PROGRESS.unpack_from(self.mm, 0)  # type: ignore[return-value]

    def close(self) -> None:
        self.mm.close()
        try:
            os.close(self.fd)
        except OSError:
            pass
