"""Every Kolors layout users keep loads to the same model; wrong models fail with one clear error.

Tiny files are written in each layout from the tiny Kolors folder: the folder itself, a folder
without vae/ plus a VAE file, and single UNet + VAE files with diffusers names and with the
original SGM / LDM names (whose writer is checked against diffusers' own LDM converters).
"""

from __future__ import annotations

import json
import os
import re
import shutil

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from tadisr_core import cli
from tadisr_core.backbone import check_backbone, load_unet
from tadisr_core.kolors_files import (
    KolorsFiles,
    KolorsFolderError,
    find_kolors_files,
    list_kolors_candidates,
    resolve_choice,
)
from tadisr_core.kolors_identity import NotKolorsError, check_unet, check_vae
from tadisr_core.loading import load_tadisr
from tadisr_core.spec import UNetSpec, full_spec

X = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(3))


# -- writers for the layouts (test fixtures, not product code) ---------------------------------------
def _sgm_unet_name(k: str) -> str:
    """diffusers -> SGM names for the 3-level, 2-resnet Kolors UNet."""
    res = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
           "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
    fixed = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
             "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",
             "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}
    for a, b in fixed.items():
        if k.startswith(a + "."):
            return b + k[len(a):]

    def r(rest):
        head, _, tail = rest.partition(".")
        return f"{res.get(head, head)}.{tail}"

    if m := re.match(r"down_blocks\.(\d)\.resnets\.(\d)\.(.*)", k):
        return f"input_blocks.{1 + 3 * int(m[1]) + int(m[2])}.0.{r(m[3])}"
    if m := re.match(r"down_blocks\.(\d)\.attentions\.(\d)\.(.*)", k):
        return f"input_blocks.{1 + 3 * int(m[1]) + int(m[2])}.1.{m[3]}"
    if m := re.match(r"down_blocks\.(\d)\.downsamplers\.0\.conv\.(.*)", k):
        return f"input_blocks.{3 * (int(m[1]) + 1)}.0.op.{m[2]}"
    if m := re.match(r"mid_block\.resnets\.(\d)\.(.*)", k):
        return f"middle_block.{2 * int(m[1])}.{r(m[2])}"
    if m := re.match(r"mid_block\.attentions\.0\.(.*)", k):
        return f"middle_block.1.{m[1]}"
    if m := re.match(r"up_blocks\.(\d)\.resnets\.(\d)\.(.*)", k):
        return f"output_blocks.{3 * int(m[1]) + int(m[2])}.0.{r(m[3])}"
    if m := re.match(r"up_blocks\.(\d)\.attentions\.(\d)\.(.*)", k):
        return f"output_blocks.{3 * int(m[1]) + int(m[2])}.1.{m[3]}"
    if m := re.match(r"up_blocks\.(\d)\.upsamplers\.0\.conv\.(.*)", k):
        return f"output_blocks.{3 * int(m[1]) + 2}.{2 if int(m[1]) < 2 else 1}.conv.{m[2]}"
    return k


def _ldm_vae_name(k: str) -> str:
    attn = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
    if m := re.match(r"(encoder|decoder)\.mid_block\.attentions\.0\.(group_norm|to_q|to_k|to_v|to_out\.0)\.(.*)", k):
        return f"{m[1]}.mid.attn_1.{attn[m[2]]}.{m[3]}"
    if m := re.match(r"(encoder|decoder)\.mid_block\.resnets\.(\d)\.(.*)", k):
        return f"{m[1]}.mid.block_{int(m[2]) + 1}.{m[3].replace('conv_shortcut', 'nin_shortcut')}"
    if m := re.match(r"encoder\.down_blocks\.(\d)\.resnets\.(\d)\.(.*)", k):
        return f"encoder.down.{m[1]}.block.{m[2]}.{m[3].replace('conv_shortcut', 'nin_shortcut')}"
    if m := re.match(r"encoder\.down_blocks\.(\d)\.downsamplers\.0\.(.*)", k):
        return f"encoder.down.{m[1]}.downsample.{m[2]}"
    if m := re.match(r"decoder\.up_blocks\.(\d)\.resnets\.(\d)\.(.*)", k):
        return f"decoder.up.{3 - int(m[1])}.block.{m[2]}.{m[3].replace('conv_shortcut', 'nin_shortcut')}"
    if m := re.match(r"decoder\.up_blocks\.(\d)\.upsamplers\.0\.(.*)", k):
        return f"decoder.up.{3 - int(m[1])}.upsample.{m[2]}"
    if m := re.match(r"(encoder|decoder)\.conv_norm_out\.(.*)", k):
        return f"{m[1]}.norm_out.{m[2]}"
    return k


def _sgm_unet(sd):
    return {_sgm_unet_name(k): v for k, v in sd.items()}


def _ldm_vae(sd):
    out = {}
    for k, v in sd.items():
        new = _ldm_vae_name(k)
        out[new] = v[:, :, None, None].contiguous() if ".attn_1." in new and v.ndim == 2 else v
    return out


def _with_config(folder):
    return {"config": (folder / "config.json").read_text()}


@pytest.fixture(scope="module")
def layouts(tiny_dir, tmp_path_factory):
    """Paths of each layout built from the tiny Kolors folder."""
    root = tmp_path_factory.mktemp("layouts")
    kolors = tiny_dir["kolors"]
    unet_sd = load_file(kolors / "unet" / "diffusion_pytorch_model.safetensors")
    vae_sd = load_file(kolors / "vae" / "diffusion_pytorch_model.safetensors")
    no_vae = root / "diffusers" / "KolorsNoVae"
    shutil.copytree(kolors, no_vae, ignore=shutil.ignore_patterns("vae"))
    for sub in ("unet", "vae"):
        (root / sub).mkdir()
    paths = {"folder": kolors, "no_vae": no_vae, "root": root}
    paths["unet_file"] = root / "unet" / "kolors_unet.safetensors"
    save_file(unet_sd, paths["unet_file"], metadata=_with_config(kolors / "unet"))
    paths["vae_file"] = root / "vae" / "sdxl_vae.safetensors"
    save_file(vae_sd, paths["vae_file"], metadata=_with_config(kolors / "vae"))
    paths["unet_sgm"] = root / "unet" / "kolors_unet_sgm.safetensors"
    save_file({f"model.diffusion_model.{k}": v for k, v in _sgm_unet(unet_sd).items()}, paths["unet_sgm"],
              metadata=_with_config(kolors / "unet"))
    paths["vae_ldm"] = root / "vae" / "sdxl_vae_ldm.safetensors"
    save_file(_ldm_vae(vae_sd), paths["vae_ldm"], metadata=_with_config(kolors / "vae"))
    # all-in-one checkpoints (models/checkpoints): SGM UNet + LDM VAE + a text encoder's tensor, and one without VAE
    (root / "checkpoints").mkdir()
    sgm = {f"model.diffusion_model.{k}": v for k, v in _sgm_unet(unet_sd).items()}
    other = {"conditioner.embedders.0.transformer.final_layernorm.weight": torch.ones(4)}
    configs = {f"{part}_config": (kolors / part / "config.json").read_text() for part in ("unet", "vae")}
    paths["aio"] = root / "checkpoints" / "kolors_aio.safetensors"
    save_file({**sgm, **{f"first_stage_model.{k}": v for k, v in _ldm_vae(vae_sd).items()}, **other}, paths["aio"],
              metadata=configs)
    paths["aio_no_vae"] = root / "checkpoints" / "kolors_no_vae.safetensors"
    save_file({**sgm, **other}, paths["aio_no_vae"], metadata=configs)
    return paths


