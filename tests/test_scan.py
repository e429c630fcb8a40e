"""Torch scan paths against the sequential reference, masking semantics and the dispatch."""

import pytest
import torch

from modeling_compressm import scan
from modeling_compressm.scan import lru_sequence, parallel_diagonal_scan, sequential_diagonal_scan


def complex_randn(*shape, dtype=torch.complex128):
    return torch.complex(torch.randn(*shape, dtype=torch.float64), torch.randn(*shape, dtype=torch.float64)).to(dtype)


def random_lam(n):
    return torch.polar(0.5 + 0.49 * torch.rand(n, dtype=torch.float64), 6.28 * torch.rand(n, dtype=torch.float64))


# lengths around the chunking of the torch scan (chunks of isqrt(L) steps, L mod chunk steps left over): a single
# step, shorter than a chunk, exact squares, leftovers of one and of chunk - 1 steps, long
LENGTHS = [1, 2, 3, 17, 63, 100, 1000]


@pytest.mark.parametrize("length", LENGTHS)
@pytest.mark.parametrize("with_initial_state", [False, True])
def test_parallel_scan_matches_sequential(length, with_initial_state):
    x = complex_randn(3, length, 5)
    lam = random_lam(5)
    h0 = complex_randn(3, 5) if with_initial_state else None
    expected = sequential_diagonal_scan(x, lam, h0)
    assert torch.allclose(parallel_diagonal_scan(x, lam, h0), expected, atol=1e-10)


@pytest.mark.parametrize("length", [1, 3, 37, 64])
def test_parallel_scan_with_per_step_factors_matches_sequential(length):
    x = complex_randn(2, length, 7)
    decay = complex_randn(2, length, 7) * 0.3
    h0 = complex_randn(2, 7)
    lam = random_lam(7)
    expected = sequential_diagonal_scan(x, lam, h0, decay)
    assert torch.allclose(parallel_diagonal_scan(x, lam, h0, decay), expected, atol=1e-10)


@pytest.mark.parametrize("length", [1, 17, 45])
@pytest.mark.parametrize("with_initial_state", [False, True])
@pytest.mark.parametrize("per_step", [False, True], ids=["constant-lam", "held-steps"])
def test_parallel_scan_gradients_match_sequential(length, with_initial_state, per_step):
    """Gradients to x, lam and h0; `held-steps` is the masked-batch path: factors a_t in {lam, 1} (torch.where)."""
    x = complex_randn(2, length, 3).requires_grad_()
    lam = random_lam(3).requires_grad_()
    h0 = complex_randn(2, 3).requires_grad_() if with_initial_state else None
    keep = torch.rand(2, length, 1) > 0.3
    weights = complex_randn(2, length, 3)
    leaves = [t for t in (x, lam, h0) if t is not None]
    grads = []
    for fn in (sequential_diagonal_scan, parallel_diagonal_scan):
        decay = torch.where(keep, lam, torch.ones((), dtype=lam.dtype)) if per_step else None
        loss = (fn(x, lam, h0, decay) * weights).real.sum()
        grads.append(torch.autograd.grad(loss, leaves))
    for reference, parallel in zip(*grads):
        assert torch.allclose(reference, parallel, atol=1e-9)


def test_parallel_scan_stays_accurate_near_the_unit_circle():
    """|lam| up to 0.9999 over 4000 steps in complex64: the chunked scan keeps the fp32 accuracy of the sequential
    loop, both measured against complex128 arithmetic on the same (complex64-rounded) inputs, per state lane."""
    length, n = 4000, 6
    modulus = torch.tensor([0.9, 0.99, 0.999, 0.9995, 0.9999, 0.9999], dtype=torch.float64)
    lam = torch.polar(modulus, torch.tensor([0.0, 0.1, 1.0, 3.0, 1e-3, 2.5], dtype=torch.float64))
    x, lam, h0 = (t.to(torch.complex64) for t in (complex_randn(2, length, n), lam, complex_randn(2, n)))
    exact = sequential_diagonal_scan(x.to(torch.complex128), lam.to(torch.complex128), h0.to(torch.complex128))
    scale = exact.abs().amax(dim=(0, 1))
    fast_error = (parallel_diagonal_scan(x, lam, h0) - exact).abs().amax(dim=(0, 1)) / scale
    loop_error = (sequential_diagonal_scan(x, lam, h0) - exact).abs().amax(dim=(0, 1)) / scale
    assert (fast_error < 1e-5).all(), fast_error
    assert (fast_error < 4 * loop_error + 1e-7).all(), (fast_error, loop_error)


def _system(n=6, h=4):
    lam = random_lam(n).to(torch.complex64)
    B = complex_randn(n, h, dtype=torch.complex64) * 0.3
    C = complex_randn(h, n, dtype=torch.complex64) * 0.3
    D = torch.randn(h)
    return lam, B, C, D


def test_lru_sequence_equals_the_layer_equations():
    lam, B, C, D = _system()
    u = torch.randn(2, 30, 4)
    y, final_state = lru_sequence(u, lam, B, C, D)
    states = sequential_diagonal_scan(u.to(torch.complex64) @ B.T, lam)
    expected = (states @ C.T).real + u * D
    assert torch.allclose(y, expected, atol=1e-5)
    assert torch.allclose(final_state, states[:, -1], atol=1e-5)
    assert y.dtype == u.dtype


def test_lru_sequence_continues_from_an_initial_state():
    lam, B, C, D = _system()
    u = torch.randn(2, 40, 4)
    y_full, final_full = lru_sequence(u, lam, B, C, D)
    y_head, state = lru_sequence(u[:, :25], lam, B, C, D)
    y_tail, final_tail = lru_sequence(u[:, 25:], lam, B, C, D, initial_state=state)
    assert torch.allclose(torch.cat([y_head, y_tail], 1), y_full, atol=1e-5)
    assert torch.allclose(final_tail, final_full, atol=1e-5)


