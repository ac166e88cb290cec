"""core.model: the 2.5D U-Net, BatchNorm fusion, FLOP count and the safetensors bundle."""

from __future__ import annotations

import hashlib
import json
import pickle
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from tomolive.core.classes import default_class
from tomolive.core.model import (
    BundleError,
    BundleMeta,
    ModelBundle,
    UNet25D,
    architecture_dict,
    build_network,
    default_bundle_path,
    flops_per_voxel,
    fuse_for_inference,
    load_bundle,
    save_bundle,
    weights_sha256,
)
from torch.utils.flop_counter import FlopCounterMode

TINY = architecture_dict(in_slices=5, n_classes=3, base_width=4, levels=5)
pytestmark = pytest.mark.usefixtures("one_torch_thread")




def _randomise_batchnorm(network: torch.nn.Module, seed: int = 0) -> None:
    """Non-trivial BatchNorm statistics, so that fusion is actually exercised."""
    gen = torch.Generator().manual_seed(seed)
    for module in network.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            n = module.num_features
            module.running_mean.copy_(torch.rand(n, generator=gen) - 0.5)
            module.running_var.copy_(torch.rand(n, generator=gen) * 2 + 0.3)
            module.weight.data.copy_(torch.rand(n, generator=gen) + 0.5)
            module.bias.data.copy_(torch.rand(n, generator=gen) - 0.5)


def _meta(arch: dict | None = None, **overrides) -> BundleMeta:
    arch = arch or TINY
    names = ["membrane", "ribosome", "gold", "actin", "microtubule"][: arch["n_classes"] - 1]
    fields = dict(
        name="tiny", version=3, architecture=arch, voxel_size_a=10.0,
        classes=[default_class(n) for n in names], parent="tiny@2",
        created="2025-01-02T03:04:05Z", training={"steps": 7, "synthetic": True},
        description="test bundle",
    )
    fields.update(overrides)
    return BundleMeta(**fields)


def _network(arch: dict | None = None, seed: int = 0) -> UNet25D:
    torch.manual_seed(seed)
    network = build_network(arch or TINY)
    with torch.no_grad():
        _randomise_batchnorm(network, seed)
    return network.eval()


@pytest.fixture()
def bundle_file(tmp_path: Path) -> Path:
    return save_bundle(tmp_path / "tiny.safetensors", _network(), _meta())


# ------------------------------------------------------------------------------ network


def test_unet_output_shape_and_multiple() -> None:
    network = _network()
    with torch.no_grad():
        out = network(torch.randn(2, 5, 64, 48))
    assert out.shape == (2, 3, 64, 48)
    assert network.size_multiple == 16
    assert UNet25D(levels=3, base_width=4).size_multiple == 4


def test_default_architecture_is_five_levels_width_16() -> None:
    network = UNet25D()
    assert network.arch == architecture_dict(5, 6, 16, 5)
    assert len(network.down) == 5 and len(network.up) == 4
    assert network.down[4][0].out_channels == 256
    n_params = sum(p.numel() for p in network.parameters())
    assert 1.5e6 < n_params < 2.5e6  # ~8 MB of float32: fine for CPU and for a drop folder


@pytest.mark.parametrize("arch", [TINY, architecture_dict(3, 2, 8, 3), architecture_dict()])
def test_flops_per_voxel_matches_torch_flop_counter(arch: dict) -> None:
    network = build_network(arch, "meta")
    with FlopCounterMode(display=False) as counter:
        network(torch.zeros(1, arch["in_slices"], 32, 32, device="meta"))
    assert flops_per_voxel(arch) == pytest.approx(counter.get_total_flops() / (32 * 32))


def test_flops_per_voxel_default_value() -> None:
    assert flops_per_voxel(architecture_dict()) == 93280.0


