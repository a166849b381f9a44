"""Forward and backward of the LoD layers at a rank prefix b, as fused autograd Functions.

Same mathematics as the plain composition ``F.linear(F.linear(x, v[:b]), u[:b].T)`` (and the conv
analogue), computed faster on CPU:

* Gradients are written straight into full-size buffers: rows < b get the product, rows >= b are
  zeroed. Slicing a parameter and letting autograd go back through the slice allocates a zero
  tensor of the full size and copies the prefix into it, for both factors, at every step.
* The 1 x 1 conv (U) runs as a batched matmul on NCHW (``(out, b) @ (b, H W)`` per image); oneDNN
  reorders NCHW to a blocked layout and back around such a conv, which costs more than the MACs.
* With few rank channels the k x k conv to b channels (V) runs as "kn2row": one matmul of the
  k k b stacked 1 x 1 kernels with the input, then a sum of k k shifted slices. Its backward is one
  strided gather of the output gradient and two matmuls, with no reorder of the input.

Inputs these paths do not cover (autocast, asymmetric 'same' padding, an empty batch) use the plain
composition.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

__all__ = ["prefix_linear", "prefix_conv2d", "reference_linear", "reference_conv2d", "use_kn2row", "dense_is_cheaper"]


def dense_is_cheaper(rank: int, out_dim: int, fan_in: int) -> bool:
    """r (m + n) >= m n: the factors of rank r cost at least the dense m x n weight, in parameters and in
    MACs per output position (App. D.4: such a layer is deployed merged)."""
    return rank * (out_dim + fan_in) >= out_dim * fan_in


def reference_linear(x, u, v, bias, b: int) -> torch.Tensor:
    """The plain composition through the factors (autograd goes back through the slices)."""
    return F.linear(F.linear(x, v[:b]), u[:b].T, bias)


def reference_conv2d(x, u, v, bias, b: int, stride, padding, dilation) -> torch.Tensor:
    z = F.conv2d(x, v[:b], None, stride, padding, dilation)  # (N, b, H', W')
    return F.conv2d(z, u[:b].T[:, :, None, None], bias)  # (N, out, H', W')


def _full_grad(param: torch.Tensor, b: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A parameter-sized gradient whose rows >= b are zero, and its (b, ...) prefix to fill."""
    grad = torch.empty_like(param, memory_format=torch.contiguous_format)
    grad[b:].zero_()
    return grad, grad[:b]


def _autocast_on(x: torch.Tensor) -> bool:
    return torch.is_autocast_enabled(x.device.type)


class _PrefixLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, u, v, bias, b):
        x2 = x.reshape(-1, x.shape[-1])  # (M, fan_in)
        h = torch.mm(x2, v[:b].T)  # (M, b)
        y = torch.mm(h, u[:b]) if bias is None else torch.addmm(bias, h, u[:b])  # (M, out)
        ctx.save_for_backward(x2, h, u, v)
        ctx.b, ctx.x_shape, ctx.has_bias = b, x.shape, bias is not None
        return y.view(*x.shape[:-1], u.shape[1])

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y):
        x2, h, u, v = ctx.saved_tensors
        b = ctx.b
        g2 = grad_y.reshape(-1, u.shape[1])  # (M, out)
        need_x, need_u, need_v, need_bias = ctx.needs_input_grad[:4]
        gx = gu = gv = gbias = None
        if need_u:
            gu, prefix = _full_grad(u, b)
            torch.mm(h.T, g2, out=prefix)  # (b, out)
        if need_x or need_v:
            gh = torch.mm(g2, u[:b].T)  # (M, b)
            if need_v:
                gv, prefix = _full_grad(v, b)
                torch.mm(gh.T, x2, out=prefix)  # (b, fan_in)
            if need_x:
                gx = torch.mm(gh, v[:b]).view(ctx.x_shape)
        if need_bias and ctx.has_bias:
            gbias = g2.sum(0)
        return gx, gu, gv, gbias, None


