"""Low-VRAM modes on the tiny model: fp8 weight storage, sequential offload, the precision rule."""

from __future__ import annotations

import math

import pytest
import torch

from tadisr_core.descriptor import DESCRIPTOR, dtype_name, part_dtypes
from tadisr_core.devices import place_model, resolve_device, resolve_dtype
from tadisr_core.loading import load_tadisr
from tadisr_core.lowvram import FP8, enable_sequential_offload, fp8_weight, store_fp8
from tadisr_core.streaming import tensor_bytes
from tests.fake_device import FakeDevice

X = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(5))


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = float(((a - b) ** 2).mean())
    return math.inf if mse == 0 else 10 * math.log10(1.0 / mse)


@pytest.fixture(scope="module")
def bf16_out(tiny_dir):
    model = load_tadisr(tiny_dir["kolors"], tiny_dir["checkpoint"], tiny_dir["prompt_cache"], dtype=torch.bfloat16,
                        merge_lora_weights=True)
    with torch.no_grad():
        return model(X), tensor_bytes(model.unet)


def test_fp8_storage_runs_on_cpu_and_stays_close_to_bf16(tiny_dir, bf16_out):
    import logging

    from diffusers.utils import logging as diffusers_logging

    ref, bf16_bytes = bf16_out
    said, level = [], diffusers_logging.get_verbosity()
    handler = logging.Handler()
    handler.emit = lambda record: said.append(record.getMessage())
    diffusers_logging.set_verbosity_warning()  # as users run (the tests quiet diffusers)
    logging.getLogger("diffusers").addHandler(handler)
    try:
        model = load_tadisr(tiny_dir["kolors"], tiny_dir["checkpoint"], tiny_dir["prompt_cache"],
                            dtype=torch.float8_e4m3fn, merge_lora_weights=True)
    finally:
        logging.getLogger("diffusers").removeHandler(handler)
        diffusers_logging.set_verbosity(level)
    assert not [m for m in said if "kept in float32" in m]  # diffusers' warning on the casts place_model means
    stored = {t.dtype for n, t in model.unet.named_parameters() if n.endswith("original")}
    assert stored == {FP8}
    assert model.unet.conv_in.weight.dtype == torch.bfloat16        # read as the compute dtype
    assert model.vae.decoder.conv_in.weight.dtype == torch.bfloat16
    assert tensor_bytes(model.unet) < 0.6 * bf16_bytes               # weights (not norms/biases) halved
    with torch.no_grad():
        out = model(X)
    image, mask = _psnr(out.image, ref.image), _psnr(torch.sigmoid(out.mask_logits), torch.sigmoid(ref.mask_logits))
    print(f"\nfp8_e4m3fn vs bf16 on the tiny model: image PSNR {image:.2f} dB, mask PSNR {mask:.2f} dB")
    assert torch.isfinite(out.image).all() and image > 25


@pytest.mark.parametrize("variant, block_bytes", [("paper", 64 << 10), ("release", 512 << 10)])
def test_sequential_offload_has_every_layer_on_the_device_when_it_runs(tiny_model_factory, monkeypatch, variant,
                                                                        block_bytes):
    """Whatever way the model calls its blocks (whole, piece by piece as the VAE, or the items of a
    ModuleList, which has no forward), each layer's weights are on the device when it runs, one
    block at a time, and the output is unchanged. Moves are followed by storage (`FakeDevice`: the
    device is "cpu:0", the home "cpu")."""
    model = tiny_model_factory(variant)
    ran_plain = set()
    handles = [m.register_forward_pre_hook(lambda m, a: ran_plain.add(id(m))) for m in model.modules()
               if any(True for _ in m.parameters(recurse=False))]
    with torch.no_grad():
        ref = model(X)
    for handle in handles:
        handle.remove()
    fake = FakeDevice(monkeypatch, model.parameters())
    moving = enable_sequential_offload(model, fake.DEVICE, block_bytes=block_bytes, resident_bytes=4 << 10,
                                       home=fake.HOME)
    assert len(moving) > 3, moving
    blocks = [model.get_submodule(name) for name in moving]
    owner = {id(t): block for block in blocks for t in block.parameters()}
    ran, wrong = set(), []
    counted = [-1]  # weight copies made when the blocks on the device were last counted

    def check(module, args):
        if counted[0] != sum(fake.copies.values()):
            counted[0] = sum(fake.copies.values())
            on_device = [b for b in blocks if all(fake.on_device(t) for t in b.parameters())]
            if len(on_device) > 1:
                wrong.append(f"{len(on_device)} blocks on the device at once")
        for t in module.parameters(recurse=False):
            ran.add(id(module))
            if id(t) in owner and not fake.on_device(t):
                wrong.append(f"{type(module).__name__} ran with its weights at home")

    for module in model.modules():
        module.register_forward_pre_hook(check)
    with torch.no_grad():
        out = model(X)
    assert not wrong, sorted(set(wrong))[:5]
    assert ran == ran_plain  # every layer that runs without offload was checked
    assert any(id(m) in ran for b in blocks for m in b.modules()), "no moving block ran"
    assert torch.equal(out.image, ref.image) and torch.equal(out.mask_logits, ref.mask_logits)