def test_sgm_writer_agrees_with_diffusers_converters(tiny_dir, layouts):
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint

    kolors = tiny_dir["kolors"]
    unet_sd = load_file(kolors / "unet" / "diffusion_pytorch_model.safetensors")
    cfg = json.loads((kolors / "unet" / "config.json").read_text())
    back = convert_ldm_unet_checkpoint(load_file(layouts["unet_sgm"]), cfg)
    assert set(back) == set(unet_sd) - {"encoder_hid_proj.weight", "encoder_hid_proj.bias"}
    assert all(torch.equal(back[k], unet_sd[k]) for k in back)
    vae_sd = load_file(kolors / "vae" / "diffusion_pytorch_model.safetensors")
    vcfg = json.loads((kolors / "vae" / "config.json").read_text())
    vback = convert_ldm_vae_checkpoint(load_file(layouts["vae_ldm"]), vcfg)
    assert set(vback) == set(vae_sd)
    assert all(torch.equal(vback[k].reshape(vae_sd[k].shape), vae_sd[k]) for k in vback)


@pytest.fixture(scope="module")
def reference(tiny_dir):
    model = load_tadisr(tiny_dir["kolors"], tiny_dir["checkpoint"], tiny_dir["prompt_cache"])
    with torch.no_grad():
        return model(X)


@pytest.mark.parametrize("layout", ["no_vae+vae_file", "unet_file+vae_file", "unet_sgm+vae_ldm", "unet_sgm+vae_file",
                                    "aio+", "aio_no_vae+vae_ldm", "no_vae+aio"])
def test_every_layout_loads_the_same_model(layout, layouts, tiny_dir, reference):
    first, second = layout.split("+")
    kolors = layouts["no_vae"] if first == "no_vae" else None
    unet = None if first == "no_vae" else layouts[first]
    vae = layouts[second] if second else None  # an all-in-one checkpoint brings its own VAE
    model = load_tadisr(kolors, tiny_dir["checkpoint"], tiny_dir["prompt_cache"], unet=unet, vae=vae)
    with torch.no_grad():
        out = model(X)
    assert torch.equal(out.image, reference.image) and torch.equal(out.mask_logits, reference.mask_logits)


@pytest.mark.parametrize("layout", ["unet_sgm+vae_ldm", "aio+", "no_vae+vae_ldm"])
def test_ldm_layouts_load_in_bf16_with_the_lora_merged(layout, layouts, tiny_dir):
    """In bf16 the LoRA is merged in fp32 from the file's weights read again; an LDM VAE file stores the
    attention projections as 1x1 convolutions, and that merge used to fail on them (a shape error on
    every GPU load of ComfyUI's sdxl_vae.safetensors or an all-in-one checkpoint)."""
    first, second = layout.split("+")
    kolors = layouts["no_vae"] if first == "no_vae" else None
    unet = None if first == "no_vae" else layouts[first]
    model = load_tadisr(kolors, tiny_dir["checkpoint"], tiny_dir["prompt_cache"], unet=unet,
                        vae=layouts[second] if second else None, dtype=torch.bfloat16)
    want = load_tadisr(tiny_dir["kolors"], tiny_dir["checkpoint"], tiny_dir["prompt_cache"], dtype=torch.bfloat16)
    got, ref = model.state_dict(), want.state_dict()
    assert got.keys() == ref.keys() and all(torch.equal(got[k], ref[k].reshape(got[k].shape)) for k in ref)


def test_folder_without_vae_says_what_to_add(layouts, tiny_dir):
    with pytest.raises(KolorsFolderError, match=r"KolorsNoVae has no vae/ folder: the Kolors VAE is the SDXL VAE: "
                                                 r"pass vae=FILE\|DIR"):
        load_tadisr(layouts["no_vae"], tiny_dir["checkpoint"], tiny_dir["prompt_cache"])


def _cli_upscale(tmp_path, tiny_dir, *weights):
    src = tmp_path / "in"
    src.mkdir(parents=True, exist_ok=True)
    from PIL import Image

    Image.fromarray((X[0].permute(1, 2, 0).numpy() * 255).round().astype("uint8")).save(src / "x.png")
    os.utime(src / "x.png", (1_700_000_000,) * 2)  # one input for every call: outputs record its time too
    out = tmp_path / "out"
    code = cli.main(["upscale", str(src / "x.png"), "-o", str(out), *weights, "--checkpoint",
                     str(tiny_dir["checkpoint"]), "--prompt-cache", str(tiny_dir["prompt_cache"]), "--scale", "2",
                     "--tile", "64", "--overlap", "16", "--device", "cpu", "--dtype", "fp32", "-q"])
    return code, out


def test_cli_layouts_give_identical_files(layouts, tiny_dir, tmp_path):
    code, ref = _cli_upscale(tmp_path / "a", tiny_dir, "--kolors", str(layouts["folder"]))
    assert code == 0
    for i, weights in enumerate((["--kolors", str(layouts["no_vae"]), "--vae", str(layouts["vae_file"])],
                                 ["--unet", str(layouts["unet_sgm"]), "--vae", str(layouts["vae_ldm"])],
                                 ["--unet", str(layouts["aio"])])):
        code, out = _cli_upscale(tmp_path / f"b{i}", tiny_dir, *weights)
        assert code == 0
        for f in ref.iterdir():  # the pixels: the files record which weight files made them
            with Image.open(out / f.name) as got, Image.open(f) as want:
                assert got.tobytes() == want.tobytes() and got.mode == want.mode, f.name


def test_cli_wrong_model_is_one_line_error(tiny_dir, tmp_path, capsys, sd15_folder):
    code, _ = _cli_upscale(tmp_path, tiny_dir, "--kolors", str(sd15_folder))
    assert code == cli.EXIT_SETUP
    err = capsys.readouterr().err
    assert "not a Kolors UNet" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


