"""SVDQuant for LLMs (arXiv 2411.05007; docs: lowrank-quant.md §6): smoothing, a 16-bit low-rank
branch that absorbs the outliers migrated into the weight, and a 4-bit residual.

Per linear ``W [out, in]`` with calibration inputs ``X``::

    x̂ = x ⊘ λ,  Ŵ = W·diag(λ)                      (exact: x̂ Ŵᵀ = x Wᵀ)
    Ŵ = B A + R,  A = V_rᵀ [r, in],  B = U_r Σ_r   (fp64 SVD, singular values in the up-projection)
    y ≈ Q_a(x̂)·Q(R)ᵀ + x̂ Aᵀ Bᵀ + b

* **Smoothing search** (§6.4): spans ``a_j = max_t |x_tj|`` (the ``abs_max`` statistic) and
  ``w_j = max_o |W_oj|``; candidates ``λ = a^α / w^β`` over ``{(0,0)} ∪ {(α,0)} ∪ {(α,1−α)}``,
  ``α ∈ {1/n, …, (n−1)/n}`` (``alpha_grid`` n = 20: 39 candidates). Zero spans take the geometric
  mean of the positive ones (scale-free); a candidate
  with any NaN/Inf becomes all ones; every candidate is divided by its geometric mean (an exact global
  rescaling that changes no quantised error but keeps ``A ⊘ λ`` and the scales well inside fp16).
  Each candidate is scored on the real quantised output error ``‖X Wᵀ − (Q_a(x̂) Q(Ŵ−L)ᵀ + x̂ Lᵀ)‖²``
  with a one-shot rank-r branch ``L = SVD_r(Ŵ)`` in the loop, the activations fake-quantised at
  ``act_bits`` / ``act_group_size`` exactly as the module computes, on a bounded random subsample of
  the calibration rows (the ``input_sample`` statistic, at most 4096 tokens per linear; products and
  errors in fp32 in the compressor, SVDs in fp64; the functions take ``dt`` for fp64 references).
  Weight-only, the error is linear in the rows, so it is scored on the ``in`` rows of the sample's QR
  factor instead (:func:`effective_rows`: the same objective, up to 7× fewer flops). The argmin is
  kept; (0,0) (no smoothing) is always a candidate, so smoothing never makes the objective worse.
* **Shared smoothing vector**: linears that read the same tensor (q/k/v, gate/up; detected by the
  collector, ``stats.extra["input_group"]``) get ONE λ: ``w`` is the abs-max over their concatenated
  weights and the objective is the sum of their output errors (the error of the concatenated layer).
  This goes through the pipeline's ``prepare_block`` hook (:func:`.apply.compress_model`). Each linear
  keeps its own rank-r branch (the paper's variant shares one ``A`` across q/k/v; not done here).
* **Folding into the preceding RMSNorm** (``fold_smoothing``, default true): once a block's linears
  are replaced (the pipeline's ``finish_block`` hook, before the block runs forward to give the next
  block its inputs, so the stored model is the one calibrated), every norm whose output only linears
  of this stage read — q/k/v after ``input_layernorm``; gate/up after ``post_attention_layernorm``
  (Llama / Qwen2 / Mistral) or ``pre_feedforward_layernorm`` (Gemma 3), from
  :func:`tensorpress.modeling.norm_readers` — absorbs their common λ: the norm then outputs ``x ⊘ λ``
  (weight ``w / λ``; Gemma's ``(1 + w)·n(x)``: ``(1 + w) / λ − 1``), and those modules store
  ``smooth = ones`` and ``lr_down = A`` (``(A ⊘ λ) ⊙ λ`` rounded once to ``factor_dtype``: the only
  change to the outputs besides fp rounding of the norm, none with ``factor_dtype: float32``). A norm
  keeps its weight and its readers their vector when any reader is not this stage's SVDQuantLinear
  (``targets`` leaving one out, another last stage), their λ differ (one fell back to no smoothing),
  λ is all ones, the layer/norm type is not one whose forward is known, or the norm's dtype cannot
  hold the folded weight precisely (:func:`~tensorpress.modeling.scaled_norm_weight`; Gemma with a
  16-bit norm and a wide λ). ``o_proj`` / ``down_proj`` have no norm before them and always keep
  their vector. ``fold_smoothing: false`` stores every λ in the modules (the kernels apply it).
* **Branch refit** (§6.5): ``L = SVD_r(Ŵ − qw)`` (exact, from the eigendecomposition of the smaller
  Gram: :func:`.lowrank.gram_svd`), ``qw = RTN(Ŵ − L)`` for up to ``iterations`` rounds, keeping
  the branch with the lowest output error and stopping at the first increase
  (``early_stop``). Then the stored factors are rounded to ``factor_dtype`` and the residual of the
  *rounded* branch ``R = Ŵ − B (A⊘λ) diag(λ)`` is quantised with RTN or GPTQ (``residual_quantizer``;
  GPTQ on the Hessian of x̂: ``H`` scaled by ``1/λ`` on both sides).
* **Stored** (:class:`tensorpress.nn.modules.SVDQuantLinear`): the residual in the GPTQ int32 layout,
  ``smooth = λ [in]``, ``lr_down = A ⊘ λ`` (unsmoothed: the branch reads the raw x) and ``lr_up = B``;
  folded (above): ``smooth = ones``, ``lr_down = A``, and the norm weight changed in the state dict.
  ``act_bits``: 4 (W4A4, activations fake-quantised on CPU), 8 (W4A8, the int8 kernel), 16 (W4A16).

Rank 0 with ``smooth: false`` is plain W4A4 RTN (``rtn-w4a4``); rank 0 with smoothing is the
smoothing-only ablation.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import TensorpressError
from ..kernels.actquant import fake_quantize_activations
from ..nn import QuantLinear
from ..nn.modules import SVDQuantLinear
from .base import Compressor, LinearContext, check_number, register
from .eora import FACTOR_DTYPES
from .gptq import gptq_quantize
from .lowrank import gram_svd, randomized_svd, truncated_svd
from .quantizer import QuantSpec, dequantize, quantize_groups

ACT_BITS = (4, 8, 16)
RESIDUAL_QUANTIZERS = ("rtn", "gptq")


# --- the math, as plain functions (the tests call these) ------------------------------------------

def _fill_zero_spans(v: torch.Tensor) -> torch.Tensor:
    """Zero (dead) spans take the geometric mean of the positive ones (all zero: ones). A fixed 1
    would not be scale-free: with activations ~1e-20 a dead channel would stand 1e20 above the live
    ones, and λ = a^α spread over ~1e7 overflows the fp16 branch (``W·λ``) into inf."""
    pos = v > 0
    if not bool(pos.any()):
        return torch.ones_like(v)
    return torch.where(pos, v, v[pos].log().mean().exp())


def smoothing_candidates(a: torch.Tensor, w: torch.Tensor, grid: int = 20):
    """``[(alpha, beta, λ)]``: ``(0,0)`` first, then ``(α,0)`` and ``(α,1−α)`` for ``α = k/grid``."""
    a = _fill_zero_spans(a.double().abs())
    w = _fill_zero_spans(w.double().abs())
    pairs = [(0.0, 0.0)]
    alphas = [k / grid for k in range(1, grid)]
    pairs += [(al, 0.0) for al in alphas] + [(al, 1.0 - al) for al in alphas]
    out = []
    for al, be in pairs:
        lam = a.pow(al) / w.pow(be)
        lam = torch.where(lam > 0, lam, torch.ones_like(lam))
        if not bool(torch.isfinite(lam).all()):
            lam = torch.ones_like(lam)
        lam = lam / lam.log().mean().exp()               # geometric mean 1: an exact global rescaling
        out.append((al, be, lam))
    return out


def decompose(W: torch.Tensor, lam: torch.Tensor, rank: int, svd: str = "exact"):
    """``(A [r, in], B [out, r], R [out, in])`` with ``B A + R = W·diag(λ)`` (fp64, Σ in ``B``).

    ``svd``: ``exact`` (fp64 SVD, the best rank-r branch) or ``randomized``
    (:func:`.lowrank.randomized_svd`, ~10× cheaper at rank 32 on 576×1536, residual norm within a
    fraction of a percent): what the smoothing search uses to score its 39 candidates."""
    What = W.double() * lam.double()[None, :]
    if rank == 0:
        return What.new_zeros(0, W.shape[1]), What.new_zeros(W.shape[0], 0), What
    if svd == "randomized":
        A, B = (t.double() for t in randomized_svd(What, rank, sigma_side="up"))
    elif svd == "exact":
        A, B = truncated_svd(What, rank, sigma_side="up", dtype=torch.float64)
    else:
        raise ValueError(svd)
    return A, B, What - B @ A


def rtn_dequant(M: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """``Q(M)`` with the one group-wise quantiser (fp32 grid), as fp64."""
    codes, scales, zeros = quantize_groups(M.float(), spec)
    g = spec.group(M.shape[1])
    gi = torch.arange(M.shape[1]) // g
    return dequantize(codes.float(), scales.t()[:, gi], zeros.t()[:, gi].float()).double()


def _act(X: torch.Tensor, lam: torch.Tensor, act_bits: int, act_group_size: int, dt=torch.float64):
    """``(x̂, Q_a(x̂))`` of the sample rows in ``dt`` (``Q_a`` rounds in fp32 exactly as the module does)."""
    xhat = (X.double() / lam.double()[None, :]).to(dt)
    if act_bits >= 16:
        return xhat, xhat
    return xhat, fake_quantize_activations(X.float(), act_bits, act_group_size, lam.float()).to(dt)


def effective_rows(X: torch.Tensor, act_bits: int) -> torch.Tensor:
    """Rows that give the same squared output errors as the sample ``X`` [N, in], fewer where possible.

    Weight-only (``act_bits`` 16) the error is linear in the rows: ``‖X diag(1/λ) Dᵀ‖_F`` for a weight
    error ``D``. With the thin QR ``X = Q R`` (``Q`` orthonormal columns) it equals
    ``‖R diag(1/λ) Dᵀ‖_F`` for every λ and D, so the search and the refit score on the ``in`` rows of
    ``R`` instead of N (4096 → 576 or 1536 here: 2.7-7× fewer flops), the objective unchanged up to
    rounding. With quantised activations ``Q_a`` acts row by row: the sample itself is returned."""
    if act_bits < 16 or X.shape[0] <= X.shape[1]:
        return X
    return torch.linalg.qr(X.double(), mode="r").R.to(X.dtype)


def _sq_err(yref, xhat, xq, A, B, Rq) -> float:
    # The search's hot loop (39 candidates × linears × 4096 rows): two fused multiply-adds into one
    # new buffer and an in-place square, summed in ``dt`` (torch's CPU sum is cascaded: fp32 is
    # accurate to ~1e-6 relative here, and the candidates differ by far more).
    dt = xhat.dtype
    d = torch.addmm(yref, xq, Rq.to(dt).T, alpha=-1)
    if A.shape[0]:
        d.addmm_(xhat @ A.to(dt).T, B.to(dt).T, alpha=-1)
    return float(d.square_().sum())


def output_sq_error(X, W, lam, A, B, Rq, act_bits, act_group_size, dt=torch.float64) -> float:
    """``‖X Wᵀ − (Q_a(x̂) Rqᵀ + x̂ Aᵀ Bᵀ)‖_F²`` on sample rows ``X`` (bias cancels), computed in ``dt``."""
    xhat, xq = _act(X, lam, act_bits, act_group_size, dt)
    return _sq_err(X.to(dt) @ W.to(dt).T, xhat, xq, A, B, Rq)


def search_smoothing(Ws: list[torch.Tensor], X: torch.Tensor, a: torch.Tensor, rank: int, spec: QuantSpec,
                     act_bits: int, act_group_size: int, grid: int = 20, wq=None, dt=torch.float64,
                     svd: str = "exact"):
    """Best λ for linears ``Ws`` reading the same inputs ``X`` (sample rows) with span ``a``.

    Returns ``(λ, [(alpha, beta, error)])``; ``error`` is the summed squared output error with a
    one-shot rank-``rank`` branch per linear and ``wq`` (default RTN with ``spec``) on the residual;
    ties keep the earlier candidate ((0,0) first). ``svd`` is how the one-shot branch is computed
    (:func:`decompose`); the compressor scores with ``randomized`` and refits the chosen λ exactly.
    """
    wq = wq or (lambda M: rtn_dequant(M, spec))
    wspan = torch.stack([W.double().abs().amax(0) for W in Ws]).amax(0)
    X = effective_rows(X, act_bits)
    yrefs = [X.to(dt) @ W.to(dt).T for W in Ws]
    scored, best = [], None
    for al, be, lam in smoothing_candidates(a, wspan, grid):
        xhat, xq = _act(X, lam, act_bits, act_group_size, dt)
        e = 0.0
        for W, yref in zip(Ws, yrefs):
            A, B, R = decompose(W, lam, rank, svd)
            e += _sq_err(yref, xhat, xq, A, B, wq(R))
        scored.append((al, be, e))
        if best is None or e < best[1]:
            best = (lam, e)
    return best[0], scored


def refit_branch(W: torch.Tensor, X: torch.Tensor, lam: torch.Tensor, rank: int, spec: QuantSpec, act_bits: int,
                 act_group_size: int, iterations: int = 100, early_stop: bool = True, wq=None, dt=torch.float64):
    """Iterative branch calibration (§6.5). Returns ``(A, B, errors, kept)``: the best branch, the
    error of every iteration run and the running best (non-increasing by construction)."""
    wq = wq or (lambda M: rtn_dequant(M, spec))
    What = W.double() * lam.double()[None, :]
    X = effective_rows(X, act_bits)
    xhat, xq = _act(X, lam, act_bits, act_group_size, dt)
    yref = X.to(dt) @ W.to(dt).T
    qw = torch.zeros_like(What)
    best, errors, kept = None, [], []
    for it in range(iterations if rank else 1):
        if rank:
            A, B = gram_svd(What - qw, rank, sigma_side="up", dtype=torch.float64)
        else:
            A, B = What.new_zeros(0, What.shape[1]), What.new_zeros(What.shape[0], 0)
        qw = wq(What - B @ A)
        e = _sq_err(yref, xhat, xq, A, B, qw)
        errors.append(e)
        if best is None or e <= best[2]:
            best = (A, B, e)
        elif early_stop:
            kept.append(best[2])
            break
        kept.append(best[2])
    return best[0], best[1], errors, kept


# --- the compressor ---------------------------------------------------------------------------------

@dataclass
class SVDQuantParams:
    rank: int = 32
    bits: int = 4
    group_size: int = 64
    act_bits: int = 4                    # 4 (W4A4) | 8 (W4A8) | 16 (weight-only W4A16)
    act_group_size: int | None = None    # None: 64 for A4, -1 (per token) for A8
    smooth: bool = True
    alpha_grid: int = 20                 # 20 → 39 candidates
    iterations: int = 100
    early_stop: bool = True
    residual_quantizer: str = "rtn"      # rtn | gptq (on the Hessian of x̂)
    damp: float = 0.01                   # GPTQ damping (residual_quantizer: gptq)
    factor_dtype: str = "float16"        # float16 | bfloat16 | float32 | model
    fold_smoothing: bool = True          # fold λ into the preceding RMSNorm where the architecture allows


@register
class SVDQuant(Compressor):
    name = "svdquant"
    description = "SVDQuant: searched smoothing + 16-bit low-rank branch + 4-bit residual (W4A4 / W4A8 / W4A16)"
    requires = frozenset({"abs_max", "input_sample"})
    Params = SVDQuantParams

    def validate(self):
        p = self.params
        check_number("rank", p.rank, 0, integer=True)
        check_number("bits", p.bits, 2, 8, integer=True)
        if isinstance(p.act_bits, bool) or not isinstance(p.act_bits, int) or p.act_bits not in ACT_BITS:
            raise TensorpressError(f"act_bits must be one of 4, 8, 16, got {p.act_bits!r}")
        if p.act_bits == 8 and p.bits != 4:
            raise TensorpressError(f"act_bits 8 runs the W4A8 kernel, which needs bits 4 (got {p.bits})")
        if p.act_group_size is None:
            self.act_group_size = 64 if p.act_bits == 4 else -1
        else:
            g = p.act_group_size
            if isinstance(g, bool) or not isinstance(g, int) or (g != -1 and g < 1):
                raise TensorpressError(f"act_group_size must be -1 (per token) or a positive integer, got {g!r}")
            self.act_group_size = g
        for k in ("smooth", "early_stop", "fold_smoothing"):
            if not isinstance(getattr(p, k), bool):
                raise TensorpressError(f"{k} must be true or false, got {getattr(p, k)!r}")
        check_number("alpha_grid", p.alpha_grid, 2, 1000, integer=True)
        check_number("iterations", p.iterations, 1, 10000, integer=True)
        if p.residual_quantizer not in RESIDUAL_QUANTIZERS:
            raise TensorpressError(f"residual_quantizer must be one of {', '.join(RESIDUAL_QUANTIZERS)}, "
                                   f"got {p.residual_quantizer!r}")
        check_number("damp", p.damp, 0, 1, lo_open=True)
        if not isinstance(p.factor_dtype, str) or p.factor_dtype not in FACTOR_DTYPES:   # dict lookup: str first
            raise TensorpressError(f"factor_dtype must be one of {', '.join(FACTOR_DTYPES)}, got {p.factor_dtype!r}")
        self.spec = QuantSpec(p.bits, p.group_size, True, False).validate()
        # per linear, from prepare_block: its group's λ and scoring rows (effective_rows of the sample)
        self._prepared: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def check_layer(self, ctx: LinearContext):
        m = ctx.original
        self.spec.validate(m.in_features)
        if self.params.rank > min(m.in_features, m.out_features):
            raise TensorpressError(f"rank {self.params.rank} is above min(out, in) = "
                                   f"{min(m.in_features, m.out_features)} for {ctx.name}")
        if self.act_group_size > m.in_features:
            raise TensorpressError(f"act_group_size {self.act_group_size} cannot apply to {ctx.name} "
                                   f"with {m.in_features} input features")

    # --- smoothing, shared by the linears that read one input ----------------------------------------
    def _search(self, ctxs: list[LinearContext], X: torch.Tensor) -> torch.Tensor:
        p = self.params
        st = ctxs[0].stats
        if not p.smooth:
            return torch.ones(ctxs[0].original.in_features, dtype=torch.float64)
        lam, _ = search_smoothing([c.weight.double() for c in ctxs], X, st.abs_max, p.rank,
                                  self.spec, p.act_bits, self.act_group_size, p.alpha_grid, dt=torch.float32,
                                  svd="randomized")
        return lam

    def prepare_block(self, ctxs: dict[str, LinearContext]) -> None:
        """Pipeline hook (called once per block before ``compress``): one λ per group of linears that
        read the same input tensor."""
        groups: dict = {}
        for name, c in ctxs.items():
            key = c.stats.extra.get("input_group", name)
            groups.setdefault(key, []).append(name)
        for names in groups.values():
            # one sample (the same keys for every reader of a tensor) reduced once for the group
            X = effective_rows(ctxs[names[0]].stats.input_sample(), self.params.act_bits)
            lam = self._search([ctxs[n] for n in names], X)
            for n in names:
                self._prepared[n] = (lam, X)

    def finish_block(self, layer: torch.nn.Module, names: list[str]) -> list[str]:
        """Pipeline hook (called once per block after its linears were replaced, before it runs forward
        again): fold the shared λ of each group into the norm that feeds it (module docstring).
        ``names``: the linears (names inside the block) whose module in place this stage produced.
        Returns the names of the block tensors it changed (the folded norm weights)."""
        if not (self.params.fold_smoothing and self.params.smooth):
            return []
        from ..modeling import norm_readers, scaled_norm_weight
        ours, changed = set(names), []
        for g in norm_readers(layer):
            if not ours.issuperset(g.linears):
                continue                                   # a reader this stage did not (last) compress
            mods = [layer.get_submodule(n) for n in g.linears]
            if not all(type(m) is SVDQuantLinear for m in mods):
                continue
            lam = mods[0].smooth
            if not all(torch.equal(m.smooth, lam) for m in mods[1:]) or bool((lam == 1).all()):
                continue                                   # different λ (a fallback), or nothing to fold
            norm = layer.get_submodule(g.norm)
            w = scaled_norm_weight(norm.weight, g.unit_offset, 1.0 / lam.double())
            downs = [m.folded_down() for m in mods]
            if w is None or not all(d is None or bool(torch.isfinite(d).all()) for d in downs):
                continue                                   # not representable: keep the vectors
            norm.weight.data.copy_(w)
            for m, d in zip(mods, downs):
                m.fold_smoothing(d)
            changed.append(f"{g.norm}.weight")
        return changed

    def compress(self, ctx: LinearContext):
        p = self.params
        W = ctx.weight.double()
        lam, X = self._prepared.pop(ctx.name, (None, None))
        if lam is None:                                  # not prepared with a block (called directly)
            X = effective_rows(ctx.stats.input_sample(), p.act_bits)
            lam = self._search([ctx], X)
        lam = lam.float().double()                                   # stored in fp32: compute with it
        try:
            A, B, _, _ = refit_branch(W, X, lam, p.rank, self.spec, p.act_bits, self.act_group_size,
                                      p.iterations, p.early_stop, dt=torch.float32)
        except torch.linalg.LinAlgError:
            # Only non-finite input reaches here: fp16 group scales overflow (|W·λ| beyond ~4e5).
            raise TensorpressError(f"{ctx.name}: svdquant: the smoothed weight leaves the fp16 range of the "
                                   f"quantisation scales") from None
        fdt = FACTOR_DTYPES[p.factor_dtype] or ctx.dtype
        down = (A / lam[None, :]).to(fdt)
        up = B.to(fdt)
        if p.rank and not (bool(torch.isfinite(down).all()) and bool(torch.isfinite(up).all())) and \
                not bool((lam == 1).all()):
            # The chosen smoothing is too wide for the factor dtype (degenerate statistics: W·λ or
            # A ⊘ λ overflows fp16): refit without smoothing rather than store inf factors.
            lam = torch.ones_like(lam)
            A, B, _, _ = refit_branch(W, X, lam, p.rank, self.spec, p.act_bits, self.act_group_size,
                                      p.iterations, p.early_stop, dt=torch.float32)
            down, up = A.to(fdt), B.to(fdt)
        R = W * lam[None, :] - (up.double() @ down.double()) * lam[None, :]
        if p.residual_quantizer == "gptq":
            H = ctx.stats.gram() / (lam[:, None] * lam[None, :])
            codes, scales, zeros, g_idx = gptq_quantize(R, H, self.spec, p.damp)
        else:
            codes, scales, zeros = quantize_groups(R.float(), self.spec)
            g_idx = None
        q = QuantLinear.from_codes(codes, scales, zeros, bits=p.bits, group_size=p.group_size, sym=True,
                                   g_idx=g_idx, bias=ctx.bias, dtype=ctx.dtype)
        return SVDQuantLinear.from_quant(q, lam, down if p.rank else None, up if p.rank else None,
                                         act_bits=p.act_bits, act_group_size=self.act_group_size, lr_dtype=fdt)