def test_one_precision_rule_and_one_auto():
    assert part_dtypes(torch.float16) == {"unet": torch.float16, "vae": torch.float32, "mi_decoder": torch.float32}
    assert part_dtypes(torch.bfloat16) == dict.fromkeys(("unet", "vae", "mi_decoder"), torch.bfloat16)
    assert part_dtypes(torch.float8_e4m3fn) == dict.fromkeys(("unet", "vae", "mi_decoder"), torch.bfloat16)
    assert resolve_dtype("fp8_e4m3fn", "cpu") == torch.float8_e4m3fn
    assert resolve_device("auto", auto="cpu") == torch.device("cpu")      # the host's device wins
    assert "fp8_e4m3fn" in DESCRIPTOR.dtype_choices
    with pytest.raises(ValueError, match="tile must be a multiple of 8 between 64 and 4096, got 60"):
        DESCRIPTOR.check_tile(60)
    with pytest.raises(ValueError, match="scale must be between 1 and 8, got 9"):
        DESCRIPTOR.check_scale(9)


def test_place_model_fp16_keeps_vae_fp32(tiny_model_factory):
    m = place_model(tiny_model_factory("release"), "cpu", torch.float16)
    assert m.unet.conv_in.weight.dtype == torch.float16
    assert m.vae.encoder.conv_in.weight.dtype == torch.float32
    assert m.mi_decoder.out_block[-1].weight.dtype == torch.float32
    with pytest.raises(ValueError, match="unknown offload mode"):
        place_model(m, "cpu", None, offload="disk")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, FP8])
def test_the_plan_counts_the_model_as_a_run_stores_it(dtype):
    """The plan's meta copy holds every tensor in the dtype `place_model` gives a real model, so its
    weights and its offload split (here with blocks small enough to split the tiny model) are the
    real ones. The plan used to count fp8 by rule on the fp32 model and split it as fp32, which put
    0.2 GiB too little in the full-size fp8 + offload row."""
    from tadisr_core.lowvram import offload_plan
    from tadisr_core.memory_plan import placed_meta, weight_bytes
    from tadisr_core.model import build_model
    from tadisr_core.spec import tiny_spec

    real = place_model(build_model(tiny_spec("release"), seed=0), dtype=dtype)
    planned = placed_meta(build_model(tiny_spec("release"), "meta"), dtype)
    want = {k: (v.dtype, v.shape) for k, v in real.state_dict().items()}
    assert {k: (v.dtype, v.shape) for k, v in planned.state_dict().items()} == want
    assert weight_bytes(planned) == weight_bytes(real) == tensor_bytes(real)
    small = {"block_bytes": 64 << 10, "resident_bytes": 4 << 10}
    assert offload_plan(planned, **small) == offload_plan(real, **small)
    moving, _ = offload_plan(real, **small)
    assert len(moving) > 3
    with pytest.raises(ValueError, match="takes a model built on the meta device"):
        placed_meta(real, dtype)


def test_true_size_and_offload_choice(tiny_dir):
    from tadisr_core.memory_plan import choose_offload, model_bytes

    bf = load_tadisr(tiny_dir["kolors"], tiny_dir["checkpoint"], tiny_dir["prompt_cache"], dtype=torch.bfloat16)
    f8 = load_tadisr(tiny_dir["kolors"], tiny_dir["checkpoint"], tiny_dir["prompt_cache"], dtype=torch.float8_e4m3fn)
    tensors = [*bf.state_dict().values(), bf.prompt_embeds, bf.text_embeds, bf.time_ids]  # + prompt buffers
    unique = {t.untyped_storage().data_ptr(): t for t in tensors}                           # tied weights once
    size = sum(t.numel() * t.element_size() for t in unique.values())
    assert model_bytes(bf) == size and model_bytes(f8) < size
    assert choose_offload(5 << 30, 1 << 30, 16 << 30) == "none"
    assert choose_offload(5 << 30, 1 << 30, 6 << 30) == "sequential"
    assert choose_offload(1 << 20, 1 << 20, 16 << 30, host_low_vram=True) == "sequential"