# -- wrong models ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sd15_folder(tmp_path_factory):
    """A tiny SD 1.5-shaped diffusers folder (unet/ + vae/), as users keep in models/diffusers."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    root = tmp_path_factory.mktemp("sd15") / "sd15"
    torch.manual_seed(0)
    UNet2DConditionModel(sample_size=8, block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4,
                         down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                         up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=16,
                         attention_head_dim=2).save_pretrained(root / "unet")
    AutoencoderKL(block_out_channels=(8, 16, 32, 32), norm_num_groups=4, scaling_factor=0.18215,
                  down_block_types=("DownEncoderBlock2D",) * 4,
                  up_block_types=("UpDecoderBlock2D",) * 4).save_pretrained(root / "vae")
    return root


def test_non_kolors_unet_fails_before_anything_is_built(sd15_folder, tiny_dir, monkeypatch):
    import tadisr_core.backbone as backbone

    def boom(*a, **k):
        raise AssertionError("a module was built")

    monkeypatch.setattr(backbone, "build_unet", boom)
    path = sd15_folder / "unet" / "diffusion_pytorch_model.safetensors"
    with pytest.raises(NotKolorsError, match=re.escape(str(path)) + r": not a Kolors UNet: expected the ChatGLM3 "
                                             r"text projection encoder_hid_proj 4096->2048; found no encoder_hid_proj"):
        load_tadisr(sd15_folder, tiny_dir["checkpoint"], tiny_dir["prompt_cache"])


def test_sd15_vae_is_rejected_by_its_scaling_factor(sd15_folder, tiny_dir):
    with pytest.raises(NotKolorsError, match=r"vae.*not a Kolors VAE \(the SDXL VAE\): expected scaling_factor "
                                             r"0.13025 .*found 0.18215"):
        load_tadisr(None, tiny_dir["checkpoint"], tiny_dir["prompt_cache"], unet=tiny_dir["kolors"],
                    vae=sd15_folder / "vae")


def test_the_fp16_fix_vae_loads_with_a_warning_that_it_is_rescaled_inside(layouts, tiny_dir, tmp_path, caplog):
    """madebyollin's sdxl-vae-fp16-fix has the SDXL VAE's shapes and weights rescaled inside; TADiSR reads the
    VAE's inner features, so the output differs. It used to load without a word."""
    kolors = tiny_dir["kolors"]
    fix = tmp_path / "sdxl-vae-fp16-fix"  # its diffusers folder: config.json says force_upcast false
    shutil.copytree(kolors / "vae", fix)
    config = json.loads((fix / "config.json").read_text())
    (fix / "config.json").write_text(json.dumps({**config, "force_upcast": False}))
    named = tmp_path / "sdxl_vae_fp16_fix.safetensors"  # its single file, no config
    shutil.copy(layouts["vae_file"], named)
    cases = {"folder": (find_kolors_files(kolors, vae=fix), "its config says force_upcast false"),
             "file": (find_kolors_files(kolors, vae=named), "it is named fp16-fix")}
    for files, why in cases.values():
        caplog.clear()
        with caplog.at_level("WARNING"):
            check_backbone(files)
        assert f"{files.vae} looks like sdxl-vae-fp16-fix ({why}): the SDXL VAE's shapes with weights rescaled " \
               f"inside" in caplog.text and "use Kolors' vae/ or the original SDXL VAE" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):
        check_backbone(find_kolors_files(kolors, vae=layouts["vae_file"]))
        check_backbone(kolors)
    assert caplog.text == ""


def test_swapped_or_foreign_files_are_named(layouts, sd15_folder, tmp_path):
    with pytest.raises(NotKolorsError, match=r"kolors_unet.safetensors: not a Kolors VAE"):
        check_vae(layouts["unet_file"])
    with pytest.raises(NotKolorsError, match=r"sdxl_vae.safetensors: not a Kolors UNet: expected a diffusion UNet"):
        check_unet(layouts["vae_file"])
    sd = load_file(layouts["unet_file"])
    sd["down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight"] = torch.zeros(16, 7)
    bad = tmp_path / "bad.safetensors"
    save_file(sd, bad)
    with pytest.raises(NotKolorsError, match=r"bad.safetensors: not a Kolors UNet: expected encoder_hid_proj output "
                                             r"= cross-attention dim; found 32 vs 7"):
        check_unet(bad)


def test_full_size_spec_is_found_from_shapes_alone(monkeypatch):
    """A real Kolors file has no config: the full spec must come from its shapes (meta model here)."""
    import tadisr_core.kolors_identity as ki
    from tadisr_core.backbone import build_unet
    from tadisr_core.streaming import TensorInfo, WeightsHeader

    meta = build_unet(UNetSpec(), "meta").state_dict()
    table = {k: TensorInfo(v.dtype, tuple(v.shape), 0, 0) for k, v in meta.items()}
    monkeypatch.setattr(ki, "read_header", lambda p: WeightsHeader(p, table, {}))
    assert check_unet("kolors.safetensors").spec == full_spec().unet


# -- ComfyUI loader helpers --------------------------------------------------------------------------
def test_candidates_and_choices(layouts, tiny_dir, sd15_folder, reference):
    diffusers_dir = layouts["root"] / "diffusers"
    shutil.copytree(tiny_dir["kolors"], diffusers_dir / "Kolors", dirs_exist_ok=True)
    shutil.copytree(sd15_folder, diffusers_dir / "sd15", dirs_exist_ok=True)
    dirs = ([diffusers_dir], [layouts["root"] / "unet"], [layouts["root"] / "vae"], [layouts["root"] / "checkpoints"])
    in_unet_dir = layouts["root"] / "unet" / "kolors_aio_copy.safetensors"  # an all-in-one among the UNet files
    shutil.copy(layouts["aio"], in_unet_dir)
    names = list_kolors_candidates(*dirs)
    assert "Kolors" in names and "sd15" not in " ".join(names)
    assert "KolorsNoVae + vae/sdxl_vae.safetensors" in names
    assert "unet/kolors_unet_sgm.safetensors + vae/sdxl_vae_ldm.safetensors" in names
    assert "checkpoints/kolors_aio.safetensors" in names and "unet/kolors_aio_copy.safetensors" in names  # VAE inside
    assert "checkpoints/kolors_no_vae.safetensors + vae/sdxl_vae.safetensors" in names
    # what the loader node does with a choice: the files behind each name (each file's loading is
    # test_every_layout_loads_the_same_model's), and one choice loaded through to the model
    copied, no_vae = diffusers_dir / "Kolors", layouts["no_vae"]
    want = {"Kolors": find_kolors_files(copied)}
    for vae in ("vae_file", "vae_ldm"):
        want[f"KolorsNoVae + vae/{layouts[vae].name}"] = find_kolors_files(no_vae, None, layouts[vae])
        for unet in ("unet_file", "unet_sgm"):
            want[f"unet/{layouts[unet].name} + vae/{layouts[vae].name}"] = \
                find_kolors_files(None, layouts[unet], layouts[vae])
        want[f"checkpoints/kolors_no_vae.safetensors + vae/{layouts[vae].name}"] = \
            find_kolors_files(None, layouts["aio_no_vae"], layouts[vae])
    want["checkpoints/kolors_aio.safetensors"] = KolorsFiles(layouts["aio"], layouts["aio"])
    want["unet/kolors_aio_copy.safetensors"] = KolorsFiles(in_unet_dir, in_unet_dir)
    assert {name: resolve_choice(name, *dirs) for name in names} == want
    model = load_tadisr(resolve_choice("unet/kolors_unet.safetensors + vae/sdxl_vae_ldm.safetensors", *dirs),
                        tiny_dir["checkpoint"], tiny_dir["prompt_cache"])
    with torch.no_grad():
        assert torch.equal(model(X).image, reference.image)
    from tadisr_core.prompt import list_text_encoders

    assert list_text_encoders(diffusers_dir, layouts["root"] / "LLM") == [diffusers_dir / "Kolors", layouts["no_vae"]]
    with pytest.raises(KolorsFolderError, match="needs a VAE file too"):
        resolve_choice("unet/kolors_unet.safetensors", *dirs)
    with pytest.raises(KolorsFolderError, match="kolors_no_vae.safetensors': a single UNet file needs a VAE file too"):
        resolve_choice("checkpoints/kolors_no_vae.safetensors", *dirs)
    with pytest.raises(KolorsFolderError, match="no vae given: pass kolors_dir=DIR .* or vae=FILE"):
        find_kolors_files(None, layouts["aio_no_vae"])
    with pytest.raises(KolorsFolderError, match="'nope' not found in models/diffusers"):
        resolve_choice("nope", *dirs)


def test_listing_passes_over_other_models_unparsed_and_checks_each_file_once(layouts, tmp_path, monkeypatch):
    """models/checkpoints holds many large non-Kolors models: a header without Kolors' text projection
    is passed over without parsing, and a file already checked is not checked again until it changes."""
    from tadisr_core import kolors_identity

    folder = tmp_path / "checkpoints"
    folder.mkdir()
    shutil.copy(layouts["vae_ldm"], folder / "other_model.safetensors")
    shutil.copy(layouts["aio"], folder / "kolors.safetensors")
    checked, real = [], kolors_identity.check_unet
    monkeypatch.setattr(kolors_identity, "check_unet", lambda path, *a: checked.append(path.name) or real(path, *a))
    for _ in range(2):
        assert list_kolors_candidates([], [], [], [folder]) == ["checkpoints/kolors.safetensors"]
    assert checked == ["kolors.safetensors"]
    (folder / "kolors.safetensors").write_bytes((folder / "other_model.safetensors").read_bytes())  # replaced
    assert list_kolors_candidates([], [], [], [folder]) == []


