"""The ``acx`` command (also ``python -m async_ca_exec``)."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import math
import platform
import sys
import time
import traceback
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from . import __version__
from .config import ALLOWED_MEMORY, BACKEND_ALIASES, MEMORY_HELP, STORAGE_ALIASES, Config
from .errors import AsyncCAExecError, ConfigError
from .hello import hello

#: The options every command takes, wherever they are given: before the command (``acx -b azure
#: clean``) or after it (``acx clean -b azure``), with the same meaning.
_COMMON: tuple[tuple[tuple[str, str], str, dict[str, Any]], ...] = (
    (("-c", "--config"), "config", {"help": "config file (YAML; Lithops config files work unchanged)"}),
    (("-b", "--backend"), "backend", {"help": "local (alias localhost) or azure (alias azure_containers)"}),
    (("-s", "--storage"), "storage", {"help": "azure_storage, or localhost for none"}),
    (("-d", "--debug"), "debug", {"action": "store_true", "help": "debug logging and full tracebacks"}),
)


def _common(level: int) -> argparse.ArgumentParser:
    """The common options as a parent parser for the parser ``level`` deep (0: ``acx`` itself).

    Each level keeps its own destination and, below the top, sets it only when the option is
    given there: a subcommand's defaults must not overwrite what was given before it (the same
    parent at every level would). :func:`_merge_common` then reads them together.
    """
    parent = argparse.ArgumentParser(add_help=False)
    for flags, name, kw in _COMMON:
        options = dict(kw) if kw.get("action") == "store_true" else {"metavar": name.upper(), **kw}
        parent.add_argument(*flags, dest=f"{name}@{level}", default=argparse.SUPPRESS, **options)
    return parent


def _merge_common(p: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.Namespace:
    """One value per common option, from whichever position gave it; the same option given in
    two positions with different values is refused (which one was meant cannot be known)."""
    for flags, name, _kw in _COMMON:
        given = {k: v for k, v in vars(args).items() if k.split("@")[0] == name}
        for k in given:
            delattr(args, k)
        values = list(dict.fromkeys(given.values()))
        if name == "debug":
            setattr(args, name, any(values))
            continue
        if len({_canonical(name, v) for v in values}) > 1:
            p.error(f"{'/'.join(flags)} is given twice with different values ({', '.join(map(repr, values))}); give it once")
        setattr(args, name, values[0] if values else None)
    return args


def _canonical(name: str, value: str) -> str:
    """What a common option's value means: two names of one backend, or two spellings of one
    path, are the same value."""
    if name == "backend":
        return BACKEND_ALIASES.get(value.strip().lower(), value)
    if name == "storage":
        return str(STORAGE_ALIASES.get(value.strip().lower(), value))
    return str(Path(value).expanduser().resolve())


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="acx", description="Run Python functions at scale on Azure Container Apps.", parents=[_common(0)]
    )
    p.add_argument("--version", action="version", version=f"async_ca_exec {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    sub.add_parser("hello", parents=[_common(1)], help="run one call end to end and print its result")

    rt = sub.add_parser("runtime", parents=[_common(1)], help="build, deploy, update, delete, list runtimes")
    rsub = rt.add_subparsers(dest="action", metavar="ACTION")
    rsub.required = True
    b = rsub.add_parser("build", parents=[_common(2)], help="build and push a runtime image")
    b.add_argument("name", help="the image to build, e.g. myregistry.azurecr.io/me/rt:1")
    b.add_argument("-f", "--file", help="your Dockerfile (default: the package's container/Dockerfile)")
    b.add_argument("--no-push", action="store_true", help="build only (a local engine)")
    d = rsub.add_parser("deploy", parents=[_common(2)], help="deploy a runtime (default or NAME:TAG)")
    d.add_argument("name", help="default (the package's image for this Python), or an image NAME:TAG")
    d.add_argument("--memory", type=int, help="runtime_memory in MB")
    d.add_argument("--timeout", type=float, help="runtime_timeout in seconds")
    d.add_argument("--create-environment", action="store_true", help="create the Container Apps environment if it is missing")
    for action in ("update", "delete"):
        x = rsub.add_parser(action, parents=[_common(2)], help=f"{action} a runtime (default, NAME:TAG or all)")
        x.add_argument("name", help="default, an image NAME:TAG, or all")
    lst = rsub.add_parser("list", parents=[_common(2)], help="list deployed runtimes")
    lst.add_argument("--json", action="store_true", help="print JSON (a list of runtimes) instead of a table")

    sub.add_parser("clean", parents=[_common(1)], help="remove deployed runtimes, cached metadata, temporary blobs")

    cf = sub.add_parser("config", parents=[_common(1)], help="the configuration reference")
    csub = cf.add_subparsers(dest="action", metavar="ACTION")
    csub.required = True
    csub.add_parser("reference", parents=[_common(2)], help="print every section and key, with defaults (Markdown)")

    st = sub.add_parser("storage", parents=[_common(1)], help="put, get, list and delete blobs in Azure Blob storage")
    ssub = st.add_subparsers(dest="action", metavar="ACTION")
    ssub.required = True
    put = ssub.add_parser("put", parents=[_common(2)], help="upload a file (- for stdin) as a blob")
    put.add_argument("file")
    put.add_argument("key")
    get = ssub.add_parser("get", parents=[_common(2)], help="download a blob to a file (stdout without one)")
    get.add_argument("key")
    get.add_argument("file", nargs="?")
    ls = ssub.add_parser("list", parents=[_common(2)], help="list blobs (under a prefix)")
    ls.add_argument("prefix", nargs="?", default="")
    rm = ssub.add_parser("delete", parents=[_common(2)], help="delete blobs (or everything under --prefix)")
    rm.add_argument("keys", nargs="*")
    rm.add_argument("--prefix", help="delete every blob under this prefix")
    for action_parser in (put, get, ls, rm):
        action_parser.add_argument("--container", help="container (default: azure_storage.container, or acx-data)")
    return p


async def _hello(cfg: Config) -> int:
    from .executor import AsyncExecutor

    async with AsyncExecutor(config=cfg) as ex:
        print(await ex.submit(hello, "world"))
    return 0


def _load(args: argparse.Namespace) -> Config:
    """The configuration the command runs with: -c's file (else $ACX_CONFIG_FILE or the default
    path), the environment, and -b/-s/-d on top. A bad file, key or value fails here, before
    any command runs, whatever the backend."""
    from .config import load_config

    return load_config(
        args.config,
        arguments={"backend": args.backend, "storage": args.storage, "log_level": "DEBUG" if args.debug else None},
        given_by="-c/--config",
        labels={"backend": "-b/--backend", "storage": "-s/--storage"},
    )


def _check_deploy_options(args: argparse.Namespace) -> None:
    """--memory and --timeout are checked for every backend: a value no backend accepts must not
    pass silently because the local backend has nothing to deploy."""
    if args.memory is not None and args.memory not in ALLOWED_MEMORY:
        raise ConfigError(f"--memory {args.memory} is not allowed: {MEMORY_HELP}")
    if args.timeout is not None and not (math.isfinite(args.timeout) and args.timeout > 0):
        raise ConfigError(f"--timeout {args.timeout:g} is not allowed: runtime_timeout is a positive number of seconds")


def _runtime(args: argparse.Namespace, cfg: Config) -> int:
    from .config import default_local_layout

    if args.action == "deploy":
        _check_deploy_options(args)
    if cfg.backend == "azure":
        return asyncio.run(_azure(args, cfg))
    if args.action == "list":
        replicas, workers = default_local_layout(cfg)
        if args.json:
            doc = {"runtime": "local", "python": platform.python_version(), "version": __version__,
                   "replicas": replicas, "workers_per_replica": workers}  # fmt: skip
            print(json.dumps([doc], indent=2))
            return 0
        _table(
            ["RUNTIME", "PYTHON", "VERSION", "REPLICAS", "WORKERS/REPLICA"],
            [["local", platform.python_version(), __version__, str(replicas), str(workers)]],
        )
        return 0
    if args.action == "build":
        return asyncio.run(_azure(args, cfg))  # building an image needs no Azure backend settings
    print(
        f"the local backend needs no '{args.action}': its runtime starts and stops with each executor "
        "(for Azure: -b azure, or lithops.backend: azure_containers in the config)"
    )
    return 0


def _progress(message: str) -> None:
    """A step of a long command: on stderr, so stdout carries only the result."""
    print(message, file=sys.stderr, flush=True)


def _table(header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())


async def _azure(args: argparse.Namespace, cfg: Config) -> int:
    from .runtimes.azure import AzureApps

    command = getattr(args, "action", None) or args.command
    if command == "build":
        from .runtimes.images import build_image

        how = await build_image(
            cfg, args.name, dockerfile=Path(args.file) if args.file else None, push=not args.no_push, progress=print
        )
        print(f"built {args.name} with {how}" + ("" if args.no_push or how == "acr" else " and pushed it"))
        return 0
    started = time.monotonic()
    async with AzureApps(cfg, progress=_progress) as apps:
        if command == "deploy":
            info = await apps.deploy(
                args.name, memory=args.memory, timeout=args.timeout, create_environment=args.create_environment
            )
            _progress(f"ready in {time.monotonic() - started:.0f} s")
            print(f"deployed runtime {info.runtime} ({info.memory} MB) as {info.app}: https://{info.fqdn}")
        elif command == "update":
            done = await apps.update(args.name)
            print(f"updated {len(done)} runtime(s): {', '.join(i.app for i in done) or 'none'}")
        elif command == "delete":
            names = await apps.delete(args.name)
            print(f"deleted {len(names)} runtime(s): {', '.join(names) or 'none'}")
        elif command == "list" and args.json:
            print(json.dumps([dataclasses.asdict(i) for i in await apps.runtimes()], indent=2))
        elif command == "list":
            rows = [
                [i.runtime, str(i.memory or "?"), i.version or "?", i.app, i.fqdn or "-", i.state or "?",
                 "?" if i.replicas is None else str(i.replicas), "?" if i.max_replicas is None else str(i.max_replicas)]
                for i in await apps.runtimes()
            ]  # fmt: skip
            _table(["RUNTIME", "MEMORY", "VERSION", "APP", "FQDN", "STATE", "REPLICAS", "MAX"], rows)
            if not rows:
                print(f"(no runtimes in resource group {apps.target.resource_group})")
        elif command == "clean":
            names = await apps.clean()
            print(f"cleaned: deleted {len(names)} runtime(s) ({', '.join(names) or 'none'}) and their cached metadata")
    return 0


async def _clean_blobs(cfg: Config) -> int:
    """``acx clean`` on the local backend with Blob storage: what the package keeps there."""
    from .storage import PREFIX, Storage

    async with Storage(cfg) as st:
        n = await st.delete_prefix(f"{PREFIX}/")
        print(f"cleaned: the local backend keeps no runtimes; deleted {n} blob(s) under {st.container}/{PREFIX}/")
    return 0


async def _storage(args: argparse.Namespace, cfg: Config) -> int:
    from .storage import Storage

    async with Storage(cfg, container=args.container) as st:
        if args.action == "put":
            data = sys.stdin.buffer.read() if args.file == "-" else Path(args.file).read_bytes()  # noqa: ASYNC240
            await st.put(args.key, data)
            print(f"uploaded {len(data)} bytes to {st.container}/{args.key}")
        elif args.action == "get":
            data = await st.get(args.key)
            if args.file:
                Path(args.file).write_bytes(data)  # noqa: ASYNC240 - one command, one task
                print(f"downloaded {st.container}/{args.key} ({len(data)} bytes) to {args.file}")
            else:
                sys.stdout.buffer.write(data)
        elif args.action == "list":
            blobs = await st.list(args.prefix)
            _table(["NAME", "SIZE", "MODIFIED"],
                   [[b.name, str(b.size), b.last_modified.isoformat(timespec="seconds") if b.last_modified else "-"]
                    for b in blobs])  # fmt: skip
            if not blobs:
                print(f"(no blobs under {st.container}/{args.prefix})")
        elif args.action == "delete":
            if not args.keys and not args.prefix:
                raise AsyncCAExecError("name the blobs to delete, or --prefix")
            n = await st.delete(*args.keys) if args.keys else 0
            if args.prefix:
                n += await st.delete_prefix(args.prefix)
            print(f"deleted {n} blob(s) from {st.container}")
    return 0


def _one_line(exc: BaseException) -> str:
    """The error's first line; for a task group's error, its first inner error's."""
    while isinstance(getattr(exc, "exceptions", None), tuple) and exc.exceptions:  # type: ignore[attr-defined]
        exc = exc.exceptions[0]  # type: ignore[attr-defined]
    return _one_line_text(str(exc)) or type(exc).__name__