def test_left_padding_gives_the_same_outputs_as_no_padding():
    lam, B, C, D = _system()
    u = torch.randn(1, 20, 4)
    padded = torch.cat([torch.randn(1, 5, 4), u], dim=1)  # garbage in the padded steps
    mask = torch.cat([torch.zeros(1, 5), torch.ones(1, 20)], dim=1)
    y, state = lru_sequence(u, lam, B, C, D)
    y_padded, state_padded = lru_sequence(padded, lam, B, C, D, step_mask=mask)
    assert torch.allclose(y_padded[:, 5:], y, atol=1e-5)
    assert torch.allclose(state_padded, state, atol=1e-5)


def test_masked_steps_leave_the_state_unchanged():
    lam, B, C, D = _system()
    u = torch.randn(1, 12, 4)
    mask = torch.ones(1, 12)
    mask[:, 4:7] = 0  # a hole in the middle: a fixed lam would still decay the state there
    _, state = lru_sequence(u[:, [0, 1, 2, 3, 7, 8, 9, 10, 11]], lam, B, C, D)
    _, state_masked = lru_sequence(u, lam, B, C, D, step_mask=mask)
    assert torch.allclose(state_masked, state, atol=1e-5)
    # Right padding after a cached prefix behaves the same way.
    _, head = lru_sequence(u[:, :4], lam, B, C, D)
    _, continued = lru_sequence(u[:, 4:], lam, B, C, D, initial_state=head, step_mask=mask[:, 4:])
    assert torch.allclose(continued, state, atol=1e-5)


def test_dispatch_uses_torch_on_cpu_and_refuses_the_kernel_there(monkeypatch):
    lam, B, C, D = _system()
    u = torch.randn(1, 5, 4)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="CUDA|not available"):
        lru_sequence(u, lam, B, C, D, use_kernel=True)
    with pytest.raises(ValueError, match="empty"):
        lru_sequence(u[:, :0], lam, B, C, D)
    with pytest.raises(ValueError, match="batch, length, hidden"):
        lru_sequence(u[0], lam, B, C, D)
    import importlib.util

    assert scan.triton_available() == (importlib.util.find_spec("triton") is not None)


def test_bfloat16_inputs_return_bfloat16_outputs():
    lam, B, C, D = _system()
    u = torch.randn(2, 9, 4)
    y32, _ = lru_sequence(u, lam, B, C, D)
    y16, _ = lru_sequence(u.bfloat16(), lam, B, C, D)
    assert y16.dtype == torch.bfloat16
    assert torch.allclose(y16.float(), y32, atol=0.1, rtol=0.05)


@pytest.mark.skipif(not scan.triton_available(), reason="triton is not installed")
@pytest.mark.parametrize("with_state, with_padding", [(False, False), (True, False), (False, True)])
def test_kernel_dispatch_matches_the_torch_path_in_values_and_gradients(with_state, with_padding):
    """The one dispatch point: the Triton kernel (compiled on CUDA, the CPU interpreter otherwise) and the torch path
    agree through autograd."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and __import__("os").environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs CUDA, or TRITON_INTERPRET=1 before triton is imported (set by conftest without CUDA)")
    results = []
    for use_kernel in (False, True):
        torch.manual_seed(1)
        lam = random_lam(5).to(torch.complex64).to(device).requires_grad_()
        B = (complex_randn(5, 3, dtype=torch.complex64) * 0.3).to(device).requires_grad_()
        C = (complex_randn(3, 5, dtype=torch.complex64) * 0.3).to(device).requires_grad_()
        D = torch.randn(3).to(device).requires_grad_()
        u = torch.randn(2, 19, 3).to(device).requires_grad_()
        h0 = complex_randn(2, 5, dtype=torch.complex64).to(device) if with_state else None
        mask = None
        if with_padding:
            mask = torch.ones(2, 19, device=device)
            mask[0, :4] = 0
        y, final = lru_sequence(u, lam, B, C, D, initial_state=h0, step_mask=mask, use_kernel=use_kernel)
        loss = (y * torch.linspace(-1, 1, 3, device=device)).sum() + (final.abs() ** 2).sum()
        results.append((y, final, torch.autograd.grad(loss, (lam, B, C, D, u))))
    (y_ref, final_ref, grads_ref), (y_k, final_k, grads_k) = results
    assert torch.allclose(y_k, y_ref, atol=1e-5)
    assert torch.allclose(final_k, final_ref, atol=1e-5)
    for reference, kernel in zip(grads_ref, grads_k):
        assert torch.allclose(kernel, reference, atol=1e-4, rtol=1e-4)


def test_holding_the_state_without_a_mask_is_refused_clearly():
    from modeling_compressm.scan import lru_sequence_torch

    u, lam = torch.randn(1, 4, 3), torch.full((2,), 0.5 + 0.1j, dtype=torch.complex64)
    B, C, D = torch.randn(2, 3, dtype=torch.complex64), torch.randn(3, 2, dtype=torch.complex64), torch.randn(3)
    with pytest.raises(ValueError, match="hold_state=True .* needs a step_mask"):
        lru_sequence_torch(u, lam, B, C, D, hold_state=True)
    y, _ = lru_sequence_torch(u, lam, B, C, D, step_mask=torch.ones(1, 4, dtype=torch.bool), hold_state=True)
    assert torch.allclose(y, lru_sequence_torch(u, lam, B, C, D)[0], atol=1e-6)  # all-real mask: nothing held
