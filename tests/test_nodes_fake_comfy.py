"""host.py's ComfyUI branches, against fake comfy modules (ComfyUI is not installed here): progress and
interrupt, model management, low-VRAM and partial loads running the model with sequential offload,
extra model paths."""

from __future__ import annotations

import sys
import types

import pytest
import torch

from nodes import host


@pytest.fixture
def fake_comfy(monkeypatch, tmp_path):
    class Interrupt(Exception):
        pass

    state = {"interrupt": False, "progress": [], "loaded": [], "freed": []}
    mm = types.ModuleType("comfy.model_management")
    mm.get_torch_device = lambda: torch.device("cpu")
    mm.unet_offload_device = lambda: torch.device("cpu")
    mm.intermediate_device = lambda: torch.device("cpu")
    mm.soft_empty_cache = lambda force=False: None
    mm.free_memory = lambda n, dev, keep_loaded=(): state["freed"].append(n)
    mm.load_models_gpu = lambda models, memory_required=0, force_full_load=False: state["loaded"].append(
        (models, memory_required, force_full_load))

    def throw():
        if state["interrupt"]:
            state["interrupt"] = False
            raise Interrupt

    mm.throw_exception_if_processing_interrupted = throw
    utils = types.ModuleType("comfy.utils")

    class ProgressBar:
        def __init__(self, total, node_id=None):
            self.total = total

        def update_absolute(self, value, total=None, preview=None):
            state["progress"].append((value, total))

    utils.ProgressBar = ProgressBar
    mp = types.ModuleType("comfy.model_patcher")

    class ModelPatcher:
        def __init__(self, model, load_device, offload_device, size=0):
            model.device = offload_device  # what the real one does: why models are wrapped
            self.model, self.load_device, self.size = model, load_device, size

    mp.ModelPatcher = ModelPatcher
    mm.VRAMState = types.SimpleNamespace(LOW_VRAM=types.SimpleNamespace(name="LOW_VRAM"),
                                         NORMAL_VRAM=types.SimpleNamespace(name="NORMAL_VRAM"))
    mm.vram_state = mm.VRAMState.NORMAL_VRAM
    mm.get_total_memory = lambda dev=None: 24 << 30
    mm.get_free_memory = lambda dev=None: 20 << 30
    state["mm"] = mm
    fp = types.ModuleType("folder_paths")
    fp.models_dir = str(tmp_path / "models")
    fp.folder_names_and_paths = {"diffusers": ([str(tmp_path / "models" / "diffusers")], ["folder"])}
    fp.get_folder_paths = lambda name: list(fp.folder_names_and_paths[name][0])
    fp.get_filename_list = lambda name: []
    fp.get_input_directory = lambda: str(tmp_path / "input")
    comfy = types.ModuleType("comfy")
    for name, mod in (("comfy", comfy), ("comfy.model_management", mm), ("comfy.utils", utils),
                      ("comfy.model_patcher", mp), ("folder_paths", fp)):
        monkeypatch.setitem(sys.modules, name, mod)
    state["Interrupt"], state["fp"] = Interrupt, fp
    return state


def test_host_uses_comfyui_when_present(fake_comfy, tmp_path):
    host.register_model_folders()
    paths, exts = fake_comfy["fp"].folder_names_and_paths["tadisr"]
    assert paths == [str(tmp_path / "models" / "tadisr")] and exts == {".pkl", ".safetensors", ".sft"}
    assert host.input_directory() == str(tmp_path / "input")
    progress = host.progress_reporter(1)
    progress(2, 5)
    assert fake_comfy["progress"] == [(2, 5)]
    fake_comfy["interrupt"] = True
    with pytest.raises(fake_comfy["Interrupt"]):
        host.cancel_callback()()
    module = torch.nn.Linear(2, 2)
    patcher = host.make_patcher(module, torch.device("cpu"))
    assert patcher.model.inner is module
    with host.model_on_device(module, torch.device("cpu"), patcher, memory_required=123) as m:
        assert m is module
    assert fake_comfy["loaded"] == [([patcher], 123, False)]  # ComfyUI may load it partially
    assert patcher.size == 2 * 2 * 4 + 2 * 4


