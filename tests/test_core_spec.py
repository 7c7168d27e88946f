"""Specs: full-size parameter counts on the meta device, tiny spec of identical structure."""

import pytest

from tadisr_core.backbone import build_unet, build_vae
from tadisr_core.checkpoint import trainable_state_dict
from tadisr_core.model import build_model
from tadisr_core.spec import TADiSRSpec, full_spec, tiny_spec


def _count(module):
    return sum(p.numel() for p in module.parameters())


def test_full_unet_and_vae_parameter_counts_on_meta():
    unet = build_unet(full_spec().unet, "meta")
    assert unet.conv_in.weight.is_meta
    assert _count(unet) == pytest.approx(2_579.5e6, rel=1e-3)
    assert _count(build_vae(full_spec().vae, "meta")) == pytest.approx(83.65e6, rel=1e-3)


@pytest.mark.parametrize("variant", ["release", "paper"])
def test_tiny_spec_has_the_full_key_set(variant):
    full = trainable_state_dict(build_model(full_spec(variant), "meta"))
    tiny = trainable_state_dict(build_model(tiny_spec(variant), "meta"))
    for group in full:
        assert set(full[group]) == set(tiny[group]), group
    if variant == "release":
        assert {g: len(v) for g, v in full.items()} == {"unet": 1546, "vae": 152, "mi_decoder": 220}


def test_spec_json_round_trip():
    spec = tiny_spec("paper").with_ranks(8, 3)
    assert TADiSRSpec.from_json(spec.to_json()) == spec


def test_unknown_variant_is_rejected():
    with pytest.raises(ValueError, match="unknown variant"):
        full_spec("sdxl")
