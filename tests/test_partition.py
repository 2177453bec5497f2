"""Object partitioning: line-aligned byte ranges of blobs and URLs, map and map_reduce over them."""

from __future__ import annotations

import collections
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from async_ca_exec import AsyncExecutor, ConfigError, FunctionExecutor, Storage
from async_ca_exec.config import load_config
from async_ca_exec.partition import CloudObject, _ranges

from conftest import Azurite, storage_config


class BytesObject(CloudObject):
    """A CloudObject reading from memory instead of HTTP (a test double)."""

    data: bytes = b""

    def _get(self, start: int, end: int) -> bytes:
        return self.data[start : end + 1]


def split(data: bytes, chunk: int, newline: bytes = b"\n") -> list[bytes]:
    ranges, cs = _ranges(len(data), chunk, None)
    parts = []
    for i, r in enumerate(ranges):
        o = BytesObject("b", "k", i, len(ranges), r, cs, len(data), newline)
        o.data = data
        parts.append(o.data_stream.read())
    return parts


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet="ab\n", max_size=200).map(str.encode), st.integers(min_value=1, max_value=40))
def test_partitions_cover_the_object_exactly_once_and_cut_no_line(data: bytes, chunk: int) -> None:
    parts = split(data, chunk)
    assert b"".join(parts) == data
    ends = [p for p in parts if p and not p.endswith(b"\n")]
    assert len(ends) <= 1 and all(data.endswith(p) for p in ends)  # only the object's last line may lack one
    assert sum(p.count(b"\n") for p in parts) == data.count(b"\n")


@settings(max_examples=400, deadline=None)
@given(st.lists(st.text(alphabet="ab\r", max_size=6), max_size=30), st.booleans(), st.integers(1, 12))
def test_two_byte_newlines_are_never_split_or_lost(lines: list[str], last_nl: bool, chunk: int) -> None:
    data = "\r\n".join(lines).encode() + (b"\r\n" if last_nl and lines else b"")
    parts = split(data, chunk, b"\r\n")
    assert b"".join(parts) == data
    ends = [p for p in parts if p and not p.endswith(b"\r\n")]
    assert len(ends) <= 1 and all(data.endswith(p) for p in ends)


def test_small_blocks_still_find_newlines_split_across_them(monkeypatch: pytest.MonkeyPatch) -> None:
    from async_ca_exec import partition

    monkeypatch.setattr(partition, "_BLOCK", 3)  # reads of 3 bytes split "\r\n" often
    data = b"aaaa\r\nbbbbbbb\r\ncc\r\nd"
    line_starts = {0} | {i + 2 for i in range(len(data) - 1) if data[i : i + 2] == b"\r\n"}
    for chunk in range(1, len(data) + 1):
        parts = split(data, chunk, b"\r\n")
        assert b"".join(parts) == data
        offset = 0
        for part in parts:
            if part:
                assert offset in line_starts, (chunk, parts)  # every part begins at a line start
            offset += len(part)


def test_lines_longer_than_a_partition_go_whole_to_the_partition_they_start_in() -> None:
    data = b"x" * 25 + b"\n" + b"short\n" + b"y" * 30
    parts = split(data, 10)
    assert [p for p in parts if p] == [b"x" * 25 + b"\n", b"short\n", b"y" * 30]


def count_lines(obj: CloudObject) -> tuple[int, bool]:
    lines = obj.data_stream.read().splitlines()
    whole = all(re.fullmatch(rb"line-\d{7}( \w+)+", line) for line in lines)
    return len(lines), whole


def words(obj: CloudObject) -> dict[str, int]:
    c: collections.Counter[str] = collections.Counter()
    for line in obj.data_stream:
        c.update(line.decode().split())
    return dict(c)


def merge(counts: list[dict[str, int]]) -> dict[str, int]:
    total: collections.Counter[str] = collections.Counter()
    for c in counts:
        total.update(c)
    return dict(total)


VOCABULARY = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda".split()


def text_file(target: int) -> bytes:
    lines, n = [], 0
    i = 0
    while n < target:
        ws = " ".join(VOCABULARY[(i * 7 + k) % len(VOCABULARY)] for k in range(1 + i % 9))
        line = f"line-{i:07d} {ws}\n".encode()
        lines.append(line)
        n += len(line)
        i += 1
    return b"".join(lines)


@pytest.fixture
async def text_blob(azurite: Azurite, container: str) -> bytes:
    data = text_file(20 * 2**20)
    async with Storage(load_config(storage_config(azurite, container), env={})) as st:
        await st.put("data/big.txt", data)
    return data


