"""Every example runs end to end, as a user would run it."""

from __future__ import annotations

import ast
import collections
import importlib.util
import math
import os
import re
import runpy
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import Azurite, storage_config

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def run(name: str, tmp_path: Path, config: dict[str, object] | None = None, argv: list[str] | None = None) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ACX_")}
    env["HOME"] = str(tmp_path)  # no user config file
    if config is not None:
        import yaml

        (tmp_path / "acx.yaml").write_text(yaml.safe_dump(config))
        env["ACX_CONFIG_FILE"] = str(tmp_path / "acx.yaml")
    r = subprocess.run(
        [sys.executable, str(EXAMPLES / name), *(argv or [])], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_quickstart_prints_1000_results(tmp_path: Path) -> None:
    out = run("quickstart.py", tmp_path).splitlines()
    results = eval(out[0])
    assert len(results) == 1000 and results[26] == 111
    assert "1000 calls" in out[1]


def test_lithops_seed_example(tmp_path: Path) -> None:
    assert run("lithops_seed.py", tmp_path).splitlines() == ["10", "[8, 9, 10]"]


def test_lithops_wait_example_collects_futures_of_two_executors(tmp_path: Path) -> None:
    out = run("lithops_wait.py", tmp_path).splitlines()
    first = out[0].removeprefix("first finished: ")
    assert first in {"1", "4", "9", "16", "25"} and out[1] == "[1, 4, 9, 16, 25]"  # (which is first: timing)


def test_lithops_retries_example_gets_every_result(tmp_path: Path) -> None:
    out = run("lithops_retries.py", tmp_path).splitlines()
    assert out[0] == "[0, 10, 20, 30, 40, 50, 60, 70]" and out[1].endswith("failed attempts were retried")


def test_async_patterns_example(tmp_path: Path) -> None:
    out = run("async_patterns.py", tmp_path)
    assert "pow: 1048576" in out and "caught: 5 is a multiple of five" in out
    assert "with a timeout: [0.1, 'CallTimeoutError', 0.2]" in out
    assert "after cancel: [0.01, 0.01, 0.01, 0.01]" in out


def test_wordcount_over_blob_storage_example(tmp_path: Path, azurite: Azurite, container: str) -> None:
    out = run("wordcount_blob.py", tmp_path, storage_config(azurite, container))
    assert out.startswith("2000000 words; most common:")


def test_custom_runtime_example_runs_or_names_the_missing_package(tmp_path: Path) -> None:
    out = run("custom_runtime/numpy_job.py", tmp_path)
    if importlib.util.find_spec("numpy") is None:  # the local runtime has what this Python has
        assert out == "this runtime lacks numpy: build and deploy examples/custom_runtime/Dockerfile\n"
    else:
        assert out.startswith("100 spectra, peak bins: [100")


def load(name: str) -> dict[str, object]:
    """An example's globals, its ``if __name__ == "__main__"`` part not run (and no .pyc written)."""
    return runpy.run_path(str(EXAMPLES / name), run_name="example")


def test_wordcount_with_map_reduce_example(tmp_path: Path) -> None:
    sample = str(load("wordcount.py")["SAMPLE"])
    expected = collections.Counter(sample.lower().split())
    out = run("wordcount.py", tmp_path).splitlines()
    assert out == [
        f"{sum(expected.values())} words, {len(expected)} distinct, in 20 chunks",
        f"most common: {expected.most_common(3)}",
    ]
    (tmp_path / "text.txt").write_text("To be, or not to be\nthat is the question\n")
    out = run("wordcount.py", tmp_path, argv=[str(tmp_path / "text.txt")]).splitlines()
    assert out == ["10 words, 9 distinct, in 1 chunks", "most common: [('to', 2), ('be,', 1), ('or', 1)]"]


def test_montecarlo_pi_example_is_close_to_pi(tmp_path: Path) -> None:
    out = run("montecarlo_pi.py", tmp_path).splitlines()
    m = re.fullmatch(r"pi ~ (\d\.\d{6}) from 20,000,000 points in 40 calls \(error \d\.\d{6}\)", out[0])
    assert m, out
    assert abs(float(m.group(1)) - math.pi) < 0.05
    assert re.fullmatch(r"41 calls \(the reduce included\) succeeded in \d+\.\d\d s", out[1]), out


def test_stragglers_example_hedges_every_stalled_call(tmp_path: Path) -> None:
    out = run("stragglers.py", tmp_path).splitlines()
    assert re.fullmatch(r"200 results in \d+\.\d s \(8 calls stalled 5 s on their first attempt\)", out[0]), out
    m = re.fullmatch(r"hedges: (\d+) backups sent, (\d+) answered first", out[1])
    assert m, out
    sent, won = int(m.group(1)), int(m.group(2))
    assert won >= 8 and sent >= won  # each stalled call's backup answered first


#: Every file in examples/ and the test that runs or checks it (notebooks: tests/test_notebooks.py).
COVERED = {
    "quickstart.py": "test_examples.py::test_quickstart_prints_1000_results",
    "lithops_seed.py": "test_examples.py::test_lithops_seed_example",
    "lithops_wait.py": "test_examples.py::test_lithops_wait_example_collects_futures_of_two_executors",
    "lithops_retries.py": "test_examples.py::test_lithops_retries_example_gets_every_result",
    "async_patterns.py": "test_examples.py::test_async_patterns_example",
    "wordcount.py": "test_examples.py::test_wordcount_with_map_reduce_example",
    "montecarlo_pi.py": "test_examples.py::test_montecarlo_pi_example_is_close_to_pi",
    "stragglers.py": "test_examples.py::test_stragglers_example_hedges_every_stalled_call",
    "wordcount_blob.py": "test_examples.py::test_wordcount_over_blob_storage_example",
    "custom_runtime/numpy_job.py": "test_examples.py::test_custom_runtime_example_runs_or_names_the_missing_package",
    # built by `acx runtime build` with a recording engine (never a real build here)
    "custom_runtime/Dockerfile": "test_images.py::test_a_users_dockerfile_keeps_its_directory_as_the_context",
    "custom_runtime/requirements.txt": "test_images.py::test_a_users_dockerfile_keeps_its_directory_as_the_context",
    "notebooks/async_quickstart.ipynb": "test_notebooks.py::test_async_quickstart_notebook_awaits_at_top_level",
    "notebooks/lithops_facade.ipynb": "test_notebooks.py::test_lithops_facade_notebook_inside_a_running_loop",
}


def example_files() -> list[str]:
    """Every file under examples/ but caches (__pycache__, Jupyter's .ipynb_checkpoints)."""
    files = (p.relative_to(EXAMPLES) for p in EXAMPLES.rglob("*") if p.is_file())
    return sorted(p.as_posix() for p in files if not {"__pycache__", ".ipynb_checkpoints"} & set(p.parts))


@pytest.mark.parametrize("path", example_files())
def test_every_example_is_covered_by_a_test(path: str) -> None:
    assert path in COVERED, f"examples/{path} has no test"
    test_file, test_name = COVERED[path].split("::")
    source = (Path(__file__).resolve().parent / test_file).read_text()
    assert f"def {test_name}(" in source, f"examples/{path}: {COVERED[path]} does not exist"


@pytest.mark.parametrize("path", sorted(p.relative_to(EXAMPLES).as_posix() for p in EXAMPLES.rglob("*.py")))
def test_every_example_says_what_it_shows_and_how_to_run_it(path: str) -> None:
    doc = ast.get_docstring(ast.parse((EXAMPLES / path).read_text()))
    assert doc, f"examples/{path} has no module docstring"
    assert f"python examples/{path}" in doc, f"examples/{path}: the docstring does not say how to run it"
