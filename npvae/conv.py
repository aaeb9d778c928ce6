"""Image ops: convolution, transposed convolution, max pooling, nearest upsampling (NCHW).

The same conventions as :mod:`npvae.ops` (pure ``*_forward(...) -> (out, cache)`` and
``*_backward(dout, cache) -> grads``, the first array's dtype is the working dtype), for batches of
images ``x`` of shape ``(B, C, H, W)``. Weights have PyTorch's shapes, so they load into
``torch.nn.Conv2d`` (``(C_out, C_in, kH, kW)``) and ``torch.nn.ConvTranspose2d``
(``(C_in, C_out, kH, kW)``) as they are.

Padding
-------
``padding`` is an int, a pair ``(pH, pW)`` (symmetric, as PyTorch), ``"valid"`` (none) or ``"same"``
as Keras / TensorFlow compute it: the output has ``ceil(H / stride)`` rows and the total padding
``max((ceil(H / s) - 1) s + k - H, 0)`` is split with the odd pixel at the bottom (right). Internally
every padding is a pair of pairs ``((top, bottom), (left, right))``: :func:`conv_pads` and
:func:`pool_pads` resolve the public forms. Sizes that do not fit (a kernel larger than the padded
input) raise one ValueError naming the op and the shapes.

Formulation (and why)
---------------------
Every product is a *correlation* of a padded input with a kernel, computed as im2col around BLAS:
the windows of the padded input are copied (one strided copy) into ``cols`` of shape
``(n, C kH kW, OH OW)`` for a chunk of n images and ``y_b = W_m cols_b`` with
``W_m = W.reshape(C_out, C kH kW)``: one GEMM per image, whose output is already NCHW. When a
batch's whole column matrix fits in :data:`KEEP_COLS_BYTES` (64 MB: every layer of the conv VAE at
batch 128), the forward leaves it behind and the weight gradient multiplies it as it is; beyond
that (an evaluation batch of 1,000, the denoising preset's batch of 2,048) the weight gradient
rebuilds the columns chunk by chunk. The data gradient of a convolution is itself a
correlation, of the padded ``dy`` with the flipped, channel-swapped kernel, so its product has a
forward product's shape (K = kH kW C_out, N = C_in) instead of writing the 9x larger column matrix
(see ``/work/shared/notes/conv-speed-facts.md``: that product ran at 19 GFLOP/s, a forward-shaped
one at ~110). For a stride s > 1 it is computed instead as per-image products ``W_m^T dy_b``
scattered into dx by a compiled col2im (no zeros of a dilated ``dy`` multiplied; 35% faster at the
conv VAE's sizes than one stride-1 correlation per output phase). A transposed convolution is
exactly that data gradient, so :func:`conv_transpose2d_forward` and conv2d's backward share one
routine (:func:`_transposed`), and conv_transpose's backward is conv2d's forward and weight
gradient, sharing one column matrix.

A correlation with a single output channel (the output convolutions of the presets: N = 1, a
matrix-vector product) runs as a direct compiled loop instead (:func:`npvae._kernels.conv_direct_forward`
and ``conv_direct_weight_grad``); one with a single *input* channel stays with BLAS, which measured
faster there. Layers add the bias and apply their activation in one compiled pass over the output
(:func:`bias_activation_forward`). A training step at a fixed batch size allocates no arrays: every
buffer comes from the layer's workspace (``buffers``).

Pooling and upsampling are direct loops: :mod:`npvae._kernels`' ``max_pool_*`` and
``upsample_*`` kernels, with NumPy twins.
"""

from __future__ import annotations

import numpy as np

from . import _kernels as K
from . import ops
from .backend import get_backend

# ----------------------------------------------------------------------------- arguments and sizes


def as_pair(value, name: str, op: str, minimum: int) -> tuple[int, int]:
    """An int or a pair of ints, each >= minimum, as a pair."""
    pair = (value, value) if isinstance(value, (int, np.integer)) and not isinstance(value, bool) else value
    try:
        a, b = pair
    except (TypeError, ValueError):
        raise ValueError(f"{op}: expected {name} an int or a pair of ints, got {value!r}") from None
    for v in (a, b):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < minimum:
            raise ValueError(f"{op}: expected {name} integers >= {minimum}, got {value!r}")
    return int(a), int(b)


