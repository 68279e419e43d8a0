"""Compressed linear modules. Each forward goes through :mod:`tensorpress.kernels`."""
from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import kernels
from ..packing import pack_bits, packed_length


class CompressedLinear(nn.Module):
    """Base of all compressed linears: ``y = base(x) [+ (x·lr_downᵀ)·lr_upᵀ] [+ bias]``.

    Subclasses define the base representation (``base_weight``) and a ``FORMAT`` name. The optional
    low-rank correction (``lr_down [r, in]``, ``lr_up [out, r]``) is what EoRA-style stages add.
    """

    FORMAT: ClassVar[str] = ""

    def __init__(self, in_features: int, out_features: int, bias: bool, rank: int = 0,
                 dtype: torch.dtype = torch.float32, lr_dtype: torch.dtype | None = None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.dtype_ = dtype
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype), requires_grad=False) if bias else None
        self.lr_down = self.lr_up = None
        if rank:
            d = lr_dtype or dtype
            self.set_correction(torch.zeros(rank, in_features, dtype=d), torch.zeros(out_features, rank, dtype=d))

    # --- correction -----------------------------------------------------------------------------------
    @property
    def rank(self) -> int:
        return 0 if self.lr_down is None else self.lr_down.shape[0]

    def set_correction(self, down: torch.Tensor | None, up: torch.Tensor | None,
                       dtype: torch.dtype | None = None) -> None:
        """Attach ``(down [r, in], up [out, r])``, stored in ``dtype`` (default: the dtype they come in
        when it is a float16/bfloat16/float32 type, else the module dtype). Corrections are often
        kept in fp16 (what PEFT adapters ship) on an fp32 model; maths upcasts to the input dtype."""
        if down is None:
            self.lr_down = self.lr_up = None
            return
        assert down.shape[1] == self.in_features and up.shape[0] == self.out_features and down.shape[0] == up.shape[1]
        d = dtype or (down.dtype if down.dtype in (torch.float16, torch.bfloat16, torch.float32) else self.dtype_)
        self.lr_down = nn.Parameter(down.to(d).contiguous(), requires_grad=False)
        self.lr_up = nn.Parameter(up.to(d).contiguous(), requires_grad=False)

    def correction_weight(self) -> torch.Tensor | None:
        return None if self.lr_down is None else self.lr_up.float() @ self.lr_down.float()

    # --- what subclasses provide ----------------------------------------------------------------------
    def base_weight(self) -> torch.Tensor:
        """Dense fp32 ``[out, in]`` weight of the base representation."""
        raise NotImplementedError

    def config(self) -> dict:
        """JSON description enough to rebuild an empty module of the same shapes."""
        cfg = {"format": self.FORMAT, "in_features": self.in_features, "out_features": self.out_features,
               "bias": self.bias is not None, "rank": self.rank}
        if self.lr_down is not None and self.lr_down.dtype != self.dtype_:
            cfg["lr_dtype"] = str(self.lr_down.dtype).removeprefix("torch.")
        return cfg

    @classmethod
    def from_config(cls, cfg: dict, dtype: torch.dtype = torch.float32) -> "CompressedLinear":
        raise NotImplementedError

    # --- shared behaviour -----------------------------------------------------------------------------
    def effective_weight(self) -> torch.Tensor:
        """Dense fp32 weight the module computes with (base + correction)."""
        w = self.base_weight()
        c = self.correction_weight()
        return w if c is None else w + c

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.base_weight().to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))
        if self.lr_down is not None:
            y = y + kernels.lowrank_linear(x, self.lr_down, self.lr_up)
        return y

    def storage_bits(self) -> int:
        """Bits stored for the weight (everything except the bias), for bits-per-weight accounting."""
        return sum(t.numel() * t.element_size() * 8 for n, t in self._tensors() if n != "bias")

    def _tensors(self):
        for n, p in self.named_parameters(recurse=False):
            yield n, p
        for n, b in self.named_buffers(recurse=False):
            yield n, b

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, rank={self.rank}, bias={self.bias is not None}"


