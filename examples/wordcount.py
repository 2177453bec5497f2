"""Word count with map_reduce on the embedded local runtime: split a text, count each chunk, merge.

Each chunk of lines is counted by one remote call; the merge runs remotely too, on the list of
partial counts, and only the merged count comes back. Nothing to configure:

    python examples/wordcount.py [FILE]

Without FILE it counts a generated sample text and checks the answer against a local count.
For text that lives in Azure Blob storage, see examples/wordcount_blob.py.
"""

import asyncio
import collections
import sys

from async_ca_exec import AsyncExecutor

SAMPLE = "\n".join(f"the quick brown fox jumps over the lazy dog {'again ' * (i % 3)}{i % 5}" for i in range(10_000))


def count_words(lines: list[str]) -> collections.Counter:
    """Map: the words of one chunk of lines."""
    counts: collections.Counter = collections.Counter()
    for line in lines:
        counts.update(line.lower().split())
    return counts


def merge_counts(partials: list[collections.Counter]) -> collections.Counter:
    """Reduce: add up the chunks' counts."""
    total: collections.Counter = collections.Counter()
    for c in partials:
        total.update(c)
    return total


def chunked(lines: list[str], size: int) -> list[list[str]]:
    return [lines[i : i + size] for i in range(0, len(lines), size)]


async def main(text: str) -> None:
    chunks = chunked(text.splitlines(), 500)
    async with AsyncExecutor() as ex:
        counts = await ex.map_reduce(count_words, chunks, merge_counts)
    print(f"{sum(counts.values())} words, {len(counts)} distinct, in {len(chunks)} chunks")
    print("most common:", counts.most_common(3))
    if text is SAMPLE:
        assert counts == collections.Counter(SAMPLE.lower().split())


if __name__ == "__main__":
    if len(sys.argv) > 1:
        with open(sys.argv[1], encoding="utf-8") as f:
            asyncio.run(main(f.read()))
    else:
        asyncio.run(main(SAMPLE))