def _keras_same(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """Keras' "same" padding of one axis: output ceil(size / stride), the odd pixel at the end."""
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def conv_pads(padding, in_hw, kernel, stride, op: str = "conv2d"):
    """Resolve ``padding`` (int, pair, ``"valid"``, ``"same"``) to ``((top, bottom), (left, right))``."""
    if isinstance(padding, str):
        if padding == "valid":
            return (0, 0), (0, 0)
        if padding == "same":
            return tuple(_keras_same(n, k, s) for n, k, s in zip(in_hw, kernel, stride))
        raise ValueError(f"{op}: unknown padding {padding!r}: expected an int, a pair, 'valid' or 'same'")
    ph, pw = as_pair(padding, "padding", op, 0)
    return (ph, ph), (pw, pw)


def pool_pads(padding, in_hw, kernel, stride, op: str = "max_pool2d"):
    """Resolve a pooling ``padding``; numeric padding is at most half the kernel (as PyTorch requires)."""
    pads = conv_pads(padding, in_hw, kernel, stride, op)
    if not isinstance(padding, str):
        for (p, _), k in zip(pads, kernel):
            if 2 * p > k:
                raise ValueError(f"{op}: padding {padding!r} must be at most half the kernel {tuple(kernel)}")
    return pads


def output_size(size: int, kernel: int, stride: int, pads: tuple[int, int]) -> int:
    """Rows of a correlation's output: ``floor((size + top + bottom - kernel) / stride) + 1``."""
    return (size + pads[0] + pads[1] - kernel) // stride + 1


def _conv_geometry(op: str, in_hw, kernel, stride, pads):
    """(OH, OW) of a correlation, or one ValueError naming the op and the shapes."""
    padded = tuple(n + p[0] + p[1] for n, p in zip(in_hw, pads))
    if any(k > n for k, n in zip(kernel, padded)):
        raise ValueError(f"{op}: kernel {kernel[0]}x{kernel[1]} is larger than the padded input "
                         f"{padded[0]}x{padded[1]} (input {in_hw[0]}x{in_hw[1]}, padding {pads})")
    return tuple(output_size(n, k, s, p) for n, k, s, p in zip(in_hw, kernel, stride, pads))


def conv2d_output_shape(in_shape, out_channels, kernel, stride=1, padding=0):
    """Per-example output shape ``(C_out, OH, OW)`` of :func:`conv2d_forward` for ``in_shape`` (C, H, W)."""
    kernel, stride = as_pair(kernel, "kernel", "conv2d", 1), as_pair(stride, "stride", "conv2d", 1)
    pads = conv_pads(padding, in_shape[1:], kernel, stride)
    return (out_channels, *_conv_geometry("conv2d", in_shape[1:], kernel, stride, pads))


def transpose_crops(padding, output_padding, kernel, stride, op: str = "conv_transpose2d"):
    """Crops ``((top, bottom), (left, right))`` of a transposed convolution's full output.

    The full output of an input of H rows has ``(H - 1) s + k`` rows. PyTorch's ``padding`` p and
    ``output_padding`` q crop p at the top and ``p - q`` at the bottom; Keras' ``"same"`` (output
    ``H s``) crops ``k - s`` split with the odd pixel at the bottom (a negative crop appends rows);
    ``"valid"`` crops nothing.
    """
    q = as_pair(output_padding, "output_padding", op, 0)
    if isinstance(padding, str):
        if q != (0, 0):
            raise ValueError(f"{op}: output_padding goes with a numeric padding, not {padding!r}")
        if padding == "valid":
            return (0, 0), (0, 0)
        if padding == "same":
            return tuple(((k - s) // 2, (k - s) - (k - s) // 2) if k >= s else (0, k - s)
                         for k, s in zip(kernel, stride))
        raise ValueError(f"{op}: unknown padding {padding!r}: expected an int, a pair, 'valid' or 'same'")
    p = as_pair(padding, "padding", op, 0)
    for qi, si, pi in zip(q, stride, p):
        if qi >= si:
            raise ValueError(f"{op}: output_padding {output_padding!r} must be smaller than the stride {tuple(stride)}")
    return tuple((pi, pi - qi) for pi, qi in zip(p, q))


def conv_transpose2d_output_shape(in_shape, out_channels, kernel, stride=1, padding=0, output_padding=0):
    """Per-example output shape ``(C_out, OH, OW)``: ``OH = (H - 1) s + k - top - bottom`` crops."""
    op = "conv_transpose2d"
    kernel, stride = as_pair(kernel, "kernel", op, 1), as_pair(stride, "stride", op, 1)
    crops = transpose_crops(padding, output_padding, kernel, stride)
    hw = tuple((n - 1) * s + k - c[0] - c[1] for n, s, k, c in zip(in_shape[1:], stride, kernel, crops))
    if min(hw) < 1:
        raise ValueError(f"{op}: input {in_shape[1]}x{in_shape[2]} with kernel {kernel}, stride {stride} and "
                         f"padding {padding!r} gives an empty output {hw[0]}x{hw[1]}")
    return (out_channels, *hw)


def _images(x, name: str, op: str) -> np.ndarray:
    x = np.asarray(x)
    if x.dtype not in (np.float32, np.float64):
        raise TypeError(f"{op}: expected {name} of dtype float32 or float64, got {x.dtype}")
    if x.ndim != 4:
        raise ValueError(f"{op}: expected {name} of shape (B, C, H, W), got {x.shape}")
    return x


def _weights(x, w, b, op: str, transposed: bool):
    w = np.asarray(w, dtype=x.dtype)
    layout = "(C_in, C_out, kH, kW)" if transposed else "(C_out, C_in, kH, kW)"
    if w.ndim != 4:
        raise ValueError(f"{op}: expected w of shape {layout}, got {w.shape}")
    c_in = w.shape[0] if transposed else w.shape[1]
    if x.shape[1] != c_in:
        raise ValueError(f"{op}: x has {x.shape[1]} channels {x.shape}, w {w.shape} {layout} expects {c_in}")
    c_out = w.shape[1] if transposed else w.shape[0]
    if b is not None:
        b = np.asarray(b, dtype=x.dtype)
        if b.shape != (c_out,):
            raise ValueError(f"{op}: expected b of shape ({c_out},), got {b.shape}")
    return w, b


def _scratch(buffers, name: str, shape, dtype) -> np.ndarray:
    """A scratch array: ``buffers(name, shape, dtype)`` when given (a workspace), else a fresh one."""
    shape = tuple(int(s) for s in shape)
    if buffers is None:
        return np.empty(shape, dtype)
    return buffers(name, shape, dtype)


# ----------------------------------------------------------------------------- the shared correlation


def _pad_dilate(x, stride, pads, out):
    """Zero ``out`` and place x's pixel (i, j) at ``(top + i s, left + j s)``; a negative pad crops.

    x : (B, C, H, W); out : (B, C, top + (H-1) s + 1 + bottom, ...) (the pads may be negative).
    """
    out.fill(0)
    src = [slice(None), slice(None)]
    dst = [slice(None), slice(None)]
    for n, s, (lo, hi), m in zip(x.shape[2:], stride, pads, out.shape[2:]):
        first = -(lo // s) if lo < 0 else 0  # the first source index landing at >= 0: ceil(-lo / s)
        start = lo + first * s
        count = 0 if start >= m else min(n - first, (m - 1 - start) // s + 1)
        src.append(slice(first, first + max(count, 0)))
        dst.append(slice(start, start + max(count, 0) * s, s) if count > 0 else slice(0, 0))
    out[tuple(dst)] = x[tuple(src)]
    return out


def _im2col(xp, kernel, stride, out_hw, cols):
    """Copy the windows of a padded input into cols.

    xp : (B, C, Hp, Wp); cols : (B, C kH kW, OH OW), row ``(c, a, b)`` and column ``(i, j)``
    holding ``xp[:, c, i sH + a, j sW + b]``.
    """
    bsz, c = xp.shape[:2]
    (kh, kw), (sh, sw), (oh, ow) = kernel, stride, out_hw
    s0, s1, s2, s3 = xp.strides
    # a read-only view (writeable=False) would be safer, but NumPy 2 keeps ~60 bytes alive for every
    # view whose flag is cleared (tracemalloc: a step's im2col calls grew the heap ~8 kB a step); the
    # overlapping windows are only read, by this copy
    windows = np.lib.stride_tricks.as_strided(xp, (bsz, c, kh, kw, oh, ow), (s0, s1, s2, s3, s2 * sh, s3 * sw))
    np.copyto(cols.reshape(bsz, c, kh, kw, oh, ow), windows)
    return cols


CHUNK_BYTES = 2 << 20  # the column matrix is built for this many bytes of images at a time (measured: 2 MB
# chunks ran the conv-VAE step 1-2% faster than 8 MB, 16 MB 3% slower, 0.5 MB 4% slower)
KEEP_COLS_BYTES = 64 << 20  # a batch's whole column matrix up to this size is kept for the weight gradient


def _direct(c_in: int, c_out: int) -> bool:
    """Whether a correlation runs as a direct loop: one output channel (N = 1, a matrix-vector product
    at a few GFLOP/s, after writing a column matrix kH kW times the input), with the compiled kernels
    (NumPy's own best form is still im2col + BLAS). One *input* channel (K = kH kW) stays with BLAS:
    measured at batch 128 on 28x28, its products beat the direct loop (1.7 against 9.5 ms forward)."""
    return c_out == 1 and get_backend() == "numba"


def _chunk_images(k: int, p: int, dtype) -> int:
    """Images per chunk of the column matrix: about :data:`CHUNK_BYTES` of columns, which stay in the
    last-level cache between their copy and their product."""
    return max(1, CHUNK_BYTES // (k * p * np.dtype(dtype).itemsize))


def _cols_buffer(buffers, name, xp_shape, c_out, kernel, out_hw, dtype, keep=False):
    """The column buffer (n, C kH kW, OH OW), or None for a direct correlation (see :func:`_direct`).

    n is the chunk size of :func:`_chunk_images`, or, with ``keep`` and when the whole batch's columns
    fit in :data:`KEEP_COLS_BYTES`, the batch: the forward then leaves every image's columns behind
    and the weight gradient multiplies them without rebuilding them (at batch 128 the largest, of a
    64-channel 3x3 layer on 14x14, is 58 MB; an evaluation batch of 1,000 is chunked instead)."""
    if _direct(xp_shape[1], c_out):
        return None
    k = xp_shape[1] * kernel[0] * kernel[1]
    p = out_hw[0] * out_hw[1]
    whole = xp_shape[0] * k * p * np.dtype(dtype).itemsize <= KEEP_COLS_BYTES
    n = xp_shape[0] if keep and whole else min(xp_shape[0], _chunk_images(k, p, dtype))
    return _scratch(buffers, name, (n, k, p), dtype)


def _chunks(batch: int, n: int):
    for start in range(0, batch, n):
        yield start, min(start + n, batch)


def _chunk_views(cols, batch: int):
    """(start, stop, columns of images start:stop) for every chunk: slices of a whole-batch buffer,
    or the front of a chunk-sized one."""
    whole = cols.shape[0] == batch
    for start, stop in _chunks(batch, min(cols.shape[0], _chunk_images(cols.shape[1], cols.shape[2], cols.dtype))):
        yield start, stop, cols[start:stop] if whole else cols[: stop - start]


def _correlate(xp, w, stride, out_hw, out, cols):
    """out (B, O, OH, OW) = the correlation of xp (B, C, Hp, Wp) with w (O, C, kH, kW).

    With a column buffer cols (n, K, P): ``out_b = W_m im2col(xp)_b``, chunk by chunk of images;
    with cols None: the direct loop :func:`npvae._kernels.conv_direct_forward`.
    """
    if cols is None:
        K.conv_direct_forward(xp, w, stride[0], stride[1], out)
        return out
    wm, out3 = w.reshape(w.shape[0], -1), out.reshape(out.shape[0], out.shape[1], -1)
    for start, stop, c in _chunk_views(cols, xp.shape[0]):
        _im2col(xp[start:stop], w.shape[2:], stride, out_hw, c)
        np.matmul(wm, c, out=out3[start:stop])
    return out


def _correlate_weight_grad(xp, dy, stride, out, cols, scratch, built=False):
    """out (O, C, kH, kW) = sum_{n,i,j} dy[n, o, i, j] xp[n, c, i sH + a, j sW + b].

    dy : (B, O, OH, OW). With cols: ``sum_b dy_b (O, P) @ im2col(xp)_b^T (P, K)``, the columns rebuilt
    chunk by chunk unless ``built`` (a whole batch's columns already in cols); scratch is
    ``(tmp (n, O, K), total (O, K))``. With cols None: the direct loop, scratch its (O, C, kH, kW, OW)
    float64 partial sums.
    """
    if cols is None:
        K.conv_direct_weight_grad(xp, dy, stride[0], stride[1], scratch, out)
        return out
    tmp, total = scratch
    bsz, c_out = dy.shape[:2]
    dy3, out2 = dy.reshape(bsz, c_out, -1), out.reshape(c_out, -1)
    built = built and cols.shape[0] == bsz
    out2.fill(0)
    for start, stop, c in _chunk_views(cols, bsz):
        m = stop - start
        if not built:
            _im2col(xp[start:stop], out.shape[2:], stride, dy.shape[2:], c)
        np.matmul(dy3[start:stop], c.transpose(0, 2, 1), out=tmp[:m])
        out2 += np.sum(tmp[:m], axis=0, out=total)
    return out


def _weight_grad_scratch(buffers, tag, cols, xp, dy_shape, kernel, dtype):
    """The scratch of :func:`_correlate_weight_grad` for its columns (or their absence)."""
    c_out = dy_shape[1]
    if cols is None:
        return _scratch(buffers, f"{tag}:dwacc", (c_out, xp.shape[1], *kernel, dy_shape[3]), np.float64)
    n = min(cols.shape[0], _chunk_images(cols.shape[1], cols.shape[2], dtype))
    return (_scratch(buffers, f"{tag}:dwtmp", (n, c_out, cols.shape[1]), dtype),
            _scratch(buffers, f"{tag}:dwsum", (c_out, cols.shape[1]), dtype))


def _transposed(x, w, stride, crops, buffers, tag: str):
    """The transposed correlation: y[n, o, i s + a - top, j s + b - left] += x[n, c, i, j] w[c, o, a, b].

    Stride 1: a correlation of x padded by ``k - 1 - crop`` with w flipped and channel-swapped (laid out
    (C_out, C_in, kH, kW)): a product of a forward's shape. Stride s > 1: per image, the contributions
    ``cols_b = W_m^T x_b`` ((C_out kH kW, C_in) @ (C_in, H W), no zeros of a dilated input multiplied)
    scattered into y by :func:`npvae._kernels.col2im` a chunk of images at a time (measured at batch
    128, 64 -> 32 channels on 14x14: 12 ms against 20 for one stride-1 correlation per output phase).

    x : (B, C_in, H, W); w : (C_in, C_out, kH, kW). Returns y : (B, C_out, OH, OW).
    """
    bsz, _, h, wd = x.shape
    c_in, c_out, kh, kw = w.shape
    (sh, sw), (ch, cw) = stride, crops
    oh, ow = (h - 1) * sh + kh - ch[0] - ch[1], (wd - 1) * sw + kw - cw[0] - cw[1]
    y = _scratch(buffers, f"{tag}:ty", (bsz, c_out, oh, ow), x.dtype)
    if (sh, sw) == (1, 1):
        pads = ((kh - 1 - ch[0], kh - 1 - ch[1]), (kw - 1 - cw[0], kw - 1 - cw[1]))
        padded = (h + sum(pads[0]), wd + sum(pads[1]))
        xp = _pad_dilate(x, (1, 1), pads, _scratch(buffers, f"{tag}:padded", (bsz, c_in, *padded), x.dtype))
        flipped = _scratch(buffers, f"{tag}:flipped", (c_out, c_in, kh, kw), x.dtype)
        np.copyto(flipped, w.transpose(1, 0, 2, 3)[:, :, ::-1, ::-1])
        cols = _cols_buffer(buffers, f"{tag}:cols", xp.shape, c_out, (kh, kw), (oh, ow), x.dtype)
        return _correlate(xp, flipped, (1, 1), (oh, ow), y, cols)
    k, p = c_out * kh * kw, h * wd
    wt = _scratch(buffers, f"{tag}:wt", (k, c_in), x.dtype)
    np.copyto(wt, w.reshape(c_in, k).T)
    x3 = x.reshape(bsz, c_in, p)
    n = min(bsz, _chunk_images(k, p, x.dtype))
    cols = _scratch(buffers, f"{tag}:contrib", (n, k, p), x.dtype)
    for start, stop in _chunks(bsz, n):
        c = np.matmul(wt, x3[start:stop], out=cols[: stop - start])
        K.col2im(c, kh, kw, sh, sw, ch[0], cw[0], h, wd, y[start:stop])
    return y


def _add_bias(y, b):
    if b is not None:
        y += b[:, None, None]


def bias_activation_forward(y, b, activation="identity", alpha=0.01, zeros=None):
    """``y <- f(y + b_c)`` in place over a convolution's output, one pass (the bias and the activation
    fused): what a layer with an activation applies after a bias-free :func:`conv2d_forward` or
    :func:`conv_transpose2d_forward`.

    .. math:: y_{n,c,i,j} \\leftarrow f(y_{n,c,i,j} + b_c)

    Parameters
    ----------
    y : (B, C, OH, OW) C-contiguous array (overwritten)
    b : (C,) array
    activation : str, one of :data:`npvae.ops.ACTIVATIONS`
    alpha : float
        LeakyReLU's slope.
    zeros : (OH OW,) zero array, optional (scratch of the generic activation loops)

    Returns
    -------
    y : the same array
    cache : the cache of :func:`npvae.ops.activation_forward` over ``y.reshape(B, -1)``: its backward
        (``da = dy f'(a)`` through y) is :func:`npvae.ops.activation_backward`, and ``db`` is
        ``dy``'s sum over (n, i, j) as in :func:`conv2d_backward`.
    """
    code = ops.activation_code(activation, alpha)
    b = np.asarray(b, dtype=y.dtype)
    if y.ndim != 4 or not y.flags.c_contiguous or b.shape != (y.shape[1],):
        raise ValueError(f"bias_activation_forward: expected a C-contiguous y (B, C, H, W) and b (C,), got {y.shape} "
                         f"and {b.shape}")
    p = y.shape[2] * y.shape[3]
    zeros = np.zeros(p, y.dtype) if zeros is None else zeros
    K.channel_bias_act(y.reshape(y.shape[0], y.shape[1], p), b, code, float(alpha), zeros)
    return y, (y.reshape(y.shape[0], -1), code, float(alpha))


def _bias_grad(dy, db, buffers, tag):
    """db (C,) = sum of dy (B, C, H, W) over (n, i, j), in float64."""
    work = _scratch(buffers, f"{tag}:dbsum", (dy.shape[1],), np.float64)
    K.channel_sum(dy.reshape(dy.shape[0], dy.shape[1], -1), work, db)
    return db


# ----------------------------------------------------------------------------- conv2d


def conv2d_forward(x, w, b=None, stride=1, padding=0, out=None, buffers=None):
    """2-D convolution (a correlation, as ``torch.nn.functional.conv2d``), NCHW.

    .. math:: y_{n,o,i,j} = b_o + \\sum_{c,a,b'} x^{pad}_{n,c,\\,i s_H + a,\\,j s_W + b'}\\, W_{o,c,a,b'}

    with ``OH = floor((H + top + bottom - kH) / sH) + 1`` (likewise OW).

    Parameters
    ----------
    x : (B, C_in, H, W) array
    w : (C_out, C_in, kH, kW) array
    b : (C_out,) array or None
    stride : int or pair
    padding : int, pair, ``"valid"`` or ``"same"`` (Keras: odd pixel bottom/right)
    out : (B, C_out, OH, OW) array, optional
    buffers : callable ``(name, shape, dtype) -> array``, optional
        Where scratch arrays come from (a layer's workspace); fresh arrays when None.

    Returns
    -------
    y : (B, C_out, OH, OW) array
    cache : tuple
    """
    op = "conv2d"
    x = _images(x, "x", op)
    w, b = _weights(x, w, b, op, transposed=False)
    kernel, stride = w.shape[2:], as_pair(stride, "stride", op, 1)
    pads = conv_pads(padding, x.shape[2:], kernel, stride, op)
    oh, ow = _conv_geometry(op, x.shape[2:], kernel, stride, pads)
    bsz, c_out = x.shape[0], w.shape[0]
    padded = (x.shape[2] + sum(pads[0]), x.shape[3] + sum(pads[1]))
    if pads == ((0, 0), (0, 0)):
        xp = x
    else:
        xp = _pad_dilate(x, (1, 1), pads, _scratch(buffers, "conv:padded", (bsz, x.shape[1], *padded), x.dtype))
    cols = _cols_buffer(buffers, "conv:cols", xp.shape, c_out, kernel, (oh, ow), x.dtype, keep=True)
    if out is None:
        out = np.empty((bsz, c_out, oh, ow), x.dtype)
    elif out.shape != (bsz, c_out, oh, ow) or out.dtype != x.dtype:
        raise ValueError(f"{op}: expected out of shape {(bsz, c_out, oh, ow)} {x.dtype}, got {out.shape} {out.dtype}")
    _correlate(xp, w, stride, (oh, ow), out, cols)
    _add_bias(out, b)
    return out, (x.shape, w, b is not None, stride, pads, xp, cols, (oh, ow), buffers)


def conv2d_backward(dy, cache, need_dx=True, dw=None, db=None):
    """Backward of :func:`conv2d_forward`.

    .. math::
        dW_{o,c,a,b'} = \\sum_{n,i,j} dy_{n,o,i,j}\\, x^{pad}_{n,c,\\,i s_H + a,\\,j s_W + b'},
        \\qquad db_o = \\sum_{n,i,j} dy_{n,o,i,j},

        dx^{pad}_{n,c,u,v} = \\sum_{o,a,b'} \\tilde{dy}_{n,o,\\,u - a,\\,v - b'}\\, W_{o,c,a,b'}

    where ``dy~`` is dy dilated by the stride (zeros between its pixels); the last sum is the
    transposed correlation of :func:`conv_transpose2d_forward` with crops = the padding, and dx
    is ``dx_pad`` without its border (rows no window reached get 0).

    Parameters
    ----------
    dy : (B, C_out, OH, OW) array
    cache : from :func:`conv2d_forward`
    need_dx : bool
        False skips the data gradient (a first layer).
    dw, db : arrays of w's and b's shapes, optional
        db is written when the forward had a bias, or when given (a bias added outside the op, as
        :func:`bias_activation_forward` does).

    Returns
    -------
    dx : (B, C_in, H, W) array or None, dw : (C_out, C_in, kH, kW) array, db : (C_out,) array or None
    """
    x_shape, w, has_bias, stride, pads, xp, cols, out_hw, buffers = cache
    dy = np.asarray(dy, dtype=w.dtype)
    bsz, c_out = x_shape[0], w.shape[0]
    if dy.shape != (bsz, c_out, *out_hw):
        raise ValueError(f"conv2d backward: dy of shape {dy.shape} does not match the forward's output "
                         f"{(bsz, c_out, *out_hw)}")
    if dw is None:
        dw = np.empty(w.shape, w.dtype)
    kernel = w.shape[2:]
    scratch = _weight_grad_scratch(buffers, "conv", cols, xp, dy.shape, kernel, w.dtype)
    _correlate_weight_grad(xp, dy, stride, dw, cols, scratch, built=True)  # the forward's columns, when kept
    if has_bias or db is not None:
        if db is None:
            db = np.empty(c_out, w.dtype)
        _bias_grad(dy, db, buffers, "conv")
    if not need_dx:
        return None, dw, db
    h, wd = x_shape[2:]
    reach = tuple((n - 1) * s + k for n, s, k in zip(dy.shape[2:], stride, kernel))  # padded rows windows reach
    crops = tuple((p[0], r - p[0] - n) for p, r, n in zip(pads, reach, (h, wd)))
    dx = _transposed(dy, w, stride, crops, buffers, "conv:dx")  # w (C_out, C_in, ..) is already (C_in, C_out, ..) of the transpose
    return dx, dw, db


# ----------------------------------------------------------------------------- conv_transpose2d


def conv_transpose2d_forward(x, w, b=None, stride=1, padding=0, output_padding=0, buffers=None):
    """2-D transposed convolution (``torch.nn.functional.conv_transpose2d``), NCHW.

    .. math:: y_{n,o,\\,i s_H + a - t,\\,j s_W + b' - l} \\mathrel{+}= \\sum_c x_{n,c,i,j}\\, W_{c,o,a,b'}, \\quad y \\mathrel{+}= b_o

    the gradient of a conv2d with respect to its input; ``OH = (H - 1) sH + kH - top - bottom``
    where the crops are PyTorch's ``(padding, padding - output_padding)`` or Keras' ``"same"``
    (``OH = H sH``), see :func:`transpose_crops`.

    Parameters
    ----------
    x : (B, C_in, H, W) array
    w : (C_in, C_out, kH, kW) array
    b : (C_out,) array or None
    stride, output_padding : int or pair
    padding : int, pair, ``"valid"`` or ``"same"``
    buffers : callable, optional (see :func:`conv2d_forward`)

    Returns
    -------
    y : (B, C_out, OH, OW) array (a scratch buffer when ``buffers`` is given)
    cache : tuple
    """
    op = "conv_transpose2d"
    x = _images(x, "x", op)
    w, b = _weights(x, w, b, op, transposed=True)
    kernel, stride = w.shape[2:], as_pair(stride, "stride", op, 1)
    shape = conv_transpose2d_output_shape(x.shape[1:], w.shape[1], kernel, stride, padding, output_padding)
    crops = transpose_crops(padding, output_padding, kernel, stride, op)
    y = _transposed(x, w, stride, crops, buffers, "convt")
    assert y.shape[1:] == shape
    _add_bias(y, b)
    return y, (x, w, b is not None, stride, crops, buffers)


def conv_transpose2d_backward(dy, cache, need_dx=True, dw=None, db=None):
    """Backward of :func:`conv_transpose2d_forward`.

    .. math::
        dx_{n,c,i,j} = \\sum_{o,a,b'} dy^{pad}_{n,o,\\,i s_H + a,\\,j s_W + b'}\\, W_{c,o,a,b'},
        \\qquad dW_{c,o,a,b'} = \\sum_{n,i,j} x_{n,c,i,j}\\, dy^{pad}_{n,o,\\,i s_H + a,\\,j s_W + b'},
        \\qquad db_o = \\sum dy_{n,o,\\cdot,\\cdot}

    i.e. dx is conv2d(dy, W) with the crops as padding (negative crops crop dy), and dW is that
    conv2d's weight gradient with x in the role of its output gradient. ``db`` is written when the
    forward had a bias or when given (see :func:`conv2d_backward`).

    Returns
    -------
    dx : (B, C_in, H, W) array or None, dw : (C_in, C_out, kH, kW) array, db : (C_out,) array or None
    """
    x, w, has_bias, stride, crops, buffers = cache
    dy = np.asarray(dy, dtype=w.dtype)
    bsz, c_in, h, wd = x.shape
    c_out, kernel = w.shape[1], w.shape[2:]
    if dy.ndim != 4 or dy.shape[:2] != (bsz, c_out):
        raise ValueError(f"conv_transpose2d backward: dy of shape {dy.shape} does not match the forward's output")
    # dy padded back to the full output: (H - 1) s + k rows (only the first (H - 1) s + k reach x)
    full = tuple((n - 1) * s + k for n, s, k in zip((h, wd), stride, kernel))
    pads = tuple((c[0], f - c[0] - m) for c, f, m in zip(crops, full, dy.shape[2:]))
    dyp = _pad_dilate(dy, (1, 1), pads, _scratch(buffers, "convt:dypad", (bsz, c_out, *full), w.dtype))
    cols = _cols_buffer(buffers, "convt:cols", dyp.shape, c_in, kernel, (h, wd), w.dtype, keep=need_dx)
    dx = _scratch(buffers, "convt:dx", (bsz, c_in, h, wd), w.dtype) if need_dx else None
    if need_dx:
        _correlate(dyp, w, stride, (h, wd), dx, cols)
    if dw is None:
        dw = np.empty(w.shape, w.dtype)
    scratch = _weight_grad_scratch(buffers, "convt", cols, dyp, x.shape, kernel, w.dtype)
    # dx's columns, when the whole batch's were kept: dx and dW multiply the same matrix
    _correlate_weight_grad(dyp, x, stride, dw, cols, scratch, built=need_dx)
    if has_bias or db is not None:
        if db is None:
            db = np.empty(c_out, w.dtype)
        _bias_grad(dy, db, buffers, "convt")
    return dx, dw, db


# ----------------------------------------------------------------------------- max pooling


def max_pool2d_output_shape(in_shape, kernel, stride=None, padding=0):
    """Per-example output shape ``(C, OH, OW)`` of :func:`max_pool2d_forward` for ``in_shape`` (C, H, W)."""
    op = "max_pool2d"
    kernel = as_pair(kernel, "kernel", op, 1)
    stride = kernel if stride is None else as_pair(stride, "stride", op, 1)
    pads = pool_pads(padding, in_shape[1:], kernel, stride, op)
    return (in_shape[0], *_conv_geometry(op, in_shape[1:], kernel, stride, pads))


def max_pool2d_forward(x, kernel, stride=None, padding=0, out=None, argmax=None):
    """2-D max pooling (``torch.nn.functional.max_pool2d``, or Keras' ``MaxPooling2D`` with ``"same"``).

    .. math:: y_{n,c,i,j} = \\max_{a < k_H,\\, b < k_W} x^{pad}_{n,c,\\,i s_H + a,\\,j s_W + b}

    Padding counts as -inf (it never wins). Ties: the first maximum in the window's row-major order
    (smallest a, then smallest b) wins, as in PyTorch's CPU kernel (``val > max``); a NaN wins over
    everything (it propagates). The winner's index is kept for backward.

    Parameters
    ----------
    x : (B, C, H, W) array
    kernel : int or pair
    stride : int or pair, default the kernel
    padding : int or pair (at most half the kernel), ``"valid"`` or ``"same"``
    out : (B, C, OH, OW) array, optional
    argmax : (B, C, OH, OW) int64 array, optional
        Buffer for the winners' flat indices into the (unpadded) H x W image.

    Returns
    -------
    y : (B, C, OH, OW) array
    cache : tuple ``(argmax, x.shape)``
    """
    op = "max_pool2d"
    x = _images(x, "x", op)
    kernel = as_pair(kernel, "kernel", op, 1)
    stride = kernel if stride is None else as_pair(stride, "stride", op, 1)
    pads = pool_pads(padding, x.shape[2:], kernel, stride, op)
    oh, ow = _conv_geometry(op, x.shape[2:], kernel, stride, pads)
    shape = (*x.shape[:2], oh, ow)
    out = np.empty(shape, x.dtype) if out is None else out
    argmax = np.empty(shape, np.int64) if argmax is None else argmax
    if out.shape != shape or argmax.shape != shape:
        raise ValueError(f"{op}: expected out and argmax of shape {shape}, got {out.shape} and {argmax.shape}")
    K.max_pool_forward(x, kernel[0], kernel[1], stride[0], stride[1], pads[0][0], pads[1][0], out, argmax)
    return out, (argmax, x.shape)


def max_pool2d_backward(dy, cache, out=None):
    """Backward of :func:`max_pool2d_forward`: each window's gradient goes to its winner.

    .. math:: dx_{n,c,u,v} = \\sum_{(i,j):\\ \\mathrm{argmax}_{n,c,i,j} = (u,v)} dy_{n,c,i,j}

    (overlapping windows that share a winner add up).

    Returns
    -------
    dx : (B, C, H, W) array
    """
    argmax, x_shape = cache
    dy = np.asarray(dy)
    if dy.shape != argmax.shape:
        raise ValueError(f"max_pool2d backward: expected dy of shape {argmax.shape}, got {dy.shape}")
    out = np.empty(x_shape, dy.dtype) if out is None else out
    K.max_pool_backward(dy, argmax, out)
    return out


# ----------------------------------------------------------------------------- nearest upsampling


def upsample_nearest2d_forward(x, scale, out=None):
    """Nearest-neighbour upsampling by integer factors (``F.interpolate(mode="nearest")``, Keras'
    ``UpSampling2D``).

    .. math:: y_{n,c,i,j} = x_{n,c,\\lfloor i / s_H \\rfloor,\\lfloor j / s_W \\rfloor}

    Parameters
    ----------
    x : (B, C, H, W) array
    scale : int or pair
    out : (B, C, H sH, W sW) array, optional

    Returns
    -------
    y : (B, C, H sH, W sW) array
    cache : tuple ``(sH, sW)``
    """
    op = "upsample_nearest2d"
    x = _images(x, "x", op)
    sh, sw = as_pair(scale, "scale", op, 1)
    shape = (*x.shape[:2], x.shape[2] * sh, x.shape[3] * sw)
    out = np.empty(shape, x.dtype) if out is None else out
    if out.shape != shape:
        raise ValueError(f"{op}: expected out of shape {shape}, got {out.shape}")
    K.upsample_forward(x, sh, sw, out)
    return out, (sh, sw)


def upsample_nearest2d_backward(dy, cache, out=None):
    """Backward of :func:`upsample_nearest2d_forward`: each input pixel sums its sH x sW block.

    .. math:: dx_{n,c,u,v} = \\sum_{a < s_H,\\, b < s_W} dy_{n,c,\\,u s_H + a,\\,v s_W + b}

    Returns
    -------
    dx : (B, C, H, W) array
    """
    sh, sw = cache
    dy = np.asarray(dy)
    b, c, h, w = dy.shape
    if h % sh or w % sw:
        raise ValueError(f"upsample_nearest2d backward: dy of shape {dy.shape} is not a multiple of the scale {(sh, sw)}")
    out = np.empty((b, c, h // sh, w // sw), dy.dtype) if out is None else out
    K.upsample_backward(dy, sh, sw, out)
    return out


__all__ = [
    "conv2d_forward", "conv2d_backward", "conv_transpose2d_forward", "conv_transpose2d_backward", "bias_activation_forward",
    "max_pool2d_forward", "max_pool2d_backward", "upsample_nearest2d_forward", "upsample_nearest2d_backward",
    "conv2d_output_shape", "conv_transpose2d_output_shape", "max_pool2d_output_shape",
    "as_pair", "conv_pads", "pool_pads", "transpose_crops", "output_size",
]
