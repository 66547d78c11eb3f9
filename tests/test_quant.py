"""NF4 storage layout: the pure-Python byte count against real bitsandbytes quantisation on CPU."""

import subprocess
import sys

import pytest

from vramplan.quant import nf4_bits_per_param, nf4_bytes, nf4_tensor_bytes

# (out_features, in_features): block-aligned, odd element counts, > 256 blocks (several nested blocks)
SHAPES = [(128, 256), (64, 320), (33, 7), (1, 1), (256, 4096), (11, 129)]


def _real_layout(shape, double_quant):
    torch = pytest.importorskip("torch")
    pytest.importorskip("bitsandbytes")
    from bitsandbytes.nn import Params4bit

    p = Params4bit(torch.randn(*shape), requires_grad=False, quant_type="nf4", compress_statistics=double_quant,
                   blocksize=64)
    p = p._quantize("cpu")
    qs = p.quant_state
    state = []
    while qs is not None:
        state += [t for t in (qs.absmax, qs.code, qs.offset) if isinstance(t, torch.Tensor)]
        qs = qs.state2
    return p.untyped_storage().nbytes(), sum(t.untyped_storage().nbytes() for t in state), p, state


@pytest.mark.parametrize("double_quant", [True, False], ids=["dq", "no-dq"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_nf4_bytes_match_bitsandbytes(shape, double_quant):
    weight, state, _, _ = _real_layout(shape, double_quant)
    assert nf4_bytes(shape[0] * shape[1], double_quant) == (weight, state)


@pytest.mark.parametrize("double_quant", [True, False], ids=["dq", "no-dq"])
def test_meta_params4bit_has_the_real_layout(double_quant):
    torch = pytest.importorskip("torch")
    from vramplan.runtime.nf4 import meta_params4bit, quant_state_tensors

    shape = (256, 4096)
    weight, state, real, real_state = _real_layout(shape, double_quant)
    fake = meta_params4bit(*shape, torch.bfloat16, double_quant)
    fake_state = quant_state_tensors(fake.quant_state)
    assert fake.device.type == "meta"
    assert (fake.dtype, tuple(fake.shape)) == (real.dtype, tuple(real.shape))
    assert [(t.dtype, tuple(t.shape)) for t in fake_state] == [(t.dtype, tuple(t.shape)) for t in real_state]
    assert fake.untyped_storage().nbytes() == weight
    assert sum(t.untyped_storage().nbytes() for t in fake_state) == state
    assert fake.quant_state.nested is double_quant and tuple(fake.quant_state.shape) == shape


def test_every_matrix_owns_its_code_books():
    """bitsandbytes copies the code books per matrix (``code.to(device, copy=True)``): no sharing to dedupe."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("bitsandbytes")
    from bitsandbytes.nn import Params4bit

    a = Params4bit(torch.randn(64, 64), quant_type="nf4", compress_statistics=True)._quantize("cpu")
    b = Params4bit(torch.randn(64, 64), quant_type="nf4", compress_statistics=True)._quantize("cpu")
    for x, y in ((a.quant_state.code, b.quant_state.code), (a.quant_state.state2.code, b.quant_state.state2.code)):
        assert x.untyped_storage().data_ptr() != y.untyped_storage().data_ptr()


def test_tensor_list_sums_to_total_and_bits_per_param():
    n = 4096 * 14336
    for dq in (True, False):
        w, s = nf4_bytes(n, dq)
        assert sum(b for _, b in nf4_tensor_bytes(n, dq)) == w + s
    assert nf4_bits_per_param(True) == pytest.approx(4.127, abs=1e-3)  # QLoRA paper, section 3
    assert nf4_bits_per_param(False) == 4.5
    assert 8 * sum(nf4_bytes(n, True)) / n == pytest.approx(nf4_bits_per_param(True), rel=1e-4)


def test_nf4_bytes_rejects_bad_input():
    with pytest.raises(ValueError):
        nf4_bytes(-1)
    with pytest.raises(ValueError):
        nf4_bytes(10, blocksize=48)


def test_quant_module_is_torch_free():
    code = "import sys, vramplan, vramplan.quant, vramplan.dryrun; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
