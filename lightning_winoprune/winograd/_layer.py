"""``WinogradConv2d``: a 3x3 stride-1 convolution whose trainable weight lives in the Winograd domain."""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lightning_winoprune.kernels._backend import Backend
from lightning_winoprune.winograd._autotune import MASKING_ROUTES, Route, choose_route
from lightning_winoprune.winograd._mask import masked
from lightning_winoprune.winograd._mask_state import MaskState
from lightning_winoprune.winograd._sparse import SparsePlan, sparse_conv
from lightning_winoprune.winograd._sparse import positions_view as _bgemm_view  # (K, C, p, p) -> (P2, K, C)
from lightning_winoprune.winograd._tiles import (
    TileGeometry,
    capturing,
    filter_transform,
    input_transform,
    input_transform_adjoint,
    output_transform,
    output_transform_adjoint,
    tile_geometry,
)
from lightning_winoprune.winograd._transforms import check_m, get_transforms, untraced

__all__ = ["Route", "WinogradConv2d", "conv_ineligibility", "winograd_layout"]


def winograd_layout(t: torch.Tensor) -> torch.Tensor:
    """Return a copy of a ``(K, C, p, p)`` tensor stored position-major, ``(p, p, K, C)`` in memory.

    The logical shape is unchanged. With this layout ``t.permute(2, 3, 0, 1)`` is contiguous, so the per-position
    GEMM matrices ``U[xi]`` are views and neither the forward nor the backward pass copies the weight.
    """
    return t.permute(2, 3, 0, 1).contiguous().permute(2, 3, 0, 1)



class _BGEMMConv(torch.autograd.Function):
    """Winograd conv as ITrans -> bmm -> OTrans with an explicit backward built from the transforms' adjoints."""

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        u: torch.Tensor,
        bias: torch.Tensor | None,
        m: int,
        geom: TileGeometry,
        backend: Backend,
    ) -> torch.Tensor:
        v = input_transform(x, m, geom, backend)
        mm = torch.bmm(_bgemm_view(u), v)
        y = output_transform(mm, m, geom, x.shape[0], bias, backend)
        ctx.save_for_backward(v, u)
        ctx.m, ctx.geom, ctx.backend, ctx.x_shape, ctx.has_bias = m, geom, backend, tuple(x.shape), bias is not None
        return y

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        v, u = ctx.saved_tensors
        dm = output_transform_adjoint(dy.contiguous(), ctx.m, ctx.geom, ctx.backend)
        dx = du = dbias = None
        if ctx.needs_input_grad[0]:
            dv = torch.bmm(_bgemm_view(u).transpose(1, 2), dm)
            dx = input_transform_adjoint(dv, ctx.m, ctx.geom, ctx.x_shape, ctx.backend)
        if ctx.needs_input_grad[1]:
            k, c, p, _ = u.shape
            du = torch.bmm(dm, v.transpose(1, 2)).view(p, p, k, c).permute(2, 3, 0, 1)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            dbias = dy.sum(dim=(0, 2, 3))
        return dx, du, dbias, None, None, None