async def test_a_20_mb_file_in_1_mb_chunks_counts_every_line_once(azurite: Azurite, container: str, text_blob: bytes) -> None:
    async with AsyncExecutor(config=storage_config(azurite, container)) as ex:
        results = await ex.map(count_lines, f"az://{container}/data/big.txt", obj_chunk_size=2**20)
        assert len(results) == -(-len(text_blob) // 2**20)  # 20 MiB and a little: 21 chunks
        assert sum(n for n, _ in results) == text_blob.count(b"\n")
        assert all(whole for _, whole in results)  # no line was cut
        local = collections.Counter(text_blob.decode().split())
        assert await ex.map_reduce(words, f"az://{container}/data/", merge, obj_chunk_size=2**20) == dict(local)


async def test_prefixes_several_blobs_chunk_numbers_and_urls(azurite: Azurite, container: str) -> None:
    async with Storage(load_config(storage_config(azurite, container), env={})) as st:
        await st.put("in/a.txt", text_file(50_000))
        await st.put("in/b.txt", text_file(30_000))
        await st.put("in/empty.txt", b"")
        url = await st.read_url("in/a.txt")
    expected_a = text_file(50_000).count(b"\n")
    async with AsyncExecutor(config=storage_config(azurite, container)) as ex:
        parts = await ex.map(count_lines, f"az://{container}/in/", obj_chunk_number=4)
        assert len(parts) == 4 + 4 + 1
        assert sum(n for n, _ in parts) == expected_a + text_file(30_000).count(b"\n")

        def describe(obj: CloudObject) -> tuple[str, int, int]:
            return obj.key, obj.part, obj.total_parts

        described = await ex.map(describe, [f"az://{container}/in/b.txt", url], obj_chunk_size=10_000)
        nb, na = -(-len(text_file(30_000)) // 10_000), -(-len(text_file(50_000)) // 10_000)
        assert described[0] == ("in/b.txt", 0, nb) and described[nb][1:] == (0, na) and len(described) == na + nb
        assert "sig=" not in repr(await ex.map(lambda obj: repr(obj), [url]))  # the SAS stays hidden


def test_the_lithops_facade_partitions_too(azurite: Azurite, container: str, text_blob: bytes) -> None:
    with FunctionExecutor(config=storage_config(azurite, container)) as fexec:
        fexec.map(count_lines, f"az://{container}/data/big.txt", obj_chunk_size=4 * 2**20)
        results = fexec.get_result()
    assert sum(n for n, _ in results) == text_blob.count(b"\n") and len(results) == -(-len(text_blob) // (4 * 2**20))


def section_only(azurite: Azurite, container: str, **lithops: object) -> dict[str, object]:
    """Blob storage configured by its section alone: no `storage: azure_storage` line."""
    config: dict[str, object] = {"azure_storage": {"connection_string": azurite.connection_string, "container": container}}
    if lithops:
        config["lithops"] = lithops
    return config


async def test_an_azure_storage_section_alone_is_enough_for_az_sources(
    azurite: Azurite, container: str, text_blob: bytes
) -> None:
    async with AsyncExecutor(config=section_only(azurite, container)) as ex:
        assert ex.config.backend == "local"
        results = await ex.map(count_lines, f"az://{container}/data/", obj_chunk_size=2**20)
        assert sum(n for n, _ in results) == text_blob.count(b"\n") and all(whole for _, whole in results)


async def test_an_azure_storage_section_alone_carries_large_payloads(azurite: Azurite, container: str) -> None:
    async with AsyncExecutor(config=section_only(azurite, container, inline_limit=0.5, keep_data=True)) as ex:
        assert await ex.submit(len, b"x" * 2**20) == 2**20
    async with Storage(load_config(section_only(azurite, container), env={})) as st:
        kept = [b.name for b in await st.list("acx/jobs/")]
    assert kept and all(name.startswith("acx/jobs/") for name in kept)  # the argument went through Blob


@pytest.mark.parametrize(
    "section, lithops, message",
    [
        ({"container": "data"}, {}, "Blob storage is not configured: set azure_storage.connection_string"),
        ({"storage_account_name": "acct"}, {},
         "storage_account_name is set but storage_account_key is not: add `storage_account_key: <a key of account acct>`"),
        ({"sas_token": "sv=x"}, {}, "sas_token is set but account_url is not: add `account_url: https://"),
        ({"connection_string": "UseDevelopmentStorage=true"}, {"storage": "localhost"},
         "lithops.storage is 'localhost' (no external storage) in the config dict; set `storage: azure_storage`"),
    ],
)  # fmt: skip
async def test_az_sources_without_usable_storage_name_the_missing_key(
    section: dict[str, str], lithops: dict[str, str], message: str
) -> None:
    async with AsyncExecutor(config={"azure_storage": section, "lithops": lithops}) as ex:
        with pytest.raises(ConfigError) as caught:
            await ex.map(count_lines, "az://data/prefix/", obj_chunk_size=2**20)
    assert str(caught.value).startswith("az://data/prefix/: reading az:// objects needs Blob storage: ")
    assert message in str(caught.value)


def test_storage_azure_storage_with_an_incomplete_section_fails_at_once_naming_the_key() -> None:
    with pytest.raises(ConfigError, match=r"storage='azure_storage' needs a usable azure_storage "
                                          r"section: .*add `storage_account_key: <a key of account acct>`"):  # fmt: skip
        AsyncExecutor(config={"lithops": {"storage": "azure_storage"}, "azure_storage": {"storage_account_name": "acct"}})