class DenseLinear(CompressedLinear):
    """A dense (e.g. pruned) weight, optionally with a low-rank correction."""

    FORMAT = "dense"

    def __init__(self, in_features, out_features, bias, rank=0, dtype=torch.float32, lr_dtype=None):
        super().__init__(in_features, out_features, bias, rank, dtype, lr_dtype)
        self.weight = nn.Parameter(torch.zeros(out_features, in_features, dtype=dtype), requires_grad=False)

    def base_weight(self):
        return self.weight.float()

    @classmethod
    def from_config(cls, cfg, dtype=torch.float32):
        return cls(cfg["in_features"], cfg["out_features"], cfg["bias"], cfg.get("rank", 0), dtype, lr_dtype_of(cfg))


class LowRankLinear(CompressedLinear):
    """``y = (x·downᵀ)·upᵀ + b`` — a factorised weight ``W ≈ up @ down`` (rank ``r``)."""

    FORMAT = "lowrank"

    def __init__(self, in_features, out_features, bias, factor_rank: int, dtype=torch.float32, rank: int = 0,
                 lr_dtype=None):
        super().__init__(in_features, out_features, bias, rank, dtype, lr_dtype)
        self.down = nn.Parameter(torch.zeros(factor_rank, in_features, dtype=dtype), requires_grad=False)
        self.up = nn.Parameter(torch.zeros(out_features, factor_rank, dtype=dtype), requires_grad=False)

    @property
    def factor_rank(self) -> int:
        return self.down.shape[0]

    def base_weight(self):
        return self.up.float() @ self.down.float()

    def forward(self, x):
        y = kernels.lowrank_linear(x, self.down, self.up, self.bias)
        if self.lr_down is not None:          # a correction stage fitted on top of the factorisation
            y = y + kernels.lowrank_linear(x, self.lr_down, self.lr_up)
        return y

    def config(self):
        return {**super().config(), "factor_rank": self.factor_rank}

    @classmethod
    def from_config(cls, cfg, dtype=torch.float32):
        return cls(cfg["in_features"], cfg["out_features"], cfg["bias"], cfg["factor_rank"], dtype,
                   cfg.get("rank", 0), lr_dtype_of(cfg))

    def extra_repr(self):
        return f"in={self.in_features}, out={self.out_features}, factor_rank={self.factor_rank}, bias={self.bias is not None}"


class QuantLinear(CompressedLinear):
    """Group-wise integer weights in the GPTQ int32 layout, optionally + a low-rank correction.

    Tensors: ``qweight int32 [ceil(in·bits/32), out]``, ``scales fp16 [G, out]``,
    ``qzeros int32 [G, ceil(out·bits/32)]`` (actual zero points, no v1 offset), ``g_idx int32 [in]``
    only when the column order is permuted (act-order), ``bias``, ``lr_down``/``lr_up``.
    """

    FORMAT = "quant"

    def __init__(self, in_features, out_features, bias, bits: int, group_size: int, sym: bool = True,
                 has_g_idx: bool = False, rank: int = 0, dtype=torch.float32, lr_dtype=None):
        super().__init__(in_features, out_features, bias, rank, dtype, lr_dtype)
        self.bits, self.group_size, self.sym = bits, group_size, sym
        g = in_features if group_size == -1 else group_size
        n_groups = (in_features + g - 1) // g
        self.register_buffer("qweight", torch.zeros(packed_length(in_features, bits), out_features, dtype=torch.int32))
        self.register_buffer("scales", torch.zeros(n_groups, out_features, dtype=torch.float16))
        self.register_buffer("qzeros", torch.zeros(n_groups, packed_length(out_features, bits), dtype=torch.int32))
        self.register_buffer("g_idx", torch.zeros(in_features, dtype=torch.int32) if has_g_idx else None)

    @classmethod
    def from_codes(cls, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, *, bits: int,
                   group_size: int, sym: bool, g_idx: torch.Tensor | None = None,
                   bias: torch.Tensor | None = None, dtype=torch.float32) -> "QuantLinear":
        """Build from unpacked ``codes [out, in]``, ``scales [G, out]``, ``zeros [G, out]``."""
        out_f, in_f = codes.shape
        m = cls(in_f, out_f, bias is not None, bits, group_size, sym, g_idx is not None, 0, dtype)
        m.qweight.copy_(pack_bits(codes.t().to(torch.int32), bits, dim=0))
        m.scales.copy_(scales.to(torch.float16))
        m.qzeros.copy_(pack_bits(zeros.to(torch.int32), bits, dim=1))
        if g_idx is not None:
            m.g_idx.copy_(g_idx.to(torch.int32))
        if bias is not None:
            m.bias.data.copy_(bias.to(dtype))
        return m

    def base_weight(self):
        return kernels.dequantize_weight(self.qweight, self.scales, self.qzeros, self.g_idx, self.bits,
                                         self.group_size, self.in_features)

    def forward(self, x):
        return kernels.quant_linear(x, self.qweight, self.scales, self.qzeros, self.g_idx, self.bits,
                                    self.group_size, self.in_features, self.bias, self.lr_down, self.lr_up)

    def config(self):
        return {**super().config(), "bits": self.bits, "group_size": self.group_size, "sym": self.sym,
                "g_idx": self.g_idx is not None}

    @classmethod
    def from_config(cls, cfg, dtype=torch.float32):
        return cls(cfg["in_features"], cfg["out_features"], cfg["bias"], cfg["bits"], cfg["group_size"],
                   cfg.get("sym", True), cfg.get("g_idx", False), cfg.get("rank", 0), dtype, lr_dtype_of(cfg))

    def extra_repr(self):
        return (f"in={self.in_features}, out={self.out_features}, bits={self.bits}, group={self.group_size}, "
                f"sym={self.sym}, rank={self.rank}, bias={self.bias is not None}")


