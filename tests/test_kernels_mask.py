"""The kernels' step mask (contract 1): masked steps have zero input and hold the state, in both ops.

``fused_lru_forward(..., step_mask=m)`` and ``diagonal_scan(..., step_mask=m)`` against the naive reference (values
and gradients) with left padding, right padding and holes, with and without an initial state, for both scan
strategies, with small tiles so the masked runs cross chunk boundaries (where the chunked strategy's chunk decay
becomes lam^(number of real steps in the chunk)). Also: the kernel agrees with the model's torch path, and masked
steps behave as if they were removed from the sequence.
"""

import pytest
import torch
from kernel_cases import (  # noqa: F401  (strategy is a fixture)
    DEVICE,
    LAYER_ARGS,
    SMALL_TILES,
    assert_close,
    check_layer,
    random_linear_grads,
    check_scan,
    layer_params,
    needs_runtime,
    scan_inputs,
    strategy,
)

import compressm_kernels as K

Bt, L, N, H = 4, 45, 19, 5  # with 16-step chunks: 3 chunks, the last partial


def make_mask(kind: str, batch: int = Bt, length: int = L) -> torch.Tensor:
    """A bool (batch, length) step mask on DEVICE; each row differs, and every kind includes an unmasked row."""
    mask = torch.ones(batch, length, dtype=torch.bool)
    if kind == "left-pad":  # row b starts with [0, 3, 16, 33] padded steps (a whole chunk, and more)
        for b, pad in enumerate([0, 3, 16, 33][:batch]):
            mask[b, :pad] = False
    elif kind == "right-pad":
        for b, pad in enumerate([0, 1, 17, 40][:batch]):
            mask[b, length - pad:] = False
    elif kind == "holes":  # a run across a chunk boundary, the first and the last step, scattered steps, all
        mask[1, 14:19] = False
        mask[2, 0] = mask[2, length - 1] = False
        mask[2, 5::7] = False
        mask[3] = False
    else:
        raise ValueError(kind)
    return mask.to(DEVICE)


MASKS = ["left-pad", "right-pad", "holes"]


@needs_runtime
@pytest.mark.parametrize("h0", [False, True], ids=["zero-h0", "h0"])
@pytest.mark.parametrize("kind", MASKS)
def test_fused_layer_with_step_mask_matches_the_reference(kind, h0, strategy):
    with K.kernel_settings(**SMALL_TILES):
        check_layer(layer_params(Bt, L, N, H, seed=41, h0=h0), step_mask=make_mask(kind))


@needs_runtime
@pytest.mark.parametrize("kind", MASKS)
def test_diagonal_scan_with_step_mask_matches_the_reference(kind, strategy):
    """The plain scan (its kernels also run inside the fused layer's backward): dL/dx is zero at masked steps."""
    with K.kernel_settings(**SMALL_TILES):
        check_scan(scan_inputs(Bt, L, N, seed=43, h0=True), step_mask=make_mask(kind))


@needs_runtime
def test_masked_steps_act_as_if_removed_from_the_sequence(strategy):
    """Holes hold the state: the final state equals the one of the sequence with the masked steps cut out, and the
    output at a masked step repeats Re(C h) of the last real step (no D u term)."""
    p = layer_params(1, 40, 7, 3, seed=47, h0=True)
    args = [p[k].detach() if p[k] is not None else None for k in LAYER_ARGS]
    mask = torch.ones(1, 40, dtype=torch.bool, device=DEVICE)
    mask[0, 10:25] = False
    with K.kernel_settings(**SMALL_TILES):
        y, hT_re, hT_im = K.fused_lru_forward(*args, step_mask=mask)
        cut = K.fused_lru_forward(args[0][:, mask[0]], *args[1:])
        prefix = K.fused_lru_forward(args[0][:, :10], *args[1:])
    assert_close(hT_re, cut[1], name="hT_re")
    assert_close(hT_im, cut[2], name="hT_im")
    held_output = prefix[0][:, -1] - args[0][:, 9] * args[7]  # Re(C h_9) without step 9's D u
    for t in range(10, 25):
        assert_close(y[:, t], held_output, 1e-5, f"y[{t}]")


@needs_runtime
def test_whatever_padded_steps_hold_never_reaches_values_or_gradients():
    """Padded positions may hold garbage, even NaN or inf: outputs and gradients equal those with zeros there."""
    p = layer_params(Bt, L, N, H, seed=61, h0=True)
    mask = make_mask("holes")
    args = [p[k] for k in LAYER_ARGS]
    with torch.no_grad():
        garbage = torch.where(mask[:, :, None], p["u"], torch.tensor([float("nan"), float("inf"), 1e30])[
            torch.arange(H) % 3].to(DEVICE))
        zeros = torch.where(mask[:, :, None], p["u"], 0.0)
    results = []
    with K.kernel_settings(**SMALL_TILES):
        for u in (garbage, zeros):
            u = u.clone().requires_grad_()
            outs = K.fused_lru_forward(u, *args[1:], step_mask=mask)
            grads = random_linear_grads(outs, [u, *args[1:]])
            results.append([*outs, *grads])
    for a, e in zip(*results):
        assert_close(a, e, 1e-6)


@needs_runtime
@pytest.mark.parametrize("kind", MASKS)
def test_kernel_step_mask_matches_the_model_torch_path(kind):
    """The kernel's masked layer equals modeling_compressm's torch path (same semantics, one dispatch)."""
    scan = pytest.importorskip("modeling_compressm.scan")
    p = layer_params(Bt, L, N, H, seed=53, h0=True)
    mask = make_mask(kind)
    with K.kernel_settings(**SMALL_TILES):
        y, hT_re, hT_im = K.fused_lru_forward(*[p[k] for k in LAYER_ARGS], step_mask=mask)
    c = lambda re, im: torch.complex(p[re].detach(), p[im].detach())  # noqa: E731
    y_t, final = scan.lru_sequence_torch(p["u"].detach(), c("lam_re", "lam_im"), c("B_re", "B_im"),
                                         c("C_re", "C_im"), p["D"].detach(), c("h0_re", "h0_im"), mask,
                                         hold_state=True)
    assert_close(y, y_t, 1e-5, "y")
    assert_close(hT_re, final.real, 1e-5, "hT_re")
    assert_close(hT_im, final.imag, 1e-5, "hT_im")


@needs_runtime
def test_integer_masks_are_accepted_and_all_ones_changes_nothing():
    p = layer_params(Bt, 30, 6, 4, seed=59, h0=True)
    args = [p[k].detach() if p[k] is not None else None for k in LAYER_ARGS]
    plain = K.fused_lru_forward(*args)
    ones = K.fused_lru_forward(*args, step_mask=torch.ones(Bt, 30, dtype=torch.int64, device=DEVICE))
    for a, e in zip(ones, plain):
        assert_close(a, e, 1e-6)
    as_int = make_mask("holes", Bt, 30).to(torch.int32)
    for a, e in zip(K.fused_lru_forward(*args, step_mask=as_int), K.fused_lru_forward(*args, step_mask=as_int != 0)):
        assert torch.equal(a, e)
