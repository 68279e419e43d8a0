"""Low-rank math shared by the SVD family (and, later, EoRA and SVDQuant): one place for ranks,
factor splits and the activation-whitened truncated SVD."""
from __future__ import annotations

import math

import torch

from ..errors import TensorpressError


def rank_from_ratio(out_f: int, in_f: int, ratio: float) -> int:
    """Rank whose two factors hold ``ratio`` (fraction *kept*) of the ``out×in`` parameters:
    ``r = floor(ratio·out·in/(out+in))``, at least 1."""
    return max(1, int(math.floor(ratio * out_f * in_f / (out_f + in_f))))


def resolve_rank(out_f: int, in_f: int, rank: int | None, ratio: float | None, name: str) -> int:
    r = rank if rank is not None else rank_from_ratio(out_f, in_f, ratio)
    if r > min(out_f, in_f):
        raise TensorpressError(f"rank {r} is above min(out, in) = {min(out_f, in_f)} for {name}")
    return r


def split_factors(U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor, sigma_side: str = "both"):
    """``(down [r, in], up [out, r])`` with ``up @ down = U diag(S) Vh``."""
    if sigma_side == "both":
        s = S.sqrt()
        return s[:, None] * Vh, U * s[None, :]
    if sigma_side == "up":
        return Vh, U * S[None, :]
    if sigma_side == "down":
        return S[:, None] * Vh, U
    raise ValueError(sigma_side)


def truncated_svd(E: torch.Tensor, rank: int, sigma_side: str = "both", dtype=torch.float32):
    """Best rank-``rank`` approximation of ``E`` in Frobenius norm (exact SVD, fp64)."""
    U, S, Vh = torch.linalg.svd(E.double(), full_matrices=False)
    down, up = split_factors(U[:, :rank], S[:rank], Vh[:rank], sigma_side)
    return down.to(dtype), up.to(dtype)


def gram_svd(E: torch.Tensor, rank: int, sigma_side: str = "both", dtype=torch.float32):
    """:func:`truncated_svd`'s factors from the eigendecomposition of the smaller Gram (``EᵀE`` or
    ``EEᵀ``, fp64): the same best rank-``rank`` approximation to ~1e-13 relative, 1.5-4× cheaper at
    LLM shapes (no full SVD of ``E``): for loops that refit a branch many times (SVDQuant's §6.5).
    The Gram squares the condition number, so a kept singular value below ``1e-4·σ₁`` (then only
    ~1e-8 accurate: rank-deficient input) falls back to the exact SVD."""
    M = E.double()
    if rank == 0:
        return M.new_zeros(0, M.shape[1]).to(dtype), M.new_zeros(M.shape[0], 0).to(dtype)
    tall = M.shape[0] >= M.shape[1]
    _, Q = torch.linalg.eigh(M.T @ M if tall else M @ M.T)
    Q = Q.flip(1)[:, :rank]                                   # eigh sorts ascending
    P = M @ Q if tall else Q.T @ M                            # U Σ [out, r]  |  Σ Vᵀ [r, in]
    S = P.norm(dim=0 if tall else 1)                          # σ from the product: accurate where λ is not
    if not bool(S.min() > S.max() * 1e-4):
        return truncated_svd(E, rank, sigma_side, dtype)
    U, Vh = (P / S[None, :], Q.T) if tall else (Q, P / S[:, None])
    down, up = split_factors(U, S, Vh, sigma_side)
    return down.to(dtype), up.to(dtype)


def randomized_svd(E: torch.Tensor, rank: int, sigma_side: str = "both", dtype=torch.float32,
                   oversample: int = 8, power_iters: int = 4, seed: int = 0):
    """Rank-``rank`` factors of ``E`` by a randomized range finder (Halko et al. 2011): ``E·Ω`` for a
    Gaussian ``Ω`` of ``rank + oversample`` columns (drawn from ``seed``: reproducible, global RNG
    untouched), ``power_iters`` re-orthonormalised power iterations, then the exact SVD of the small
    projected matrix. Computed in fp32. Close to :func:`truncated_svd` when the spectrum decays past
    ``rank``, and several times cheaper when ``rank ≪ min(out, in)``: for inner loops that only need
    a good branch to score candidates (SVDQuant's smoothing search), not for stored factors."""
    M = E.float()
    k = min(rank + oversample, *M.shape)
    g = torch.Generator(device="cpu").manual_seed(seed)
    Q = torch.linalg.qr(M @ torch.randn(M.shape[1], k, generator=g).to(M.device)).Q
    for _ in range(power_iters):
        Q = torch.linalg.qr(M @ torch.linalg.qr(M.T @ Q).Q).Q
    U, S, Vh = torch.linalg.svd(Q.T @ M, full_matrices=False)
    down, up = split_factors((Q @ U)[:, :rank], S[:rank], Vh[:rank], sigma_side)
    return down.to(dtype), up.to(dtype)


def gram_sqrt(H: torch.Tensor, method: str = "eigh"):
    """``(S, S_pinv)`` with ``S Sᵀ = H`` (fp64).

    ``eigh``: ``S = Q Λ^½`` with a truncated pseudo-inverse — eigenvalues below
    ``λ_max·min(1, n·eps_fp32)`` are dropped, so a rank-deficient Gram never gives inf/NaN.
    ``cholesky``: SVD-LLM's choice, with a shift by ``−λ_min + 1e-6`` if the factorisation fails.
    """
    H = H.double()
    H = (H + H.T) / 2
    n = H.shape[0]
    if method == "eigh":
        L, Q = torch.linalg.eigh(H)
        if not bool(torch.isfinite(L).all()):
            raise TensorpressError("the activation Gram has non-finite eigenvalues")
        keep = L > L.max().clamp_min(0) * min(1.0, n * torch.finfo(torch.float32).eps)
        sq = torch.where(keep, L.clamp_min(0).sqrt(), torch.zeros_like(L))
        isq = torch.where(keep, 1 / L.clamp_min(1e-300).sqrt(), torch.zeros_like(L))
        return Q * sq[None, :], isq[:, None] * Q.T
    if method == "cholesky":
        S, info = torch.linalg.cholesky_ex(H)
        if int(info) != 0:
            lam = torch.linalg.eigvalsh(H).min()
            S = torch.linalg.cholesky(H + (-lam + 1e-6) * torch.eye(n, dtype=H.dtype))
        return S, torch.linalg.inv(S)
    raise ValueError(method)