def prefix_linear(x: torch.Tensor, u: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None, b: int) -> torch.Tensor:
    """x V[:, :b] U[:, :b]^T + bias for ``u`` (rank, out), ``v`` (rank, in) and 0 < b <= rank."""
    if _autocast_on(x) or x.dim() == 0:
        return reference_linear(x, u, v, bias, b)
    return _PrefixLinear.apply(x, u, v, bias, b)


# kn2row while k k b <= KN2ROW_MAX_STACKED * in_channels and the output has at least KN2ROW_MIN_PIXELS
# positions; otherwise oneDNN's direct convolution wins. bench/layers.py (64 -> 64 channels, 3 x 3,
# 32 x 32 images, one thread, AMD EPYC, AVX2): kn2row takes 0.34 of the dense time at b = 16 (direct:
# 0.42) and 0.59 at b = 32 (direct: 0.70). On smaller feature maps the shifted-slice sums do not pay
# off: forward + backward of one LoDConv2d (C -> C, 3 x 3, batch 32), kn2row time / direct time at
# k k b / in = 1.1, 2.25, 4.5: 16 x 16 outputs (C 128) 1.04, 1.19, 1.20; 8 x 8 (C 256) 1.22, 1.33,
# 1.69; 4 x 4 (C 512) 1.94, 3.35, 3.46. A ResNet-18 (CIFAR, batch 32) training step at p = 0.5 took
# 1.8-2.1 s without the pixel rule and 1.18 s with it (p = 0.25: 1.03-1.16 s and 0.71 s).
KN2ROW_MAX_STACKED = 4.5
KN2ROW_MIN_PIXELS = 1024


def use_kn2row(x: torch.Tensor, v: torch.Tensor, b: int, stride, padding, dilation) -> bool:
    """kn2row for the k x k conv: on CPU, stride 1, padding <= dilation (k - 1), few stacked kernels, a large
    output feature map."""
    _, in_channels, kh, kw = v.shape
    if not (x.device.type == "cpu" and tuple(stride) == (1, 1)
            and all(p <= d * (k - 1) for p, d, k in zip(padding, dilation, (kh, kw)))
            and kh * kw * b <= KN2ROW_MAX_STACKED * in_channels):
        return False
    out_h, out_w = (size + 2 * p - d * (k - 1) for size, p, d, k in zip(x.shape[-2:], padding, dilation, (kh, kw)))
    return out_h * out_w >= KN2ROW_MIN_PIXELS


def _stacked(v: torch.Tensor, b: int) -> torch.Tensor:
    """(b k k, in): the k x k kernels of v[:b] as stacked 1 x 1 kernels, taps flipped, channel-major."""
    return v[:b].flip(2, 3).permute(0, 2, 3, 1).reshape(-1, v.shape[1])


# Images per kn2row chunk: the stacked products of a chunk (about this many bytes) stay in cache and
# their buffer is reused, instead of a fresh (N, k k b, H, W) allocation that page-faults every step.
KN2ROW_CHUNK_BYTES = 1 << 22