def test_sequential_offload_set_up_twice_keeps_one_set_of_hooks_and_placing_whole_takes_them(tiny_model_factory):
    from tadisr_core.lowvram import sequential_offload_device

    model = tiny_model_factory("paper")
    with torch.no_grad():
        ref = model(X)

    def hooks() -> int:
        return sum(len(m._forward_pre_hooks) for m in model.modules())

    plain = hooks()
    enable_sequential_offload(model, "cpu", block_bytes=64 << 10, resident_bytes=4 << 10)
    once = hooks()
    enable_sequential_offload(model, "cpu", block_bytes=64 << 10, resident_bytes=4 << 10)
    assert once > plain and hooks() == once
    with torch.no_grad():
        assert torch.equal(model(X).image, ref.image)
    place_model(model, "cpu")  # the whole model where it runs: the hooks would keep sending blocks home
    assert hooks() == plain and sequential_offload_device(model) is None


def test_fp8_storage_scales_each_weight_into_fp8s_range():
    """Kolors' weights are small (a 1280 x 1280 projection: std about 0.02), mostly below fp8_e4m3fn's normal
    range (2^-6): a plain cast zeroed 3.9 % of them and kept 1-3 bits of most others. Each weight is now
    stored divided by its own scale (the power of two that brings its largest magnitude into (224, 448]) and
    read back times it."""
    torch.manual_seed(0)
    layer = torch.nn.Linear(1280, 1280, bias=False)
    torch.nn.init.normal_(layer.weight, std=0.02)
    want = layer.weight.detach().clone()
    assert store_fp8(layer, torch.float32) == 1
    stored, scale = layer.parametrizations.weight.original, layer.parametrizations.weight[0].scale
    assert stored.dtype == FP8 and scale == 2.0 ** math.ceil(math.log2(float(want.abs().max()) / 448))
    assert 224 < float(stored.float().abs().max()) <= 448
    got = layer.weight
    assert torch.equal(got, stored.float() * scale) and torch.equal(fp8_weight(layer), got)
    assert float((got == 0).float().mean()) < 1e-4
    relative = float((got - want).norm() / want.norm())
    assert relative < 0.03  # 0.027: e4m3's 3 mantissa bits; the plain cast: 0.033


def test_sequential_offload_leaves_fp8_weight_reads_alone(tiny_dir):
    """Reading an fp8 layer's weight (as memory estimates do) runs no layer, so it moves no block."""
    model = load_tadisr(tiny_dir["kolors"], tiny_dir["checkpoint"], tiny_dir["prompt_cache"], dtype=FP8)
    enable_sequential_offload(model, "cpu", block_bytes=64 << 10, resident_bytes=4 << 10)
    swapper = model._tadisr_offload
    with torch.no_grad():
        model(X)
    active = swapper.active
    layer = next(m for m in model.unet.modules() if isinstance(m, torch.nn.Linear)
                 and hasattr(m, "parametrizations") and all(m is not x for x in active.modules()))
    assert layer.weight.dtype == torch.bfloat16
    assert swapper.active is active


def _stored_fp8(model) -> dict[str, torch.Tensor]:
    return {n: fp8_weight(m).clone() for n, m in model.unet.named_modules() if hasattr(m, "parametrizations")}


def _within_fp8_rounding(got: dict, want: dict, *others: dict) -> bool:
    """Equal up to one fp8_e4m3fn rounding (2^-4 of the value, 2^-10 below the normal range) of each
    value taking part: the two compared and the fp8 weight merged into or out of."""
    return all(((got[k] - want[k]).abs() <= 2 ** -4 * sum(v[k].abs() for v in (got, want, *others)) + 2 ** -8).all()
               for k in want)


