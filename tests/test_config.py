"""Configuration: precedence, Lithops compatibility, and errors that name the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from async_ca_exec import ConfigError, load_config
from async_ca_exec.config import ALLOWED_MEMORY, default_local_layout, memory_pair


def test_nothing_configured_means_the_local_backend(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    cfg = load_config(env={})
    assert cfg.backend == "local" and cfg.lithops.storage is None and cfg.source == "defaults"
    assert cfg.max_concurrency == 64 and cfg.retries == 4


def test_lithops_config_dict_is_accepted() -> None:
    cfg = load_config({"lithops": {"backend": "localhost", "storage": "localhost"}}, env={})
    assert cfg.backend == "local" and cfg.lithops.storage is None


@pytest.mark.parametrize(
    ("name", "expected"), [("local", "local"), ("localhost", "local"), ("azure", "azure"), ("azure_containers", "azure")]
)
def test_backend_aliases(name: str, expected: str) -> None:
    assert load_config(arguments={"backend": name}, env={}).backend == expected


def test_lithops_config_file_is_accepted_unchanged(tmp_path: Path) -> None:
    path = tmp_path / "lithops.yaml"
    path.write_text("""
lithops:
    backend: azure_containers
    storage: azure_storage
    monitoring: storage
    data_limit: 4
azure:
    resource_group: rg
    location: westeurope
azure_containers:
    runtime_memory: 1024
    invoke_pool_threads: 32
    trigger: pub/sub
azure_storage:
    storage_account_name: acct
    storage_account_key: c2VjcmV0
aws:
    region: us-east-1