class _OneLine(logging.Formatter):
    """``acx: warning: ...``: a log record as one line, like the command's own errors."""

    def format(self, record: logging.LogRecord) -> str:
        return f"acx: {record.levelname.lower()}: {_one_line_text(record.getMessage())}"


def _show_warning(message: Warning | str, category: type[Warning], *_args: Any, **_kw: Any) -> None:
    print(f"acx: warning: {_one_line_text(str(message))}", file=sys.stderr)


def _setup_output(debug: bool) -> None:
    """With --debug: every logger at DEBUG with timestamps, tracebacks on error. Without: the SDK's
    warnings and Python warnings (an ignored Lithops section, say) as one ``acx: warning:`` line
    each, and nothing from the Azure libraries, whose failures reach the user as our errors (the
    credential chain azure-identity logs is in the error's first line, in full with --debug)."""
    if debug:
        logging.basicConfig(level=logging.DEBUG, stream=sys.stderr,
                            format="%(asctime)s [%(levelname)s] %(name)s: %(message)s")  # fmt: skip
        return
    warnings.showwarning = _show_warning
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_OneLine())
    ours = logging.getLogger("async_ca_exec")
    ours.addHandler(handler)
    ours.setLevel(logging.WARNING)
    ours.propagate = False
    azure = logging.getLogger("azure")
    azure.addHandler(logging.NullHandler())
    azure.propagate = False