def test_fp8_unet_merges_and_unmerges_lora_into_its_stored_weights(tiny_dir):
    """PEFT merges into `layer.weight`, which for an fp8-stored layer is a bf16 copy made on each read:
    merging after an fp8 load dropped the UNet LoRA (weights unchanged, adapters skipped), and unmerging
    a model merged at load took nothing away (the LoRA then ran twice). The merge goes into the stored
    fp8 weights instead, equal to a merge at load up to fp8 rounding, and the unmerge takes it out."""
    args = (tiny_dir["kolors"], tiny_dir["checkpoint"], tiny_dir["prompt_cache"])
    separate = load_tadisr(*args, dtype=FP8, merge_lora_weights=False)
    at_load = load_tadisr(*args, dtype=FP8, merge_lora_weights=True)
    unmerged, merged = _stored_fp8(separate), _stored_fp8(at_load)
    with torch.no_grad():
        ref_separate, ref_merged = separate(X).image, at_load(X).image
    assert separate.merge_lora() > 0 and separate.lora_merged
    assert _within_fp8_rounding(_stored_fp8(separate), merged, unmerged)
    with torch.no_grad():
        assert _psnr(separate(X).image, ref_merged) > 25
    assert at_load.unmerge_lora() > 0 and not at_load.lora_merged
    assert _within_fp8_rounding(_stored_fp8(at_load), unmerged, merged)
    with torch.no_grad():
        assert _psnr(at_load(X).image, ref_separate) > 25


def test_place_model_refuses_another_dtype_for_an_fp8_unet(tiny_dir):
    """A cast cannot undo fp8 rounding, and casting the stored fp8 weights left the layers computing in
    bf16 against fp32 / fp16 inputs ("self and mat2 must have the same dtype"): say to load again."""
    model = load_tadisr(tiny_dir["kolors"], tiny_dir["checkpoint"], tiny_dir["prompt_cache"], dtype=FP8)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        with pytest.raises(ValueError, match=f"stored in fp8_e4m3fn.*load the model again in {dtype_name(dtype)}"):
            place_model(model, "cpu", dtype)
    assert place_model(model, "cpu", FP8) is model and place_model(model, "cpu") is model
    assert {t.dtype for n, t in model.unet.named_parameters() if n.endswith("original")} == {FP8}
    with torch.no_grad():
        assert torch.isfinite(model(X).image).all()


def test_the_plan_orders_the_modes_lightest_last_and_the_readme_prints_it(capsys):
    """The meta model's plan: each mode needs less than the one before, larger tiles more, and 512 px tiles
    fit 8 GB. fp8 + offload moves the UNet's mid block whole, so bf16 + offload needs less: the plan lists
    it last (the lightest). The README's GPU memory tables are `memory_plan`'s output."""
    from pathlib import Path

    from tadisr_core.memory_plan import MODES, NO_BF16_MODE, main

    main()
    readme = (Path(__file__).parents[1] / "README.md").read_text(encoding="utf-8")
    tables = capsys.readouterr().out.strip().split("\n\n")
    assert len(tables) == 2 and all(table in readme for table in tables)
    need, fits = ({row.strip("| ").split(" | ")[0]: row.strip("| ").split(" | ")[1:] for row in table.splitlines()[2:]}
                  for table in tables)                      # mode: GiB at tiles 512, 768, 1024; GPU: mode per tile
    # review: the fp16 that auto runs before Ampere (VAE and decoders in fp32) was left out: it needs the most
    assert list(need) == [NO_BF16_MODE[0]] + [label for label, _, _ in MODES] and MODES[-1][0] == "bf16 + offload"
    gib = [[float(cell.removesuffix(" GiB")) for cell in cells] for cells in need.values()]
    for tile in range(3):
        column = [row[tile] for row in gib]
        assert column == sorted(column, reverse=True)
    assert gib[-1][1] < gib[-2][1]                            # bf16 + offload under fp8 + offload at 768 px
    assert all(row == sorted(row) for row in gib)
    assert fits["8 GB"][0] != "no"                           # the goal: 512 px tiles on 8 GB


def _block_tensors(model, moving) -> list[torch.Tensor]:
    return [t for name in moving for t in (*model.get_submodule(name).parameters(),
                                           *model.get_submodule(name).buffers())]