@functools.lru_cache(maxsize=64)
def _phase_coefficients(m: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``R[i, j, a, b, u, v] = AT[a, i] AT[b, j] BT[i, u] BT[j, v]``, shape ``(p, p, m, m, p, p)``: U -> kernels E."""
    t = get_transforms(m, torch.float64)
    with untraced():  # a constant of a traced graph, whether the cache was cold or warm
        r = torch.einsum("ai,bj,iu,jv->ijabuv", t.AT, t.AT, t.BT, t.BT)
        return r.to(dtype=dtype, device=device)


def _phase_kernels(u: torch.Tensor, m: int) -> torch.Tensor:
    """Exact phase-conv kernels ``E`` of shape ``(K * m * m, C, p, p)`` (see ``docs/winograd.md``, the phase route)."""
    k, c, p, _ = u.shape
    r = _phase_coefficients(m, u.dtype, u.device).reshape(p * p, m * m * p * p)
    e = (_bgemm_view(u).reshape(p * p, k * c).T @ r).view(k, c, m, m, p, p)
    return e.permute(0, 2, 3, 1, 4, 5).reshape(k * m * m, c, p, p)


class WinogradConv2d(nn.Module):
    """3x3, stride-1 convolution trained in the Winograd domain F(m x m, 3 x 3).

    The trainable ``weight`` is the Winograd-domain tensor ``U`` of shape ``(out_channels, in_channels, p, p)``,
    ``p = m + 2``; each ``U[:, :, i, j]`` is the ``K x C`` matrix of one BGEMM position. An optional boolean
    ``mask`` buffer of the same shape prunes entries: the forward pass uses ``torch.where(mask, weight, 0)``, so
    pruned entries are absent (they contribute exactly zero, even if a NaN or inf is stored there) and receive zero
    gradient. A masked layer with ``route="auto"`` runs the structured-sparse BGEMM (``Route.SPARSE``: only the kept
    rows and columns of every ``U[xi]``) where that is faster, see :class:`Route`; :attr:`last_route` says which
    route the last forward pass took.

    A batch of size 0 gives an empty output, as ``F.conv2d`` does. While ``torch.jit.trace``, ``torch.compile`` or
    ``torch.export`` captures the layer, the ``bgemm`` and ``sparse`` routes run as plain torch ops (the native
    transforms cannot be traced), so the captured graph computes the same function.

    Build one from an existing convolution with :meth:`from_conv`, which makes the two exactly equivalent.

    Args:
        in_channels: Input channels ``C``.
        out_channels: Output channels ``K``.
        m: Output tile size, one of :data:`~lightning_winoprune.winograd.SUPPORTED_M`. Fixed for the layer's life.
        padding: Zero padding, an int or ``(pad_h, pad_w)``.
        bias: Whether the layer has a bias.
        route: How the output is computed, see :class:`Route`.
        backend: Kernel implementation for the ``bgemm`` route's transforms, see
            :class:`~lightning_winoprune.kernels.Backend`.

    """

    weight: nn.Parameter
    bias: nn.Parameter | None
    mask: torch.Tensor | None

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        m: int = 2,
        padding: int | tuple[int, int] = 1,
        bias: bool = True,
        route: Route | str = Route.AUTO,
        backend: Backend | str = Backend.AUTO,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        for name, val in (("in_channels", in_channels), ("out_channels", out_channels)):
            if isinstance(val, bool) or not isinstance(val, int) or val < 1:
                raise ValueError(f"{name} must be a positive int, got {val!r}")
        self.m = check_m(m)
        pad = (padding, padding) if isinstance(padding, int) else tuple(padding)
        if len(pad) != 2 or any(isinstance(q, bool) or not isinstance(q, int) or q < 0 for q in pad):
            raise ValueError(f"padding must be a non-negative int or a pair of them, got {padding!r}")
        self.padding: tuple[int, int] = (int(pad[0]), int(pad[1]))
        self.in_channels, self.out_channels = in_channels, out_channels
        self.route = Route.parse(route)
        self.backend = Backend.parse(backend)
        p = self.m + 2
        factory: dict[str, Any] = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(winograd_layout(torch.empty(out_channels, in_channels, p, p, **factory)))
        self.bias = nn.Parameter(torch.empty(out_channels, **factory)) if bias else None
        self.register_buffer("mask", None)
        #: When False, the forward pass uses ``weight`` as stored, trusting that its pruned entries are zero. Set by
        #: callbacks that zero them and mask every gradient before each optimizer step (cheaper than a multiply in
        #: every forward and backward); they set it back when they stop.
        self.mask_in_forward = True
        #: The route the last forward pass ran (``None`` before the first one); see :class:`Route`.
        self.last_route: Route | None = None
        self._mask_cache: MaskState | None = None  # derived from the mask, rebuilt when it changes, never saved
        self._pruned_grads_zero = False
        self.reset_parameters()

    @property
    def p(self) -> int:
        """Input tile size ``m + 2``."""
        return self.m + 2

    def reset_parameters(self) -> None:
        """Initialise like ``nn.Conv2d`` in the spatial domain, then transform, so the layer starts conv-equivalent."""
        g = torch.empty(self.out_channels, self.in_channels, 3, 3, dtype=torch.float64)
        nn.init.kaiming_uniform_(g, a=5**0.5)
        with torch.no_grad():
            self.weight.copy_(filter_transform(g, self.m, Backend.TORCH))
            if self.bias is not None:
                bound = 1.0 / (self.in_channels * 9) ** 0.5
                nn.init.uniform_(self.bias, -bound, bound)

    @classmethod
    def from_conv(
        cls, conv: nn.Module, m: int = 2, route: Route | str = Route.AUTO, backend: Backend | str = Backend.AUTO
    ) -> WinogradConv2d:
        """Convert a 3x3, stride-1, dilation-1, groups-1, zero-padded ``nn.Conv2d`` into an equivalent layer.

        The filter transform is computed in float64, so right after conversion the output equals ``F.conv2d`` of
        the original up to the Winograd algorithm's own float32 rounding.

        Raises:
            ValueError: If ``conv`` is not such a convolution (the message says which property is wrong).

        """
        reason = conv_ineligibility(conv)
        if reason is not None:
            raise ValueError(f"cannot convert {type(conv).__name__} to WinogradConv2d: {reason}")
        assert isinstance(conv, nn.Conv2d)
        w = conv.weight
        layer = cls(
            conv.in_channels,
            conv.out_channels,
            m=m,
            padding=_conv_padding(conv),
            bias=conv.bias is not None,
            route=route,
            backend=backend,
            device=w.device,
            dtype=w.dtype,
        )
        with torch.no_grad():
            layer.weight.copy_(filter_transform(w.detach().to(torch.float64), layer.m, Backend.TORCH))
            if conv.bias is not None:
                assert layer.bias is not None
                layer.bias.copy_(conv.bias)
        layer.weight.requires_grad_(w.requires_grad)
        layer.train(conv.training)
        return layer

    # ----------------------------------------------------------------------------------------------- masking
    def set_mask(self, mask: torch.Tensor | None) -> None:
        """Set (or with ``None`` remove) the boolean mask; ``True`` keeps an entry.

        Raises:
            ValueError: If the mask's shape differs from the weight's.
            TypeError: If the mask is not a boolean tensor.

        """
        self._pruned_grads_zero = False
        if mask is None:
            self.mask = None
            return
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
            raise TypeError(f"mask must be a bool tensor, got {getattr(mask, 'dtype', type(mask).__name__)}")
        if mask.shape != self.weight.shape:
            raise ValueError(f"mask must have the weight's shape {tuple(self.weight.shape)}, got {tuple(mask.shape)}")
        self.mask = winograd_layout(mask.to(self.weight.device))

    @torch.no_grad()
    def zero_pruned_(self) -> None:
        """Set the stored weight entries the mask prunes to exactly zero (in place; a no-op without a mask).

        The forward pass already ignores them; zeroing the storage too makes exported weights and optimizer
        updates (whose gradient there is zero) keep them at zero. A NaN or inf stored there becomes zero as well.
        """
        if self.mask is not None:
            self.weight.masked_fill_(~self.mask, 0)

    def mask_value(self) -> torch.Tensor | None:
        """The mask as a tensor of the weight's dtype (1 keeps, 0 prunes), or ``None`` without a mask.

        Cached; refreshed when the mask is replaced or edited in place, or the weight's dtype changes.
        """
        if self.mask is None:
            return None
        if capturing():  # no cache while a graph is captured
            return self.mask.to(self.weight.dtype)
        return self._mask_state().value(self.weight.dtype)

    @property
    def sparsity(self) -> float:
        """Fraction of masked-out weight entries (0.0 without a mask)."""
        return 0.0 if self.mask is None else 1.0 - self.mask.count_nonzero().item() / self.mask.numel()

    def effective_weight(self) -> torch.Tensor:
        """``torch.where(mask, weight, 0)`` when a mask is set (pruned entries are absent, whatever they store)."""
        if self.mask is None or not self.mask_in_forward:
            return self.weight
        return masked(self.weight, self.mask, self._keep_bits(self.weight.dtype))

    def _load_from_state_dict(
        self, state_dict: dict[str, Any], prefix: str, local_metadata: dict[str, Any], strict: bool,
        missing_keys: list[str], unexpected_keys: list[str], error_msgs: list[str],
    ) -> None:
        # A saved mask is restored into a freshly built (mask-less) layer, and vice versa.
        key = prefix + "mask"
        if key in state_dict and self.mask is None:
            self.mask = torch.ones_like(self.weight, dtype=torch.bool)
        elif key not in state_dict and self.mask is not None:
            self.mask = None
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        if self.mask is not None:
            self.mask = winograd_layout(self.mask)
        self._pruned_grads_zero = False

    # ----------------------------------------------------------------------------------------------- routes
    def resolve_route(self, height: int, width: int, batch: int | None = None) -> Route:
        """The route ``auto`` takes for an ``height x width`` input without a mask (another setting is returned).

        ``unrolled`` needs the whole output in one tile and at most ``p * p`` taps (``Ho * Wo * H * W``) per
        ``(k, c)``. Given the ``batch``, it must also be cheaper than the BGEMM counting the cost of building the
        unrolled matrix once per call: ``taps * (batch + p * p) < p * p * batch`` (on a 1x1 map from a batch of 2
        on; never on a 2x2 map, where ``taps == p * p`` for F(2,3)).

        With a mask, ``auto`` also considers ``sparse`` (measured in training, by the kept work fraction otherwise,
        see :class:`Route`); :attr:`last_route` says what the last forward pass ran.
        """
        if self.route is not Route.AUTO:
            return self.route
        geom = tile_geometry(height, width, self.padding, self.m)
        # One tile: the unrolled matrix has Ho*Wo*H*W taps per (k, c) against the BGEMM's p*p, without transforms.
        taps, p2 = geom.out_size[0] * geom.out_size[1] * height * width, self.p * self.p
        if geom.tiles != (1, 1) or taps > p2:
            return Route.BGEMM
        if batch is not None and taps * (batch + p2) >= p2 * batch:
            return Route.BGEMM
        return Route.UNROLLED

    def sparse_plan(self) -> SparsePlan | None:
        """The gather/scatter plan of the current mask for the ``sparse`` route (``None`` without a mask).

        Built on first use and cached on the layer until the mask changes (another tensor, or the same one edited in
        place); never saved in the state dict.
        """
        return None if self.mask is None else self._mask_state().get_plan()

    def _keep_bits(self, dtype: torch.dtype) -> torch.Tensor | None:
        """The cached bit pattern of the mask for :func:`masked` (``None`` while a graph is captured: no cache)."""
        return None if self.mask is None or capturing() else self._mask_state().bits(dtype)

    def _mask_state(self) -> MaskState:
        mask = self.mask
        assert mask is not None
        state = self._mask_cache
        if state is None or not state.matches(mask):
            state = self._mask_cache = MaskState(mask)
        return state

    @property
    def pruned_grads_zero(self) -> bool:
        """Whether the forward passes since :meth:`mark_pruned_grads_zero` give pruned entries an exactly zero grad.

        True when each of those passes ran the ``sparse`` or ``unrolled`` route or masked the weight in the forward pass
        (``mask_in_forward``); False after a pass on another route with ``mask_in_forward`` off (whose gradient
        must still be masked), after the mask changed, and before the first mark. The pruning callbacks read it to
        skip their gradient multiply; it covers only gradients that flow through this layer's forward pass.
        """
        return self._pruned_grads_zero

    def mark_pruned_grads_zero(self) -> None:
        """Start a new accumulation window for :attr:`pruned_grads_zero` (called once the gradients are used)."""
        self._pruned_grads_zero = True

    def _choose_route(self, x: torch.Tensor) -> Route:
        """The route of this forward pass (see :class:`Route`); may time the candidates once per key in training."""
        return choose_route(self, x)

    # ----------------------------------------------------------------------------------------------- forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Convolve ``x`` of shape ``(N, C, H, W)``."""
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"WinogradConv2d expects input (N, {self.in_channels}, H, W), got shape {tuple(x.shape)}"
            )
        # The Winograd domain is numerically sensitive: under autocast it still runs in the weight's precision.
        with torch.autocast(device_type=x.device.type, enabled=False):
            x = x.to(self.weight.dtype)
            route = self._choose_route(x)
            self.last_route = route
            if (self.mask is not None and not self.mask_in_forward and route not in MASKING_ROUTES
                    and torch.is_grad_enabled() and x.shape[0] > 0):
                self._pruned_grads_zero = False  # this pass's gradient is masked by whoever turned the masking off
            return self._run(route, x, self.weight, self.bias)

    def _masked(self, weight: torch.Tensor, force: bool = False) -> torch.Tensor:
        """``weight`` with the pruned entries absent when the forward pass masks (``mask_in_forward`` or ``force``)."""
        if self.mask is None or not (force or self.mask_in_forward):
            return weight
        return masked(weight, self.mask, self._keep_bits(weight.dtype))

    def _run(self, route: Route, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        h, w = x.shape[-2:]
        geom = tile_geometry(h, w, self.padding, self.m)
        if route is Route.UNROLLED and geom.tiles != (1, 1):
            raise ValueError(
                f"route='unrolled' needs the output to fit in one {self.m}x{self.m} tile, got {geom.out_size}"
            )
        sparse = route is Route.SPARSE and self.mask is not None  # the sparse route always applies the mask
        gemm = route in (Route.BGEMM, Route.SPARSE)
        # an empty batch, like F.conv2d (pixel_shuffle's backward refuses one); a tracer / compiler must see every
        # op: no custom autograd function, no native calls
        if x.shape[0] == 0 or (gemm and capturing()):
            return self._bgemm_torch(x, self._masked(weight, sparse), bias, geom)
        if sparse:
            plan = self._mask_state().get_plan()
            return sparse_conv(x, weight, bias, plan, self.m, geom, self.backend)
        if route is Route.UNROLLED:
            return self._unrolled(x, weight, bias, geom)  # masks by itself, on the positions it uses
        u = self._masked(weight)
        if gemm:
            out: torch.Tensor = _BGEMMConv.apply(x, u, bias, self.m, geom, self.backend)
            return out
        return self._phase(x, u, bias, geom)

    def _bgemm_torch(
        self, x: torch.Tensor, u: torch.Tensor, bias: torch.Tensor | None, geom: TileGeometry
    ) -> torch.Tensor:
        """The ``bgemm`` route as plain differentiable torch ops (no custom autograd function, no native calls)."""
        v = input_transform(x, self.m, geom, Backend.TORCH)
        mm = torch.bmm(_bgemm_view(u), v)
        return output_transform(mm, self.m, geom, x.shape[0], bias, Backend.TORCH)

    def _unrolled(
        self, x: torch.Tensor, u: torch.Tensor, bias: torch.Tensor | None, geom: TileGeometry
    ) -> torch.Tensor:
        """The layer as one matrix product; only the positions that reach the output, the mask always applied.

        Positions whose coefficients onto the cropped output are all zero (12 of 16 for F(2,3) on a 1x1 map) are
        left out, so their gradient is exactly zero and costs nothing; the kept positions are masked here, so
        pruned entries get an exactly zero gradient by construction, as on the ``sparse`` route.
        """
        n, c, h, w = x.shape
        k, p = self.out_channels, self.p
        (ph, pw), (ho, wo) = geom.pad, geom.out_size
        r = _phase_coefficients(self.m, u.dtype, u.device)[:, :, :ho, :wo, ph : ph + h, pw : pw + w]
        r = r.reshape(p * p, ho * wo * h * w)
        u_view = _bgemm_view(u)
        mask_view = bits_view = None
        if self.mask is not None:
            mask_view, bits = _bgemm_view(self.mask), self._keep_bits(u.dtype)
            bits_view = None if bits is None else _bgemm_view(bits)
        if not capturing():  # a data-dependent position list would make a captured graph's shapes dynamic
            support = (r != 0).any(dim=1).nonzero().flatten()
            if support.numel() < p * p:
                r, u_view = r.index_select(0, support), u_view.index_select(0, support)
                if mask_view is not None:
                    mask_view = mask_view.index_select(0, support)
                    bits_view = None if bits_view is None else bits_view.index_select(0, support)
        if mask_view is not None:
            u_view = masked(u_view, mask_view, bits_view)
        e = (u_view.reshape(-1, k * c).T @ r).view(k, c, ho * wo, h * w)
        e = e.permute(0, 2, 1, 3).reshape(k * ho * wo, c * h * w)
        y = F.linear(x.reshape(n, c * h * w), e).view(n, k, ho, wo)
        return y if bias is None else y + bias.view(1, k, 1, 1)

    def _phase(self, x: torch.Tensor, u: torch.Tensor, bias: torch.Tensor | None, geom: TileGeometry) -> torch.Tensor:
        _, _, h, w = x.shape
        m = self.m
        (ph, pw), (ho, wo), (th, tw) = geom.pad, geom.out_size, geom.tiles
        xp = F.pad(x, (pw, tw * m + 2 - w - pw, ph, th * m + 2 - h - ph))
        y = F.pixel_shuffle(F.conv2d(xp, _phase_kernels(u, m), stride=m), m)[:, :, :ho, :wo]
        return y if bias is None else y + bias.view(1, -1, 1, 1)

    def extra_repr(self) -> str:
        s = f"{self.in_channels}, {self.out_channels}, m={self.m}, padding={self.padding}"
        if self.bias is None:
            s += ", bias=False"
        if self.route is not Route.AUTO:
            s += f", route={self.route.value}"
        if self.mask is not None:
            s += f", sparsity={self.sparsity:.3f}"
        return s


def _conv_padding(conv: nn.Conv2d) -> tuple[int, int]:
    if isinstance(conv.padding, str):
        return (1, 1) if conv.padding == "same" else (0, 0)
    return int(conv.padding[0]), int(conv.padding[1])


def conv_ineligibility(conv: nn.Module) -> str | None:
    """Why ``conv`` cannot become a :class:`WinogradConv2d`, or ``None`` if it can.

    Eligible: exactly ``nn.Conv2d`` (subclasses such as timm's ``Conv2dSame`` pad dynamically and are refused),
    3x3 kernel, stride 1, dilation 1, groups 1, ``padding_mode='zeros'``, floating-point weights.
    """
    if type(conv) is not nn.Conv2d:
        if isinstance(conv, nn.Conv2d):
            return f"{type(conv).__qualname__} overrides nn.Conv2d's forward (only plain nn.Conv2d is supported)"
        return f"{type(conv).__qualname__} is not an nn.Conv2d"
    checks = (
        (tuple(conv.kernel_size) == (3, 3), f"kernel_size is {tuple(conv.kernel_size)}, not (3, 3)"),
        (tuple(conv.stride) == (1, 1), f"stride is {tuple(conv.stride)}, not (1, 1)"),
        (tuple(conv.dilation) == (1, 1), f"dilation is {tuple(conv.dilation)}, not (1, 1)"),
        (conv.groups == 1, f"groups is {conv.groups}, not 1 (depthwise/grouped convs are DEPrune's)"),
        (conv.padding_mode == "zeros", f"padding_mode is '{conv.padding_mode}', not 'zeros'"),
        (conv.weight.is_floating_point(), f"weight dtype is {conv.weight.dtype}, not floating point"),
    )
    for ok, reason in checks:
        if not ok:
            return reason
    return None