def _one_line_text(text: str) -> str:
    text = text.strip()
    return text.splitlines()[0] if text else ""


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = _merge_common(parser, parser.parse_args(argv))
    _setup_output(args.debug)
    try:
        if args.command == "config":
            given = [flag for flag, value in (("-c", args.config), ("-b", args.backend), ("-s", args.storage)) if value]
            if given:
                parser.error(f"acx config reference lists every key whatever the configuration; drop {', '.join(given)}")
            from .configdoc import render

            sys.stdout.write(render())
            return 0
        cfg = _load(args)
        if args.command == "hello":
            return asyncio.run(_hello(cfg))
        if args.command == "runtime":
            return _runtime(args, cfg)
        if args.command == "storage":
            return asyncio.run(_storage(args, cfg))
        if args.command == "clean":
            if cfg.backend == "azure":
                return asyncio.run(_azure(args, cfg))
            if cfg.storage_configured:  # local runs with Blob storage keep their data there too
                return asyncio.run(_clean_blobs(cfg))
            print(
                "nothing to clean: the local backend keeps no runtimes, metadata or blobs "
                "(for Azure: -b azure, or lithops.backend: azure_containers in the config)"
            )
            return 0
    except KeyboardInterrupt:
        print("acx: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - one line for the user, the traceback with --debug
        if args.debug:
            traceback.print_exc()
        print(f"acx: error: {_one_line(exc)}", file=sys.stderr)
        return 1
    return 2  # pragma: no cover - argparse requires a command


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