def test_file_names_holding_a_plus_are_listed_and_resolved(layouts, tmp_path):
    """" + " also joins a choice's UNet and VAE parts: a name that holds it is split at the last " + vae/"
    (the first " + " was taken, so such a choice could not be loaded)."""
    dirs = [tmp_path / sub for sub in ("diffusers", "unet", "vae")]
    no_vae, unet = dirs[0] / "Kolors + extra", dirs[1] / "kolors + detail.safetensors"
    vae = dirs[2] / "sdxl + fix.safetensors"
    shutil.copytree(layouts["no_vae"], no_vae)
    for src, dst in ((layouts["unet_file"], unet), (layouts["vae_file"], vae)):
        dst.parent.mkdir()
        shutil.copy(src, dst)
    names = list_kolors_candidates(*[[d] for d in dirs])
    assert names == ["Kolors + extra + vae/sdxl + fix.safetensors",
                     "unet/kolors + detail.safetensors + vae/sdxl + fix.safetensors"]
    assert [resolve_choice(n, *[[d] for d in dirs]) for n in names] == [find_kolors_files(no_vae, None, vae),
                                                                        find_kolors_files(None, unet, vae)]


def test_a_file_given_as_the_kolors_folder_is_said_to_be_one(layouts):
    with pytest.raises(KolorsFolderError, match=r"kolors_dir \S+kolors_unet.safetensors is a file, not a Kolors "
                                                r"folder: pass a Kolors UNet file .* as unet with"):
        find_kolors_files(layouts["unet_file"])


def test_find_files_prefers_explicit_parts(layouts):
    files = find_kolors_files(layouts["folder"], vae=layouts["vae_ldm"])
    assert files.vae == layouts["vae_ldm"] and files.vae_config is None and files.root == layouts["folder"]
    assert files.unet.parent.name == "unet"


# -- memory: the target dtype from the first byte ----------------------------------------------------
def test_bf16_load_never_creates_an_fp32_tensor(layouts, tmp_path):
    """fp16 file (as Kolors ships) -> bf16: every tensor made during the load is bf16 or meta."""
    from torch.utils._python_dispatch import TorchDispatchMode

    sd = {k: v.half() for k, v in load_file(layouts["unet_file"]).items()}
    half = tmp_path / "unet.fp16.safetensors"
    save_file(sd, half, metadata=load_file_metadata(layouts["unet_file"]))
    seen = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (list, tuple)) else [out]:
                if isinstance(t, torch.Tensor) and not t.is_meta and t.dtype == torch.float32 and t.numel() > 1:
                    seen.append((str(func), tuple(t.shape)))
            return out

    files = find_kolors_files(None, half, layouts["vae_file"])
    with Record():
        unet = load_unet(files, torch.bfloat16)
    assert not seen, seen[:5]
    assert {p.dtype for p in unet.parameters()} == {torch.bfloat16}
    assert torch.equal(unet.conv_in.weight, sd["conv_in.weight"].to(torch.bfloat16))


def load_file_metadata(path):
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return f.metadata()


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy-pickle"])
def test_bin_weights_load_like_safetensors(tiny_dir, tmp_path, legacy):
    """Also a legacy (pre-zip) torch file, which cannot be memory-mapped: it is read whole instead."""
    folder = tmp_path / "kolors"
    shutil.copytree(tiny_dir["kolors"], folder, ignore=shutil.ignore_patterns("text_encoder"))
    st = folder / "unet" / "diffusion_pytorch_model.safetensors"
    torch.save(load_file(st), st.with_suffix(".bin"), _use_new_zipfile_serialization=not legacy)
    st.unlink()
    files = find_kolors_files(folder)
    assert files.unet.suffix == ".bin"
    a, b = load_unet(files, torch.bfloat16), load_unet(find_kolors_files(tiny_dir["kolors"]), torch.bfloat16)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_a_torch_file_under_a_safetensors_name_loads_by_its_bytes(tiny_dir, tmp_path):
    """torch.load hands any path ending in .safetensors to safetensors without looking at the bytes: a UNet
    saved by torch.save under diffusers' safetensors name was a raw SafetensorError ("header too large")."""
    folder = tmp_path / "kolors"
    shutil.copytree(tiny_dir["kolors"], folder, ignore=shutil.ignore_patterns("text_encoder"))
    st = folder / "unet" / "diffusion_pytorch_model.safetensors"
    torch.save(load_file(tiny_dir["kolors"] / "unet" / "diffusion_pytorch_model.safetensors"), st)
    files = find_kolors_files(folder)
    assert files.unet == st
    a, b = load_unet(files, torch.bfloat16), load_unet(find_kolors_files(tiny_dir["kolors"]), torch.bfloat16)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_a_training_checkpoint_pickle_is_unwrapped_or_refused_in_one_line(tiny_dir, tmp_path):
    """A .ckpt of {"state_dict": weights} loads like the weights; one that pickles other objects is
    refused with one line naming the file and the safe way out (never an unsafe load)."""
    from pathlib import PurePosixPath

    from tadisr_core.streaming import iter_tensors, read_header

    weights = load_file(tiny_dir["kolors"] / "unet" / "diffusion_pytorch_model.safetensors")
    wrapped = tmp_path / "trained.ckpt"
    torch.save({"state_dict": weights, "epoch": 3}, wrapped)
    assert set(read_header(wrapped).tensors) == set(weights)
    assert all(torch.equal(t, weights[k]) for k, t in iter_tensors(wrapped))
    other = tmp_path / "lightning.ckpt"
    torch.save({"state_dict": weights, "path": PurePosixPath("/x")}, other)
    with pytest.raises(ValueError) as err:
        read_header(other)
    message = str(err.value)
    assert message.startswith(f"{other} is a pickle that holds more than weights") and "\n" not in message
    assert "safetensors.torch.save_file" in message and "weights_only" not in message


@pytest.mark.parametrize("variant", ["", "fp16"])
def test_sharded_weights_are_named_with_how_to_join_them(tiny_dir, tmp_path, variant):
    """Also the fp16 variant's shards (diffusion_pytorch_model.safetensors.index.fp16.json), which were
    reported as no weights at all; its advice reads them as that variant."""
    folder = tmp_path / "unet"
    folder.mkdir()
    shutil.copy(tiny_dir["kolors"] / "unet" / "config.json", folder)
    dot = f".{variant}" if variant else ""
    index = f"diffusion_pytorch_model.safetensors.index{dot}.json"
    (folder / index).write_text(json.dumps({"weight_map": {}}))
    for k in (1, 2):
        (folder / f"diffusion_pytorch_model{dot}-0000{k}-of-00002.safetensors").write_bytes(b"")
    read = f"from_pretrained(DIR, variant='{variant}')" if variant else "from_pretrained(DIR)"
    with pytest.raises(KolorsFolderError, match=re.escape(f"{folder} holds its weights in shards ({index})")
                       + ".*" + re.escape(f"{read} then save_pretrained")):
        find_kolors_files(None, unet=folder, vae=tiny_dir["kolors"] / "vae")


