"""Low-precision projections of the fused LRU op (``KernelSettings.gemm_dtype``) and the model's autocast dispatch.

The op's GEMMs (``x = B u`` forward; ``C^H dy``, ``dB``, ``dC``, ``du`` backward) may run in bf16/fp16 with fp32
accumulation while the recurrence and its state stay fp32. Checked against the fp32 naive reference with bf16/fp16
tolerances, and checked to really change the arithmetic (so a setting that is silently ignored fails).
"""

import pytest
import torch
from kernel_cases import DEVICE, LAYER_ARGS, assert_close, layer_params, needs_runtime, random_linear_grads

import compressm_kernels as K
from modeling_compressm.scan import lru_sequence

LOW_PRECISION = {torch.bfloat16: 3e-2, torch.float16: 4e-3}  # relative tolerance against the fp32 reference


def _layer(seed=21):
    p = layer_params(2, 45, 37, 7, seed=seed, h0=True)
    return p, [p[k] for k in LAYER_ARGS]


@needs_runtime
@pytest.mark.parametrize("dtype", list(LOW_PRECISION), ids=str)
def test_low_precision_projections_match_the_fp32_reference_within_their_tolerance(dtype):
    p, args = _layer()
    with K.kernel_settings(gemm_dtype=dtype):
        outs = K.fused_lru_forward(*args)
    grads = random_linear_grads(outs, args)  # the backward runs outside the block, with the forward's settings
    expected = K.naive_lru_forward(*args)
    expected_grads = random_linear_grads(expected, args)
    rtol = LOW_PRECISION[dtype]
    assert outs[0].dtype == torch.float32 and outs[1].dtype == torch.float32
    for a, e, name in zip(outs, expected, ("y", "hT_re", "hT_im")):
        assert_close(a, e, rtol, name)
    names = [k for k in LAYER_ARGS if p[k] is not None]
    for a, e, name in zip(grads, expected_grads, names):
        assert_close(a, e, rtol, "d" + name)
    # the projections really ran in the low precision: fp32 projections agree with the reference to ~1e-6
    y_error = (outs[0] - expected[0]).abs().max().item() / expected[0].abs().max().item()
    du_error = (grads[0] - expected_grads[0]).abs().max().item() / expected_grads[0].abs().max().item()
    assert y_error > 1e-4 and du_error > 1e-4, (y_error, du_error)


@needs_runtime
def test_fp32_projections_stay_the_default():
    p, args = _layer(seed=22)
    outs = K.fused_lru_forward(*args)
    for a, e, name in zip(outs, K.naive_lru_forward(*args), ("y", "hT_re", "hT_im")):
        assert_close(a, e, 1e-5, name)


def test_gemm_dtype_is_validated():
    with pytest.raises(ValueError, match="gemm_dtype must be one of"):
        K.KernelSettings(gemm_dtype=torch.float64)


@needs_runtime
def test_the_model_dispatch_runs_projections_in_the_autocast_dtype():
    """Under torch.autocast with bf16 the layer's fused op gets bf16 projections (as Mamba-2 and RG-LRU layers run
    theirs), bit for bit what ``kernel_settings(gemm_dtype=bf16)`` gives; without autocast it stays fp32."""
    gen = torch.Generator().manual_seed(5)
    N, H = 11, 6
    modulus = 0.5 + 0.45 * torch.rand(N, generator=gen)
    lam = torch.polar(modulus, 6.0 * torch.rand(N, generator=gen))
    B = torch.complex(torch.randn(N, H, generator=gen), torch.randn(N, H, generator=gen)) / H**0.5
    C = torch.complex(torch.randn(H, N, generator=gen), torch.randn(H, N, generator=gen)) / N**0.5
    D = torch.randn(H, generator=gen)
    u = torch.randn(2, 30, H, generator=gen)
    device = torch.device(DEVICE)
    lam, B, C, D, u = (t.to(device) for t in (lam, B, C, D, u))
    with torch.autocast(device_type=device.type, dtype=torch.bfloat16):
        y_autocast, state_autocast = lru_sequence(u, lam, B, C, D, use_kernel=True)
    with K.kernel_settings(gemm_dtype=torch.bfloat16):
        y_low, state_low = lru_sequence(u, lam, B, C, D, use_kernel=True)
    y_fp32, _ = lru_sequence(u, lam, B, C, D, use_kernel=True)
    assert torch.equal(y_autocast, y_low) and torch.equal(state_autocast, state_low)
    assert not torch.allclose(y_autocast, y_fp32, rtol=0, atol=1e-5)
    assert_close(y_autocast, y_fp32, LOW_PRECISION[torch.bfloat16], "y")