def lr_dtype_of(cfg: dict) -> torch.dtype | None:
    """The stored dtype of a module's correction factors, from its config (``None``: module dtype)."""
    name = cfg.get("lr_dtype")
    if name is None:
        return None
    if name not in ("float16", "bfloat16", "float32"):
        raise KeyError(f"unsupported lr_dtype {name!r}")
    return getattr(torch, name)


FORMATS: dict[str, type[CompressedLinear]] = {c.FORMAT: c for c in (DenseLinear, LowRankLinear, QuantLinear)}


def module_from_config(cfg: dict, dtype: torch.dtype = torch.float32) -> CompressedLinear:
    fmt = cfg.get("format")
    if fmt not in FORMATS:
        raise KeyError(f"unknown compressed format {fmt!r}; known: {sorted(FORMATS)}")
    return FORMATS[fmt].from_config(cfg, dtype)


# Used only by the 2:4 and low-rank + sparse formats below.
from ..errors import TensorpressError  # noqa: E402
from ..kernels.reference import blockdiag  # noqa: E402
from ..packing import pack_24, unpack_24  # noqa: E402

class Sparse24Linear(CompressedLinear):
    """A 2:4 weight stored compactly, optionally wrapped ARMOR-style: ``W = A · S · B``.

    ``S`` is the 2:4 core in the kernel layout of :func:`tensorpress.packing.pack_24`
    (``values [out, in/2]`` in the module dtype, ``meta int32 [out, ceil(in/32)]`` of 2-bit in-group
    indices); ``armor_a [out/b, b, b]`` and ``armor_b [in/b, b, b]`` are the blocks of the optional
    block-diagonal wrappers (stored ``[out, in]``, as :func:`tensorpress.kernels.sparse24_linear` takes
    them). The wrappers are never merged into ``S``: that would destroy the 2:4 pattern.
    """

    FORMAT = "sparse24"

    def __init__(self, in_features, out_features, bias, block_size: int = 0, dtype=torch.float32, rank: int = 0,
                 lr_dtype=None):
        super().__init__(in_features, out_features, bias, rank, dtype, lr_dtype)
        if in_features % 4 or (block_size and (in_features % block_size or out_features % block_size)):
            raise TensorpressError(f"sparse24 {out_features}x{in_features} with block size {block_size}: in_features must "
                             f"be divisible by 4 and both dimensions by the block size")
        self.block_size = block_size
        self.register_buffer("values", torch.zeros(out_features, in_features // 2, dtype=dtype))
        self.register_buffer("meta", torch.zeros(out_features, packed_length(in_features // 2, 2), dtype=torch.int32))
        # All-zero metadata is not a valid index pair; (0, 1) per group is what an empty core packs to.
        self.meta.copy_(pack_24(torch.zeros(out_features, in_features))[1])
        self.armor_a = self.armor_b = None
        if block_size:
            b = block_size
            self.armor_a = nn.Parameter(torch.zeros(out_features // b, b, b, dtype=dtype), requires_grad=False)
            self.armor_b = nn.Parameter(torch.zeros(in_features // b, b, b, dtype=dtype), requires_grad=False)

    @classmethod
    def from_dense(cls, core: torch.Tensor, armor_a: torch.Tensor | None = None, armor_b: torch.Tensor | None = None,
                   bias: torch.Tensor | None = None, dtype=torch.float32, name: str = "weight") -> "Sparse24Linear":
        """Pack a dense 2:4 ``core [out, in]`` (plus optional wrapper blocks and bias) into a module.

        The pattern is checked on the values as they will be stored: packing keeps two positions per
        group and would silently drop any others (sparse.md §6.2), so a non-2:4 core is an error here."""
        out_f, in_f = core.shape
        if (armor_a is None) != (armor_b is None):
            raise TensorpressError(f"{name}: ARMOR needs both wrappers (armor_a and armor_b) or neither")
        b = 0 if armor_a is None else armor_a.shape[-1]
        core = core.to(dtype)
        try:
            values, meta = pack_24(core)
        except ValueError as e:
            raise TensorpressError(f"{name}: cannot store as sparse24: {e}") from None
        m = cls(in_f, out_f, bias is not None, b, dtype)
        m.values.copy_(values)
        m.meta.copy_(meta)
        if b:
            if tuple(armor_a.shape) != (out_f // b, b, b) or tuple(armor_b.shape) != (in_f // b, b, b):
                raise TensorpressError(f"{name}: ARMOR blocks {tuple(armor_a.shape)} / {tuple(armor_b.shape)} do not fit "
                                       f"a {out_f}x{in_f} weight with block size {b}")
            m.armor_a.data.copy_(armor_a)
            m.armor_b.data.copy_(armor_b)
        if bias is not None:
            m.bias.data.copy_(bias)
        return m

    def core_weight(self) -> torch.Tensor:
        """Dense fp32 ``[out, in]`` 2:4 core ``S`` (zeros stored)."""
        return unpack_24(self.values, self.meta, self.in_features).float()

    def base_weight(self):
        w = self.core_weight()
        if self.armor_b is not None:
            # W·blockdiag(B) = rows of W through the transposed blocks; blockdiag(A)·W = the transpose trick.
            w = blockdiag(w, self.armor_b.float().transpose(1, 2))
            w = blockdiag(w.t(), self.armor_a.float()).t()
        return w.contiguous()

    def forward(self, x):
        y = kernels.sparse24_linear(x, self.values, self.meta, self.in_features, self.bias, self.armor_a, self.armor_b)
        if self.lr_down is not None:
            y = y + kernels.lowrank_linear(x, self.lr_down, self.lr_up)
        return y

    def config(self):
        return {**super().config(), "block_size": self.block_size}

    @classmethod
    def from_config(cls, cfg, dtype=torch.float32):
        return cls(cfg["in_features"], cfg["out_features"], cfg["bias"], cfg.get("block_size", 0), dtype,
                   cfg.get("rank", 0), lr_dtype_of(cfg))

    def extra_repr(self):
        return (f"in={self.in_features}, out={self.out_features}, 2:4, block={self.block_size}, rank={self.rank}, "
                f"bias={self.bias is not None}")


class LowRankSparseLinear(LowRankLinear):
    """``y = (x·downᵀ)·upᵀ + x[:, channels]·sparseᵀ + b``: a factorised weight plus ``k`` dense input
    columns (LOST-style, sparse.md §5.3): ``W ≈ up @ down``, then columns ``channels`` (sorted,
    unique, int32 ``[k]``) get ``sparse [out, k]`` added."""

    FORMAT = "lowrank_sparse"

    def __init__(self, in_features, out_features, bias, factor_rank: int, n_channels: int, dtype=torch.float32,
                 rank: int = 0, lr_dtype=None):
        super().__init__(in_features, out_features, bias, factor_rank, dtype, rank, lr_dtype)
        self.register_buffer("channels", torch.arange(n_channels, dtype=torch.int32))
        self.sparse = nn.Parameter(torch.zeros(out_features, n_channels, dtype=dtype), requires_grad=False)

    @property
    def n_channels(self) -> int:
        return self.channels.shape[0]

    def base_weight(self):
        w = super().base_weight()
        return w.index_add(1, self.channels.long(), self.sparse.float())

    def forward(self, x):
        y = super().forward(x)
        if self.n_channels:
            # Gathering k input channels and one small GEMM: no sparse kernel needed (sparse.md §5.3.8).
            y = y + F.linear(x.index_select(-1, self.channels.long()), self.sparse.to(x.dtype))
        return y

    def config(self):
        return {**super().config(), "n_channels": self.n_channels}

    @classmethod
    def from_config(cls, cfg, dtype=torch.float32):
        return cls(cfg["in_features"], cfg["out_features"], cfg["bias"], cfg["factor_rank"], cfg["n_channels"], dtype,
                   cfg.get("rank", 0), lr_dtype_of(cfg))

    def extra_repr(self):
        return (f"in={self.in_features}, out={self.out_features}, factor_rank={self.factor_rank}, "
                f"channels={self.n_channels}, bias={self.bias is not None}")


class SVDQuantLinear(QuantLinear):
    """SVDQuant (docs: lowrank-quant.md §6): a smoothed 4-bit residual plus a 16-bit low-rank branch.

    ``y = Q_a(x ⊘ smooth)·dequant(R)ᵀ + (x·lr_downᵀ)·lr_upᵀ + b`` where the GPTQ-layout tensors hold the
    residual ``R`` of the *smoothed* weight ``Ŵ = W·diag(smooth)``, ``lr_up = B`` (singular values in
    it) and ``lr_down = A ⊘ smooth`` is stored unsmoothed, so the branch reads the raw ``x``.
    ``Q_a`` is the activation quantiser: ``act_bits`` 16 none (W4A16: :func:`kernels.quant_linear` on
    ``x ⊘ smooth``), 8 the int8 W4A8 kernel (:func:`kernels.w4a8_linear`), 4 fake-quantised 4-bit
    activations (:func:`tensorpress.kernels.actquant.fake_quantize_activations`, per token or per group
    of ``act_group_size`` inputs). ``smooth`` is an fp32 ``[in]`` buffer (ones: no smoothing).

    **Folded form** (:meth:`fold_smoothing`): when the preceding norm already outputs ``x ⊘ λ`` (its
    weight absorbed λ, see :func:`tensorpress.modeling.norm_readers`), the module reads ``x̂`` itself:
    ``smooth`` is all ones and ``lr_down = A`` (the branch reads the smoothed input). A module whose
    ``smooth`` is all ones skips the elementwise ``⊘ smooth`` (checked once per change of the buffer).
    ``effective_weight()`` is the W4A16 dense equivalent ``dequant(R)·diag(1/smooth) + lr_up·lr_down``
    *for the input the module receives*: in the folded form ``Ŵ``, which the folded norm makes exact
    (a dense export writes it beside the folded norm weight).
    """

    FORMAT = "svdquant"

    def __init__(self, in_features, out_features, bias, bits: int, group_size: int, sym: bool = True,
                 has_g_idx: bool = False, rank: int = 0, dtype=torch.float32, lr_dtype=None,
                 act_bits: int = 16, act_group_size: int = -1):
        super().__init__(in_features, out_features, bias, bits, group_size, sym, has_g_idx, rank, dtype, lr_dtype)
        if act_bits not in (4, 8, 16):
            raise TensorpressError(f"act_bits must be 4, 8 or 16, got {act_bits!r}")
        if act_bits == 8 and bits != 4:
            raise TensorpressError(f"act_bits 8 runs the W4A8 kernel, which needs 4-bit weights (got {bits})")
        self.act_bits, self.act_group_size = act_bits, act_group_size
        self.register_buffer("smooth", torch.ones(in_features, dtype=torch.float32))
        self._identity = None             # (smooth tensor, its _version, all ones?): see _smooth_arg

    @classmethod
    def from_quant(cls, q: QuantLinear, smooth: torch.Tensor, down: torch.Tensor | None, up: torch.Tensor | None,
                   *, act_bits: int, act_group_size: int, lr_dtype: torch.dtype | None = None) -> "SVDQuantLinear":
        """Wrap a residual :class:`QuantLinear` (its tensors are taken as they are) with ``smooth`` and the
        (already unsmoothed) branch ``down [r, in]``, ``up [out, r]``."""
        m = cls(q.in_features, q.out_features, q.bias is not None, q.bits, q.group_size, q.sym, q.g_idx is not None,
                0, q.dtype_, None, act_bits, act_group_size)
        for n in ("qweight", "scales", "qzeros"):
            getattr(m, n).copy_(getattr(q, n))
        if q.g_idx is not None:
            m.g_idx.copy_(q.g_idx)
        if q.bias is not None:
            m.bias.data.copy_(q.bias.data)
        m.smooth.copy_(smooth.float())
        if down is not None and down.shape[0]:
            m.set_correction(down, up, dtype=lr_dtype)
        return m

    def residual_weight(self) -> torch.Tensor:
        """Dense fp32 ``dequant(R)`` in the smoothed space."""
        return super().base_weight()

    def base_weight(self):
        return self.residual_weight() / self.smooth[None, :]

    def smoothing_is_identity(self) -> bool:
        return bool((self.smooth == 1).all())

    def _smooth_arg(self) -> torch.Tensor | None:
        """``smooth``, or ``None`` when it is all ones (folded or no smoothing): the division is skipped.
        The answer is cached per buffer object and in-place version (load_state_dict, a fold); under
        ``torch.compile`` the buffer is always applied (no data-dependent branch in the graph)."""
        s, c = self.smooth, getattr(self, "_identity", None)
        if torch.compiler.is_compiling():
            return s
        if c is None or c[0] is not s or c[1] != s._version:
            c = self._identity = (s, s._version, self.smoothing_is_identity())
        return None if c[2] else s

    def folded_down(self) -> torch.Tensor | None:
        """``lr_down ⊙ smooth`` (per input column) in the factor dtype: the branch for an input that
        arrives already smoothed (one rounding of the exact product); ``None`` without a branch."""
        if self.lr_down is None:
            return None
        return (self.lr_down.detach().double() * self.smooth.double()[None, :]).to(self.lr_down.dtype)

    def fold_smoothing(self, down: torch.Tensor | None = None) -> None:
        """Switch to the folded form: the caller has made the preceding op output ``x ⊘ smooth``.
        ``lr_down ← down`` (default :meth:`folded_down`) and ``smooth ← ones``."""
        if self.lr_down is not None:
            down = self.folded_down() if down is None else down
            self.lr_down.data = down.to(self.lr_down.dtype).contiguous()
        self.smooth.fill_(1.0)

    def forward(self, x):
        smooth = self._smooth_arg()
        if self.act_bits == 8:
            return kernels.w4a8_linear(x, self.qweight, self.scales, self.qzeros, self.g_idx, self.group_size,
                                       self.in_features, self.bias, self.lr_down, self.lr_up, smooth,
                                       self.act_group_size)
        if self.act_bits == 4:
            from ..kernels.actquant import fake_quantize_activations
            xs = fake_quantize_activations(x, 4, self.act_group_size, smooth).to(x.dtype)
        else:
            xs = x if smooth is None else x * (1.0 / smooth).to(x.dtype)
        y = kernels.quant_linear(xs, self.qweight, self.scales, self.qzeros, self.g_idx, self.bits, self.group_size,
                                 self.in_features, self.bias)
        if self.lr_down is not None:
            y = y + kernels.lowrank_linear(x, self.lr_down, self.lr_up)
        return y

    def config(self):
        return {**super().config(), "act_bits": self.act_bits, "act_group_size": self.act_group_size}

    @classmethod
    def from_config(cls, cfg, dtype=torch.float32):
        return cls(cfg["in_features"], cfg["out_features"], cfg["bias"], cfg["bits"], cfg["group_size"],
                   cfg.get("sym", True), cfg.get("g_idx", False), cfg.get("rank", 0), dtype, lr_dtype_of(cfg),
                   cfg["act_bits"], cfg["act_group_size"])

    def extra_repr(self):
        return (f"in={self.in_features}, out={self.out_features}, W{self.bits}A{self.act_bits}, group={self.group_size}, "
                f"act_group={self.act_group_size}, rank={self.rank}, smoothed={not self.smoothing_is_identity()}, "
                f"bias={self.bias is not None}")


FORMATS.update({c.FORMAT: c for c in (Sparse24Linear, LowRankSparseLinear, SVDQuantLinear)})