def test_a_sharded_unet_in_models_unet_is_named_once_by_the_listing(tiny_dir, tmp_path, caplog):
    """A Kolors fine-tune saved in fp32 by diffusers is sharded (its default max_shard_size is 10 GB, the UNet
    10.3 GB). In models/unet it vanished from the loader's list with a debug line alone."""
    folder = tmp_path / "unet" / "kolors_finetune"
    folder.mkdir(parents=True)
    shutil.copy(tiny_dir["kolors"] / "unet" / "config.json", folder)
    sd = load_file(tiny_dir["kolors"] / "unet" / "diffusion_pytorch_model.safetensors")
    keys = sorted(sd)
    weight_map = {}
    for k, part in enumerate((keys[: len(keys) // 2], keys[len(keys) // 2:]), 1):
        name = f"diffusion_pytorch_model-0000{k}-of-00002.safetensors"
        save_file({key: sd[key] for key in part}, folder / name)
        weight_map.update(dict.fromkeys(part, name))
    index = "diffusion_pytorch_model.safetensors.index.json"
    (folder / index).write_text(json.dumps({"weight_map": weight_map}))
    for _ in range(2):  # said once, not on every listing
        with caplog.at_level("WARNING"):
            assert list_kolors_candidates([], [tmp_path / "unet"], [tiny_dir["kolors"] / "vae"], []) == []
    assert caplog.text.count(f"not listed: {folder} holds its weights in shards ({index}), which TADiSR does not "
                             f"read: save them as one file, e.g. with diffusers' from_pretrained(DIR) then "
                             f"save_pretrained(NEW_DIR, max_shard_size='50GB'), or use Kwai-Kolors/Kolors' unet/ "
                             f"as published") == 1


def test_a_nan_in_the_vae_file_names_the_vae(tiny_dir, tmp_path):
    from safetensors.torch import save_file

    from tadisr_core.checkpoint import CheckpointError
    from tadisr_core.loading import load_tadisr

    vae = tmp_path / "vae"
    shutil.copytree(tiny_dir["kolors"] / "vae", vae)
    weights = vae / "diffusion_pytorch_model.safetensors"
    tensors = load_file(weights)
    key = next(k for k in sorted(tensors) if k.startswith("decoder.") and k.endswith("weight"))
    tensors[key] = torch.full_like(tensors[key], float("nan"))
    save_file(tensors, str(weights))
    with pytest.raises(CheckpointError, match=r"the Kolors VAE weights are damaged \(re-download the VAE file given "
                                              r"as --vae, or the Kolors folder's vae/\)"):
        load_tadisr(tiny_dir["kolors"], tiny_dir["checkpoint"], tiny_dir["prompt_cache"], vae=vae)


def test_a_malformed_file_among_the_unets_is_not_kolors_and_never_breaks_the_listing(tmp_path):
    """Kolors' tensor names at shapes no Kolors file has: NotKolorsError naming the file (it used to be a
    bare IndexError, which would have broken the loader's list), and the file is not listed."""
    from tadisr_core.kolors_identity import NotKolorsError, check_unet, check_vae

    odd = tmp_path / "unet" / "odd.safetensors"
    odd.parent.mkdir()
    save_file({"conv_in.weight": torch.zeros(3), "encoder_hid_proj.weight": torch.zeros(2),
               "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight": torch.zeros(5)}, str(odd))
    with pytest.raises(NotKolorsError, match=r"odd.safetensors: not a Kolors UNet: .*\(IndexError: "):
        check_unet(odd)
    flat = tmp_path / "vae" / "flat.safetensors"
    flat.parent.mkdir()
    save_file({"quant_conv.weight": torch.zeros(8), "encoder.conv_in.weight": torch.zeros(1),
               "decoder.conv_out.weight": torch.zeros(1), "encoder.down_blocks.0.resnets.0.conv1.weight":
               torch.zeros(())}, str(flat))
    with pytest.raises(NotKolorsError, match=r"flat.safetensors: not a Kolors VAE \(the SDXL VAE\): "):
        check_vae(flat)
    assert list_kolors_candidates([], [odd.parent], [flat.parent]) == []


def test_a_damaged_or_foreign_config_is_named_and_never_breaks_the_listing(layouts, tiny_dir, tmp_path, caplog):
    """A truncated unet/config.json is NotKolorsError naming it (it named no file), as is one that is JSON but
    not an object, and such entries are left out of the loader's list; a VAE whose metadata 'config' is
    another tool's note ("v1-inference.yaml") is judged by its weights, as an SDXL VAE without metadata is
    (it broke the whole list with an AttributeError)."""
    diffusers = tmp_path / "diffusers"
    for name, config in (("Kolors", None), ("KolorsCut", '{"encoder_hid_dim_type": '), ("KolorsList", '["x"]')):
        shutil.copytree(tiny_dir["kolors"], diffusers / name)
        if config is not None:
            (diffusers / name / "unet" / "config.json").write_text(config)
    cut = diffusers / "KolorsCut" / "unet" / "config.json"
    with pytest.raises(NotKolorsError, match=re.escape(f"{cut}: not valid JSON (Expecting")):
        load_tadisr(diffusers / "KolorsCut", tiny_dir["checkpoint"], tiny_dir["prompt_cache"])
    with pytest.raises(NotKolorsError, match=r"KolorsList/unet/config.json: a JSON list, not the object"):
        check_unet(diffusers / "KolorsList" / "unet" / "diffusion_pytorch_model.safetensors",
                   diffusers / "KolorsList" / "unet" / "config.json")
    vaes = tmp_path / "vae"
    vaes.mkdir()
    shutil.copy(layouts["vae_file"], vaes / "sdxl_vae.safetensors")
    other = vaes / "other_vae.safetensors"
    save_file(load_file(layouts["vae_file"]), str(other), metadata={"config": '"v1-inference.yaml"'})
    with pytest.raises(ValueError):  # the note is ignored: without its config this tiny VAE is no SDXL one
        check_vae(other)
    with caplog.at_level("WARNING", logger="tadisr"):
        names = list_kolors_candidates([diffusers], [layouts["root"] / "unet"], [vaes])
    assert names[0] == "Kolors" and "KolorsCut" not in " ".join(names) and "KolorsList" not in " ".join(names)
    assert "unet/kolors_unet.safetensors + vae/sdxl_vae.safetensors" in names and "other_vae" not in " ".join(names)
    assert f"{diffusers / 'KolorsCut'} is left out of the Kolors list: {cut}: not valid JSON" in caplog.text


# -- fp8 and scaled fp8 UNets (ComfyUI's low-memory copies of a model) --------------------------------
def _fp8_layouts(kolors, root):
    """The Kolors UNet as each fp8 file ComfyUI users keep (the "records" one an all-in-one checkpoint with
    the VAE inside), and the values each must load as (stored x scale): (paths, plain values, scaled values)."""
    unet_sd = load_file(kolors / "unet" / "diffusion_pytorch_model.safetensors")
    config = (kolors / "unet" / "config.json").read_text()
    plain = {k: v.to(torch.float8_e4m3fn) if v.ndim >= 2 else v.half() for k, v in unet_sd.items()}
    scaled, scales, values = {}, {}, {}
    for k, v in unet_sd.items():
        if v.ndim >= 2:
            scales[k] = v.abs().max() / 448
            scaled[k] = (v / scales[k]).to(torch.float8_e4m3fn)
            values[k] = scaled[k].float() * scales[k]
        else:
            scaled[k], values[k] = v.half(), v.half().float()
    layers = {k[: -len(".weight")]: {"format": "float8_e4m3fn"} for k in scales}
    sgm = {_sgm_unet_name(k): k for k in unet_sd}
    # ComfyUI's older layout: a `scaled_fp8` marker, `scale_weight` / `scale_input`, SGM names
    legacy = {"scaled_fp8": torch.empty(2, dtype=torch.float8_e4m3fn)}
    for name, k in sgm.items():
        legacy[name] = scaled[k]
        if k in scales:
            legacy[name[: -len("weight")] + "scale_weight"] = scales[k]
            legacy[name[: -len("weight")] + "scale_input"] = torch.tensor(1.0)
    # its newer one: `weight_scale` / `input_scale` and the formats in the header (diffusers names), or in
    # `.comfy_quant` tensors (here an all-in-one checkpoint's UNet section)
    header = {k: v for k, v in scaled.items()}
    header.update({k[: -len("weight")] + "weight_scale": s for k, s in scales.items()})
    header.update({k[: -len("weight")] + "input_scale": torch.tensor(1.0) for k in scales})
    records = {f"model.diffusion_model.{name}": scaled[k] for name, k in sgm.items()}
    for name, k in sgm.items():
        if k in scales:
            layer = f"model.diffusion_model.{name[: -len('.weight')]}"
            records[f"{layer}.weight_scale"] = scales[k]
            records[f"{layer}.comfy_quant"] = torch.tensor(list(b'{"format": "float8_e4m3fn"}'), dtype=torch.uint8)
    vae = _ldm_vae(load_file(kolors / "vae" / "diffusion_pytorch_model.safetensors"))
    records.update({f"first_stage_model.{k}": v for k, v in vae.items()})
    both = {"unet_config": config, "vae_config": (kolors / "vae" / "config.json").read_text()}
    files = {"plain": (plain, {"config": config}), "legacy": (legacy, {"config": config}),
             "header": (header, {"config": config, "_quantization_metadata": json.dumps({"format_version": "1.0",
                                                                                         "layers": layers})}),
             "records": (records, both)}
    paths = {}
    for name, (sd, meta) in files.items():
        paths[name] = root / f"kolors_unet_{name}_fp8.safetensors"
        save_file(sd, paths[name], metadata=meta)
    return paths, {k: v.to(torch.float8_e4m3fn).float() if v.ndim >= 2 else v.half().float()
                   for k, v in unet_sd.items()}, values



@pytest.fixture(scope="module")
def fp8_unets(tiny_dir, tmp_path_factory):
    """The fp8 files (one folder) and, for the plain and the scaled ones, a Kolors folder holding the values
    they must load as in an ordinary fp32 file; each expected model is built once, when first asked for."""
    kolors, root = tiny_dir["kolors"], tmp_path_factory.mktemp("fp8")
    (root / "unet").mkdir()
    paths, plain_values, scaled_values = _fp8_layouts(kolors, root / "unet")
    exact = {}
    for kind, values in (("plain", plain_values), ("scaled", scaled_values)):
        exact[kind] = root / f"exact_{kind}"
        shutil.copytree(kolors, exact[kind])
        save_file(values, exact[kind] / "unet" / "diffusion_pytorch_model.safetensors")
    built = {}

    def expected(layout, dtype):
        kind = "plain" if layout == "plain" else "scaled"
        if (kind, dtype) not in built:
            built[kind, dtype] = load_tadisr(exact[kind], tiny_dir["checkpoint"], tiny_dir["prompt_cache"], dtype=dtype)
        return built[kind, dtype]

    return root / "unet", paths, expected


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", ["plain", "legacy", "header", "records"])
def test_fp8_and_scaled_fp8_unets_load_as_stored_times_scale(layout, dtype, layouts, tiny_dir, fp8_unets, monkeypatch):
    """Each fp8 copy of the Kolors UNet loads as exactly its stored values x scales, in fp32 and in bf16
    (whose LoRA merge reads each base weight again in fp32, one at a time), with an adapter checkpoint
    trained on the original (the fp8 rounding is not "another base"), and is listed."""
    import weakref

    from tadisr_core import kolors_identity

    kolors = tiny_dir["kolors"]
    folder, paths, expected_model = fp8_unets
    real, alive, most = kolors_identity.iter_dequantized, [], []

    def tracked(path, dtype=None, *args, **kwargs):
        for name, t in real(path, dtype, *args, **kwargs):
            if dtype == torch.float32 and path == paths[layout]:
                most.append(sum(r() is not None for r in alive))
                alive.append(weakref.ref(t))
            yield name, t

    monkeypatch.setattr(kolors_identity, "iter_dequantized", tracked)
    vae = None if layout == "records" else layouts["vae_file"]  # the all-in-one brings its own
    model = load_tadisr(None, tiny_dir["checkpoint"], tiny_dir["prompt_cache"], unet=paths[layout], vae=vae,
                        dtype=dtype)
    expected = expected_model(layout, dtype)
    got, ref = model.state_dict(), expected.state_dict()
    assert got.keys() == ref.keys() and all(torch.equal(got[k], ref[k]) for k in ref)
    with torch.no_grad():
        assert torch.equal(model(X).image, expected(X).image)
    if dtype == torch.bfloat16:
        assert len(most) > 10 and max(most) == 0, "fp32 base weights of the merge held at once"
    assert check_unet(paths[layout]).spec == check_unet(kolors / "unet" / "diffusion_pytorch_model.safetensors",
                                                        kolors / "unet" / "config.json").spec
    listed = f"unet/{paths[layout].name}" + ("" if layout == "records" else " + vae/sdxl_vae.safetensors")
    assert listed in list_kolors_candidates([], [folder], [layouts["root"] / "vae"])


def test_quantized_unets_in_other_layouts_are_named_and_never_break_the_listing(tiny_dir, tmp_path):
    """Block-wise or per-column scales, packed 4-bit, rotated or int8 layers, an unreadable format record:
    refused before anything is built, saying what was found and which files work; none is listed."""
    kolors = tiny_dir["kolors"]
    config = {"config": (kolors / "unet" / "config.json").read_text()}
    unet_sd = load_file(kolors / "unet" / "diffusion_pytorch_model.safetensors")
    key = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.weight"  # square
    layer, rows = key[: -len(".weight")], unet_sd[key].shape[0]
    scale = f"{layer}.weight_scale"
    packed = {**unet_sd, key: torch.zeros(rows, rows // 2, dtype=torch.uint8),   # nvfp4: two values a byte
              scale: torch.ones(rows, rows // 16), f"{layer}.weight_scale_2": torch.tensor(1.0)}
    record = {f"{layer}.comfy_quant": torch.tensor(list(b'{"format": "nvfp4"}'), dtype=torch.uint8)}
    rotated = json.dumps({"layers": {layer: {"format": "float8_e4m3fn", "convrot": True}}})
    cases = {
        "blockwise": ({**unet_sd, scale: torch.ones(rows, 2)}, {},
                      rf"{re.escape(key)} \({rows}, {rows}\) has a scale of shape \({rows}, 2\): only one scale per "
                      r"tensor or per row is read here, not block-wise or per-column scales"),
        "per_column": ({**unet_sd, scale: torch.ones(1, rows)}, {},
                       rf"has a scale of shape \(1, {rows}\): only one scale per tensor or per row"),
        "nvfp4": ({**packed, **record}, {},
                  rf"its layers are quantized as nvfp4 \(e\.g\. {re.escape(layer)}\), a layout read here only as fp8"),
        "convrot": ({**unet_sd, scale: torch.tensor(1.0)}, {"_quantization_metadata": rotated},
                    r"quantized as float8_e4m3fn with rotated weights \(convrot\)"),
        "int8": ({**unet_sd, key: unet_sd[key].to(torch.int8), scale: torch.tensor(1.0)},
                 {"_quantization_metadata": json.dumps({"layers": {layer: "int8_tensorwise"}})},
                 r"quantized as int8_tensorwise"),
        "bad_record": ({**unet_sd, scale: torch.tensor(1.0)}, {"_quantization_metadata": '{"layers": [1, 2]}'},
                       r"quantized as unreadable \(e\.g\. _quantization_metadata\)"),
    }
    folder = tmp_path / "unet"
    folder.mkdir()
    for name, (sd, meta, words) in cases.items():
        save_file(sd, folder / f"{name}.safetensors", metadata={**config, **meta})
        with pytest.raises(NotKolorsError, match=rf"{name}\.safetensors: a Kolors UNet whose weights are stored in a "
                                                 rf"layout TADiSR does not read: .*{words}.*\. Use its fp16 / bf16 "
                                                 r"file, or a plain or scaled fp8 one$"):
            check_unet(folder / f"{name}.safetensors")
    assert list_kolors_candidates([], [folder], [tmp_path / "none"]) == []


def test_weight_files_are_told_apart_by_their_bytes_not_their_names(layouts, tiny_dir, tmp_path, capsys):
    """Defect: formats were told by the suffix alone: ComfyUI's `.sft` and a `.SafeTensors` were opened as
    pickles ("a pickle that holds more than weights"), and so were a GGUF file and a sharded model's
    index.json given as --unet, with that advice."""
    from tadisr_core.checkpoint import load_checkpoint
    from tadisr_core.model_ref import resolve_model, runs_alone

    unet, vae = tmp_path / "models" / "unet" / "kolors.sft", tmp_path / "models" / "vae" / "SDXL_VAE.SafeTensors"
    for src, dst in ((layouts["unet_file"], unet), (layouts["vae_file"], vae)):
        dst.parent.mkdir(parents=True)
        shutil.copy(src, dst)
    assert _cli_upscale(tmp_path / "sft", tiny_dir, "--unet", str(unet), "--vae", str(vae))[0] == 0
    assert list_kolors_candidates((), [unet.parent], [vae.parent]) == ["unet/kolors.sft + vae/SDXL_VAE.SafeTensors"]
    checkpoint = tmp_path / "tadisr.sft"
    shutil.copy(tiny_dir["checkpoint"], checkpoint)
    assert load_checkpoint(checkpoint).source == "native"
    demo = tmp_path / "demo.sft"
    shutil.copy(resolve_model("demo").checkpoint, demo)
    assert runs_alone(demo)                                     # read from its header: it needs no Kolors base
    gguf = tmp_path / "kolors-Q8_0.gguf"
    gguf.write_bytes(b"GGUF\x03\x00\x00\x00" + bytes(64))
    shards = tmp_path / "sharded" / "unet"
    shards.mkdir(parents=True)
    index = shards / "diffusion_pytorch_model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {}}))
    cases = [(["--unet", str(gguf), "--vae", str(vae)], f"{gguf} is a GGUF file, a quantised format"),
             (["--unet", str(index), "--vae", str(vae)], f"{shards} holds its weights in shards ({index.name})"),
             (["--kolors", str(layouts["folder"]), "--vae", str(gguf)], f"{gguf} is a GGUF file")]
    for weights in cases:
        code, _ = _cli_upscale(tmp_path / "bad", tiny_dir, *weights[0])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == cli.EXIT_SETUP and len(err) == 1 and weights[1] in err[0], (weights, err)
    with pytest.raises(ValueError, match=re.escape(f"{gguf} is a GGUF file")):
        load_checkpoint(gguf)


# -- where users keep their files (ComfyUI's folder lists) ---------------------------------------------
def test_kolors_folders_below_the_top_of_models_diffusers_are_listed_by_their_path(layouts, tiny_dir, tmp_path):
    """Defect: a Kolors folder deeper than one level (models/diffusers/Kwai-Kolors/Kolors, or the Hugging Face
    cache's models--Kwai-Kolors--Kolors/snapshots/<hash>) was not listed, though ComfyUI's DiffusersLoader lists
    it. A found model folder's own sub-folders are not walked into."""
    diffusers = tmp_path / "diffusers"
    shutil.copytree(tiny_dir["kolors"], diffusers / "Kwai-Kolors" / "Kolors")
    shutil.copytree(tiny_dir["kolors"], diffusers / "models--Kwai-Kolors--Kolors" / "snapshots" / "abc123")
    shutil.copytree(layouts["no_vae"], diffusers / "kijai" / "Kolors")
    shutil.copytree(tiny_dir["kolors"], diffusers / "Kolors")
    shutil.copytree(tiny_dir["kolors"], diffusers / "Kolors" / "extra" / "Kolors-copy")  # inside a found folder
    (diffusers / "loop").symlink_to(diffusers)  # a link back up is followed once
    dirs = [diffusers], [], [layouts["root"] / "vae"], []
    names = list_kolors_candidates(*dirs)
    assert names == ["Kolors", "Kwai-Kolors/Kolors", "models--Kwai-Kolors--Kolors/snapshots/abc123",
                     "kijai/Kolors + vae/sdxl_vae.safetensors", "kijai/Kolors + vae/sdxl_vae_ldm.safetensors"]
    assert resolve_choice("models--Kwai-Kolors--Kolors/snapshots/abc123", *dirs) == \
        find_kolors_files(diffusers / "models--Kwai-Kolors--Kolors" / "snapshots" / "abc123")
    from tadisr_core.prompt import list_text_encoders

    assert list_text_encoders(diffusers) == [diffusers / "Kolors", diffusers / "Kwai-Kolors" / "Kolors",
                                             diffusers / "kijai" / "Kolors",
                                             diffusers / "models--Kwai-Kolors--Kolors" / "snapshots" / "abc123"]


def test_a_looping_link_or_an_unreadable_folder_hides_nothing_beside_it(tiny_dir, tmp_path, monkeypatch):
    """Defect (review): one self-looping link in models/diffusers (or models/LLM) emptied the whole Kolors list,
    and a folder of another user's below the top made the list raise PermissionError."""
    from pathlib import Path

    from tadisr_core.prompt import list_text_encoders

    diffusers = tmp_path / "diffusers"
    shutil.copytree(tiny_dir["kolors"], diffusers / "Kolors")
    (diffusers / "old-kolors").symlink_to("old-kolors")
    (diffusers / "x").symlink_to("y")
    (diffusers / "y").symlink_to("x")
    (diffusers / "hub" / "private" / "unet").mkdir(parents=True)
    real_is_file = Path.is_file

    def is_file(path):  # as for a folder with mode 700 owned by another user (root reads everything)
        if "private" in path.parts and path.name != "private":
            raise PermissionError(13, "Permission denied", str(path))
        return real_is_file(path)

    monkeypatch.setattr(Path, "is_file", is_file)
    assert list_kolors_candidates([diffusers]) == ["Kolors"]
    assert list_text_encoders(diffusers) == [diffusers / "Kolors"]


def test_a_link_back_up_in_a_single_file_folder_lists_each_file_once(layouts, tmp_path):
    """Review: models/vae (unet, checkpoints) were walked without a record of the folders seen, so a link back
    to its own folder listed every file about 40 times, each checked again (two such links: a walk that never
    ends)."""
    diffusers, vae = tmp_path / "diffusers", tmp_path / "vae"
    shutil.copytree(layouts["no_vae"], diffusers / "KolorsNoVae")  # a folder of its own: other tests add to the
    shutil.copytree(layouts["root"] / "vae", vae)                  # module's
    (vae / "again").symlink_to(".")
    names = list_kolors_candidates([diffusers], [], [vae], [])
    assert names == ["KolorsNoVae + vae/sdxl_vae.safetensors", "KolorsNoVae + vae/sdxl_vae_ldm.safetensors"]


def test_torch_format_unets_and_vaes_are_listed_when_their_pickle_passes_the_scan(layouts, tiny_dir, tmp_path,
                                                                                    caplog):
    """Defect: UNet / VAE weights as .bin / .pt / .ckpt / .pth, which the CLI loads, were never listed, and a
    Kolors folder without vae/ then vanished from the list without a word. Torch zips are listed once the
    bounded pickle scan passes them; a legacy (pre-zip) pickle, which cannot be scanned, is not opened."""
    import logging

    from tests.hostile_files import dag_key_pickle, torch_zip

    kolors = tiny_dir["kolors"]
    models = tmp_path / "models"
    shutil.copytree(layouts["no_vae"], models / "diffusers" / "KolorsNoVae")
    (models / "vae").mkdir()
    with caplog.at_level(logging.WARNING, logger="tadisr"):
        for _ in range(2):
            assert list_kolors_candidates([models / "diffusers"], [], [models / "vae"]) == []
    said = [r.getMessage() for r in caplog.records if "KolorsNoVae" in r.getMessage()]
    assert said == [f"Kolors folder KolorsNoVae has no vae/ and no SDXL VAE was found in models/vae ({models / 'vae'}),"
                    f" so it is not listed: put the SDXL VAE (e.g. sdxl_vae.safetensors) there"]
    for sub, folder, name in (("unet", "unet", "kolors.ckpt"), ("vae", "vae", "sdxl_vae.pt"),
                              ("vae", "vae", "sdxl_vae.pth"), ("vae", "vae", "diffusion_pytorch_model.bin")):
        part = models / folder / name.split(".")[0] / name  # each with its config.json beside it
        part.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(kolors / sub / "config.json", part.parent)
        torch.save(load_file(kolors / sub / "diffusion_pytorch_model.safetensors"), part)
    legacy = models / "vae" / "sdxl_vae" / "legacy.pt"
    torch.save(load_file(kolors / "vae" / "diffusion_pytorch_model.safetensors"), legacy,
               _use_new_zipfile_serialization=False)
    torch_zip(models / "vae" / "sdxl_vae" / "hostile.pt", dag_key_pickle(8))
    vaes = ["diffusion_pytorch_model/diffusion_pytorch_model.bin", "sdxl_vae/sdxl_vae.pt", "sdxl_vae/sdxl_vae.pth"]
    dirs = [models / "diffusers"], [models / "unet"], [models / "vae"], []
    names = list_kolors_candidates(*dirs)
    assert names == [f"KolorsNoVae + vae/{v}" for v in vaes] + [f"unet/kolors/kolors.ckpt + vae/{v}" for v in vaes]
    files = resolve_choice(names[-1], *dirs)
    assert files == KolorsFiles(models / "unet" / "kolors" / "kolors.ckpt", models / "vae" / "sdxl_vae" /
                                "sdxl_vae.pth", models / "unet" / "kolors" / "config.json",
                                models / "vae" / "sdxl_vae" / "config.json")
    a, b = load_unet(files, torch.float32), load_unet(find_kolors_files(kolors), torch.float32)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_a_config_json_beside_a_weights_file_is_read_by_the_list_and_the_cli(layouts, sd15_folder, tmp_path):
    """Defect: an SD 1.x VAE kept as a diffusers folder in models/vae (config.json: scaling_factor 0.18215) was
    listed and loaded through its inner file without its config, as if it were the SDXL VAE; the CLI refused
    the folder but took the inner file."""
    vae_dir = tmp_path / "vae"
    shutil.copytree(sd15_folder / "vae", vae_dir / "sd-vae-ft-mse")
    shutil.copy(layouts["vae_file"], vae_dir)
    inner = vae_dir / "sd-vae-ft-mse" / "diffusion_pytorch_model.safetensors"
    (tmp_path / "unet").mkdir()
    shutil.copy(layouts["unet_file"], tmp_path / "unet")
    assert list_kolors_candidates([], [tmp_path / "unet"], [vae_dir]) == [
        "unet/kolors_unet.safetensors + vae/sdxl_vae.safetensors"]
    for given in (inner.parent, inner):
        files = find_kolors_files(None, layouts["unet_file"], given)
        assert (files.vae, files.vae_config) == (inner, inner.parent / "config.json")
        with pytest.raises(NotKolorsError, match=re.escape(f"{inner}: not a Kolors VAE (the SDXL VAE): expected "
                                                           f"scaling_factor 0.13025 (the SDXL VAE); found 0.18215.")):
            load_tadisr(files, "unused.pkl", "unused.safetensors")


def test_a_folders_full_precision_weights_are_read_unless_the_load_is_fp16_or_fp8(tiny_dir, tmp_path):
    """Defect: diffusion_pytorch_model.fp16.safetensors was read before the full-precision file beside it for
    any dtype (an fp32 load carried fp16 rounding), and a *.fp16.bin before a plain .safetensors. Each part's
    file follows the dtype it is loaded in: the UNet's, and the VAE's (fp32 under an fp16 load)."""
    from tadisr_core.kolors_files import weights_file

    folder = tmp_path / "Kolors"
    shutil.copytree(tiny_dir["kolors"], folder, ignore=shutil.ignore_patterns("text_encoder"))
    for sub in ("unet", "vae"):
        plain = folder / sub / "diffusion_pytorch_model.safetensors"
        half = {k: v.half() for k, v in load_file(plain).items()}
        save_file(half, plain.with_name("diffusion_pytorch_model.fp16.safetensors"))
        torch.save(half, plain.with_name("diffusion_pytorch_model.fp16.bin"))
    unet = folder / "unet"
    full, fp16 = unet / "diffusion_pytorch_model.safetensors", unet / "diffusion_pytorch_model.fp16.safetensors"
    assert find_kolors_files(folder).unet == full  # a load in an unknown dtype: the full precision, as diffusers
    for dtype in (None, torch.float32, torch.bfloat16):
        assert weights_file(unet, dtype) == full
    for dtype in (torch.float16, torch.float8_e4m3fn):
        assert weights_file(unet, dtype) == fp16
    fp16.unlink()
    assert weights_file(unet, torch.float16) == unet / "diffusion_pytorch_model.fp16.bin"
    full.unlink()
    assert weights_file(unet, torch.float32) == unet / "diffusion_pytorch_model.fp16.bin"
    vae = folder / "vae"
    picked = {dtype: find_kolors_files(folder, dtype=dtype) for dtype in (torch.float32, torch.float16)}
    assert picked[torch.float32].vae == picked[torch.float16].vae == vae / "diffusion_pytorch_model.safetensors"
    assert find_kolors_files(folder, dtype=torch.float8_e4m3fn).vae == vae / "diffusion_pytorch_model.safetensors"
    model = load_tadisr(folder, tiny_dir["checkpoint"], tiny_dir["prompt_cache"], dtype=torch.float32)
    ref = load_tadisr(tiny_dir["kolors"], tiny_dir["checkpoint"], tiny_dir["prompt_cache"], dtype=torch.float32)
    assert all(torch.equal(a, b) for a, b in zip(model.vae.state_dict().values(), ref.vae.state_dict().values()))