@pytest.mark.parametrize(
    ("arch", "message"),
    [
        ({**TINY, "in_slices": 4}, "in_slices = 4 must be odd"),
        ({**TINY, "name": "resnet"}, "architecture name 'resnet' is not 'unet25d'"),
        ({**TINY, "levels": "5"}, "architecture.levels must be an integer"),
        ({**TINY, "n_classes": 1}, "architecture.n_classes = 1 is outside 2..127"),
        ({**TINY, "depth": 3}, "architecture has unknown keys ['depth']"),
    ],
)
def test_bad_architecture_rejected(arch: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        build_network(arch)


def test_fused_network_matches_unfused() -> None:
    network = _network(seed=1)
    fused = fuse_for_inference(network)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fused.modules())
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in network.modules())  # untouched
    x = torch.randn(3, 5, 64, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        reference, result = network(x), fused(x)
    assert reference.abs().max() > 0.1  # a meaningful comparison
    torch.testing.assert_close(result, reference, atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------------------ metadata


def test_meta_json_round_trip_and_dict_classes() -> None:
    meta = _meta()
    document = json.loads(json.dumps(meta.to_json()))
    again = BundleMeta.from_json(document)
    assert again == meta
    assert again.in_slices == 5 and again.n_classes == 3 and again.ref == "tiny@3"
    from_dicts = _meta(classes=[c.to_json() for c in meta.classes])
    assert from_dicts.classes == meta.classes


def test_meta_created_defaults_to_utc_now() -> None:
    meta = BundleMeta(name="m", version=1, architecture=TINY, voxel_size_a=8.0,
                      classes=[default_class("membrane"), default_class("gold")])
    assert meta.created.endswith("Z") and meta.format_version == 1 and meta.parent is None


# ------------------------------------------------------------------------------ bundle files


def test_save_load_round_trip(bundle_file: Path) -> None:
    bundle = load_bundle(bundle_file)
    assert isinstance(bundle, ModelBundle)
    # The loaded metadata is what was saved plus the checksum save_bundle recorded.
    assert bundle.meta == _meta(weights_sha256=weights_sha256(_network().state_dict()))
    assert [c.name for c in bundle.classes] == ["membrane", "ribosome"]
    assert bundle.path == bundle_file
    original = _network().state_dict()
    assert set(bundle.state_dict) == set(original)
    for name, tensor in original.items():
        assert torch.equal(bundle.state_dict[name], tensor), name
    rebuilt = bundle.build("cpu")
    assert not rebuilt.training
    x = torch.randn(2, 5, 32, 32)
    with torch.no_grad():
        assert torch.equal(rebuilt(x), _network()(x))


def test_save_is_atomic_and_sha256_stable(tmp_path: Path, bundle_file: Path) -> None:
    assert sorted(p.name for p in bundle_file.parent.iterdir()) == ["tiny.safetensors"]
    digest = hashlib.sha256(bundle_file.read_bytes()).hexdigest()
    assert load_bundle(bundle_file).sha256 == digest
    assert load_bundle(bundle_file).sha256 == digest
    # The same network and metadata give byte-identical files (same sha256).
    other = save_bundle(tmp_path / "again.safetensors", _network(), _meta())
    assert load_bundle(other).sha256 == digest
    # Overwriting in place replaces the file; different weights give a different digest.
    save_bundle(bundle_file, _network(seed=5), _meta())
    assert load_bundle(bundle_file).sha256 != digest


def test_save_refuses_mismatched_or_nonfinite_network(tmp_path: Path) -> None:
    path = tmp_path / "bad.safetensors"
    with pytest.raises(ValueError, match="has shape"):
        save_bundle(path, _network(), _meta({**TINY, "base_width": 8}))
    network = _network()
    with torch.no_grad():
        network.head.bias[0] = float("nan")
    with pytest.raises(ValueError, match="tensor head.bias has non-finite values"):
        save_bundle(path, network, _meta())
    with pytest.raises(ValueError, match="do not match architecture"):
        save_bundle(path, fuse_for_inference(_network()), _meta())
    assert list(tmp_path.iterdir()) == []  # nothing half-written left behind


def test_default_bundle_path() -> None:
    path = default_bundle_path()
    assert path.name == "default.safetensors" and path.parent.name == "assets"
    assert path.parent.parent == Path(__file__).resolve().parents[1] / "core"


# ------------------------------------------------------------------------------ rejections


def _write_raw(path: Path, document: object | None, network: torch.nn.Module | None = None,
               raw_json: str | None = None) -> Path:
    """A safetensors file with arbitrary 'tomolive' metadata (document None: no metadata)."""
    tensors = {k: v.contiguous() for k, v in (network or _network()).state_dict().items()}
    metadata = None
    if raw_json is not None:
        metadata = {"tomolive": raw_json}
    elif document is not None:
        metadata = {"tomolive": json.dumps(document)}
    save_file(tensors, str(path), metadata=metadata)
    return path


def _reject(path: Path, message: str) -> str:
    with pytest.raises(BundleError) as info:
        load_bundle(path)
    text = str(info.value)
    assert text.startswith(f"{path}: "), text
    assert "\n" not in text
    assert message in text, text
    return text


def test_reject_missing_file(tmp_path: Path) -> None:
    _reject(tmp_path / "nope.safetensors", "cannot read model bundle")


def test_reject_not_safetensors(tmp_path: Path) -> None:
    path = tmp_path / "text.safetensors"
    path.write_text("this is a README, not a model\n" * 10)
    _reject(path, "not a safetensors file")
    tiny = tmp_path / "tiny.safetensors"
    tiny.write_bytes(b"abc")
    _reject(tiny, "not a safetensors file (only 3 bytes)")


def test_reject_truncated(tmp_path: Path, bundle_file: Path) -> None:
    blob = bundle_file.read_bytes()
    half = tmp_path / "half.safetensors"
    half.write_bytes(blob[: len(blob) // 2])
    _reject(half, "truncated safetensors file")
    head = tmp_path / "head.safetensors"
    head.write_bytes(blob[:100])
    _reject(head, "truncated safetensors file (header needs")


class _Payload:
    """Unpickling this would create a file: proof of whether code ran."""

    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self):
        return (Path.touch, (self.target,))


@pytest.mark.parametrize("use_torch_save", [False, True])
def test_reject_pickle_renamed_safetensors(tmp_path: Path, use_torch_save: bool) -> None:
    sentinel = tmp_path / "code-was-executed"
    path = tmp_path / "evil.safetensors"
    if use_torch_save:
        torch.save({"weights": _Payload(sentinel)}, path)  # zip container with a pickle inside
    else:
        path.write_bytes(pickle.dumps(_Payload(sentinel)))
    _reject(path, "not a safetensors file")
    assert not sentinel.exists()


def test_reject_missing_tomolive_metadata(tmp_path: Path) -> None:
    _reject(_write_raw(tmp_path / "plain.safetensors", None), "no 'tomolive' metadata")


def test_reject_bad_json(tmp_path: Path) -> None:
    path = _write_raw(tmp_path / "badjson.safetensors", None, raw_json='{"name": "x",')
    _reject(path, "'tomolive' metadata is not valid JSON")


def test_reject_unsupported_format_version(tmp_path: Path) -> None:
    doc = {**_meta().to_json(), "format_version": 2}
    _reject(_write_raw(tmp_path / "v2.safetensors", doc),
            "unsupported format_version 2 (this tomolive reads 1)")


def test_reject_missing_and_unknown_fields(tmp_path: Path) -> None:
    doc = _meta().to_json()
    del doc["voxel_size_a"]
    _reject(_write_raw(tmp_path / "missing.safetensors", doc),
            "metadata is missing fields ['voxel_size_a']")
    doc = {**_meta().to_json(), "colour_map": "viridis"}
    _reject(_write_raw(tmp_path / "unknown.safetensors", doc),
            "metadata has unknown fields ['colour_map']")


def test_reject_bad_field_values(tmp_path: Path) -> None:
    doc = {**_meta().to_json(), "voxel_size_a": -3}
    _reject(_write_raw(tmp_path / "vs.safetensors", doc), "voxel_size_a must be a positive number")
    doc = {**_meta().to_json(), "created": "yesterday"}
    _reject(_write_raw(tmp_path / "t.safetensors", doc), "created 'yesterday' is not an ISO-8601")


def test_reject_unknown_class_kind(tmp_path: Path) -> None:
    doc = _meta().to_json()
    doc["classes"][1]["kind"] = "blob"
    _reject(_write_raw(tmp_path / "kind.safetensors", doc), "kind 'blob' is not one of")


def test_reject_class_count_mismatch(tmp_path: Path) -> None:
    doc = _meta().to_json()
    doc["classes"] = doc["classes"][:1]
    _reject(_write_raw(tmp_path / "count.safetensors", doc),
            "architecture.n_classes = 3 but 1 classes are listed")


def test_reject_tensor_shape_mismatch(tmp_path: Path) -> None:
    doc = _meta({**TINY, "base_width": 8}).to_json()  # metadata says width 8, tensors width 4
    _reject(_write_raw(tmp_path / "width.safetensors", doc),
            "tensor down.0.0.weight has shape [4, 5, 3, 3] but architecture in_slices=5, "
            "base_width=8, levels=5, n_classes=3 needs [8, 5, 3, 3]")


def test_reject_tensor_names_mismatch(tmp_path: Path) -> None:
    doc = _meta({**TINY, "levels": 4}).to_json()  # tensors have a fifth level
    text = _reject(_write_raw(tmp_path / "levels.safetensors", doc),
                   "tensors do not match architecture")
    assert "unexpected 26 tensors (dec.3.0.weight, dec.3.1.bias, " in text


def test_reject_nonfinite_weights(tmp_path: Path) -> None:
    network = _network()
    with torch.no_grad():
        network.down[2][0].weight[0, 0, 0, 0] = float("inf")
    _reject(_write_raw(tmp_path / "inf.safetensors", _meta().to_json(), network),
            "tensor down.2.0.weight has non-finite values (NaN or Inf)")


def test_reject_bad_preprocess_recipe(tmp_path: Path) -> None:
    doc = {**_meta().to_json(), "preprocess": [{"step": "sharpen"}]}
    _reject(_write_raw(tmp_path / "recipe.safetensors", doc), "unknown step 'sharpen'")


# ------------------------------------------------------------------------------ weights checksum


def _data_region_start(path: Path) -> int:
    """Offset of the first tensor byte: after the 8-byte length and the JSON header."""
    (header_len,) = struct.unpack("<Q", path.read_bytes()[:8])
    return 8 + header_len


def test_save_records_a_weights_checksum(bundle_file: Path) -> None:
    (header_len,) = struct.unpack("<Q", bundle_file.read_bytes()[:8])
    header = json.loads(bundle_file.read_bytes()[8 : 8 + header_len])
    document = json.loads(header["__metadata__"]["tomolive"])
    assert document["weights_sha256"] == weights_sha256(_network().state_dict())
    assert load_bundle(bundle_file).meta.weights_sha256 == document["weights_sha256"]


def test_altered_weights_with_an_intact_header_fail_to_load(bundle_file: Path) -> None:
    start = _data_region_start(bundle_file)
    header_before = bundle_file.read_bytes()[:start]
    blob = bytearray(bundle_file.read_bytes())
    middle = start + (len(blob) - start) // 2
    for i in range(middle, middle + 64):  # flip bits inside the tensor data region only
        blob[i] ^= 0x01  # low mantissa bits: the weights stay finite, only the checksum sees it
    bundle_file.write_bytes(bytes(blob))
    assert bundle_file.read_bytes()[:start] == header_before
    _reject(bundle_file, "weights do not match their weights_sha256 checksum")


def test_bundles_without_a_checksum_still_load(tmp_path: Path) -> None:
    document = _meta().to_json()
    assert "weights_sha256" not in document  # older bundles' documents look exactly like this
    bundle = load_bundle(_write_raw(tmp_path / "old.safetensors", document))
    assert bundle.meta.weights_sha256 is None
    shipped = load_bundle(default_bundle_path())  # saved before checksums existed
    assert shipped.meta.weights_sha256 is None


def test_save_replaces_a_parents_checksum(tmp_path: Path) -> None:
    # A fine-tuned model starts from its parent's metadata, checksum included.
    parent = _meta(weights_sha256="0" * 64)
    path = save_bundle(tmp_path / "child.safetensors", _network(seed=3), parent)
    assert load_bundle(path).meta.weights_sha256 == weights_sha256(_network(seed=3).state_dict())
    assert parent.weights_sha256 == "0" * 64  # the caller's metadata is not modified


def test_z_edge_rule_round_trips_and_older_bundles_mean_clamp(tmp_path: Path) -> None:
    document = _meta().to_json()
    assert "z_edge" not in document  # a clamp bundle's document is as before the field
    assert load_bundle(_write_raw(tmp_path / "old.safetensors", document)).meta.z_edge == "clamp"
    assert load_bundle(default_bundle_path()).meta.z_edge == "clamp"  # trained so
    path = save_bundle(tmp_path / "r.safetensors", _network(), _meta(z_edge="reflect"))
    assert load_bundle(path).meta.z_edge == "reflect"
    _reject(_write_raw(tmp_path / "bad.safetensors", {**document, "z_edge": "wrap"}),
            "z_edge must be one of clamp, reflect, not 'wrap'")


def test_malformed_checksum_is_rejected(tmp_path: Path) -> None:
    document = {**_meta().to_json(), "weights_sha256": "abc"}
    _reject(_write_raw(tmp_path / "bad.safetensors", document),
            "weights_sha256 must be 64 hex digits or null, not 'abc'")


# ------------------------------------------------------------------------------ voxel-size bounds


@pytest.mark.parametrize("voxel_a", [0.1, 1000.0])
def test_bundle_voxel_size_outside_the_bounds_is_rejected(tmp_path: Path, voxel_a: float) -> None:
    path = save_bundle(tmp_path / "absurd.safetensors", _network(), _meta(voxel_size_a=voxel_a))
    _reject(path, f"voxel_size_a {voxel_a:g} Å is outside the plausible range 1.5..50 Å")
    # The bounds are the caller's (daemon configuration): wider ones accept it.
    assert load_bundle(path, voxel_size_bounds_a=(0.05, 2000.0)).meta.voxel_size_a == voxel_a