@pytest.mark.parametrize("dtype", [torch.float32, FP8])
def test_a_block_going_home_keeps_its_host_tensors_and_copies_nothing_back(tiny_dir, tiny_model_factory, monkeypatch,
                                                                           dtype):
    """Review: a block going home was moved with Module.to, which copied every weight back from the device
    into new host tensors on every swap: twice the transfers of a visit, the host memory allocated anew
    (and no longer pinned). Inference never changes a weight: the host tensors are kept and only the
    device copies dropped, one copy per visit. fp8 weights (stored under parametrizations) too."""
    from tadisr_core.lowvram import send_offloaded_block_home

    if dtype == FP8:
        model = load_tadisr(tiny_dir["kolors"], tiny_dir["checkpoint"], tiny_dir["prompt_cache"], dtype=FP8)
    else:
        model = tiny_model_factory("paper")
    with torch.no_grad():
        ref = model(X)
    fake = FakeDevice(monkeypatch, model.parameters())
    moving = enable_sequential_offload(model, fake.DEVICE, block_bytes=64 << 10, resident_bytes=4 << 10,
                                       home=fake.HOME)
    tensors = _block_tensors(model, moving)
    host = [t.data_ptr() for t in tensors]
    for _ in range(2):
        with torch.no_grad():
            out = model(X)
        assert torch.equal(out.image, ref.image) and torch.equal(out.mask_logits, ref.mask_logits)
    assert send_offloaded_block_home(model) and not send_offloaded_block_home(model)
    assert [t.data_ptr() for t in tensors] == host and not any(fake.on_device(t) for t in tensors)
    assert fake.copies["home"] == 0 and fake.copies["to device"] > 2 * len(tensors)  # each block twice at least
    if dtype == FP8:
        assert any(n.endswith("original") and t.dtype == FP8 for n, t in model.named_parameters())


def test_weights_changed_under_offload_are_kept(tiny_model_factory, monkeypatch):
    """Changing the weights of an offloaded model: a LoRA merge sends the block used last home first (its
    device copy, which would take the merge, is dropped on the way home), and a block that trains (run
    with autograd on) moves whole, so what an optimizer step changed on the device is copied back."""
    from tadisr_core.lowvram import send_offloaded_block_home

    def with_lora():  # a fresh LoRA adds nothing (B = 0)
        model, g = tiny_model_factory("paper"), torch.Generator().manual_seed(0)
        for name, p in model.named_parameters():
            if ".lora_B." in name:
                p.data.normal_(0, 0.1, generator=g)
        return model

    merged = with_lora()
    with torch.no_grad():
        unmerged = merged(X)
        assert merged.merge_lora() > 0
        ref = merged(X)
    assert not torch.equal(ref.image, unmerged.image)
    model = with_lora()
    fake = FakeDevice(monkeypatch, model.parameters())
    enable_sequential_offload(model, fake.DEVICE, block_bytes=64 << 10, resident_bytes=4 << 10, home=fake.HOME)
    with torch.no_grad():
        model(X)
        assert model.merge_lora() > 0
        assert torch.equal(model(X).image, ref.image)
    assert fake.copies["home"] == 0
    model(X)  # autograd on, trainable weights: a training step
    block = model._tadisr_offload.active
    weight = next(block.parameters())
    assert fake.on_device(weight)
    with torch.no_grad():
        weight.add_(1)
        want = weight.clone()
    assert send_offloaded_block_home(model)
    assert not fake.on_device(weight) and torch.equal(weight, want) and fake.copies["home"] > 0


def test_compile_with_sequential_offload_is_refused_and_on_the_cpu_warned_of(tiny_model_factory, monkeypatch,
                                                                              caplog, tmp_path, capsys):
    """Defects: compile with sequential offload was taken (its hooks made torch.compile trace the blocks
    again and again), and on the CPU compile spent minutes on the first tile without a word."""
    from tadisr_core import cli

    model = tiny_model_factory()
    FakeDevice(monkeypatch, model.parameters())
    enable_sequential_offload(model, FakeDevice.DEVICE, home=FakeDevice.HOME)
    compiled = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kw: compiled.append(self))
    with pytest.raises(ValueError, match=r"^compile and sequential offload do not go together .*: choose one$"):
        place_model(model, compile=True)
    assert compiled == []
    with caplog.at_level("WARNING", logger="tadisr"):
        place_model(tiny_model_factory(), compile=True)
    assert len(compiled) > 1 and any(r.getMessage().startswith("compile on the CPU: the first tile of each size "
                                                               "compiles for minutes") for r in caplog.records)
    (tmp_path / "a.png").write_bytes(b"")  # never read: refused before the model loads
    assert cli.main(["upscale", str(tmp_path / "a.png"), "-o", str(tmp_path / "out"), "--model", "demo",
                     "--compile", "--offload", "sequential"]) == 2
    assert "compile and sequential offload do not go together" in capsys.readouterr().err
