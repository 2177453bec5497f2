"""The ``acx`` command (also ``python -m async_ca_exec``)."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import platform
import sys
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from . import __version__
from .config import Config, memory_pair
from .errors import AsyncCAExecError
from .hello import hello


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-c", "--config", help="config file (YAML; Lithops config files work unchanged)")
    common.add_argument("-b", "--backend", help="local (alias localhost) or azure (alias azure_containers)")
    common.add_argument("-s", "--storage", help="azure_storage, or localhost for none")
    common.add_argument("-d", "--debug", action="store_true", help="debug logging and full tracebacks")

    p = argparse.ArgumentParser(
        prog="acx", description="Run Python functions at scale on Azure Container Apps.", parents=[common]
    )
    p.add_argument("--version", action="version", version=f"async_ca_exec {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    sub.add_parser("hello", parents=[common], help="run one call end to end and print its result")

    rt = sub.add_parser("runtime", parents=[common], help="build, deploy, update, delete, list runtimes")
    rsub = rt.add_subparsers(dest="action", metavar="ACTION")
    rsub.required = True
    b = rsub.add_parser("build", parents=[common], help="build and push a runtime image")
    b.add_argument("name")
    b.add_argument("-f", "--file", help="your Dockerfile (default: the package's container/Dockerfile)")
    b.add_argument("--no-push", action="store_true", help="build only (a local engine)")
    d = rsub.add_parser("deploy", parents=[common], help="deploy a runtime (default or NAME:TAG)")
    d.add_argument("name")
    d.add_argument("--memory", type=int, help="runtime_memory in MB")
    d.add_argument("--timeout", type=float, help="runtime_timeout in seconds")
    d.add_argument("--create-environment", action="store_true", help="create the Container Apps environment if it is missing")
    for action in ("update", "delete"):
        x = rsub.add_parser(action, parents=[common], help=f"{action} a runtime (default, NAME:TAG or all)")
        x.add_argument("name")
    lst = rsub.add_parser("list", parents=[common], help="list deployed runtimes")
    lst.add_argument("--json", action="store_true", help="print JSON (a list of runtimes) instead of a table")

    sub.add_parser("clean", parents=[common], help="remove deployed runtimes, cached metadata, temporary blobs")

    cf = sub.add_parser("config", parents=[common], help="the configuration reference")
    csub = cf.add_subparsers(dest="action", metavar="ACTION")
    csub.required = True
    csub.add_parser("reference", parents=[common], help="print every section and key, with defaults (Markdown)")

    st = sub.add_parser("storage", parents=[common], help="put, get, list and delete blobs in Azure Blob storage")
    ssub = st.add_subparsers(dest="action", metavar="ACTION")
    ssub.required = True
    put = ssub.add_parser("put", parents=[common], help="upload a file (- for stdin) as a blob")
    put.add_argument("file")
    put.add_argument("key")
    get = ssub.add_parser("get", parents=[common], help="download a blob to a file (stdout without one)")
    get.add_argument("key")
    get.add_argument("file", nargs="?")
    ls = ssub.add_parser("list", parents=[common], help="list blobs (under a prefix)")
    ls.add_argument("prefix", nargs="?", default="")
    rm = ssub.add_parser("delete", parents=[common], help="delete blobs (or everything under --prefix)")
    rm.add_argument("keys", nargs="*")
    rm.add_argument("--prefix", help="delete every blob under this prefix")
    for action_parser in (put, get, ls, rm):
        action_parser.add_argument("--container", help="container (default: azure_storage.container, or acx-data)")
    return p


def _executor_options(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "config": args.config,
        "backend": args.backend,
        "storage": args.storage,
        "log_level": "DEBUG" if args.debug else None,
    }


async def _hello(args: argparse.Namespace) -> int:
    from .executor import AsyncExecutor

    async with AsyncExecutor(**_executor_options(args)) as ex:
        print(await ex.submit(hello, "world"))
    return 0


def _load(args: argparse.Namespace) -> Config:
    from .config import load_config

    cfg = load_config(args.config, arguments={"backend": args.backend, "storage": args.storage,
                                                "log_level": "DEBUG" if args.debug else None})  # fmt: skip
    return cfg


def _runtime(args: argparse.Namespace) -> int:
    from .config import default_local_layout

    cfg = _load(args)
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
    print(f"the local backend needs no '{args.action}': its runtime starts and stops with each executor")
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
    if command == "deploy" and args.memory is not None:
        memory_pair(args.memory)  # a bad size is refused before any Azure call
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
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.debug:
        logging.basicConfig(level=logging.DEBUG, stream=sys.stderr,
                            format="%(asctime)s [%(levelname)s] %(name)s: %(message)s")  # fmt: skip
    try:
        if args.command == "hello":
            return asyncio.run(_hello(args))
        if args.command == "runtime":
            return _runtime(args)
        if args.command == "storage":
            return asyncio.run(_storage(args, _load(args)))
        if args.command == "config":
            from .configdoc import render

            sys.stdout.write(render())
            return 0
        if args.command == "clean":
            cfg = _load(args)
            if cfg.backend == "azure":
                return asyncio.run(_azure(args, cfg))
            print("nothing to clean: the local backend keeps no runtimes, metadata or blobs")
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
