"""Balanced truncation math: Gramians, Hankel singular values, truncation error bound, rank choice, guards."""

import math
import re

import pytest
import torch
from conftest import random_stable_system

from modeling_compressm.reduction import (
    ReductionError,
    balanced_truncation,
    gramians,
    hankel_singular_values,
    lru_parameters_from_system,
    rank_for_energy,
)
from modeling_compressm.scan import sequential_diagonal_scan


def dense_gramians(A: torch.Tensor, B: torch.Tensor, C: torch.Tensor):
    """Solve P = A P A^H + B B^H and Q = A^H Q A + C^H C for a dense A by the Kronecker (vec) formulation."""
    n = A.shape[0]
    eye = torch.eye(n * n, dtype=A.dtype)
    vec = lambda X: X.T.reshape(-1)  # column-major vec
    unvec = lambda v: v.reshape(n, n).T
    P = unvec(torch.linalg.solve(eye - torch.kron(A.conj(), A), vec(B @ B.conj().T)))
    Q = unvec(torch.linalg.solve(eye - torch.kron(A.T, A.conj().T), vec(C.conj().T @ C)))
    return P, Q


def simulate(lam, B, C, u):
    """y = Re(C h), h_t = lam h_{t-1} + B u_t in complex128. u: float64 (batch, L, H) -> (batch, L, H)."""
    x = u.to(torch.complex128) @ B.T
    states = sequential_diagonal_scan(x, lam)
    return (states @ C.T).real


def test_gramians_solve_the_lyapunov_equations():
    lam, B, C = random_stable_system(24, 5, max_modulus=0.99)
    P, Q = gramians(lam, B, C)
    A = torch.diag(lam)
    residual_p = P - A @ P @ A.conj().T - B @ B.conj().T
    residual_q = Q - A.conj().T @ Q @ A - C.conj().T @ C
    assert residual_p.abs().max() / P.abs().max() < 1e-10
    assert residual_q.abs().max() / Q.abs().max() < 1e-10
    assert torch.allclose(P, P.conj().T) and torch.allclose(Q, Q.conj().T)
    assert torch.linalg.eigvalsh(P).min() > -1e-10 * P.abs().max()


def test_hsv_match_a_dense_solver_and_are_invariant_under_state_transforms():
    lam, B, C = random_stable_system(6, 3)
    hsv = hankel_singular_values(lam, B, C, system="complex")
    # Any invertible change of state basis T leaves the Hankel singular values unchanged.
    generator = torch.Generator().manual_seed(3)
    T = torch.complex(torch.randn(6, 6, generator=generator, dtype=torch.float64),
                      torch.randn(6, 6, generator=generator, dtype=torch.float64)) + 3 * torch.eye(6)
    T_inv = torch.linalg.inv(T)
    A_t = T_inv @ torch.diag(lam) @ T
    P, Q = dense_gramians(A_t, T_inv @ B, C @ T)
    dense_hsv = torch.linalg.eigvals(P @ Q).real.clamp_min(0).sqrt().sort(descending=True).values
    assert torch.allclose(hsv, dense_hsv, rtol=1e-8, atol=1e-10)
    # A diagonal rescaling plus permutation keeps the system diagonal: the closed form must agree with itself.
    scale = torch.polar(torch.rand(6, dtype=torch.float64) + 0.5, torch.rand(6, dtype=torch.float64))
    order = torch.randperm(6)
    hsv_scaled = hankel_singular_values(
        lam[order], (scale[:, None] * B)[order], (C / scale[None, :])[:, order], system="complex"
    )
    assert torch.allclose(hsv, hsv_scaled, rtol=1e-9)
    assert torch.all(hsv[:-1] >= hsv[1:])


