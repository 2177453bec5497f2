"""Exceptions raised by async_ca_exec. A user function's own exception keeps its type."""

from __future__ import annotations


class AsyncCAExecError(Exception):
    """Base class of every error this package raises (user exceptions keep their own type)."""


class RemoteTraceback(Exception):
    """The traceback of an exception raised in a worker, attached as ``__cause__``.

    Printed below the re-raised exception, as :mod:`concurrent.futures` does::

        RemoteTraceback:
        \"\"\"
        Traceback (most recent call last): ...
        \"\"\"
    """

    def __init__(self, tb: str) -> None:
        super().__init__(tb)
        self.tb = tb

    def __str__(self) -> str:
        return f'\n"""\n{self.tb.rstrip()}\n"""'


class RemoteError(AsyncCAExecError):
    """A remote exception whose type cannot be recreated here (not importable or unpicklable)."""

    def __init__(self, type_name: str, message: str, traceback: str = "", *, call_id: str | None = None) -> None:
        super().__init__(f"{type_name}: {message}" if message else type_name)
        self.type_name = type_name
        self.message = message
        self.traceback = traceback
        self.call_id = call_id


class CallTimeoutError(AsyncCAExecError, TimeoutError):
    """A call ran longer than its timeout; the worker running it was killed."""


class WorkerCrashedError(AsyncCAExecError):
    """The process running a call died (os._exit, a segfault, out of memory)."""


class InvocationError(AsyncCAExecError):
    """A call could not be delivered after all retries (network errors, 5xx, 429)."""


class AuthenticationError(AsyncCAExecError):
    """The runtime refused the request signature, or Azure refused the credentials."""


class ConfigError(AsyncCAExecError, ValueError):
    """Bad configuration; the message names the key and what is allowed."""


class RuntimeNotFoundError(AsyncCAExecError):
    """No runtime of that name is deployed."""


class RuntimeMismatchError(AsyncCAExecError):
    """The runtime's Python or package versions cannot run this client's pickles."""


class SerializationError(AsyncCAExecError):
    """A function, argument or result could not be pickled or unpickled."""


class DeploymentError(AsyncCAExecError):
    """Azure could not create, change or delete a runtime (the message says what to do)."""


class RuntimeStartError(AsyncCAExecError):
    """The runtime could not be started or reached (the message carries its log's tail)."""


class StorageError(AsyncCAExecError):
    """Azure Blob storage could not be reached or refused an operation (the message names it)."""
