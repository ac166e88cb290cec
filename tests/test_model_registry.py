"""daemon.models.ModelRegistry on a real models folder: validation, choice, rejection, fallback
to the shipped default, the cache."""

from __future__ import annotations

import os

from tomolive.daemon.model_registry import ModelRegistry

from .daemon_harness import write_tiny_model


def _registry(tmp_path, **kwargs):
    rejected = []
    registry = ModelRegistry(tmp_path / "models", tmp_path / "cache", settle_s=0.0,
                             on_rejected=lambda path, reason: rejected.append((path.name, reason)),
                             **kwargs)
    (tmp_path / "models").mkdir(exist_ok=True)
    return registry, rejected


def _set_mtime(path, seconds_ago: int) -> None:
    now = os.stat(path).st_mtime
    os.utime(path, (now - seconds_ago, now - seconds_ago))


def test_the_shipped_default_serves_until_a_valid_bundle_arrives(tmp_path):
    default = write_tiny_model(tmp_path / "default.safetensors", name="default")
    registry, rejected = _registry(tmp_path, default_bundle=default)
    assert registry.poll().name == "default"
    assert registry.poll() is None  # no change, no new model
    write_tiny_model(tmp_path / "models" / "m1.safetensors", name="m1")
    served = registry.poll()
    assert served.name == "m1" and served.classes[0] == "membrane"
    assert served.cached_path.parent == tmp_path / "cache" and served.cached_path.exists()
    assert rejected == []


def test_the_newest_valid_bundle_is_chosen_and_a_pinned_one_wins(tmp_path):
    models = tmp_path / "models"
    registry, _ = _registry(tmp_path)
    write_tiny_model(models / "old.safetensors", name="old", seed=1)
    write_tiny_model(models / "new.safetensors", name="new", seed=2)
    _set_mtime(models / "old.safetensors", 3600)
    assert registry.poll().name == "new"
    pinned, _ = _registry(tmp_path, policy="old.safetensors")
    assert pinned.poll().name == "old"


def test_a_bad_bundle_is_rejected_with_its_reason_and_the_current_model_keeps_serving(tmp_path):
    registry, rejected = _registry(tmp_path)
    write_tiny_model(tmp_path / "models" / "good.safetensors", name="good")
    assert registry.poll().name == "good"
    bad = tmp_path / "models" / "zz-bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    assert registry.poll() is None and registry.current.name == "good"
    assert [name for name, _ in rejected] == ["zz-bad.safetensors"]
    assert "\n" not in rejected[0][1] and rejected[0][1]
    registry.poll()
    assert len(rejected) == 1  # judged once, not at every poll
    assert not list((tmp_path / "cache").glob(".incoming-*"))  # its copy is gone


def test_a_model_taken_out_of_service_gives_way_to_the_next_best(tmp_path):
    default = write_tiny_model(tmp_path / "default.safetensors", name="default")
    registry, rejected = _registry(tmp_path, default_bundle=default)
    write_tiny_model(tmp_path / "models" / "m1.safetensors", name="m1")
    m1 = registry.poll()
    assert registry.has_alternative(m1)
    registry.take_out_of_service(m1, "failed on 3 tomograms in a row")
    assert registry.poll().name == "default"
    assert rejected == [("m1.safetensors", "failed on 3 tomograms in a row")]


def test_prune_cache_keeps_what_is_serving_valid_or_in_use(tmp_path):
    registry, _ = _registry(tmp_path)
    write_tiny_model(tmp_path / "models" / "m1.safetensors", name="m1", seed=1)
    first = registry.poll()
    write_tiny_model(tmp_path / "models" / "m1.safetensors", name="m1", seed=2, version=2)
    second = registry.poll()  # the file changed: a new copy, the old one no longer valid
    assert second.sha256 != first.sha256
    assert registry.prune_cache(in_use={first.sha256}) == 0  # a job in flight still needs it
    assert registry.prune_cache(in_use=set()) == 1
    assert not first.cached_path.exists() and second.cached_path.exists()
