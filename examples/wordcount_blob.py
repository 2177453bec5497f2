"""Word count over a text file in Azure Blob storage: partitioned reads and map_reduce.

Needs Blob storage configured (an azure_storage section, or ACX_CONFIG_FILE pointing at one);
Azurite works too. Uploads a sample text unless a blob is named:

    python examples/wordcount_blob.py [az://container/path/to/text.txt]
"""

import asyncio
import collections
import sys

from async_ca_exec import AsyncExecutor, Storage

SAMPLE = "\n".join(f"line {i}: the quick brown fox jumps over the lazy dog {i % 7}" for i in range(200_000)) + "\n"


def count_words(obj):
    """One partition: its lines are whole (a line belongs to the partition it starts in)."""
    counts = collections.Counter()
    for line in obj.data_stream:
        counts.update(line.decode().split()[2:])
    return counts


def merge(partials):
    total = collections.Counter()
    for c in partials:
        total.update(c)
    return total


async def main() -> None:
    async with AsyncExecutor() as ex:
        if len(sys.argv) > 1:
            source = sys.argv[1]
        else:
            async with Storage(ex.config) as st:
                await st.put("examples/sample.txt", SAMPLE.encode())
                source = f"az://{st.container}/examples/sample.txt"
        counts = await ex.map_reduce(count_words, source, merge, obj_chunk_size=1 << 20)
        print(f"{sum(counts.values())} words; most common: {counts.most_common(3)}")
        if len(sys.argv) == 1:
            assert counts == merge([collections.Counter(w for line in SAMPLE.splitlines() for w in line.split()[2:])])
            async with Storage(ex.config) as st:
                await st.delete("examples/sample.txt")


if __name__ == "__main__":
    asyncio.run(main())
