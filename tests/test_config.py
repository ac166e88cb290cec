"""daemon.config: defaults, messages with key paths, path resolution, the example file."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from tomolive.daemon.config import (
    Config,
    ConfigError,
    load_config,
    model_fields_tree,
)

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "config.example.yaml"


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return path


def test_defaults_without_file(tmp_path):
    config = load_config(None, tmp_path)
    assert [w.path for w in config.watch] == [tmp_path / "incoming"]
    assert config.watch[0].patterns == ["*.mrc", "*.rec"]
    assert config.watch[0].recursive is True
    assert config.output_dir == tmp_path / "outputs"
    assert config.models_dir == tmp_path / "models"
    assert (config.metrics.host, config.metrics.port) == ("127.0.0.1", 9847)
    assert config.model == "newest" and config.devices == "auto" and config.order == "newest_first"
    assert config.heartbeat_interval_seconds == pytest.approx(config.lease_seconds / 4)


def test_relative_paths_resolve_against_the_config_folder(tmp_path):
    path = _write(
        tmp_path,
        "watch:\n  - path: data/in\n    voxel_size_a: 13.2\noutput_dir: ../shared/out\n"
        "models_dir: /abs/models\ndevices: [0, 1]\nlease_seconds: 8\n",
    )
    config = load_config(path, Path("/somewhere/else"))
    assert config.watch[0].path == tmp_path / "data" / "in"
    assert config.watch[0].voxel_size_a == 13.2
    assert config.output_dir == tmp_path.parent / "shared" / "out"
    assert config.models_dir == Path("/abs/models")
    assert config.devices == [0, 1]
    assert config.heartbeat_interval_seconds == 2.0


def test_empty_file_gives_defaults(tmp_path):
    assert load_config(_write(tmp_path, ""), None) == load_config(None, tmp_path)


def test_unknown_keys_and_wrong_types_name_the_key_path(tmp_path):
    path = _write(
        tmp_path,
        "watch:\n  - path: x\n    settle_seconds: 3\nmetrics: {port: abc}\nrecursive: true\n"
        "max_attempts: 2.5\n",
    )
    with pytest.raises(ConfigError) as info:
        load_config(path)
    lines = str(info.value).splitlines()
    assert f"{path}: watch.0.settle_seconds: unknown key" in lines
    assert f"{path}: metrics.port: Input should be a valid integer" in lines
    assert f"{path}: recursive: unknown key" in lines
    assert f"{path}: max_attempts: Input should be a valid integer" in lines
    assert len(lines) == 4


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("devices: gpu\n",
         "devices: must be 'auto', 'cpu' or a list of distinct GPU ids such as [0, 1]"),
        ("devices: [0, 0]\n", "devices: must be 'auto', 'cpu' or a list of distinct GPU ids"),
        ("discovery: inotify\n", "discovery: Input should be 'auto', 'events' or 'polling'"),
        ("order: random\n", "order: Input should be 'newest_first' or 'oldest_first'"),
        ("model: ../evil.safetensors\n",
         "model: must be 'newest' or a file name inside models_dir"),
        ("watch: []\n", "watch: List should have at least 1 item"),
        ("watch:\n  - patterns: ['*.mrc']\n", "watch.0.path: Field required"),
        ("watch:\n  - {path: a, voxel_size_a: 0}\n",
         "watch.0.voxel_size_a: Input should be greater than 0"),
        ("metrics: {port: 70000}\n", "metrics.port: Input should be less than or equal to 65535"),
        ("resegment_on_model_change: maybe\n",
         "resegment_on_model_change: Input should be a valid boolean"),
        ("lease_seconds: 10\nheartbeat_interval_seconds: 10\n",
         "heartbeat_interval_seconds (10) must be shorter than lease_seconds (10)"),
        ("inference: {batch_size: 0}\n",
         "inference.batch_size: Input should be greater than or equal to 1"),
        ("- a\n- b\n", "must be a mapping of settings, not list"),
        ("voxel_size_bounds_a: [50, 1.5]\n",
         "voxel_size_bounds_a: must be [low, high] with 0 < low < high, not [50, 1.5]"),
        ("voxel_size_bounds_a: [2]\n", "voxel_size_bounds_a.1: Field required"),
        ("watch:\n  - {path: a, voxel_size_a: 0.1}\n",
         "watch.0.voxel_size_a 0.1 Å is outside voxel_size_bounds_a [1.5, 50]"),
        ("max_model_voxels: 0\n", "max_model_voxels: Input should be greater than or equal to 1"),
    ],
)
def test_bad_values_are_rejected_with_a_clear_message(tmp_path, text, expected):
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert message.startswith(f"{path}: ")
    assert expected in message


def test_invalid_yaml_and_missing_file(tmp_path):
    path = _write(tmp_path, "watch: [\n")
    with pytest.raises(ConfigError, match=r"config.yaml: invalid YAML at line \d+, column \d+"):
        load_config(path)
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as info:
        load_config(missing)
    assert str(info.value) == f"{missing}: cannot read (No such file or directory)"


def _keys(tree: dict, prefix: str = "") -> set[str]:
    out = set()
    for name, sub in tree.items():
        out.add(prefix + name)
        if isinstance(sub, dict):
            out |= _keys(sub, prefix + name + ".")
    return out


def _yaml_keys(data, prefix: str = "") -> set[str]:
    out = set()
    if isinstance(data, dict):
        for name, sub in data.items():
            out.add(prefix + name)
            out |= _yaml_keys(sub, prefix + name + ".")
    elif isinstance(data, list):
        for item in data:
            out |= _yaml_keys(item, prefix)
    return out


def test_example_file_documents_every_setting_with_its_default():
    config = load_config(EXAMPLE)
    # The example's active values are exactly the defaults (its extra examples are commented out).
    assert config == load_config(None, EXAMPLE.parent)
    documented = _yaml_keys(yaml.safe_load(EXAMPLE.read_text()))
    schema = _keys(model_fields_tree(Config))
    assert schema - documented == set()
    assert documented - schema == set()


def test_devices_give_one_worker_entry_per_process(tmp_path):
    """Every listed GPU gets `workers_per_gpu` workers; a CPU host gets `cpu_workers`."""
    from tomolive.daemon.service import resolve_devices

    gpus = load_config(_write(tmp_path, "devices: [0, 2]\nworkers_per_gpu: 2\n"), tmp_path)
    assert resolve_devices(gpus) == ["cuda:0", "cuda:0", "cuda:2", "cuda:2"]
    cpu = load_config(_write(tmp_path, "devices: cpu\ncpu_workers: 3\n"), tmp_path)
    assert resolve_devices(cpu) == ["cpu"] * 3


def test_plausibility_bounds_defaults_and_override(tmp_path):
    from tomolive.core.volume import DEFAULT_MAX_MODEL_VOXELS, DEFAULT_VOXEL_SIZE_BOUNDS_A

    defaults = load_config(None, tmp_path)
    assert defaults.voxel_size_bounds_a == DEFAULT_VOXEL_SIZE_BOUNDS_A == (1.5, 50.0)
    assert defaults.max_model_voxels == DEFAULT_MAX_MODEL_VOXELS
    path = _write(tmp_path, "voxel_size_bounds_a: [0.5, 80]\nmax_model_voxels: 1000000\n"
                            "watch:\n  - {path: a, voxel_size_a: 0.8}\n")
    config = load_config(path)
    assert config.voxel_size_bounds_a == (0.5, 80.0) and config.max_model_voxels == 10**6
    assert config.watch[0].voxel_size_a == 0.8  # within the widened bounds