def test_low_vram_host_runs_the_model_with_sequential_offload(fake_comfy, monkeypatch, tiny_model_factory):
    from tadisr_core import devices
    from tadisr_core.memory_plan import model_bytes

    placed = []
    monkeypatch.setattr(devices, "place_model", lambda *a, **k: placed.append((a, k)))
    model = tiny_model_factory()
    gpu = torch.device("cuda", 0)  # never touched: loading and placing are faked
    patcher = host.make_patcher(model, gpu)
    assert patcher.size == model_bytes(model)
    assert host.offload_mode(model, gpu, 1 << 20) == "none" and host.offload_mode(model, torch.device("cpu")) == "none"
    fake_comfy["mm"].get_total_memory = lambda dev=None: model_bytes(model)  # weights + a tile do not fit
    assert host.offload_mode(model, gpu, 1 << 20) == "sequential"
    fake_comfy["mm"].get_total_memory = lambda dev=None: 24 << 30
    fake_comfy["mm"].vram_state = fake_comfy["mm"].VRAMState.LOW_VRAM
    for _ in range(2):
        with host.model_on_device(model, gpu, patcher, 1 << 20) as m:
            assert m is model
    # set up on each run (idempotent), as ComfyUI may have moved the model home in between
    assert fake_comfy["loaded"] == [] and placed == [((model, gpu, None), {"offload": "sequential"})] * 2


def test_offload_follows_each_run_sequential_none_sequential(fake_comfy, monkeypatch, tiny_model_factory):
    """Defect: the hooks of a sequential run stayed when a later run (a smaller tile) loaded the model
    whole, and kept sending each block back to the CPU: ComfyUI counted the model as loaded while every
    run moved the weights again. A run without offload takes them away; the next sequential one (after
    ComfyUI moved the model home) sets them up again. "cpu:0" stands for the GPU."""
    from tadisr_core import devices, lowvram

    gpu, home = torch.device("cpu", 0), torch.device("cpu")
    model = tiny_model_factory()
    plain = sum(len(m._forward_pre_hooks) for m in model.modules())

    real = devices.place_model

    def place(m, device, dtype=None, offload="none"):
        if offload != "sequential":
            return real(m, device, dtype)
        # the real one leaves the CPU alone; small blocks split the tiny model
        lowvram.enable_sequential_offload(m, device, block_bytes=64 << 10, resident_bytes=4 << 10, home=home)
        return m

    monkeypatch.setattr(devices, "place_model", place)
    patcher = host.make_patcher(model, gpu)
    for mode in ("sequential", "none", "sequential"):
        monkeypatch.setattr(host, "offload_mode", lambda *a, mode=mode, **k: mode)
        with host.model_on_device(model, gpu, patcher, 1 << 20) as m, torch.no_grad():
            m(torch.rand(1, 3, 32, 32))
        hooks = sum(len(mod._forward_pre_hooks) for mod in model.modules())
        if mode == "sequential":
            assert lowvram.sequential_offload_device(model) == gpu and hooks > plain
        else:
            assert lowvram.sequential_offload_device(model) is None and hooks == plain
        model.to(home)  # ComfyUI unloads it between runs