""")
    with pytest.warns(UserWarning, match="'aws'"):
        cfg = load_config(path, env={})
    assert cfg.backend == "azure" and cfg.lithops.storage == "azure_storage"
    assert cfg.azure.region == "westeurope" and cfg.runtime_memory == 1024
    assert cfg.azure_storage.storage_account_key is not None
    assert "c2VjcmV0" not in repr(cfg) and "c2VjcmV0" not in str(cfg)


def test_arguments_beat_environment_which_beats_the_file(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("lithops:\n  max_concurrency: 10\n  retries: 1\nlocalhost:\n  runtime_memory: 1024\n")
    cfg = load_config(path, env={"ACX_MAX_CONCURRENCY": "20", "ACX_RUNTIME_MEMORY": "2048"}, arguments={"max_concurrency": 30})
    assert cfg.max_concurrency == 30 and cfg.runtime_memory == 2048 and cfg.retries == 1
    cfg = load_config(path, env={"ACX_MAX_CONCURRENCY": "20"})
    assert cfg.max_concurrency == 20 and cfg.runtime_memory == 1024


def test_config_file_is_found_through_the_environment(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("lithops:\n  retries: 7\n")
    assert load_config(env={"ACX_CONFIG_FILE": str(path)}).retries == 7


def test_default_config_file_in_the_home_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    conf = tmp_path / ".config" / "async-ca-exec"
    conf.mkdir(parents=True)
    (conf / "config.yaml").write_text("lithops:\n  retries: 2\n")
    cfg = load_config(env={})
    assert cfg.retries == 2 and "config.yaml" in cfg.source


def test_runtime_memory_lands_in_the_active_backend_section() -> None:
    cfg = load_config(arguments={"backend": "azure", "runtime_memory": 4096}, env={"ACX_RUNTIME_MEMORY": "1024"})
    assert cfg.azure_containers.runtime_memory == 4096 and cfg.localhost.runtime_memory is None
    assert memory_pair(4096) == (2.0, "4Gi") and memory_pair(512) == (0.25, "0.5Gi")


def test_runtime_memory_outside_the_allowed_set_names_the_allowed_values() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(arguments={"runtime_memory": 1000}, env={})
    msg = str(info.value)
    assert "runtime_memory=1000" in msg and "512, 1024, 1536" in msg and "8192" in msg
    assert "runtime_memory argument" in msg
    with pytest.raises(ConfigError, match="ACX_RUNTIME_MEMORY"):
        load_config(env={"ACX_RUNTIME_MEMORY": "100"})
    assert ALLOWED_MEMORY[0] == 512 and ALLOWED_MEMORY[-1] == 8192 and len(ALLOWED_MEMORY) == 16


def test_unknown_key_in_our_section_is_an_error_with_a_suggestion() -> None:
    with pytest.raises(ConfigError) as info:
        load_config({"azure_containers": {"runtime_memroy": 1024}}, env={})
    msg = str(info.value)
    assert "runtime_memroy" in msg and "azure_containers" in msg and "did you mean 'runtime_memory'" in msg


def test_unknown_section_is_an_error_but_other_lithops_clouds_only_warn() -> None:
    with pytest.raises(ConfigError, match="did you mean 'azure_containers'"):
        load_config({"azure_container": {}}, env={})
    with pytest.warns(UserWarning, match="ibm_cf"):
        load_config({"ibm_cf": {"endpoint": "x"}}, env={})


def test_bad_values_name_the_key_and_the_source() -> None:
    with pytest.raises(ConfigError, match=r"lithops.max_concurrency.*config dict"):
        load_config({"lithops": {"max_concurrency": 0}}, env={})
    with pytest.raises(ConfigError, match="ACX_RETRIES"):
        load_config(env={"ACX_RETRIES": "many"})
    with pytest.raises(ConfigError, match="log_level"):
        load_config(arguments={"log_level": "LOUD"}, env={})
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("/nonexistent/acx.yaml", env={})


@pytest.mark.parametrize(
    "section",
    [
        {"azure_storage": {"storage_account_key": 123456789}},
        {"azure_containers": {"docker_password": 123456789}},
        {"azure_storage": {"connection_string": [123456789]}},
        {"azure_storage": {"sas_token": 123456789}},
    ],
)
def test_secrets_never_appear_in_config_errors(section: dict[str, dict[str, object]]) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(section, env={})
    assert "123456789" not in str(info.value) and "***" in str(info.value)


def test_unknown_environment_variables_warn() -> None:
    with pytest.warns(UserWarning, match="ACX_BAKCEND.*ACX_BACKEND"):
        load_config(env={"ACX_BAKCEND": "azure"})


def test_local_layout_defaults_to_a_replica_per_four_cpus_sharing_them() -> None:
    assert default_local_layout(load_config(env={}), cpus=2) == (1, 2)
    assert default_local_layout(load_config(env={}), cpus=8) == (2, 4)
    assert default_local_layout(load_config(env={}), cpus=1) == (1, 1)
    assert default_local_layout(load_config(env={}), cpus=6) == (1, 6)
    cfg = load_config({"localhost": {"replicas": 3, "worker_processes": 5}}, env={})
    assert default_local_layout(cfg, cpus=2) == (3, 5)
    assert load_config({"local": {"replicas": 4}}, env={}).localhost.replicas == 4


def test_timeout_is_capped_by_runtime_timeout() -> None:
    cfg = load_config({"localhost": {"runtime_timeout": 100}}, arguments={"timeout": 50}, env={})
    assert cfg.call_timeout == 50
    assert load_config({"localhost": {"runtime_timeout": 100}}, env={}).call_timeout == 100


def test_invalid_yaml_is_one_line_with_its_position(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("lithops:\n  backend: local\n azure:\n  x: 1\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    message = str(info.value)
    assert "\n" not in message and f"config file {path} is not valid YAML: line 3, column 2: " in message, message


def test_a_key_in_the_wrong_section_says_where_it_belongs() -> None:
    with pytest.raises(ConfigError) as info:
        load_config({"azure_containers": {"arm_endpoint": "https://x", "arm_retries": 0}}, env={})
    assert str(info.value) == (
        "key 'arm_endpoint' in section 'azure_containers' (the config dict) belongs in section 'azure': move it there; "
        "key 'arm_retries' in section 'azure_containers' (the config dict) belongs in section 'azure': move it there"
    )


UAI = "/subscriptions/0000/resourceGroups/rg-id/providers/Microsoft.ManagedIdentity/userAssignedIdentities/acr-puller"


@pytest.mark.parametrize(("given", "kept"), [(UAI, UAI), ("System", "system"), (UAI.lower(), UAI.lower())])
def test_registry_identity_takes_a_user_assigned_identity_id_or_system(given: str, kept: str) -> None:
    assert load_config({"azure_containers": {"registry_identity": given}}, env={}).azure_containers.registry_identity == kept


@pytest.mark.parametrize(
    "bad", ["acr-puller", "/subscriptions/0000/resourceGroups/rg-id/providers/Microsoft.App/containerApps/x", f"{UAI}/extra"]
)
def test_a_registry_identity_of_another_shape_names_the_shape_and_how_to_get_it(bad: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config({"azure_containers": {"registry_identity": bad}}, env={})
    text = str(info.value)
    assert text.startswith(f"azure_containers.registry_identity={bad!r} is neither `system` nor")
    assert "Microsoft.ManagedIdentity/userAssignedIdentities/<name>" in text and "az identity show" in text