def whitened_lowrank(E: torch.Tensor, H: torch.Tensor, rank: int, sqrt: str = "eigh",
                     sigma_side: str = "both", dtype=torch.float32):
    """Rank-``rank`` ``M`` minimising ``‖X(E − M)ᵀ‖_F`` for inputs with Gram ``H = XᵀX/N``.

    ``E S = U Σ Vᵀ`` with ``S Sᵀ = H``; ``M = U_r Σ_r V_rᵀ S⁻¹`` (SVD-LLM with ``E = W``, EoRA with
    ``E = W − Ŵ``). Returns ``(down [r, in], up [out, r])``.
    """
    S, S_inv = gram_sqrt(H, sqrt)
    U, sig, Vh = torch.linalg.svd(E.double() @ S, full_matrices=False)
    down, up = split_factors(U[:, :rank], sig[:rank], Vh[:rank] @ S_inv, sigma_side)
    return down.to(dtype), up.to(dtype)


def scaled_lowrank(E: torch.Tensor, rank: int, col_scale: torch.Tensor | None = None,
                   row_scale: torch.Tensor | None = None, sigma_side: str = "both", dtype=torch.float32):
    """Rank-``rank`` ``M`` minimising the diagonally weighted error ``‖R (E − M) C‖_F``.

    ``R = diag(row_scale)``, ``C = diag(col_scale)`` (positive; ``None`` = identity): ``R E C = UΣVᵀ``,
    ``M = R⁻¹ U_r Σ_r V_rᵀ C⁻¹`` — exact (Eckart–Young in the rescaled space), one exact SVD in fp64.
    ASVD (``C = diag(m^α)``) and FWSVD (``C`` or ``R`` = ``diag(√Fisher)``) are this with their own
    scales. Returns ``(down [r, in], up [out, r])``.
    """
    E = E.double()
    c = None if col_scale is None else col_scale.double()
    r = None if row_scale is None else row_scale.double()
    for s, what in ((c, "column"), (r, "row")):
        if s is not None and not (bool(torch.isfinite(s).all()) and bool((s > 0).all())):
            raise TensorpressError(f"{what} scales of a weighted SVD must be finite and positive")
    Es = E if c is None else E * c[None, :]
    Es = Es if r is None else Es * r[:, None]
    U, S, Vh = torch.linalg.svd(Es, full_matrices=False)
    U, S, Vh = U[:, :rank], S[:rank], Vh[:rank]
    if c is not None:
        Vh = Vh / c[None, :]
    if r is not None:
        U = U / r[:, None]
    down, up = split_factors(U, S, Vh, sigma_side)
    return down.to(dtype), up.to(dtype)


def balance_factors(down: torch.Tensor, up: torch.Tensor):
    """Rescale each rank-1 term ``up[:, k] down[k]`` so that both factors have the same norm: the
    product is unchanged, and neither factor leaves the range of a 16-bit dtype when the metric is
    badly scaled (activations ~1e-20 give ``S⁻¹``, hence ``down``, ~1e20 and ``up`` ~1e-20, which
    fp16 stores as inf and 0)."""
    dn, un = down.norm(dim=1), up.norm(dim=0)
    ok = (dn > 0) & (un > 0) & torch.isfinite(dn) & torch.isfinite(un)
    s = torch.where(ok, (un / dn.where(ok, torch.ones_like(dn))).sqrt(), torch.ones_like(dn))
    return down * s[:, None], up / s[None, :]


def positive_scale(v: torch.Tensor, eps: float) -> torch.Tensor:
    """``v + eps·mean(v)`` for a non-negative importance vector: strictly positive, and the result of
    a weighted SVD stays invariant to a global rescaling of ``v`` (a fixed absolute epsilon would
    not be: Fisher values are ~1e-8, activation means ~1). An all-zero ``v`` becomes all ones."""
    v = v.double().clamp_min(0)
    m = v.mean()
    if not bool(torch.isfinite(m)):
        raise TensorpressError("importance scales contain NaN/Inf")
    if float(m) == 0.0:
        return torch.ones_like(v)
    return v + eps * m


def weighted_spectrum(E: torch.Tensor, col_scale: torch.Tensor | None = None,
                      row_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Squared singular values of ``R E C`` (descending): the error of truncating at rank ``r`` in the
    method's own metric is the sum of the entries past ``r`` (what the budget allocator uses)."""
    E = E.double()
    if col_scale is not None:
        E = E * col_scale.double()[None, :]
    if row_scale is not None:
        E = E * row_scale.double()[:, None]
    return torch.linalg.svdvals(E) ** 2


def whitened_spectrum(E: torch.Tensor, H: torch.Tensor) -> torch.Tensor:
    """Squared singular values of ``E S`` (``S Sᵀ = H``): tail sums are output errors on the inputs."""
    S, _ = gram_sqrt(H)
    return torch.linalg.svdvals(E.double() @ S) ** 2
