"""Every example runs end to end, as a user would run it."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import Azurite, storage_config

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def run(name: str, tmp_path: Path, config: dict[str, object] | None = None) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ACX_")}
    env["HOME"] = str(tmp_path)  # no user config file
    if config is not None:
        import yaml

        (tmp_path / "acx.yaml").write_text(yaml.safe_dump(config))
        env["ACX_CONFIG_FILE"] = str(tmp_path / "acx.yaml")
    r = subprocess.run([sys.executable, str(EXAMPLES / name)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_quickstart_prints_1000_results(tmp_path: Path) -> None:
    out = run("quickstart.py", tmp_path).splitlines()
    results = eval(out[0])
    assert len(results) == 1000 and results[26] == 111
    assert "1000 calls" in out[1]


def test_lithops_seed_example(tmp_path: Path) -> None:
    assert run("lithops_seed.py", tmp_path).splitlines() == ["10", "[8, 9, 10]"]


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


@pytest.mark.parametrize("path", sorted(p.relative_to(EXAMPLES).as_posix() for p in EXAMPLES.rglob("*.py")))
def test_every_example_is_covered_by_a_test(path: str) -> None:
    tested = {"quickstart.py", "lithops_seed.py", "async_patterns.py", "wordcount_blob.py", "custom_runtime/numpy_job.py"}
    assert path in tested, f"examples/{path} has no test"