@pytest.mark.parametrize("rank", [2, 5, 12])
@pytest.mark.parametrize("seed", [0, 1])
def test_truncation_error_is_within_twice_the_discarded_hsv_sum(rank, seed):
    lam, B, C = random_stable_system(20, 4, max_modulus=0.97, seed=seed)
    reduced = balanced_truncation(lam, B, C, rank, system="complex")
    assert reduced.lam.shape == (rank,) and reduced.B.shape == (rank, 4) and reduced.C.shape == (4, rank)
    assert reduced.lam.abs().max() < 1
    bound = 2 * reduced.hsv[rank:].sum()
    u = torch.randn(8, 300, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    error = simulate(lam, B, C, u) - simulate(reduced.lam, reduced.B, reduced.C, u)
    error_norms = error.flatten(1).norm(dim=1)
    input_norms = u.flatten(1).norm(dim=1)
    assert torch.all(error_norms <= bound * input_norms * (1 + 1e-9)), (error_norms / input_norms).max() / bound
    # The bound is not vacuous: the reduced system is a much better model than dropping the output.
    output_norms = simulate(lam, B, C, u).flatten(1).norm(dim=1)
    assert torch.all(error_norms < output_norms)


def test_full_rank_truncation_reproduces_the_system():
    lam, B, C = random_stable_system(8, 3, seed=4)
    reduced = balanced_truncation(lam, B, C, 8, system="complex")
    u = torch.randn(2, 50, 3, dtype=torch.float64)
    assert torch.allclose(simulate(lam, B, C, u), simulate(reduced.lam, reduced.B, reduced.C, u), atol=1e-9)


def test_hsv_of_the_reduced_system_are_the_kept_ones():
    lam, B, C = random_stable_system(16, 2, seed=5)
    reduced = balanced_truncation(lam, B, C, 6, system="complex")
    # Balanced truncation keeps the leading Hankel singular values only approximately; they must stay close.
    kept = hankel_singular_values(reduced.lam, reduced.B, reduced.C, system="complex")
    assert torch.allclose(kept, reduced.hsv[:6], rtol=0.05, atol=2 * reduced.hsv[6:].sum().item())


def test_rank_for_energy_uses_the_sum_of_singular_values():
    hsv = torch.tensor([4.0, 3.0, 2.0, 1.0])  # cumulative energy 0.4, 0.7, 0.9, 1.0
    assert rank_for_energy(hsv, 0.0) == 4
    assert rank_for_energy(hsv, 0.1) == 3
    assert rank_for_energy(hsv, 0.11) == 3
    assert rank_for_energy(hsv, 0.3) == 2
    assert rank_for_energy(hsv, 0.31) == 2
    assert rank_for_energy(hsv, 0.61) == 1
    assert rank_for_energy(hsv[[3, 0, 2, 1]], 0.3) == 2  # order does not matter
    assert rank_for_energy(torch.zeros(5), 0.1) == 1
    with pytest.raises(ValueError, match="tau"):
        rank_for_energy(hsv, 1.0)
    with pytest.raises(ValueError, match="NaN"):
        rank_for_energy(torch.tensor([1.0, float("nan")]), 0.1)


@pytest.mark.parametrize("tau", [False, True, "0.1", -0.1, 1.0, float("nan")])
def test_rank_for_energy_refuses_every_tau_the_rank_policy_refuses(tau):
    """One rule decides what a tau is (an int or float, not a bool, in [0, 1)): a value the training settings refuse
    is not silently turned into a tolerance by the post-hoc function either; each keeps its own wording."""
    from modeling_compressm.training.settings import ReductionSettings

    with pytest.raises(ValueError, match=r"tau must be a number in \[0, 1\), got " + re.escape(repr(tau))):
        ReductionSettings(policy="tolerance", tau=tau)
    with pytest.raises(ValueError, match=r"tau must lie in \[0, 1\), got " + re.escape(repr(tau))):
        rank_for_energy(torch.tensor([4.0, 3.0, 2.0, 1.0]), tau)


def test_guards_raise_reduction_error():
    lam, B, C = random_stable_system(6, 2)
    with pytest.raises(ReductionError, match="stable"):
        gramians(lam * 1.2, B, C)
    bad = B.clone()
    bad[0, 0] = complex(float("nan"), 0)
    with pytest.raises(ReductionError, match="NaN"):
        hankel_singular_values(lam, bad, C)
    with pytest.raises(ReductionError, match="rank"):
        balanced_truncation(lam, B, C, 0)
    with pytest.raises(ReductionError, match="rank"):
        balanced_truncation(lam, B, C, 7)
    with pytest.raises(ReductionError, match="shape"):
        gramians(lam, B.T, C)
    # An unobservable state has a zero Hankel singular value: keeping it cannot be balanced.
    C_deficient = C.clone()
    C_deficient[:, :3] = 0
    with pytest.raises(ReductionError, match="zero Hankel"):
        balanced_truncation(lam, B, C_deficient, 6, system="complex")
    assert isinstance(ReductionError("x"), ValueError)


def test_lru_parameter_mapping_inverts_the_parametrisation():
    lam, B, _ = random_stable_system(10, 3, seed=6)
    nu_log, theta_log, gamma_log, B_normalised = lru_parameters_from_system(lam, B)
    rebuilt = torch.exp(torch.complex(-torch.exp(nu_log), torch.exp(theta_log)))
    assert torch.allclose(rebuilt, lam, atol=1e-12)
    assert torch.allclose(B_normalised * torch.exp(gamma_log)[:, None], B, atol=1e-12)
    assert torch.allclose(torch.exp(gamma_log), torch.sqrt(1 - lam.abs() ** 2))
    with pytest.raises(ReductionError, match="moduli"):
        lru_parameters_from_system(torch.tensor([1.0 + 0j]), B[:1])
    assert math.isfinite(theta_log.min().item())


def test_basis_maps_relate_old_and_new_states():
    """ReducedSystem.project (r, N) maps old states to new ones and lift (N, r) back: at full rank the reduced
    recurrence follows project @ h exactly; at any rank B_r = project B, C_r = C lift and project lift = I."""
    lam, B, C = random_stable_system(10, 3, seed=4)
    full = balanced_truncation(lam, B, C, 10, system="complex")
    u = torch.randn(2, 40, 3, dtype=torch.float64)
    old_states = sequential_diagonal_scan(u.to(torch.complex128) @ B.T, lam)  # (batch, L, N)
    new_states = sequential_diagonal_scan(u.to(torch.complex128) @ full.B.T, full.lam)  # (batch, L, N)
    torch.testing.assert_close(new_states, old_states @ full.project.T, rtol=1e-8, atol=1e-8)
    torch.testing.assert_close(full.lift @ full.project, torch.eye(10, dtype=torch.complex128), rtol=0, atol=1e-8)
    reduced = balanced_truncation(lam, B, C, 4, system="complex")
    assert reduced.project.shape == (4, 10) and reduced.lift.shape == (10, 4)
    assert reduced.project.dtype == reduced.lift.dtype == torch.complex128
    torch.testing.assert_close(reduced.project @ reduced.lift, torch.eye(4, dtype=torch.complex128), rtol=0, atol=1e-8)
    torch.testing.assert_close(reduced.B, reduced.project @ B.to(torch.complex128), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(reduced.C, C.to(torch.complex128) @ reduced.lift, rtol=1e-10, atol=1e-10)


def test_all_zero_hankel_singular_values_keep_a_zero_map():
    lam, B, C = random_stable_system(8, 3, seed=5)
    C = torch.zeros_like(C)  # unobservable: the map is identically zero, every HSV is zero
    assert rank_for_energy(hankel_singular_values(lam, B, C), 0.05) == 1
    reduced = balanced_truncation(lam, B, C, 2)  # used to fail with "choose a smaller rank" for rank 1 too
    assert reduced.lam.shape == (2,) and torch.count_nonzero(reduced.C) == 0
    assert set(reduced.lam.tolist()) <= set(lam.tolist())