def _chunks(n: int, bytes_per_image: int):
    step = max(1, min(n, KN2ROW_CHUNK_BYTES // max(1, bytes_per_image)))
    return step, [(n0, min(n, n0 + step)) for n0 in range(0, n, step)]


def _kn2row_forward(x, vs, b, kh, kw, padding, dilation, z) -> None:
    """z[c, o] = sum_taps P[c, tap, o + tap d - p] with P the stacked 1 x 1 products, chunk by chunk.

    Writes into ``z`` (N, b, H', W'), which may be a strided view.
    """
    n, in_channels, h, w = x.shape
    oh, ow = z.shape[2:]
    (ph, pw), (dh, dw) = padding, dilation
    windows = []  # (tap row, tap col, output rows, output cols); taps are flipped in P
    for i in range(kh):
        r0, r1 = max(0, ph - i * dh), min(oh, h + ph - i * dh)
        for j in range(kw):
            c0, c1 = max(0, pw - j * dw), min(ow, w + pw - j * dw)
            if r0 < r1 and c0 < c1:
                windows.append((i, j, r0, r1, c0, c1))
    full = next((k for k, win in enumerate(windows) if win[2:] == (0, oh, 0, ow)), None)
    if full is not None:  # a tap that covers the whole output initialises it: no zero fill
        windows.insert(0, windows.pop(full))
    if full is None:
        z.zero_()
    x3 = x.reshape(n, in_channels, h * w)
    step, chunks = _chunks(n, vs.shape[0] * h * w * x.element_size())
    prod = x.new_empty(step, vs.shape[0], h * w)
    for n0, n1 in chunks:
        p = torch.bmm(vs.expand(n1 - n0, -1, -1), x3[n0:n1], out=prod[:n1 - n0])  # (n, b k k, H W)
        p = p.view(n1 - n0, b, kh, kw, h, w)
        for k, (i, j, r0, r1, c0, c1) in enumerate(windows):
            src = p[:, :, kh - 1 - i, kw - 1 - j, r0 + i * dh - ph:r1 + i * dh - ph, c0 + j * dw - pw:c1 + j * dw - pw]
            dst = z[n0:n1, :, r0:r1, c0:c1]
            if k == 0 and full is not None:
                dst.copy_(src)
            else:
                dst += src


def _kn2row_backward(gz, x, vs, kh, kw, padding, dilation, need_x, need_v):
    """Gradients of _kn2row_forward: G[c, tap, q] = gz[c, q - tap d + p] (zero outside), then
    grad x = vs^T G and grad vs = sum_n G x^T, chunk by chunk."""
    n, in_channels, h, w = x.shape
    b = gz.shape[1]
    (ph, pw), (dh, dw) = padding, dilation
    lh, lw = dh * (kh - 1) - ph, dw * (kw - 1) - pw  # >= 0 (use_kn2row)
    padded = F.pad(gz, (lw, lw, lh, lh))  # (N, b, H + 2 lh, W + 2 lw)
    s_n, s_c, s_h, s_w = padded.stride()
    gathered_view = padded.as_strided((n, b, kh, kw, h, w), (s_n, s_c, dh * s_h, dw * s_w, s_h, s_w))
    x3 = x.reshape(n, in_channels, h * w)
    gx = x.new_empty(n, in_channels, h * w) if need_x else None
    gvs = []
    step, chunks = _chunks(n, vs.shape[0] * h * w * x.element_size())
    buffer = x.new_empty(step, vs.shape[0], h * w)
    for n0, n1 in chunks:
        g = buffer[:n1 - n0]
        g.view(n1 - n0, b, kh, kw, h, w).copy_(gathered_view[n0:n1])  # (n, b k k, H W), flipped taps
        if need_x:
            torch.bmm(vs.T.expand(n1 - n0, -1, -1), g, out=gx[n0:n1])  # (n, in, H W)
        if need_v:
            gvs.append(torch.bmm(g, x3[n0:n1].transpose(1, 2)).sum(0))  # (b k k, in)
    gx = gx.view(x.shape) if need_x else None
    return gx, (torch.stack(gvs).sum(0) if need_v else None)


class _PrefixConv2d(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, u, v, bias, b, stride, padding, dilation):
        n, _, h, w = x.shape
        kh, kw = v.shape[2:]
        kn2row = use_kn2row(x, v, b, stride, padding, dilation)
        oh = (h + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
        ow = (w + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
        # With a bias, z gets a row of ones and U^T a bias column, so one matmul adds the bias
        # (no broadcast pass over the output) and one matmul gives the grads of U and the bias.
        rows = b + (bias is not None)
        z_aug = x.new_empty(n, rows, oh * ow)  # (N, b [+ 1], H' W')
        z = z_aug[:, :b].view(n, b, oh, ow)
        if kn2row:
            vs = _stacked(v, b)  # (b k k, in)
            _kn2row_forward(x, vs, b, kh, kw, padding, dilation, z)
        else:
            vs = None
            z.copy_(F.conv2d(x, v[:b], None, stride, padding, dilation))  # (N, b, H', W')
        if bias is None:
            u_aug = u[:b].T  # (out, b)
        else:
            z_aug[:, b].fill_(1)
            u_aug = torch.cat([u[:b].T, bias[:, None]], 1)  # (out, b + 1)
        y = torch.bmm(u_aug.expand(n, -1, -1), z_aug)  # (N, out, H' W')
        ctx.save_for_backward(x, u, v, z_aug, vs)
        ctx.b, ctx.conv, ctx.kn2row, ctx.has_bias = b, (stride, padding, dilation), kn2row, bias is not None
        return y.view(n, u.shape[1], oh, ow)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y):
        x, u, v, z_aug, vs = ctx.saved_tensors
        b = ctx.b
        stride, padding, dilation = ctx.conv
        need_x, need_u, need_v, need_bias = ctx.needs_input_grad[:4]
        need_bias = need_bias and ctx.has_bias
        n, in_channels, h, w = x.shape
        kh, kw = v.shape[2:]
        g3 = grad_y.reshape(n, u.shape[1], -1)  # (N, out, H' W')
        gx = gu = gv = gbias = None
        if need_u or need_bias:
            rows = b + need_bias
            g_aug = torch.bmm(z_aug[:, :rows], g3.transpose(1, 2)).sum(0)  # (b [+ 1], out)
            if need_u:
                gu, prefix = _full_grad(u, b)
                prefix.copy_(g_aug[:b])
            if need_bias:
                gbias = g_aug[b]
        if need_x or need_v:
            gz = torch.bmm(u[:b].expand(n, -1, -1), g3).view(n, b, *grad_y.shape[2:])  # (N, b, H', W')
            if ctx.kn2row:
                gx, gvs = _kn2row_backward(gz, x, vs, kh, kw, padding, dilation, need_x, need_v)
                if need_v:
                    gv, prefix = _full_grad(v, b)
                    prefix.copy_(gvs.view(b, kh, kw, in_channels).permute(0, 3, 1, 2).flip(2, 3))
            else:
                gx, gvb, _ = torch.ops.aten.convolution_backward(
                    gz, x, v[:b], None, stride, padding, dilation, False, [0, 0], 1, [need_x, need_v, False])
                if need_v:
                    gv, prefix = _full_grad(v, b)
                    prefix.copy_(gvb)
        return gx, gu, gv, gbias, None, None, None, None


def prefix_conv2d(x: torch.Tensor, u: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None, b: int,
                  stride: tuple[int, int], padding: tuple[int, int] | str, dilation: tuple[int, int]) -> torch.Tensor:
    """conv(x, V[:, :b]) then the 1 x 1 conv with U[:, :b]^T, for ``v`` (rank, in, kh, kw) and 0 < b <= rank.

    Without autograd (evaluation), a prefix whose two convs cost more MACs than one dense conv,
    b (out + in kh kw) >= out in kh kw (the rule of ``to_dense``), runs as that dense conv with the
    merged kernel U[:, :b]^T V[:, :b]: LeNet's first layer (1 -> 6 channels) evaluates 4x faster."""
    if not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, u, v, bias))):
        out, fan_in = u.shape[1], v[0].numel()
        if dense_is_cheaper(b, out, fan_in):
            kernel = (u[:b].T @ v[:b].flatten(1)).view(out, *v.shape[1:])
            return F.conv2d(x, kernel, bias, stride, padding, dilation)
    explicit = _explicit_padding(padding, v.shape[2:], dilation) if isinstance(padding, str) else padding
    if explicit is None or _autocast_on(x) or x.dim() != 4 or x.shape[0] == 0:
        return reference_conv2d(x, u, v, bias, b, stride, padding, dilation)
    return _PrefixConv2d.apply(x, u, v, bias, b, tuple(stride), tuple(explicit), tuple(dilation))


def _explicit_padding(padding: str, kernel_size, dilation) -> tuple[int, int] | None:
    """'valid' -> (0, 0); 'same' -> the symmetric padding, or None where it is asymmetric."""
    if padding == "valid":
        return (0, 0)
    totals = [d * (k - 1) for k, d in zip(kernel_size, dilation)]
    if any(t % 2 for t in totals):
        return None
    return tuple(t // 2 for t in totals)
