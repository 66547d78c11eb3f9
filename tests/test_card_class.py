"""Compute capability is parsed as numbers and one function (gpus.card_class) classes a card for every consumer."""

from __future__ import annotations

import pytest

import vramplan
from vramplan.errors import VramplanError
from vramplan.gpus import (CARD_CLASSES, _parse, card_class, catalogue, custom_gpu, generation, get_gpu,
                           parse_compute_capability)
from vramplan.overheads import default_workspace_bytes
from vramplan.taxonomy import Component
from vramplan.throughput import card_efficiency
from vramplan.units import MIB


def test_compute_capability_parses_as_numbers():
    assert parse_compute_capability("12.0") == (12, 0)
    assert parse_compute_capability("8.9") == (8, 9)
    assert parse_compute_capability((10, 0)) == (10, 0)
    for bad in (None, "", "?.?", "9", "sm_90", "9.0.1"):
        assert parse_compute_capability(bad) is None
    # the string comparison that classed an RTX 5090 as pre-Ampere, and the numeric one
    assert "12.0" < "8.0" and not (12, 0) < (8, 0)
    assert get_gpu("rtx5090").cc == (12, 0) > get_gpu("a100-80gb").cc == (8, 0)


@pytest.mark.parametrize("cc,gen", [((7, 0), "volta"), ((7, 5), "turing"), ((8, 0), "ampere"), ((8, 6), "ampere"),
                                    ((8, 9), "ada"), ((9, 0), "hopper"), ((10, 0), "blackwell"),
                                    ((12, 0), "blackwell"), ((6, 1), "unknown"), (None, "unknown")])
def test_generation_of_a_compute_capability(cc, gen):
    assert generation(cc) == gen


def test_every_catalogue_card_has_a_numeric_cc_matching_its_arch_and_a_class():
    for spec in catalogue().values():
        assert spec.cc == parse_compute_capability(spec.compute_capability)
        cls = card_class(spec)
        assert cls.name in CARD_CLASSES and cls.generation == spec.arch and cls.cc == spec.cc


def test_catalogue_entry_whose_arch_contradicts_its_cc_is_refused():
    entry = {k: getattr(get_gpu("rtx4090"), k) for k in ("name", "display_name", "memory_bytes", "bf16_tflops",
                                                          "fp16_tflops", "fp32_tflops", "bandwidth_gbs", "bf16",
                                                          "flash_attention", "sources")}
    with pytest.raises(VramplanError, match="does not match compute capability"):
        _parse({**entry, "compute_capability": "12.0", "arch": "ada"})
    with pytest.raises(VramplanError, match="not 'major.minor'"):
        _parse({**entry, "compute_capability": "twelve", "arch": "ada"})


@pytest.mark.parametrize("name,cls,gen,workspace_mib", [
    ("rtx5090", "gddr", "blackwell", 2 * 32), ("b200", "datacenter-blackwell", "blackwell", 2 * 32),
    ("h100-sxm", "datacenter-hopper", "hopper", 2 * 32), ("a100-80gb", "datacenter-ampere", "ampere", 2 * 8),
    ("rtx4090", "gddr", "ada", 2 * 8), ("rtx3090", "gddr", "ampere", 2 * 8), ("t4", "pre-ampere", "turing", 2 * 8),
    ("v100-32gb", "pre-ampere", "volta", 2 * 8)])
def test_card_class_and_workspace(name, cls, gen, workspace_mib):
    gpu = get_gpu(name)
    c = card_class(gpu)
    assert (c.name, c.generation) == (cls, gen)
    assert default_workspace_bytes(gpu.cc) == default_workspace_bytes(gpu.compute_capability) == workspace_mib * MIB
    assert card_efficiency(gpu).card_class == cls


def test_rtx5090_is_planned_as_a_blackwell_card_not_a_pre_ampere_one():
    gpu = get_gpu("rtx5090")
    assert gpu.bf16 and gpu.flash_attention
    cls = card_class(gpu)
    assert cls.name != "pre-ampere" and cls.generation == "blackwell" and cls.hopper_or_newer and not cls.datacenter
    # efficiency class: the GDDR cards' assumed MAMF (0.80), not pre-Ampere's fp16-only 0.75
    assert card_efficiency(gpu).matmul == card_efficiency(get_gpu("rtx4090")).matmul == 0.80
    # bf16 and FlashAttention-2 plan without complaint; the cuBLAS workspaces are Blackwell's 2 x 32 MiB
    est = vramplan.estimate("llama-3.2-1b", "qlora", gpu="rtx5090", precision="bf16-mixed", attn="flash")
    assert est.components[Component.WORKSPACE] == 2 * 32 * MIB
    assert est.throughput.source.startswith("defaults for gddr cards")  # not "pre-ampere cards"


def test_placeholder_and_overridden_cards():
    assert card_class(custom_gpu(24 * 1024 * MIB)).name == "generic"
    over = custom_gpu(16 * 1024 * MIB, like=get_gpu("rtx5090"))  # --gpu rtx5090 --gpu-mem 16GiB keeps its class
    assert over.cc == (12, 0) and card_class(over).name == "gddr" and card_class(over).generation == "blackwell"
