"""Azure Blob storage against Azurite: the Storage API, big payloads, cleanup, failures, secrets."""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import logging
from pathlib import Path

import pytest

from async_ca_exec import AsyncExecutor, AuthenticationError, ConfigError, FunctionExecutor, Storage, StorageError
from async_ca_exec.config import load_config

from conftest import AZURITE_KEY, Azurite, storage_config


def make_bytes(n: int) -> bytes:
    return bytes(range(256)) * (n // 256) + bytes(n % 256)


def digest_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


async def leftovers(azurite: Azurite, container: str, prefix: str = "acx/") -> list[str]:
    async with Storage(load_config(storage_config(azurite, container), env={})) as st:
        return [b.name for b in await st.list(prefix)]


# -- the Storage API -----------------------------------------------------------------------


async def test_storage_api_puts_gets_lists_and_deletes(azurite: Azurite, container: str) -> None:
    async with Storage(load_config(storage_config(azurite, container), env={})) as st:
        assert await st.list() == []  # the container does not exist yet: nothing in it
        await st.put("data/a.txt", b"hello world")
        await st.put("data/b.txt", b"x" * 1000)
        await st.put("other/c.txt", b"c")
        assert await st.get("data/a.txt") == b"hello world"
        assert await st.get("data/a.txt", offset=6, length=5) == b"world"
        assert await st.size("data/b.txt") == 1000 and await st.exists("data/b.txt")
        assert [b.name for b in await st.list("data/")] == ["data/a.txt", "data/b.txt"]
        assert await st.delete_prefix("data/") == 2
        assert [b.name for b in await st.list()] == ["other/c.txt"]
        assert await st.delete("other/c.txt", "missing.txt") == 1
        with pytest.raises(StorageError, match=r"no such blob"):
            await st.get("missing.txt")
        with pytest.raises(ValueError, match="give a prefix"):
            await st.delete_prefix("")


def test_storage_config_errors_name_the_keys() -> None:
    with pytest.raises(ConfigError, match="connection_string, or storage_account_name"):
        Storage(load_config({}, env={}))
    with pytest.raises(ConfigError, match="not a valid container name"):
        Storage(load_config({"azure_storage": {"connection_string": "x", "container": "Bad_Name"}}, env={}))
    with pytest.raises(ConfigError, match="storage_account_key"):
        Storage(load_config({"azure_storage": {"storage_account_name": "acct"}}, env={}))


async def test_lithops_account_name_and_key_work_with_a_blob_endpoint(azurite: Azurite, container: str) -> None:
    cfg = load_config(
        {"azure_storage": {"storage_account_name": "devstoreaccount1", "storage_account_key": AZURITE_KEY,
                           "blob_endpoint": azurite.endpoint, "storage_bucket": container}},
        env={},
    )  # fmt: skip
    async with Storage(cfg) as st:
        await st.put("k", b"v")
        assert await st.get("k") == b"v" and st.container == container


# -- big payloads through Blob -------------------------------------------------------------


def big_result(n: int) -> bytes:
    return make_bytes(n)


async def test_50_mb_argument_and_50_mb_result_round_trip_through_blob(azurite: Azurite, container: str) -> None:
    payload = make_bytes(50_000_000)
    async with AsyncExecutor(config=storage_config(azurite, container)) as ex:
        assert await ex.submit(digest_of, payload) == digest_of(payload)
        result = await ex.submit(big_result, 50_000_000)
        assert len(result) == 50_000_000 and result == payload
        t = ex._transfers
        assert t is not None and t.uploads >= 1 and t.downloads >= 1  # both went through Blob
    assert await leftovers(azurite, container) == []  # and their blobs are gone


@pytest.mark.parametrize("chunksize", [1, None], ids=["one per request", "batched (the default)"])
async def test_1000_calls_returning_1_mb_each_leave_no_blobs(azurite: Azurite, container: str, chunksize: int | None) -> None:
    cfg = storage_config(azurite, container, inline_limit=0.5)
    async with AsyncExecutor(config=cfg, max_concurrency=32) as ex:
        results = await ex.map(big_result, [1_000_000] * 1000, chunksize=chunksize)
        assert len(results) == 1000 and all(len(r) == 1_000_000 for r in results)
        assert results[0] == make_bytes(1_000_000)
        assert ex._transfers is not None
        if chunksize == 1:
            assert ex._transfers.downloads == 1000  # each result through Blob
        else:  # a batch's outcomes travel together
            assert 1 <= ex._transfers.downloads < 1000 and ex.job_summary()["requests"] < 1000
    assert await leftovers(azurite, container) == []


async def test_keep_data_leaves_the_blobs_for_inspection(azurite: Azurite, container: str) -> None:
    cfg = storage_config(azurite, container, inline_limit=0.5, keep_data=True)
    async with AsyncExecutor(config=cfg) as ex:
        assert len(await ex.submit(big_result, 1_000_000)) == 1_000_000
    names = await leftovers(azurite, container)
    assert len(names) == 1 and names[0].startswith("acx/jobs/") and names[0].endswith("/0.out")


def test_the_facades_clean_deletes_what_keep_data_kept(azurite: Azurite, container: str) -> None:
    cfg = storage_config(azurite, container, inline_limit=0.5, keep_data=True)
    with FunctionExecutor(config=cfg) as fexec:
        fexec.call_async(big_result, 1_000_000)
        assert len(fexec.get_result()) == 1_000_000
        kept = asyncio.run(leftovers(azurite, container))
        assert len(kept) == 1 and kept[0].endswith("/0.out")
        fexec.clean()
        assert asyncio.run(leftovers(azurite, container)) == []


async def test_a_big_function_is_uploaded_once_and_cached_by_the_replicas(azurite: Azurite, container: str) -> None:
    table = make_bytes(6_000_000)  # a closure above the 4 MiB inline limit

    def lookup(i: int) -> int:
        return table[i]

    async with AsyncExecutor(config=storage_config(azurite, container)) as ex:
        assert await ex.map(lookup, range(50)) == list(table[:50])
        assert await ex.map(lookup, range(50, 60)) == list(table[50:60])
        t = ex._transfers
        assert t is not None and t.uploads == 1  # one function blob, no argument blobs
        fn_blobs = await leftovers(azurite, container, "acx/functions/")
        assert len(fn_blobs) == 1
        assert ex.job_summary()["function_uploads"] == 0  # never sent inline
    assert await leftovers(azurite, container) == []  # removed when the executor closed


async def test_without_storage_a_big_argument_on_azure_fails_fast_naming_the_setting(tmp_path: Path) -> None:
    cfg = {
        "lithops": {"backend": "azure_containers", "inline_limit": 1},
        "azure": {"subscription_id": "s", "resource_group": "rg", "arm_endpoint": "https://127.0.0.1:9"},
    }
    ex = AsyncExecutor(config=cfg)
    try:
        with pytest.raises(ConfigError, match=r"2\.0 MiB, above lithops\.inline_limit=1 MiB.*azure_storage"):
            await asyncio.wait_for(ex.map(len, [b"x" * 2 * 2**20]), 30)
    finally:
        await ex.aclose()


async def test_without_storage_a_big_argument_goes_inline_on_the_local_runtime() -> None:
    async with AsyncExecutor(config={"lithops": {"inline_limit": 1}}) as ex:
        assert await ex.map(len, [b"x" * 3 * 2**20]) == [3 * 2**20]


# -- failures ------------------------------------------------------------------------------


async def test_storage_stopped_mid_job_fails_the_blob_calls_clearly_and_spares_the_others(tmp_path: Path, container: str) -> None:
    own = Azurite(tmp_path)
    try:
        cfg = storage_config(own, container, inline_limit=0.5)
        async with AsyncExecutor(config=cfg) as ex:
            assert await ex.submit(digest_of, make_bytes(1_000_000)) == digest_of(make_bytes(1_000_000))
            own.stop()
            big = ex.submit(digest_of, make_bytes(1_000_000))
            small = ex.submit(len, b"tiny")
            with pytest.raises(StorageError, match=r"Azure Blob storage at http://127\.0\.0\.1:\d+/devstoreaccount1"):
                await asyncio.wait_for(big, 120)
            assert await asyncio.wait_for(small, 60) == 4
            assert await ex.map(len, ["ab", "c"]) == [2, 1]
    finally:
        own.stop()


async def test_secrets_never_reach_logs_or_errors(tmp_path: Path, container: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    own = Azurite(tmp_path)
    errors: list[str] = []
    try:
        cfg = storage_config(own, container, inline_limit=0.5)
        async with AsyncExecutor(config=cfg, log_level="DEBUG") as ex:
            assert len(await ex.submit(big_result, 1_000_000)) == 1_000_000
            assert await ex.submit(digest_of, make_bytes(1_000_000)) == digest_of(make_bytes(1_000_000))
            own.stop()
            for call in (ex.submit(digest_of, make_bytes(1_000_000)),):
                try:
                    await asyncio.wait_for(call, 120)
                except StorageError as exc:
                    errors.append(repr(exc) + str(exc))
    finally:
        own.stop()
    assert errors and "acx/jobs/" in caplog.text  # blob traffic was logged (at DEBUG)...
    for text in [caplog.text, *errors]:
        assert AZURITE_KEY not in text and "sig=" not in text  # ...but never a key or a SAS


def test_acx_storage_commands_put_get_list_delete(azurite: Azurite, container: str, tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    import yaml

    cfg = tmp_path / "acx.yaml"
    cfg.write_text(yaml.safe_dump(storage_config(azurite, container)))
    src = tmp_path / "in.bin"
    src.write_bytes(make_bytes(300_000))
    env = {k: v for k, v in os.environ.items() if not k.startswith("ACX_")}
    acx = [str(Path(sys.executable).with_name("acx")), "storage"]

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*acx, *args, "-c", str(cfg)], env=env, capture_output=True, text=True, timeout=120)

    r = run("put", str(src), "data/in.bin")
    assert r.returncode == 0 and "uploaded 300000 bytes" in r.stdout, r.stderr
    assert run("put", str(src), "data/copy.bin").returncode == 0
    r = run("list", "data/")
    assert r.returncode == 0 and "data/in.bin" in r.stdout and "300000" in r.stdout
    out = tmp_path / "out.bin"
    r = run("get", "data/in.bin", str(out))
    assert r.returncode == 0 and out.read_bytes() == src.read_bytes()
    r = run("delete", "data/in.bin")
    assert r.returncode == 0 and "deleted 1 blob(s)" in r.stdout
    r = run("delete", "--prefix", "data/")
    assert r.returncode == 0 and "deleted 1 blob(s)" in r.stdout
    r = run("get", "data/in.bin")
    assert r.returncode == 1 and "no such blob" in r.stderr and "Traceback" not in r.stderr


def test_acx_clean_on_the_local_backend_removes_the_packages_blobs(azurite: Azurite, container: str, tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    import yaml

    cfg = tmp_path / "acx.yaml"
    cfg.write_text(yaml.safe_dump(storage_config(azurite, container, keep_data=True, inline_limit=0.5)))
    code = "import asyncio\nfrom async_ca_exec import AsyncExecutor\n" \
           f"async def main():\n    async with AsyncExecutor(config={str(cfg)!r}) as ex:\n" \
           "        assert await ex.submit(len, b'x' * 2**20) == 2**20\nasyncio.run(main())\n"  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith("ACX_")}
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    kept = asyncio.run(leftovers(azurite, container))
    assert kept, "keep_data left nothing to clean"
    acx = str(Path(sys.executable).with_name("acx"))
    r = subprocess.run([acx, "clean", "-c", str(cfg)], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and f"deleted {len(kept)} blob(s) under {container}/acx/" in r.stdout, (r.stdout, r.stderr)
    assert asyncio.run(leftovers(azurite, container)) == []


async def test_a_malformed_connection_string_is_a_config_error_naming_the_key() -> None:
    with pytest.raises(ConfigError, match=r"azure_storage\.connection_string cannot be used: .*malformed"):
        async with AsyncExecutor(config={"azure_storage": {"connection_string": "not one", "container": "data"}}) as ex:
            await ex.map(len, ["x"])


async def test_unreachable_storage_at_start_fails_once_and_leaks_no_session(
    recwarn: pytest.WarningsRecorder, capfd: pytest.CaptureFixture[str]
) -> None:
    import gc

    conn = "DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;AccountKey=" + AZURITE_KEY + \
           ";BlobEndpoint=http://127.0.0.1:9/devstoreaccount1;"  # fmt: skip
    ex = AsyncExecutor(config={"azure_storage": {"connection_string": conn, "container": "data", "retries": 0}})
    with pytest.raises(StorageError, match="cannot be reached while creating container data"):
        await ex.start()
    await ex.aclose()
    gc.collect()
    await asyncio.sleep(0)
    assert "Unclosed client session" not in capfd.readouterr().err


# -- roles: what a 403 says ------------------------------------------------------------------------

ROLE_LINE = (
    'az role assignment create --assignee <your user, app id or object id> --role "Storage Blob Data Contributor" '
    "--scope /subscriptions/<sub>/resourceGroups/<rg>/providers/Microsoft.Storage/storageAccounts/"
)


def forbidden(code: str) -> Exception:
    """What azure-storage-blob raises for a 403 Azure answers (Azurite enforces no RBAC)."""
    from azure.core.exceptions import HttpResponseError

    exc = HttpResponseError(message=f"This request is not authorized to perform this operation.\nErrorCode:{code}")
    exc.status_code = 403
    return exc


def entra_storage() -> Storage:
    """Blob through account_url and an Entra credential (nothing is sent: the seams are replaced)."""
    from arm_endpoint import StaticToken

    cfg = load_config({"azure_storage": {"account_url": "https://acxtest.blob.core.windows.net", "container": "c-1"}}, env={})
    return Storage(cfg, credential=StaticToken())


async def test_a_refused_user_delegation_key_names_the_data_contributor_role_and_the_command() -> None:
    async with entra_storage() as st:

        async def refuse(*args: object, **kwargs: object) -> None:
            raise forbidden("AuthorizationPermissionMismatch")

        st._service.get_user_delegation_key = refuse
        with pytest.raises(AuthenticationError) as refused:
            await st.read_url("acx/x.in")
    text = str(refused.value)
    assert "refused the signed-in identity a user delegation key" in text
    assert "carry only what the identity may do itself, so it needs Storage Blob Data Contributor" in text
    assert "Storage Blob Delegator adds only the key, for an identity whose data role is scoped to a container" in text
    assert ROLE_LINE + "acxtest`" in text and "az storage account show -n acxtest --query id -o tsv" in text


async def test_a_403_to_an_entra_identity_names_the_role_and_one_with_a_key_does_not() -> None:
    keyed = load_config({"azure_storage": {"storage_account_name": "acxtest", "storage_account_key": AZURITE_KEY,
                                           "container": "c-1"}}, env={})  # fmt: skip
    texts = []
    for st in (entra_storage(), Storage(keyed)):
        async with st:

            async def refuse(*args: object, **kwargs: object) -> None:
                raise forbidden("AuthorizationPermissionMismatch")

            st._c.upload_blob = refuse
            st._created = True  # the container "exists": nothing goes over the network
            with pytest.raises(AuthenticationError) as refused:
                await st.put("acx/x", b"x")
            texts.append(str(refused.value))
    entra, key = texts
    assert "denied writing blob acx/x to the signed-in identity" in entra and ROLE_LINE + "acxtest`" in entra
    assert "check the account key or the SAS permissions" in key and "Data Contributor" not in key


@pytest.mark.parametrize("way", ["write", "read"])
async def test_a_sas_the_runtime_is_refused_names_the_role_and_the_command(
    azurite: Azurite, container: str, monkeypatch: pytest.MonkeyPatch, way: str
) -> None:
    """A real 403 from Azurite: the SAS the client lends lacks the permission the runtime uses,
    as a user-delegation SAS does when the signing identity lacks the data role."""
    real_sas = Storage._sas

    async def narrowed(self: Storage, *, blob: str | None, permission: str, expiry: dt.datetime) -> str:
        wanted = {"cw": "r", "r": "w"}[permission]  # each without what it is for
        return await real_sas(self, blob=blob, permission=wanted, expiry=expiry)

    monkeypatch.setattr(Storage, "_sas", narrowed)
    async with AsyncExecutor(config=storage_config(azurite, container, inline_limit=0.5)) as ex:
        call = ex.submit(big_result, 1_000_000) if way == "write" else ex.submit(digest_of, make_bytes(1_000_000))
        with pytest.raises(StorageError) as refused:
            await asyncio.wait_for(call, 120)
    text = str(refused.value)
    assert f"HTTP 403 {way.rstrip('e')}ing" in text and "refused the SAS URL this client lent the runtime" in text
    assert "only what the signed-in identity may do itself, so the identity needs Storage Blob Data Contributor" in text
    assert ROLE_LINE + "devstoreaccount1`" in text and "sig=" not in text