def test_a_partial_load_by_comfyui_runs_the_model_with_sequential_offload(fake_comfy, monkeypatch,
                                                                            tiny_model_factory):
    """Review: when ComfyUI could load only part of the weights (its low-VRAM partial load), the model was
    moved to the GPU whole anyway: out of memory on exactly the GPUs that needed the partial load. A
    partial load (the patcher counts fewer loaded bytes than the model's, or says model_lowvram on an
    older ComfyUI) runs the model block by block, as on a low-VRAM host; a full load as before."""
    from tadisr_core import devices

    placed = []
    monkeypatch.setattr(devices, "place_model", lambda *a, **k: placed.append((a, k)))
    model = tiny_model_factory()
    gpu = torch.device("cuda", 0)  # never touched: loading and placing are faked
    patcher = host.make_patcher(model, gpu)
    patcher.model_size = lambda: patcher.size
    sequential, whole = ((model, gpu, None), {"offload": "sequential"}), ((model, gpu), {})
    for loaded, want in ((patcher.size // 3, sequential), (patcher.size, whole)):
        patcher.loaded_size = lambda loaded=loaded: loaded
        placed.clear()
        with host.model_on_device(model, gpu, patcher, 1 << 20) as m:
            assert m is model
        assert placed == [want]
    del patcher.loaded_size, patcher.model_size  # an older ComfyUI's patcher
    patcher.model.model_lowvram = True
    placed.clear()
    with host.model_on_device(model, gpu, patcher, 1 << 20):
        pass
    assert placed == [sequential] and len(fake_comfy["loaded"]) == 3
    placed.clear()
    with host.model_on_device(model, torch.device("cpu"), patcher, 1 << 20):  # nothing to offload to
        pass
    assert placed == [((model, torch.device("cpu")), {})]


def test_a_sequential_run_leaves_the_host_weights_where_they_were(fake_comfy, monkeypatch, tiny_model_factory):
    """Review: after a sequential run, `.to(offload device)` copied the block used last back from the GPU
    into new host tensors, though its host tensors were still there unchanged: the device copy is dropped
    instead. `FakeDevice`: "cpu:0" stands for the GPU."""
    from tadisr_core import devices, lowvram
    from tests.fake_device import FakeDevice

    model = tiny_model_factory()
    fake = FakeDevice(monkeypatch, model.parameters())
    moving = []

    def place(m, device, dtype=None, offload="none"):  # small blocks split the tiny model
        moving[:] = lowvram.enable_sequential_offload(m, device, block_bytes=64 << 10, resident_bytes=4 << 10,
                                                      home=fake.HOME)
        return m

    monkeypatch.setattr(devices, "place_model", place)
    monkeypatch.setattr(host, "offload_mode", lambda *a, **k: "sequential")
    with host.model_on_device(model, fake.DEVICE, host.make_patcher(model, fake.DEVICE), 1 << 20) as m:
        tensors = [t for name in moving for t in m.get_submodule(name).parameters()]
        host_ptrs = [t.data_ptr() for t in tensors]
        with torch.no_grad():
            m(torch.rand(1, 3, 32, 32))
        assert any(fake.on_device(t) for t in tensors)  # the block used last
    assert [t.data_ptr() for t in tensors] == host_ptrs
    assert not any(fake.on_device(t) for t in model.parameters())


def test_extra_model_paths_add_to_models_tadisr(fake_comfy, tmp_path):
    """Defect: a `tadisr:` entry in extra_model_paths.yaml replaced the default models/tadisr."""
    fake_comfy["fp"].folder_names_and_paths["tadisr"] = (["/data/tadisr"], set())
    host.register_model_folders()
    assert fake_comfy["fp"].folder_names_and_paths["tadisr"] == (
        ["/data/tadisr", str(tmp_path / "models" / "tadisr")], {".pkl", ".safetensors", ".sft"})
    host.register_model_folders()  # twice (pack reloaded): no duplicate
    assert len(fake_comfy["fp"].folder_names_and_paths["tadisr"][0]) == 2


def test_a_sequential_run_sends_every_weight_home_afterwards(fake_comfy, monkeypatch, tiny_model_factory):
    """Defect: after a low-VRAM (sequential offload) run the resident modules and the block used last
    stayed on the GPU, where ComfyUI, which never loaded them, would not unload them. "meta" stands for
    the offload device, the CPU for the GPU."""
    from tadisr_core import devices, lowvram

    gpu = torch.device("cpu")
    model = tiny_model_factory()

    def place(m, device, dtype=None, offload="none"):  # small blocks split the tiny model
        lowvram.enable_sequential_offload(m, device, block_bytes=64 << 10, resident_bytes=4 << 10, home=gpu)
        return m

    monkeypatch.setattr(devices, "place_model", place)
    monkeypatch.setattr(host, "offload_mode", lambda *a, **k: "sequential")
    fake_comfy["mm"].unet_offload_device = lambda: torch.device("meta")
    with host.model_on_device(model, gpu, host.make_patcher(model, gpu), 1 << 20) as m, torch.no_grad():
        m(torch.rand(1, 3, 32, 32))
        assert lowvram.sequential_offload_device(model) == gpu
    assert {t.device.type for t in [*model.parameters(), *model.buffers()]} == {"meta"}
