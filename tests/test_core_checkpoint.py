"""Checkpoints: the released layout at full size, lossless conversion, refusals and clear errors."""

import json

import pytest
import torch

from tadisr_core.checkpoint import (
    Checkpoint,
    CheckpointError,
    apply_checkpoint,
    compare,
    convert,
    load_checkpoint,
    trainable_state_dict,
    verify_manifest,
)
from tadisr_core.checkpoint import main as checkpoint_cli
from tadisr_core.loading import load_tadisr
from tadisr_core.model import build_model
from tadisr_core.spec import full_spec


def _untied_official_groups(model):
    """What the release's save_model writes: every tensor, tied seq_r duplicates included."""
    return trainable_state_dict(model)


def test_full_size_official_layout_loads_with_no_missing_or_unexpected_keys(tmp_path):
    model = build_model(full_spec(), "meta")
    groups = _untied_official_groups(model)
    ckpt = Checkpoint(tmp_path / "x.pkl", "official", full_spec(), groups)
    report = compare(ckpt, model)
    assert report.ok
    assert report.counts == {"unet": 1546, "vae": 152, "mi_decoder": 220}
    assert sum(t.numel() for t in groups["unet"].values()) == 12_178_256
    assert sum(t.numel() for t in groups["vae"].values()) == 938_132


def test_official_to_native_to_model_is_lossless(tiny_dir, tmp_path):
    official = load_checkpoint(tiny_dir["official"])
    assert official.source == "official" and official.spec.unet_lora.rank == 4 and official.spec.vae_lora.rank == 2
    out = convert(tiny_dir["official"], tmp_path / "native.safetensors")
    native = load_checkpoint(out)
    assert native.source == "native" and native.spec == official.spec
    for g in official.groups:
        assert official.groups[g].keys() == native.groups[g].keys()
        for k, v in official.groups[g].items():
            assert torch.equal(v, native.groups[g][k]), (g, k)
    a = load_tadisr(tiny_dir["kolors"], tiny_dir["official"], tiny_dir["prompt_cache"])
    b = load_tadisr(tiny_dir["kolors"], out, tiny_dir["prompt_cache"])
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    x = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ra, rb = a(x), b(x)
    assert torch.equal(ra.image, rb.image) and torch.equal(ra.mask_logits, rb.mask_logits)


def test_loaded_weights_change_the_output(tiny_dir):
    """The checkpoint's LoRA is really applied: merging keeps the result, dropping LoRA changes it."""
    model = load_tadisr(tiny_dir["kolors"], tiny_dir["checkpoint"], tiny_dir["prompt_cache"], merge_lora_weights=False)
    merged = load_tadisr(tiny_dir["kolors"], tiny_dir["checkpoint"], tiny_dir["prompt_cache"], merge_lora_weights=True)
    x = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref, got = model(x), merged(x)
        assert (ref.image - got.image).abs().max() <= 1e-4  # whole model, fp32 rounding of merged weights
        for n, p in model.named_parameters():
            if ".lora_B." in n:
                p.zero_()
        assert (model(x).image - ref.image).abs().max() > 1e-4


def test_legacy_skip_conv_names_are_accepted(tiny_dir, tmp_path):
    raw = torch.load(tiny_dir["official"], weights_only=True)
    vae = raw["state_dict_vae"]
    for i in range(1, 5):
        vae[f"decoder.skip_conv_{i}.weight"] = vae.pop(f"decoder.skip_conv_{i}.base_layer.weight")
    torch.save(raw, tmp_path / "legacy.pkl")
    ckpt = load_checkpoint(tmp_path / "legacy.pkl")
    assert "decoder.skip_conv_2.base_layer.weight" in ckpt.groups["vae"]


class _Exploit:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_a_pickle_that_would_run_code_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"state_dict_unet": {}, "payload": _Exploit(str(marker))}, tmp_path / "evil.pkl")
    with pytest.raises(CheckpointError, match="refused.*nothing from it was executed"):
        load_checkpoint(tmp_path / "evil.pkl")
    assert not marker.exists()


