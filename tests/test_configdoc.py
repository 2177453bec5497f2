"""The configuration reference: generated from the models, and docs/configuration.md's copy kept current."""

from __future__ import annotations

import functools
import re
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import BaseModel, Field, SecretStr

from async_ca_exec import configdoc
from async_ca_exec.config import ENV_VARS, Config

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / configdoc.DOC


def section_text(reference: str, name: str) -> str:
    """The part of the reference under ``### `name```, up to the next heading."""
    match = re.search(rf"^#+ `{re.escape(name)}`.*?(?=^#+ `|\Z)", reference, re.S | re.M)
    assert match, f"no section {name} in the reference"
    return match.group(0)


def test_the_configuration_page_holds_the_current_reference() -> None:
    block = configdoc.extract(DOC.read_text())
    assert block is not None, f"{configdoc.DOC} lacks the markers {configdoc.START} ... {configdoc.END}"
    assert block == configdoc.render(), (
        f"{configdoc.DOC}'s configuration reference differs from async_ca_exec/config.py; regenerate it: {configdoc.REGENERATE}"
    )


def test_the_reference_lives_in_docs_not_in_readme() -> None:
    assert configdoc.REGENERATE == "python -m async_ca_exec.configdoc --update docs/configuration.md"
    readme = (ROOT / "README.md").read_text()
    assert configdoc.START not in readme and configdoc.END not in readme
    assert "docs/configuration.md" in readme  # linked from README's documentation list


def test_check_and_update_default_to_the_configuration_page(tmp_path: Path) -> None:
    (tmp_path / "docs").mkdir()
    page = tmp_path / configdoc.DOC
    page.write_text(f"# Configuration\n\n{configdoc.START}\nstale\n{configdoc.END}\n")
    run = functools.partial(subprocess.run, capture_output=True, text=True, timeout=60, cwd=tmp_path)
    r = run([sys.executable, "-m", "async_ca_exec.configdoc", "--check"])
    assert r.returncode == 1 and configdoc.REGENERATE in r.stderr
    assert run([sys.executable, "-m", "async_ca_exec.configdoc", "--update"]).returncode == 0
    assert configdoc.extract(page.read_text()) == configdoc.render()
    assert run([sys.executable, "-m", "async_ca_exec.configdoc", "--check"]).returncode == 0


def test_every_field_of_every_section_is_in_the_reference() -> None:
    reference = configdoc.render()
    sections = [
        name
        for name, field in Config.model_fields.items()
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)
    ]
    assert sections == ["lithops", "localhost", "azure", "azure_containers", "azure_storage", *sections[5:]]
    for name in sections:
        model = Config.model_fields[name].annotation
        assert isinstance(model, type) and issubclass(model, BaseModel)
        text = section_text(reference, name)
        for key, field in model.model_fields.items():
            row = next((line for line in text.splitlines() if line.startswith(f"| `{key}` |")), None)
            assert row is not None, f"{name}.{key} is missing from the reference"
            assert row.count(" | ") == 4, row  # key, type, default, environment / argument, meaning
            if field.description:
                assert configdoc._cell(field.description) in row


def test_every_field_has_a_description() -> None:
    assert configdoc.undocumented() == [], "give these fields a description= in async_ca_exec/config.py"


def test_rows_carry_type_default_and_the_variable_that_sets_them() -> None:
    reference = configdoc.render()
    lithops = section_text(reference, "lithops")
    assert "| `backend` | str | `local` | `ACX_BACKEND`, `backend=` |" in lithops
    assert "| `retries` | int (>= 0, <= 100) | `4` | `ACX_RETRIES`, `retries=` |" in lithops
    assert "| `execution_timeout` | float (> 0) | unset | `ACX_TIMEOUT`, `timeout=` |" in lithops
    azure = section_text(reference, "azure_containers")
    assert "| `runtime_memory` | int | `512` | `ACX_RUNTIME_MEMORY`, `runtime_memory=` (backend `azure`) |" in azure
    assert "| `builder` | one of `auto`, `docker`, `podman`, `buildah`, `acr` | `auto` | `ACX_BUILDER` |" in azure
    assert "| `build_options` | list of str | `[]` |" in azure
    local = section_text(reference, "localhost")
    assert local.startswith("### `localhost` (alias `local`)")
    assert "| `runtime_timeout` | float (> 0) | `3600` | `ACX_RUNTIME_TIMEOUT`, `runtime_timeout=` (backend `local`) |" in local
    for name, (key, section) in ENV_VARS.items():  # every variable appears on its key's row
        for target in [section] if section else ["localhost", "azure_containers"]:
            assert re.search(rf"^\| `{key}` \|[^\n]*`{name}`", section_text(reference, target), re.M), (name, target)


class _Inner(BaseModel):
    """A nested section."""

    token: SecretStr = Field(SecretStr("hunter2-secret-default"), description="A secret with a default.")
    plain: int = Field(3, description="Pipes | and <tags> are escaped; `<code>` is not.")


class _Outer(BaseModel):
    inner: _Inner = Field(default_factory=_Inner)
    other: _Inner = Field(default_factory=_Inner)


class _Root(BaseModel):
    outer: _Outer = Field(default_factory=_Outer)
    password: _Inner = Field(default_factory=_Inner)


def test_any_model_tree_is_walked_and_secret_defaults_never_shown() -> None:
    reference = configdoc.render(_Root)
    assert [s.name for s in configdoc.collect(_Root)] == ["outer", "outer.inner", "outer.other", "password"]
    assert "#### `outer.inner`" in reference and "### `password`" in reference
    assert "hunter2" not in reference
    assert "| `token` | secret str | *(hidden)* |" in reference
    assert r"| `plain` | int | `3` |  | Pipes \| and &lt;tags> are escaped; `<code>` is not. |" in reference
    assert "| `docker_password` | secret str | unset |" in configdoc.render()


def test_update_and_check_rewrite_only_the_marked_block(tmp_path: Path) -> None:
    doc = tmp_path / "doc.md"
    doc.write_text(f"# Title\n\nbefore\n\n{configdoc.START}\nstale\n{configdoc.END}\n\nafter\n")

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "async_ca_exec.configdoc", *args], capture_output=True, text=True,
                              timeout=60)  # fmt: skip

    r = run("--check", str(doc))
    assert r.returncode == 1 and f"python -m async_ca_exec.configdoc --update {doc}" in r.stderr
    assert run("--update", str(doc)).returncode == 0
    text = doc.read_text()
    assert text.startswith("# Title\n\nbefore\n\n") and text.endswith(f"{configdoc.END}\n\nafter\n")
    assert configdoc.extract(text) == configdoc.render() and run("--check", str(doc)).returncode == 0
    assert run().stdout == configdoc.render()
    doc.write_text("no markers\n")
    r = run("--update", str(doc))
    assert r.returncode == 1 and "markers" in r.stderr and doc.read_text() == "no markers\n"


@pytest.mark.parametrize("bad", ["", f"{configdoc.END}\n{configdoc.START}"])
def test_missing_or_misordered_markers_are_reported(bad: str) -> None:
    assert configdoc.extract(bad) is None
    with pytest.raises(ValueError, match="markers"):
        configdoc.replace(bad, "x")
