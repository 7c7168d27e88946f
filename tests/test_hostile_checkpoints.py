"""Hostile and damaged weight files (issue 13): refused with one clear error, never a hang, crash or black image.

Every file is generated here; the two pickles that froze (2**64-node key hash) or crashed (2-million-deep
key) the process before are run in a child process so a regression fails the test instead of the suite.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tracemalloc
import warnings
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from tadisr_core.checkpoint import CheckpointError, apply_checkpoint, load_checkpoint, save_official
from tadisr_core.checkpoint import main as checkpoint_cli
from tadisr_core.loading import load_tadisr
from tadisr_core.prompt import PromptCache
from tadisr_core.safe_pickle import MAX_DEPTH, UnsafePickleError, scan_torch_zip
from tests.hostile_files import (
    FakeStorage,
    FakeTensor,
    corrupt_one_record,
    dag_key_pickle,
    deep_tuple_pickle,
    floats,
    torch_like,
    torch_zip,
)

ROOT = Path(__file__).resolve().parents[1]


def _inspect_in_child(path: Path) -> subprocess.CompletedProcess:
    # timeout: a safety net so a regression (a hang) fails here instead of freezing the suite
    return subprocess.run([sys.executable, "-m", "tadisr_core.checkpoint", "inspect", str(path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("case, pickle_bytes, reason", [
    ("dag_key", dag_key_pickle(64), "shared references that expand to more than 10,000,000 objects"),
    ("tuple_key", b"\x80\x02}K\x01K\x02\x86Ns.", "dict key or set item that is a tuple"),
    ("deep_key", b"\x80\x02}" + deep_tuple_pickle(2_000_000)[3:-1] + b"Ns.", "nested deeper than"),
    ("deep_value", deep_tuple_pickle(2_000_000), "nested deeper than"),
])
def test_pickles_that_froze_or_crashed_the_process_are_refused(tmp_path, case, pickle_bytes, reason):
    path = torch_zip(tmp_path / f"{case}.pkl", pickle_bytes)
    done = _inspect_in_child(path)
    assert done.returncode == 2, (done.returncode, done.stderr[-2000:])
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and str(path) in lines[0] and reason in lines[0]
    assert "nothing from it was executed" in lines[0]
    assert "weights_only=False" not in done.stderr


@pytest.mark.parametrize("case, pickle_bytes, reason", [
    ("deep", deep_tuple_pickle(1_000_000), "nested deeper"),
    ("wide", b"\x80\x02" + b"]" * 1_000_000 + b".", "objects pending at once"),
    ("memo", b"\x80\x02]" + b"\x94" * 1_000_000 + b".", "remembered objects"),
])
def test_scan_memory_stays_a_small_multiple_of_the_file(tmp_path, case, pickle_bytes, reason):
    path = torch_zip(tmp_path / f"{case}.pkl", pickle_bytes)
    size = path.stat().st_size
    tracemalloc.start()
    with pytest.raises(UnsafePickleError, match=reason):
        scan_torch_zip(path)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 4 * size + (32 << 20), (peak, size)  # the stack and memo caps bound the rest


def test_a_shared_reference_dag_as_a_value_is_refused(tmp_path):
    out = [b"\x80\x02", b")", b"q\x00"]
    for i in range(1, 41):                                  # 40 levels: 2**40 objects when expanded
        out += [b"h" + bytes([i - 1]), b"h" + bytes([i - 1]), b"\x86", b"q" + bytes([i])]
    path = torch_zip(tmp_path / "dag_value.pkl", b"".join(out) + b".")
    with pytest.raises(UnsafePickleError, match="expand to more than"):
        scan_torch_zip(path)


def test_nesting_limit_admits_real_state_dicts(tmp_path):
    nested = {"a": 1}
    for _ in range(MAX_DEPTH // 3):
        nested = {"n": [nested]}
    torch.save({"ok": nested, "t": torch.ones(2)}, tmp_path / "fine.pt")
    scan_torch_zip(tmp_path / "fine.pt")
    for _ in range(MAX_DEPTH):
        nested = {"n": [nested]}
    torch.save(nested, tmp_path / "deep.pt")
    with pytest.raises(UnsafePickleError, match="nested deeper"):
        scan_torch_zip(tmp_path / "deep.pt")


def test_globals_are_named_and_no_unsafe_advice_is_given(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"state_dict_unet": Evil()}, tmp_path / "evil.pkl")
    with pytest.raises(CheckpointError, match=r"evil\.pkl: refused: the global builtins\.print is not allowed") as e:
        load_checkpoint(tmp_path / "evil.pkl")
    assert "weights_only" not in str(e.value)


def test_storage_larger_than_its_record_and_views_past_their_storage(tmp_path):
    big = torch_like(tmp_path / "big.pkl", {"w": FakeTensor(FakeStorage("0", 1 << 28), (1 << 28,), (1,))},
                     {"0": floats(1.0, 2.0)})
    with pytest.raises(CheckpointError, match=r"storage '0' claims 1,073,741,824 bytes but its zip record holds 8"):
        load_checkpoint(big)
    expanded = torch_like(tmp_path / "view.pkl", {"w": FakeTensor(FakeStorage("0", 2), (100_000, 100_000), (0, 1))},
                          {"0": floats(1.0, 2.0)})
    with pytest.raises(CheckpointError, match=r"tensor view of shape \[100000, 100000\] reaches past its storage"):
        load_checkpoint(expanded)


def test_a_tensor_record_corrupted_inside_the_zip_is_caught_by_its_crc(tiny_dir, tmp_path):
    bad = corrupt_one_record(tiny_dir["official"], tmp_path / "crc.pkl")
    assert zipfile.is_zipfile(bad)
    with pytest.raises(CheckpointError, match=r"crc\.pkl: cannot be read.*CRC"):
        load_checkpoint(bad)
    assert checkpoint_cli(["inspect", str(bad)]) == 2


def _official_raw(tiny_dir):
    return torch.load(tiny_dir["official"], weights_only=True)


@pytest.mark.parametrize("value, problem", [
    (float("nan"), "contains NaN"), (float("inf"), "contains Inf"),
    (1e30, r"holds \|value\| 1e\+30, above the sane limit"),
])
def test_non_finite_or_huge_weights_are_refused_naming_the_key(tiny_dir, tmp_path, value, problem):
    raw = _official_raw(tiny_dir)
    key = next(k for k in raw["state_dict_unet"] if "lora_B" in k)
    raw["state_dict_unet"][key] = raw["state_dict_unet"][key].clone().fill_(value)
    torch.save(raw, tmp_path / "bad.pkl")
    with pytest.raises(CheckpointError, match=rf"bad\.pkl: unet\.{key.replace('.', '[.]')} {problem}"):
        load_checkpoint(tmp_path / "bad.pkl")


def test_integer_tensors_where_floats_belong_are_refused(tiny_dir, tmp_path):
    raw = _official_raw(tiny_dir)
    raw["state_dict_vae"] = {k: (v * 0).long() if "skip_conv_2" in k else v for k, v in raw["state_dict_vae"].items()}
    torch.save(raw, tmp_path / "ints.pkl")
    with pytest.raises(CheckpointError, match=r"vae\..*skip_conv_2.* has integer dtype int64"):
        load_checkpoint(tmp_path / "ints.pkl")


def _rewrite_native(src: Path, dst: Path, *, tensors=None, meta=None) -> Path:
    with safe_open(str(src), framework="pt") as f:
        old_meta = dict(f.metadata())
        old = {k: f.get_tensor(k) for k in f.keys()}
    old.update(tensors or {})
    old_meta.update(meta or {})
    save_file(old, str(dst), metadata=old_meta)
    return dst


def test_native_checkpoint_with_nan_or_bad_spec_metadata(tiny_dir, tmp_path):
    src = tiny_dir["checkpoint"]
    with safe_open(str(src), framework="pt") as f:
        key = next(k for k in f.keys() if k.startswith("mi_decoder."))
        spec = json.loads(f.metadata()["spec"])
        shape = f.get_tensor(key).shape
    nan = _rewrite_native(src, tmp_path / "nan.safetensors", tensors={key: torch.full(shape, float("nan"))})
    with pytest.raises(CheckpointError, match=rf"nan\.safetensors: {key.replace('.', '[.]')} contains NaN"):
        load_checkpoint(nan)
    nan_alpha = {**spec["unet_lora"], "alpha": float("nan")}
    for field, value, match in (("timestep", -5, "timestep -5"), ("unet_lora", nan_alpha, "unet_lora.alpha nan")):
        bad = _rewrite_native(src, tmp_path / f"{field}.safetensors", meta={"spec": json.dumps({**spec, field: value})})
        with pytest.raises(CheckpointError, match=rf"bad spec metadata: {match}"):
            load_checkpoint(bad)


def test_nan_base_weights_are_refused_at_load(tiny_dir, tiny_model_factory):
    model = tiny_model_factory()
    ckpt = load_checkpoint(tiny_dir["checkpoint"])
    with torch.no_grad():
        model.unet.time_embedding.linear_1.weight[0, 0] = float("nan")
    with pytest.raises(CheckpointError, match=r"base weight unet\.time_embedding\.linear_1\.weight contains NaN"):
        apply_checkpoint(model, ckpt)


def test_nan_prompt_cache_is_refused(tiny_dir, tmp_path):
    cache = PromptCache.load(tiny_dir["prompt_cache"])
    cache.prompt_embeds[0, 3, 1] = float("nan")
    cache.save(tmp_path / "nan_cache.safetensors")
    with pytest.raises(ValueError, match=r"nan_cache\.safetensors: prompt cache tensor prompt_embeds contains NaN"):
        PromptCache.load(tmp_path / "nan_cache.safetensors")


def test_wrong_kind_of_file_for_each_flag(tiny_dir, tmp_path):
    with pytest.raises(ValueError, match=r"not a prompt cache \(\.safetensors\)"):
        PromptCache.load(tiny_dir["official"])
    with pytest.raises(ValueError, match="is not a TADiSR prompt cache"):
        PromptCache.load(tiny_dir["checkpoint"])
    with pytest.raises(CheckpointError, match=r"not a native TADiSR checkpoint \(metadata .*\): it is a prompt cache"):
        load_checkpoint(tiny_dir["prompt_cache"])
    (tmp_path / "text.pkl").write_text("hello")
    with pytest.raises(CheckpointError, match="not a zip-based torch checkpoint"):
        load_checkpoint(tmp_path / "text.pkl")
    with pytest.raises(IsADirectoryError, match="is a folder"):
        load_checkpoint(tmp_path)


def test_the_model_loader_used_by_the_nodes_raises_the_same_error(tiny_dir, tmp_path):
    torch_zip(tmp_path / "dag.pkl", dag_key_pickle(64))
    with pytest.raises(CheckpointError, match="refused: shared references that expand"):
        load_tadisr(tiny_dir["kolors"], tmp_path / "dag.pkl", tiny_dir["prompt_cache"])


def test_convert_refuses_its_input_as_output_and_existing_files(tiny_dir, tmp_path, capsys):
    src = tmp_path / "release.pkl"
    src.write_bytes(tiny_dir["official"].read_bytes())
    before = src.read_bytes()
    assert checkpoint_cli(["convert", str(src), str(src)]) == 2
    assert "onto itself" in capsys.readouterr().err and src.read_bytes() == before
    out = tmp_path / "n.safetensors"
    assert checkpoint_cli(["convert", str(src), str(out)]) == 0
    assert out.stat().st_mode & 0o777 == 0o666 & ~_umask()
    assert checkpoint_cli(["convert", str(src), str(out)]) == 2
    assert "pass --force" in capsys.readouterr().err
    assert checkpoint_cli(["convert", str(src), str(out), "--force"]) == 0
    assert not list(tmp_path.glob(".*")) and not list(tmp_path.glob("*.tmp"))


def _umask() -> int:
    import os

    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_official_fixture_writer_still_round_trips(tiny_dir, tmp_path):
    ckpt = load_checkpoint(tiny_dir["official"])
    save_official(ckpt.groups, ckpt.spec, tmp_path / "again.pkl")
    scan_torch_zip(tmp_path / "again.pkl")
    assert load_checkpoint(tmp_path / "again.pkl").groups.keys() == ckpt.groups.keys()


def test_permission_denied_is_not_reported_as_missing(tiny_dir, monkeypatch):
    import builtins

    from tadisr_core import files

    real_open = builtins.open

    def no_access(path, *a, **kw):
        if str(path) == str(tiny_dir["checkpoint"]):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *a, **kw)

    monkeypatch.setattr(files, "open", no_access, raising=False)  # root reads everything: simulate the denial
    with pytest.raises(PermissionError, match=r"checkpoint .*tadisr_tiny\.safetensors: permission denied"):
        load_checkpoint(tiny_dir["checkpoint"])


def test_convert_keeps_what_a_native_checkpoint_says_of_itself(tmp_path):
    """Defect: converting a native checkpoint kept only `converted_from`, so the copy of the demo lost
    `backbone=included` (it then asked for a Kolors base) and a trained one lost its base probe."""
    from tadisr_core.model_ref import resolve_model

    src = resolve_model("demo").checkpoint
    out = tmp_path / "models" / "tadisr" / "demo_copy.safetensors"          # its folder is made
    assert checkpoint_cli(["convert", str(src), str(out)]) == 0
    before, after = load_checkpoint(src), load_checkpoint(out)
    assert after.includes_backbone
    assert after.metadata == {**before.metadata, "converted_from": src.name}
    assert all(torch.equal(after.groups[g][k], t) for g, sd in before.groups.items() for k, t in sd.items())


def test_convert_names_a_wrong_output_in_one_line(tiny_dir, tmp_path, capsys):
    """Defect: `convert X out.pt` wrote safetensors under a torch name (later "not a zip-based torch
    checkpoint"), and an output that cannot be written was a raw SafetensorError traceback."""
    assert checkpoint_cli(["convert", str(tiny_dir["official"]), str(tmp_path / "out.pt")]) == 2
    assert "name the output *.safetensors" in capsys.readouterr().err and not (tmp_path / "out.pt").exists()
    (tmp_path / "file").write_text("a file, not a folder")
    assert checkpoint_cli(["convert", str(tiny_dir["official"]), str(tmp_path / "file" / "n.safetensors")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and str(tmp_path / "file") in err and "Traceback" not in err


def test_a_torch_checkpoint_under_a_safetensors_name_is_read_by_its_bytes(tiny_dir, tmp_path, capsys):
    """torch.load hands any path ending in .safetensors to safetensors: `inspect` of a release pickle
    named *.safetensors was a raw SafetensorError traceback."""
    renamed = tmp_path / "release.safetensors"
    renamed.write_bytes(tiny_dir["official"].read_bytes())
    assert checkpoint_cli(["inspect", str(renamed)]) == 0
    a, b = load_checkpoint(renamed), load_checkpoint(tiny_dir["official"])
    assert all(torch.equal(a.groups[g][k], t) for g, sd in b.groups.items() for k, t in sd.items())


@pytest.mark.parametrize("fmt", ["pkl", "safetensors"])
def test_fp8_checkpoints_are_checked_in_float32_chunks(tiny_dir, tmp_path, monkeypatch, fmt):
    """torch has no aminmax for fp8: `inspect` of an fp8 checkpoint was a NotImplementedError traceback.
    fp8 tensors are checked in bounded float32 chunks, and a NaN or Inf in a later chunk is still found."""
    import tadisr_core.finite as finite
    from tadisr_core.checkpoint import convert

    raw = _official_raw(tiny_dir)
    for name in ("state_dict_unet", "state_dict_vae", "mi_decoder"):
        raw[name] = {k: v.to(torch.float8_e4m3fn) for k, v in raw[name].items()}
    path = tmp_path / "fp8.pkl"
    torch.save(raw, path)
    if fmt == "safetensors":
        path = convert(path, tmp_path / "fp8.safetensors")
    assert checkpoint_cli(["inspect", str(path)]) == 0
    assert load_checkpoint(path).groups["unet"]["conv_in.weight"].dtype == torch.float8_e4m3fn
    monkeypatch.setattr(finite, "FP8_CHUNK", 7)
    for dtype, value, problem in ((torch.float8_e4m3fn, float("nan"), "contains NaN"),
                                  (torch.float8_e5m2, float("inf"), "contains Inf"),
                                  (torch.float8_e4m3fn, 448.0, None)):
        t = torch.zeros(50)
        t[31] = value
        assert finite.tensor_problem(t.to(dtype)) == problem
        assert finite.tensor_problem(t.to(dtype).reshape(5, 10).t()) == problem  # a strided view too


@pytest.mark.parametrize("prefix", ["module.", "_orig_mod.", "module._orig_mod."])
def test_a_release_saved_from_a_wrapped_module_loads_without_the_prefix(tiny_dir, tmp_path, prefix):
    """The state dicts of a DataParallel model (`module.`) or a compiled one (`_orig_mod.`) were refused
    as "group 'unet' has no conv_in.weight"."""
    raw = _official_raw(tiny_dir)
    for name in ("state_dict_unet", "state_dict_vae", "mi_decoder"):
        raw[name] = {prefix + k: v for k, v in raw[name].items()}
    torch.save(raw, tmp_path / "wrapped.pkl")
    a, b = load_checkpoint(tmp_path / "wrapped.pkl"), load_checkpoint(tiny_dir["official"])
    assert a.groups.keys() == b.groups.keys()
    assert all(a.groups[g].keys() == sd.keys() and all(torch.equal(a.groups[g][k], t) for k, t in sd.items())
               for g, sd in b.groups.items())


def test_a_newer_pickle_protocol_is_named_with_what_to_do(tiny_dir, tmp_path):
    """torch's weights-only loader does not read protocol 4's FRAME opcode: such a file was refused as
    holding "pickled objects other than tensors"."""
    path = tmp_path / "proto4.pkl"
    torch.save(_official_raw(tiny_dir), path, pickle_protocol=4)
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        with pytest.raises(CheckpointError, match=r"proto4\.pkl was written with a newer pickle protocol .*Re-save "
                                                  r"it with torch\.save's default protocol") as err:
            load_checkpoint(path)
    assert "other than tensors" not in str(err.value)
    assert not [w for w in said if "pickle protocol" in str(w.message)]  # torch's own warning said it first


def test_another_large_torch_file_given_as_the_checkpoint_is_not_read_whole(tmp_path):
    """Review: a torch file given where the TADiSR checkpoint belongs (a 10 GB Kolors UNet .bin) was read
    whole into memory, and kept while the file was looked at again to say what it is."""
    path = tmp_path / "diffusion_pytorch_model.bin"
    torch.save({f"w{i}": torch.zeros(1 << 20) for i in range(64)}, path)  # 256 MiB of tensors
    # the peak resident size of this process alone (VmHWM; ru_maxrss keeps the parent's across exec)
    probe = ("import sys\n"
             "from tadisr_core.checkpoint import CheckpointError, load_checkpoint\n"
             "def peak_kib():\n"
             "    return next(int(ln.split()[1]) for ln in open('/proc/self/status') if ln.startswith('VmHWM'))\n"
             "before = peak_kib()\n"
             "try:\n    load_checkpoint(sys.argv[1])\nexcept CheckpointError as e:\n    print(e)\n"
             "print((peak_kib() - before) >> 10)\n")
    done = subprocess.run([sys.executable, "-c", probe, str(path)], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    message, grown_mib = done.stdout.strip().splitlines()
    assert "not a TADiSR Kolors checkpoint: missing top-level group(s)" in message, done.stderr[-2000:]
    assert int(grown_mib) < 64