def test_truncated_and_missing_files_are_reported(tiny_dir, tmp_path):
    data = tiny_dir["official"].read_bytes()
    (tmp_path / "cut.pkl").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"cut\.pkl.*(truncated|corrupt)"):
        load_checkpoint(tmp_path / "cut.pkl")
    native = tiny_dir["checkpoint"].read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(native[: len(native) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_checkpoint(tmp_path / "cut.safetensors")
    with pytest.raises(FileNotFoundError, match="huqiming513/TADiSR-Models"):
        load_checkpoint(tmp_path / "absent.pkl")


def test_header_that_disagrees_with_its_shapes_is_refused_before_reading(tiny_dir, tmp_path):
    """The checkpoint is read without safetensors' own checks: a header claiming a 1 TB tensor, or
    offsets that do not match the shape, must be refused without allocating anything."""
    data = tiny_dir["checkpoint"].read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    key = next(k for k in header if k != "__metadata__")
    start, end = header[key]["data_offsets"]
    for name, entry in (("huge", {"shape": [1 << 20, 1 << 20], "data_offsets": [0, 1 << 42]}),
                        ("skewed", {"data_offsets": [start, end + 4]})):
        bad = json.loads(data[8:8 + n])
        bad[key].update(entry)
        raw = json.dumps(bad).encode()
        raw += b" " * (-len(raw) % 8)
        (tmp_path / f"{name}.safetensors").write_bytes(len(raw).to_bytes(8, "little") + raw + data[8 + n:])
        with pytest.raises(CheckpointError, match=rf"{name}\.safetensors.*(truncated|corrupt)"):
            load_checkpoint(tmp_path / f"{name}.safetensors")


def test_wrong_shape_error_names_key_and_shapes(tiny_dir, tmp_path, tiny_model_factory):
    raw = torch.load(tiny_dir["official"], weights_only=True)
    raw["state_dict_unet"]["conv_in.bias"] = torch.zeros(7)
    torch.save(raw, tmp_path / "bad.pkl")
    with pytest.raises(CheckpointError, match=r"bad\.pkl[\s\S]*unet\.conv_in\.bias: expected shape \[8\], "
                                              r"checkpoint has \[7\]"):
        apply_checkpoint(tiny_model_factory(), load_checkpoint(tmp_path / "bad.pkl"))


def test_not_a_tadisr_checkpoint(tmp_path):
    torch.save({"state_dict": {"w": torch.zeros(1)}}, tmp_path / "other.pkl")
    with pytest.raises(CheckpointError, match=r"missing top-level group\(s\)"):
        load_checkpoint(tmp_path / "other.pkl")


def test_sha256_manifest_check(tmp_path):
    fake = tmp_path / "tadisr_kolors_ftsr_526000.pkl"
    fake.write_bytes(b"0" * 10)
    with pytest.raises(CheckpointError, match="incomplete download"):
        verify_manifest(fake)
    (tmp_path / "x.pkl").write_bytes(b"0" * 10)
    with pytest.raises(CheckpointError, match=r"x\.pkl: 10 bytes, neither the name nor the size of a published "
                                              r"release file \(tadisr_kolors_ftsr_526000\.pkl \(195,866,454 bytes\)"):
        verify_manifest(tmp_path / "x.pkl")


def test_a_renamed_release_file_is_verified_by_its_size_and_digest(tmp_path, monkeypatch):
    import hashlib

    from tadisr_core import checkpoint

    data = b"release bytes"
    monkeypatch.setattr(checkpoint, "MANIFEST", {"release.pkl": (len(data), hashlib.sha256(data).hexdigest())})
    renamed = tmp_path / "my_tadisr.pkl"  # as users rename it in models/tadisr
    renamed.write_bytes(data)
    assert verify_manifest(renamed) == hashlib.sha256(data).hexdigest()
    renamed.write_bytes(b"release byteZ")  # same size, other content
    with pytest.raises(CheckpointError, match=r"my_tadisr\.pkl: SHA-256 \w+ does not match the release's \w+ "
                                              r"\(release\.pkl\)$"):
        verify_manifest(renamed)


def test_inspect_and_convert_cli(tiny_dir, tmp_path, capsys):
    assert checkpoint_cli(["inspect", str(tiny_dir["official"]), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["variant"] == "release" and info["size"] == "tiny" and info["fits_model"]
    assert info["groups"] == {"unet": 1546, "vae": 152, "mi_decoder": 220}
    assert info["unique_decoder_tensors"] == 156 and len(info["sha256"]) == 64
    assert checkpoint_cli(["convert", str(tiny_dir["official"]), str(tmp_path / "n.safetensors")]) == 0
    assert checkpoint_cli(["inspect", str(tmp_path / "missing.pkl")]) == 2
    assert "checkpoint not found" in capsys.readouterr().err


def test_inspect_names_the_size_and_takes_what_model_takes(tiny_model_factory, tmp_path, capsys):
    """Defects: `inspect` called the demo checkpoint "(tiny size)" (any UNet not 320 wide was tiny), and
    refused a run folder, a step folder or `demo`, which --model takes. The size is one of the spec's known
    sizes or "custom"; the argument is resolved as --model's, and the file inspected is named."""
    import dataclasses

    from tadisr_core import model_ref
    from tadisr_core.checkpoint import save_model
    from tadisr_core.spec import SIZES, size_name, tiny_spec

    assert {name: size_name(make("paper")) for name, make in SIZES.items()} == {n: n for n in SIZES}
    tiny = tiny_spec()
    assert size_name(dataclasses.replace(tiny, vae=dataclasses.replace(tiny.vae, block_out_channels=(8, 16, 32, 64)))
                     ) == "custom"

    def inspected(ref) -> dict:
        assert checkpoint_cli(["inspect", str(ref), "--json"]) == 0
        return json.loads(capsys.readouterr().out)

    for name, shipped in model_ref.shipped_models().items():
        info = inspected(name)
        assert (info["path"], info["size"], info["fits_model"]) == (str(shipped.checkpoint), "demo", True)
    step = tmp_path / "run" / "checkpoints" / "step_00000002"
    step.mkdir(parents=True)
    save_model(tiny_model_factory("paper"), step / "model.safetensors", backbone=True)
    (tmp_path / "run" / "config.json").write_text(json.dumps({"model": {"kolors_dir": None}}))
    for ref in (tmp_path / "run", step, step / "model.safetensors"):
        info = inspected(ref)
        assert (info["path"], info["size"]) == (str(step / "model.safetensors"), "tiny")
    assert checkpoint_cli(["inspect", str(tmp_path / "run" / "checkpoints")]) == 2
    assert capsys.readouterr().err.startswith(f"error: inspect {tmp_path / 'run' / 'checkpoints'}: the folder holds "
                                              f"neither model_final.safetensors")


def test_native_round_trip_of_a_paper_model(tiny_model_factory, tmp_path):
    from tadisr_core.checkpoint import save_model

    model = tiny_model_factory("paper", seed=3)
    path = save_model(model, tmp_path / "paper.safetensors")
    ckpt = load_checkpoint(path)
    assert ckpt.spec == model.spec and ckpt.metadata["variant"] == "paper"
    other = tiny_model_factory("paper", seed=3)  # the same base (another base is refused: test_demo_model)
    with torch.no_grad():
        for sd in trainable_state_dict(other).values():
            for t in sd.values():
                t.add_(1.0)
    apply_checkpoint(other, ckpt)
    want, got = trainable_state_dict(model), trainable_state_dict(other)
    assert all(torch.equal(want[g][k], got[g][k]) for g in want for k in want[g])


def test_load_in_target_dtypes_keeps_lora_layers_at_file_precision(tiny_dir):
    """`dtypes` casts as the file is read, except LoRA factors and LoRA base weights (merged in fp32)."""
    plain = load_checkpoint(tiny_dir["checkpoint"])
    cast = load_checkpoint(tiny_dir["checkpoint"], {g: torch.bfloat16 for g in ("unet", "vae", "mi_decoder")})
    kept = 0
    for group, sd in plain.groups.items():
        assert sd.keys() == cast.groups[group].keys()
        for key, value in sd.items():
            lora_layer = ".lora_" in f".{key}" or ".base_layer." in f".{key}"
            kept += lora_layer
            want = value if lora_layer else value.to(torch.bfloat16)
            assert cast.groups[group][key].dtype == want.dtype and torch.equal(cast.groups[group][key], want), key
    assert kept and {t.dtype for t in cast.groups["mi_decoder"].values()} == {torch.bfloat16}


@pytest.mark.parametrize("header, why", [
    ({"__metadata__": ["format"]}, "metadata is not a table of strings"),
    ({"__metadata__": {"format": 5}}, "metadata is not a table of strings"),
    ({"unet.a": {"dtype": "F32", "shape": [1.0], "data_offsets": [0, 4]}}, "bad entry for tensor unet.a"),
    ({"unet.a": {"dtype": "F32", "shape": "1", "data_offsets": [0, 4]}}, "bad entry for tensor unet.a"),
    ({"unet.a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
      "unet.b": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, "overlap or leave a hole"),
])
def test_malformed_safetensors_headers_name_the_file(tmp_path, header, why):
    """Every malformed header is one CheckpointError naming the file, before any tensor is allocated
    (two entries sharing bytes would otherwise each get their own copy)."""
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path = tmp_path / "bad.safetensors"
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + b"\0" * 8)
    with pytest.raises(CheckpointError, match=rf"bad\.safetensors.*{why}"):
        load_checkpoint(path)
