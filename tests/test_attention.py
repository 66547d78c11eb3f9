"""The attention definitions (``vramplan.attention``): what renderings and listings read instead of names."""

from types import SimpleNamespace

import pytest

from vramplan.attention import KERNELS, attention_kernel
from vramplan.config import make_config
from vramplan.errors import UnknownNameError, VramplanError
from vramplan.models import get_model
from vramplan.render import plan_brief
from vramplan.request import ATTENTION, ConfigRequest


def test_a_request_accepts_exactly_the_defined_kernels_and_defaults_to_the_default_one():
    for name in KERNELS:
        assert ConfigRequest(attn=name).attn == name
    with pytest.raises(VramplanError):
        ConfigRequest(attn="xformers")
    assert ATTENTION == tuple(KERNELS)  # the CLI's and the API's choices, in the definitions' order
    assert [k.name for k in KERNELS.values() if k.default] == [ConfigRequest.attn]
    for k in KERNELS.values():
        if k.same_as is not None:  # ties a kernel that is itself listed
            assert attention_kernel(k.same_as).same_as is None and k.same_as != k.name


def test_unknown_kernel_is_a_named_error():
    with pytest.raises(UnknownNameError, match="unknown attention implementation 'flsh'"):
        attention_kernel("flsh")


@pytest.mark.parametrize("attn", sorted(KERNELS))
def test_plan_brief_names_every_kernel_but_the_default(attn):
    cfg = make_config(get_model("llama-3.2-1b"), "lora", batch=2, attn=attn)
    brief = plan_brief(SimpleNamespace(config=cfg, parallel=SimpleNamespace(distributed=False)))
    assert (attn in brief.split(", ")) == (not attention_kernel(attn).default), brief
