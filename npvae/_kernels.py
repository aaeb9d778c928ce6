"""Hot loops, each written once as a Numba-compilable loop and paired with a NumPy twin.

Every kernel writes into caller-provided arrays (the last arguments, scratch included) and returns
nothing, so a training step runs without allocating. Loops read no global data; the only globals
they touch are the helper functions below (float32 exp / expm1 / log1p that LLVM can vectorise, a
row sum, the per-activation loops), which :func:`numba_extensions` registers with Numba before the
first compile. Row sums accumulate in float64 and are stored in the output's dtype, so float32
stays float32. The math of each op is documented in :mod:`npvae.ops`, which is the public face of
these kernels.

Activation codes (``code`` arguments): each :data:`npvae.ops.ACTIVATIONS` entry says its code. The
compiled loops branch on the code (one tight loop per activation, which a call through a function
table would not be); the NumPy twins look the entry up in :data:`ACTIVATIONS_BY_CODE` and call its
NumPy form.
"""

from __future__ import annotations

import math
import warnings

import numpy as np

from .backend import before_first_compile, kernel

#: kernel code -> its :class:`npvae.ops.ActivationInfo`, filled as npvae.ops registers each activation
#: (ops sits above this module, so it hands the entries down rather than being imported here).
ACTIVATIONS_BY_CODE: dict = {}


def _rowsum(values, rows):
    rows[...] = np.sum(values, axis=1, dtype=np.float64)


# ----------------------------------------------------------------------------- float32 exp, expm1, log1p
# libm's expf, expm1f and log1pf are calls LLVM cannot vectorise (PyPI's llvmlite has no SVML), so a
# loop calling them runs one element at a time. These are the classic Cephes approximations written
# as plain float32 arithmetic, which LLVM turns into 8-wide AVX2 code. Loops call fast_exp,
# fast_expm1 and fast_log1p_unit; numba_extensions() routes float32 arguments to the *_f32
# formulas and float64 ones to libm, so float64 results are libm's exactly.


def _float32_from_bits(bits):
    """The float32 whose IEEE 754 bit pattern is the integer ``bits`` (an LLVM bitcast in Numba)."""
    return np.asarray(bits, np.int32).view(np.float32)[()]


def _exp_f32(x):
    """exp(x) for float32 x, within 1 ulp of the exact value (Cephes expf).

    x = n ln2 + r with |r| <= ln2 / 2 (ln2 split in two parts so n ln2 is exact), exp(r) by a
    degree-6 polynomial, times 2^n built from its bits in two halves so that subnormal results and
    overflow to inf come out right. x is first clamped to [-104, 100], beyond which float32 exp
    is 0 or inf anyway; NaN stays NaN.
    """
    t = min(max(x, np.float32(-104.0)), np.float32(100.0))
    n = np.floor(t * np.float32(1.44269504088896341) + np.float32(0.5))
    r = t - n * np.float32(0.693359375)
    r = r - n * np.float32(-2.12194440e-4)
    p = np.float32(1.9875691500e-4)
    p = p * r + np.float32(1.3981999507e-3)
    p = p * r + np.float32(8.3334519073e-3)
    p = p * r + np.float32(4.1665795894e-2)
    p = p * r + np.float32(1.6666665459e-1)
    p = p * r + np.float32(5.0000001201e-1)
    p = p * (r * r) + r + np.float32(1.0)
    k = np.int32(n)
    k1 = k >> np.int32(1)
    k2 = k - k1
    bias, shift = np.int32(127), np.int32(23)
    y = p * _float32_from_bits((k1 + bias) << shift) * _float32_from_bits((k2 + bias) << shift)
    return y if x == x else x


def _expm1_f32(x):
    """exp(x) - 1 for float32 x, within 2 ulp: the Taylor series to x^9/9! for |x| < 1/2 (the
    first term left out is below 2^-27 of the sum), else exp(x) - 1, where at most one bit cancels."""
    if abs(x) < np.float32(0.5):
        p = np.float32(1 / 362880)
        p = p * x + np.float32(1 / 40320)
        p = p * x + np.float32(1 / 5040)
        p = p * x + np.float32(1 / 720)
        p = p * x + np.float32(1 / 120)
        p = p * x + np.float32(1 / 24)
        p = p * x + np.float32(1 / 6)
        p = p * x + np.float32(0.5)
        return x + x * x * p
    return _exp_f32(x) - np.float32(1.0)


def _log1p_unit_f32(e):
    """log1p(e) for float32 e in [0, 1], within 2 ulp: 2 atanh(s) with s = e / (2 + e) <= 1/3,
    the series 2 s (1 + s^2/3 + ... + s^14/15) (the next term is below 2^-26 relative). Below
    2^-24, log1p(e) rounds to e itself, which is returned exactly (e / 2 would lose a subnormal's
    last bit)."""
    if e < np.float32(5.9604645e-08):
        return e
    s = e / (np.float32(2.0) + e)
    w = s * s
    p = np.float32(1 / 15)
    p = p * w + np.float32(1 / 13)
    p = p * w + np.float32(1 / 11)
    p = p * w + np.float32(1 / 9)
    p = p * w + np.float32(1 / 7)
    p = p * w + np.float32(1 / 5)
    p = p * w + np.float32(1 / 3)
    return np.float32(2.0) * s + np.float32(2.0) * s * (w * p)


def fast_exp(x):
    """exp(x): :func:`_exp_f32` for float32 in compiled loops, else libm."""
    return math.exp(x)


def fast_expm1(x):
    """exp(x) - 1: :func:`_expm1_f32` for float32 in compiled loops, else libm."""
    return math.expm1(x)


def fast_log1p_unit(x):
    """log1p(x) for x in [0, 1]: :func:`_log1p_unit_f32` for float32 in compiled loops, else libm."""
    return math.log1p(x)


def _loop_row_sum(a, i):
    """sum_j a[i, j] in float64, four running sums so the adds overlap instead of queueing."""
    m = a.shape[1]
    s0 = s1 = s2 = s3 = 0.0
    j = 0
    while j + 4 <= m:
        s0 += a[i, j]
        s1 += a[i, j + 1]
        s2 += a[i, j + 2]
        s3 += a[i, j + 3]
        j += 4
    while j < m:
        s0 += a[i, j]
        j += 1
    return (s0 + s1) + (s2 + s3)


@before_first_compile
def numba_extensions() -> None:
    """Teach Numba the helpers the loops call: the bitcast, exp / expm1 / log1p by dtype (the float32
    formulas or libm), the row sum, and the per-activation loops (inlined)."""
    from llvmlite import ir
    from numba import types
    from numba.core.errors import NumbaIRAssumptionWarning
    from numba.extending import intrinsic, overload, register_jitable

    @intrinsic
    def bitcast_int32_to_float32(typingctx, bits):
        if not isinstance(bits, types.Integer):
            return None

        def codegen(context, builder, signature, args):
            as_int32 = context.cast(builder, args[0], signature.args[0], types.int32)
            return builder.bitcast(as_int32, ir.FloatType())

        return types.float32(bits), codegen

    @overload(_float32_from_bits)
    def _float32_from_bits_impl(bits):
        return lambda bits: bitcast_int32_to_float32(bits)

    for helper in (_exp_f32, _expm1_f32, _log1p_unit_f32, _loop_row_sum):
        register_jitable(helper)
    # Inlined by Numba itself (LLVM leaves loops this size as calls), so that an array passed twice
    # is one array in the kernel. Numba's pedantic SSA check then warns about its own renamed
    # variables, harmlessly; that one warning, from that one module, is silenced.
    overload(_bias_act_loops, inline="always")(lambda src, b, code, alpha, out: _bias_act_loops)
    overload(_act_backward_loops, inline="always")(lambda dy, y, code, alpha, out: _act_backward_loops)
    warnings.filterwarnings("ignore", category=NumbaIRAssumptionWarning, module=r"numba\.core\.ssa")

    def by_dtype(fast, exact):
        def choose(x):
            if x == types.float32:
                return fast
            if isinstance(x, types.Float):
                return exact
            return None

        return choose

    overload(fast_exp)(by_dtype(lambda x: _exp_f32(x), lambda x: math.exp(x)))
    overload(fast_expm1)(by_dtype(lambda x: _expm1_f32(x), lambda x: math.expm1(x)))
    overload(fast_log1p_unit)(by_dtype(lambda x: _log1p_unit_f32(x), lambda x: math.log1p(x)))


# ----------------------------------------------------------------------------- activations


def _bias_act_forward_np(a, b, code, alpha, out):
    np.add(a, b, out=out)
    ACTIVATIONS_BY_CODE[code].forward(out, alpha, out)


def _bias_act_loops(src, b, code, alpha, out):
    """out = act(src + b), one loop per activation so each is a tight loop LLVM vectorises."""
    n, m = out.shape
    if code == 0:
        for i in range(n):
            for j in range(m):
                out[i, j] = src[i, j] + b[j]
    elif code == 1:
        for i in range(n):
            for j in range(m):
                v = src[i, j] + b[j]
                out[i, j] = 0.0 if v < 0 else v  # written so that NaN passes through, as in np.maximum
    elif code == 2:
        for i in range(n):
            for j in range(m):
                v = src[i, j] + b[j]
                out[i, j] = alpha * v if v < 0 else v
    elif code == 3:
        for i in range(n):
            for j in range(m):
                v = src[i, j] + b[j]
                e = fast_exp(-abs(v))
                out[i, j] = 1.0 / (1.0 + e) if v >= 0 else e / (1.0 + e)
    elif code == 4:
        for i in range(n):
            for j in range(m):
                out[i, j] = math.tanh(src[i, j] + b[j])
    elif code == 5:
        for i in range(n):
            for j in range(m):
                v = src[i, j] + b[j]
                out[i, j] = max(v, 0.0) + fast_log1p_unit(fast_exp(-abs(v)))


@kernel(_bias_act_forward_np)
def bias_act_forward(a, b, code, alpha, out):
    """out[i, j] = act(a[i, j] + b[j]); ``a`` may alias ``out``.

    In place, the loops are handed ``out`` twice: LLVM then sees one array and vectorises, where
    two arrays that overlap would send it to its scalar fallback.
    """
    if a.ctypes.data == out.ctypes.data:
        _bias_act_loops(out, b, code, alpha, out)
    else:
        _bias_act_loops(a, b, code, alpha, out)


def _channel_bias_act_np(y, b, code, alpha, zeros):
    y3 = y.reshape(y.shape[0], y.shape[1], -1)
    y3 += b[:, None]
    flat = y.reshape(y.shape[0], -1)
    _bias_act_forward_np(flat, 0.0, code, alpha, flat)


@kernel(_channel_bias_act_np)
def channel_bias_act(y, b, code, alpha, zeros):
    """y[n, c, p] = act(y[n, c, p] + b[c]) in place, y (B, C, P): one pass over a convolution's output.
    ``zeros`` is a (P,) zero scratch, the bias of the generic per-activation loops that ReLU,
    LeakyReLU and identity (inlined here) do not need."""
    bsz, c_in, p = y.shape
    for n in range(bsz):
        for c in range(c_in):
            bc = b[c]
            row = y[n, c]
            if code == 1:
                for j in range(p):
                    v = row[j] + bc
                    row[j] = 0.0 if v < 0 else v  # NaN passes through, as in np.maximum
            elif code == 2:
                for j in range(p):
                    v = row[j] + bc
                    row[j] = alpha * v if v < 0 else v
            else:
                for j in range(p):
                    row[j] += bc
                if code != 0:
                    rows = y[n, c : c + 1]
                    _bias_act_loops(rows, zeros, code, alpha, rows)


def _channel_sum_np(d, work, out):
    out[...] = np.sum(d, axis=(0, 2), dtype=np.float64)


@kernel(_channel_sum_np)
def channel_sum(d, work, out):
    """out[c] = sum_{n, p} d[n, c, p] (d (B, C, P)), accumulated in float64 in ``work`` (C,): a
    convolution's bias gradient."""
    bsz, c_in = d.shape[0], d.shape[1]
    work[:] = 0.0
    for n in range(bsz):
        rows = d[n]
        for c in range(c_in):
            work[c] += _loop_row_sum(rows, c)
    for c in range(c_in):
        out[c] = work[c]


def _act_backward_np(dy, y, code, alpha, out):
    np.multiply(dy, ACTIVATIONS_BY_CODE[code].derivative(y, alpha), out=out)


def _act_backward_loops(dy, y, code, alpha, out):
    """out = dy * act'(a) through y = act(a), one loop per activation (see :func:`_bias_act_loops`)."""
    n, m = out.shape
    if code == 0:
        for i in range(n):
            for j in range(m):
                out[i, j] = dy[i, j]
    elif code == 1:
        for i in range(n):
            for j in range(m):
                out[i, j] = dy[i, j] if y[i, j] > 0 else 0.0
    elif code == 2:
        for i in range(n):
            for j in range(m):
                out[i, j] = dy[i, j] if y[i, j] > 0 else alpha * dy[i, j]
    elif code == 3:
        for i in range(n):
            for j in range(m):
                v = y[i, j]
                out[i, j] = dy[i, j] * v * (1.0 - v)
    elif code == 4:
        for i in range(n):
            for j in range(m):
                v = y[i, j]
                out[i, j] = dy[i, j] * (1.0 - v * v)
    elif code == 5:
        for i in range(n):
            for j in range(m):
                out[i, j] = dy[i, j] * -fast_expm1(-y[i, j])


@kernel(_act_backward_np)
def act_backward(dy, y, code, alpha, out):
    """out = dy * act'(a), with act' written through the output y = act(a); ``dy`` may alias ``out``
    (handed over as ``out`` twice then, as in :func:`bias_act_forward`)."""
    if dy.ctypes.data == out.ctypes.data:
        _act_backward_loops(out, y, code, alpha, out)
    else:
        _act_backward_loops(dy, y, code, alpha, out)


def _bias_grad_np(d, out, work):
    out[...] = np.sum(d, axis=0, dtype=np.float64)


@kernel(_bias_grad_np)
def bias_grad(d, out, work):
    """out[j] = sum_i d[i, j], summed in ``work``, a float64 (m,) scratch (no allocation per call)."""
    n, m = d.shape
    acc = work
    acc[:] = 0.0
    for i in range(n):
        for j in range(m):
            acc[j] += d[i, j]
    for j in range(m):
        out[j] = acc[j]


# ----------------------------------------------------------------------------- reconstruction losses


def _bce_logits_forward_np(logits, target, rows, probs, work):
    e = np.abs(logits, out=probs)  # the transcendentals through NumPy's vectorised exp and log
    np.negative(e, out=e)
    np.exp(e, out=e)  # e = exp(-|l|) <= 1: never overflows
    u = np.add(e, 1, out=work)
    log_u = np.log(u)
    r = 1 / u
    log1p_e = log_u - ((u - 1) - e) * r  # log1p(e) from log(1 + e), its rounding corrected
    _rowsum(np.maximum(logits, 0) + log1p_e - target * logits, rows)
    probs[...] = np.where(logits >= 0, r, e * r)


@kernel(_bce_logits_forward_np)
def bce_logits_forward(logits, target, rows, probs, work):
    """rows[i] = sum_j softplus(l) - x l and probs = sigmoid(l), both from one e = exp(-|l|).

    softplus(l) = max(l, 0) + log1p(e); sigmoid(l) = 1/(1+e) (l >= 0) or e/(1+e). The element
    losses go to ``work`` and each row is then summed in float64. In float32, exp and log1p are
    :func:`fast_exp` and :func:`fast_log1p_unit`: plain arithmetic that LLVM vectorises, where
    libm calls would run one element at a time.
    """
    n, m = logits.shape
    one = logits.dtype.type(1.0)
    zero = logits.dtype.type(0.0)
    for i in range(n):
        for j in range(m):
            v = logits[i, j]
            e = fast_exp(-abs(v))
            r = one / (one + e)
            work[i, j] = max(v, zero) + fast_log1p_unit(e) - target[i, j] * v
            probs[i, j] = r if v >= zero else e * r
        rows[i] = _loop_row_sum(work, i)


def _scaled_difference_np(a, b, scale, out):
    np.multiply(a - b, scale[:, None], out=out)


@kernel(_scaled_difference_np)
def scaled_difference(a, b, scale, out):
    """out[i, j] = (a[i, j] - b[i, j]) * scale[i]: the BCE gradient (a = sigmoid(l), b = x)."""
    n, m = a.shape
    for i in range(n):
        s = scale[i]
        for j in range(m):
            out[i, j] = (a[i, j] - b[i, j]) * s


def _squared_error_rows_np(pred, target, rows):
    _rowsum(np.square(pred - target), rows)


@kernel(_squared_error_rows_np)
def squared_error_rows(pred, target, rows):
    """rows[i] = sum_j (pred - target)^2."""
    n, m = pred.shape
    for i in range(n):
        acc = 0.0
        for j in range(m):
            d = pred[i, j] - target[i, j]
            acc += d * d
        rows[i] = acc


# Series of log C(l) and its derivative below |l| < 0.1, where the closed forms lose digits.
# log C(l) = log(l / tanh(l/2));  d/dl log C(l) = 1/l - 1/sinh(l).
_CB_SMALL = 0.1


def _cb_log_norm_rows_np(logits, rows):
    a = np.abs(logits)
    small = a < _CB_SMALL
    safe = np.where(small, 1.0, a)
    l2 = logits * logits
    series = math.log(2.0) + l2 * (1 / 12 + l2 * (-7 / 1440 + l2 * (31 / 90720 - l2 * 127 / 4838400)))
    closed = np.log(safe / np.tanh(0.5 * safe))
    _rowsum(np.where(small, series, closed), rows)


@kernel(_cb_log_norm_rows_np)
def cb_log_norm_rows(logits, rows):
    """rows[i] = sum_j log C(l), the continuous-Bernoulli log-normaliser, C(l) = l / tanh(l/2)."""
    n, m = logits.shape
    for i in range(n):
        acc = 0.0
        for j in range(m):
            v = logits[i, j]
            a = abs(v)
            if a < 0.1:
                l2 = v * v
                acc += math.log(2.0) + l2 * (1 / 12 + l2 * (-7 / 1440 + l2 * (31 / 90720 - l2 * 127 / 4838400)))
            else:
                acc += math.log(a / math.tanh(0.5 * a))
        rows[i] = acc


def _cb_log_norm_backward_np(logits, scale, out):
    a = np.abs(logits)
    small = a < _CB_SMALL
    safe = np.where(small, 1.0, a)
    l2 = logits * logits
    series = logits * (1 / 6 + l2 * (-7 / 360 + l2 * (31 / 15120 - l2 * 127 / 604800)))
    e = np.exp(-safe)
    closed = np.sign(logits) * (1.0 / safe - 2.0 * e / (1.0 - e * e))
    np.multiply(np.where(small, series, closed), scale[:, None], out=out)


@kernel(_cb_log_norm_backward_np)
def cb_log_norm_backward(logits, scale, out):
    """out[i, j] = scale[i] * (1/l - 1/sinh(l)), with 1/sinh(l) = 2 e / (1 - e^2), e = exp(-|l|)."""
    n, m = logits.shape
    for i in range(n):
        s = scale[i]
        for j in range(m):
            v = logits[i, j]
            a = abs(v)
            if a < 0.1:
                l2 = v * v
                g = v * (1 / 6 + l2 * (-7 / 360 + l2 * (31 / 15120 - l2 * 127 / 604800)))
            else:
                e = math.exp(-a)
                g = 1.0 / a - 2.0 * e / (1.0 - e * e)
                if v < 0:
                    g = -g
            out[i, j] = g * s


# ----------------------------------------------------------------------------- sampling and KL


def _reparameterize_np(mu, logvar, eps, z, std):
    np.exp(0.5 * logvar, out=std)
    np.multiply(std, eps, out=z)
    z += mu


@kernel(_reparameterize_np)
def reparameterize(mu, logvar, eps, z, std):
    """std = exp(logvar / 2); z = mu + std * eps."""
    n, m = mu.shape
    half = logvar.dtype.type(0.5)
    for i in range(n):
        for j in range(m):
            s = fast_exp(half * logvar[i, j])
            std[i, j] = s
            z[i, j] = mu[i, j] + s * eps[i, j]


def _reparameterize_backward_np(dz, eps, std, dmu, dlogvar):
    dmu[...] = dz
    np.multiply(dz * eps, 0.5 * std, out=dlogvar)


@kernel(_reparameterize_backward_np)
def reparameterize_backward(dz, eps, std, dmu, dlogvar):
    """dmu = dz; dlogvar = dz * eps * std / 2."""
    n, m = dz.shape
    for i in range(n):
        for j in range(m):
            g = dz[i, j]
            dmu[i, j] = g
            dlogvar[i, j] = 0.5 * g * eps[i, j] * std[i, j]


def _exp_excess(v):
    """e^v - 1 - v. expm1(v) - v cancels to a relative error ~2 eps / abs(v) near 0, so below
    abs(v) < 0.01 it is the series v^2/2 + v^3/6 + ... + v^7/5040 (truncation ~1e-17 relative)."""
    series = v * v * (0.5 + v * (1 / 6 + v * (1 / 24 + v * (1 / 120 + v * (1 / 720 + v / 5040)))))
    return np.where(np.abs(v) < 0.01, series, np.expm1(v) - v)


def _kl_normal_rows_np(mu, logvar, rows):
    _rowsum(0.5 * (mu * mu + _exp_excess(logvar)), rows)


@kernel(_kl_normal_rows_np)
def kl_normal_rows(mu, logvar, rows):
    """rows[i] = 1/2 sum_j (mu^2 + e^logvar - 1 - logvar) = KL(N(mu, e^logvar) || N(0, 1)).

    e^v - 1 - v as in :func:`_exp_excess`: its series below abs(v) < 0.01, else expm1(v) - v.
    """
    n, m = mu.shape
    for i in range(n):
        acc = 0.0
        for j in range(m):
            v = logvar[i, j]
            if abs(v) < 0.01:
                excess = v * v * (0.5 + v * (1 / 6 + v * (1 / 24 + v * (1 / 120 + v * (1 / 720 + v / 5040)))))
            else:
                excess = fast_expm1(v) - v
            acc += mu[i, j] * mu[i, j] + excess
        rows[i] = 0.5 * acc


def _kl_normal_backward_np(mu, logvar, scale, accumulate, dmu, dlogvar):
    s = scale[:, None]
    if accumulate:
        dmu += s * mu
        dlogvar += s * 0.5 * np.expm1(logvar)
    else:
        np.multiply(mu, s, out=dmu)
        np.multiply(0.5 * np.expm1(logvar), s, out=dlogvar)


@kernel(_kl_normal_backward_np)
def kl_normal_backward(mu, logvar, scale, accumulate, dmu, dlogvar):
    """dmu (+)= scale[i] mu; dlogvar (+)= scale[i] expm1(logvar) / 2."""
    n, m = mu.shape
    for i in range(n):
        s = scale[i]
        for j in range(m):
            gm = s * mu[i, j]
            gl = s * 0.5 * fast_expm1(logvar[i, j])
            if accumulate:
                dmu[i, j] += gm
                dlogvar[i, j] += gl
            else:
                dmu[i, j] = gm
                dlogvar[i, j] = gl


def _kl_gaussians_rows_np(mu, logvar, mu_p, logvar_p, rows):
    d = logvar - logvar_p
    diff = mu - mu_p
    _rowsum(0.5 * (_exp_excess(d) + diff * diff * np.exp(-logvar_p)), rows)


@kernel(_kl_gaussians_rows_np)
def kl_gaussians_rows(mu, logvar, mu_p, logvar_p, rows):
    """rows[i] = KL(N(mu, e^logvar) || N(mu_p, e^logvar_p)), summed over j (e^d - 1 - d as in kl_normal_rows)."""
    n, m = mu.shape
    for i in range(n):
        acc = 0.0
        for j in range(m):
            v = logvar[i, j] - logvar_p[i, j]
            if abs(v) < 0.01:
                excess = v * v * (0.5 + v * (1 / 6 + v * (1 / 24 + v * (1 / 120 + v * (1 / 720 + v / 5040)))))
            else:
                excess = fast_expm1(v) - v
            diff = mu[i, j] - mu_p[i, j]
            acc += excess + diff * diff * fast_exp(-logvar_p[i, j])
        rows[i] = 0.5 * acc


def _kl_gaussians_backward_np(mu, logvar, mu_p, logvar_p, scale, accumulate, dmu, dlogvar, dmu_p, dlogvar_p):
    s = scale[:, None]
    inv_var_p = np.exp(-logvar_p)
    diff = mu - mu_p
    gm = s * diff * inv_var_p
    gl = s * 0.5 * np.expm1(logvar - logvar_p)
    if accumulate:
        dmu += gm
        dlogvar += gl
    else:
        dmu[...] = gm
        dlogvar[...] = gl
    dmu_p[...] = -gm
    dlogvar_p[...] = -gl - s * 0.5 * diff * diff * inv_var_p


@kernel(_kl_gaussians_backward_np)
def kl_gaussians_backward(mu, logvar, mu_p, logvar_p, scale, accumulate, dmu, dlogvar, dmu_p, dlogvar_p):
    """Gradients of scale[i] * KL_i w.r.t. both Gaussians (the q side accumulates when asked)."""
    n, m = mu.shape
    for i in range(n):
        s = scale[i]
        for j in range(m):
            inv_var_p = fast_exp(-logvar_p[i, j])
            diff = mu[i, j] - mu_p[i, j]
            gm = s * diff * inv_var_p
            gl = s * 0.5 * fast_expm1(logvar[i, j] - logvar_p[i, j])
            if accumulate:
                dmu[i, j] += gm
                dlogvar[i, j] += gl
            else:
                dmu[i, j] = gm
                dlogvar[i, j] = gl
            dmu_p[i, j] = -gm
            dlogvar_p[i, j] = -gl - s * 0.5 * diff * diff * inv_var_p


# ----------------------------------------------------------------------------- the poor man's VAE


def _l2_norm_rows_np(z, rows):
    rows[...] = np.sqrt(np.sum(np.square(z, dtype=np.float64), axis=1))


@kernel(_l2_norm_rows_np)
def l2_norm_rows(z, rows):
    """rows[i] = sqrt(sum_j z[i, j]^2), squared in float64: a float32 square underflows below
    abs(z) ~ 1e-19 (a zero norm, so a zero gradient) and overflows above ~1e19."""
    n, m = z.shape
    for i in range(n):
        acc = 0.0
        for j in range(m):
            v = np.float64(z[i, j])
            acc += v * v
        rows[i] = math.sqrt(acc)


def _l2_norm_backward_np(z, norms, scale, out):
    positive = norms > 0
    factor = np.where(positive, scale / np.where(positive, norms, 1.0).astype(np.float64), 0.0)
    np.multiply(z, factor[:, None], out=out)


@kernel(_l2_norm_backward_np)
def l2_norm_backward(z, norms, scale, out):
    """out[i] = scale[i] * z[i] / ||z[i]||, and 0 where ||z[i]|| = 0 (the minimal-norm subgradient).

    scale / ||z|| is formed in float64: for a float32 norm below ~3e-39 its reciprocal overflows.
    """
    n, m = z.shape
    for i in range(n):
        r = np.float64(norms[i])
        f = scale[i] / r if r > 0 else 0.0
        for j in range(m):
            out[i, j] = z[i, j] * f


# ---- optimizers
# One fused in-place update per optimizer over the flat parameter buffer. Scalars arrive already cast
# to the parameters' dtype, so float32 stays float32 inside the loops. Each line reproduces the
# order of operations of the matching torch.optim single-tensor update; torch's CPU kernels fuse
# some of them with FMA, so results agree with torch to rounding, not bit for bit. The loops keep
# their temporaries in registers; the NumPy twins use ``work``, a (2, N) scratch array the caller
# allocates once, and give bit-identical results. Unused state arrays are passed as empty arrays.
# The loops divide with np.divide, not `/`: under Numba's default (Python) error model `/` tests every
# divisor for zero to raise ZeroDivisionError, which stops LLVM vectorising the loop (Adam over 650k
# float32 parameters: ~2.5 ms scalar, ~0.6 ms vectorised) and would raise where torch gives inf/nan.


def _sgd_step_np(params, grads, buf, neg_lr, weight_decay, momentum, keep, nesterov, first, work):
    g = grads
    if weight_decay != 0:
        g = np.multiply(params, weight_decay, out=work[0])
        np.add(grads, g, out=g)
    if momentum != 0:
        if first:
            buf[...] = g
        else:
            np.multiply(buf, momentum, out=buf)
            buf += np.multiply(g, keep, out=work[1])
        if nesterov:
            g = np.add(g, np.multiply(buf, momentum, out=work[1]), out=work[1])
        else:
            g = buf
    params += np.multiply(g, neg_lr, out=work[1])


@kernel(_sgd_step_np)
def sgd_step(params, grads, buf, neg_lr, weight_decay, momentum, keep, nesterov, first, work):
    """SGD with momentum, in place (``neg_lr`` = -lr, ``keep`` = 1 - dampening; ``first``: first step).

    g = grad + weight_decay * p;  b = g (first step) or momentum * b + keep * g;
    g = g + momentum * b (nesterov) or b;  p = p - lr * g.
    """
    for i in range(params.shape[0]):
        p = params[i]
        g = grads[i]
        if weight_decay != 0:
            g = g + weight_decay * p
        if momentum != 0:
            if first:
                b = g
            else:
                b = buf[i] * momentum + keep * g
            buf[i] = b
            if nesterov:
                g = g + momentum * b
            else:
                g = b
        params[i] = p + neg_lr * g


def _rmsprop_step_np(params, grads, square_avg, grad_avg, buf, neg_lr, alpha, one_minus_alpha, alpha_lerp,
                     lerp_small, eps, weight_decay, momentum, centered, work):
    g = grads
    if weight_decay != 0:
        g = np.multiply(params, weight_decay, out=work[0])
        np.add(grads, g, out=g)
    t = work[1]
    np.multiply(square_avg, alpha, out=square_avg)
    np.multiply(g, one_minus_alpha, out=t)
    square_avg += np.multiply(t, g, out=t)
    if centered:
        np.subtract(g, grad_avg, out=t)
        if lerp_small:
            grad_avg += np.multiply(t, one_minus_alpha, out=t)
        else:
            np.subtract(g, np.multiply(t, alpha_lerp, out=t), out=grad_avg)
        np.multiply(grad_avg, grad_avg, out=t)
        np.subtract(square_avg, t, out=t)
        np.sqrt(t, out=t)
    else:
        np.sqrt(square_avg, out=t)
    t += eps
    if momentum > 0:
        np.multiply(buf, momentum, out=buf)
        buf += np.divide(g, t, out=t)
        params += np.multiply(buf, neg_lr, out=t)
    else:
        np.divide(np.multiply(g, neg_lr, out=work[0]), t, out=t)
        params += t


@kernel(_rmsprop_step_np)
def rmsprop_step(params, grads, square_avg, grad_avg, buf, neg_lr, alpha, one_minus_alpha, alpha_lerp,
                 lerp_small, eps, weight_decay, momentum, centered, work):
    """RMSprop, in place (``neg_lr`` = -lr; ``alpha_lerp`` = 1 - (1 - alpha) in the parameters' dtype).

    g = grad + weight_decay * p;  s = alpha * s + (1 - alpha) g^2;
    centered: a = lerp(a, g, 1 - alpha), r = sqrt(s - a^2) + eps, else r = sqrt(s) + eps;
    momentum: b = momentum * b + g / r, p = p - lr * b, else p = p - lr * g / r.
    """
    for i in range(params.shape[0]):
        p = params[i]
        g = grads[i]
        if weight_decay != 0:
            g = g + weight_decay * p
        s = square_avg[i] * alpha + one_minus_alpha * g * g
        square_avg[i] = s
        if centered:
            a = grad_avg[i]
            if lerp_small:
                a = a + one_minus_alpha * (g - a)
            else:
                a = g - (g - a) * alpha_lerp
            grad_avg[i] = a
            r = math.sqrt(s - a * a) + eps
        else:
            r = math.sqrt(s) + eps
        if momentum > 0:
            b = buf[i] * momentum + np.divide(g, r)
            buf[i] = b
            params[i] = p + neg_lr * b
        else:
            params[i] = p + np.divide(neg_lr * g, r)


def _adam_step_np(params, grads, exp_avg, exp_avg_sq, max_exp_avg_sq, w1, w1_lerp, lerp_small, beta2,
                  one_minus_beta2, neg_step_size, bc2_sqrt, eps, weight_decay, decay, amsgrad, work):
    g = grads
    if weight_decay != 0:
        g = np.multiply(params, weight_decay, out=work[0])
        np.add(grads, g, out=g)
    np.multiply(params, decay, out=params)
    t = work[1]
    np.subtract(g, exp_avg, out=t)
    if lerp_small:
        exp_avg += np.multiply(t, w1, out=t)
    else:
        np.subtract(g, np.multiply(t, w1_lerp, out=t), out=exp_avg)
    np.multiply(exp_avg_sq, beta2, out=exp_avg_sq)
    np.multiply(g, one_minus_beta2, out=t)
    exp_avg_sq += np.multiply(t, g, out=t)
    v = exp_avg_sq
    if amsgrad:
        v = np.maximum(max_exp_avg_sq, exp_avg_sq, out=max_exp_avg_sq)
    np.sqrt(v, out=t)
    np.divide(t, bc2_sqrt, out=t)
    t += eps
    step = np.multiply(exp_avg, neg_step_size, out=work[0])
    params += np.divide(step, t, out=step)


@kernel(_adam_step_np)
def adam_step(params, grads, exp_avg, exp_avg_sq, max_exp_avg_sq, w1, w1_lerp, lerp_small, beta2,
              one_minus_beta2, neg_step_size, bc2_sqrt, eps, weight_decay, decay, amsgrad, work):
    """Adam / AdamW, in place (``w1`` = 1 - beta1, ``w1_lerp`` = 1 - w1, both in the parameters' dtype).

    g = grad + weight_decay * p (L2);  p = decay * p (decoupled, decay = 1 - lr wd, else 1);
    m = lerp(m, g, 1 - beta1);  v = beta2 v + (1 - beta2) g^2;  v_max = max(v_max, v) (amsgrad);
    p = p + (neg_step_size * m) / (sqrt(v) / bc2_sqrt + eps),
    with neg_step_size = -lr / (1 - beta1^t) and bc2_sqrt = sqrt(1 - beta2^t).
    """
    for i in range(params.shape[0]):
        p = params[i]
        g = grads[i]
        if weight_decay != 0:
            g = g + weight_decay * p
        p = p * decay
        m = exp_avg[i]
        if lerp_small:
            m = m + w1 * (g - m)
        else:
            m = g - (g - m) * w1_lerp
        exp_avg[i] = m
        v = exp_avg_sq[i] * beta2 + one_minus_beta2 * g * g
        exp_avg_sq[i] = v
        if amsgrad:
            vmax = max_exp_avg_sq[i]
            # NaN-propagating max, like np.maximum and torch.maximum
            if not (vmax >= v or vmax != vmax):
                vmax = v
            max_exp_avg_sq[i] = vmax
            v = vmax
        params[i] = p + np.divide(neg_step_size * m, np.divide(math.sqrt(v), bc2_sqrt) + eps)


def _sum_squares_np(x, out):
    out[0] = np.sum(np.square(x, dtype=np.float64))


@kernel(_sum_squares_np)
def sum_squares(x, out):
    """out[0] = sum_i x[i]^2, accumulated in float64 (the twin sums pairwise: equal to rounding)."""
    acc = 0.0
    for i in range(x.shape[0]):
        v = np.float64(x[i])
        acc += v * v
    out[0] = acc


# ----------------------------------------------------------------------------- max pooling, nearest upsampling


def _max_pool_forward_np(x, kh, kw, sh, sw, pt, pl, out, argmax):
    b, c, h, w = x.shape
    oh, ow = out.shape[2:]
    hp, wp = max(h + pt, (oh - 1) * sh + kh), max(w + pl, (ow - 1) * sw + kw)
    xp = np.full((b, c, hp, wp), -np.inf, dtype=x.dtype)
    xp[:, :, pt:pt + h, pl:pl + w] = x
    s0, s1, s2, s3 = xp.strides
    windows = np.lib.stride_tricks.as_strided(xp, (b, c, oh, ow, kh, kw), (s0, s1, s2 * sh, s3 * sw, s2, s3))
    windows = windows.reshape(b, c, oh, ow, kh * kw)
    best = np.argmax(windows, axis=-1)  # the first maximum (NaN counts as the maximum)
    nan = np.isnan(windows)
    if nan.any():  # PyTorch moves to every NaN it meets: the last NaN wins
        last = kh * kw - 1 - np.argmax(nan[..., ::-1], axis=-1)
        best = np.where(nan.any(axis=-1), last, best)
    out[...] = np.take_along_axis(windows, best[..., None], axis=-1)[..., 0]
    rows = np.arange(oh)[:, None] * sh - pt + best // kw
    cols = np.arange(ow)[None, :] * sw - pl + best % kw
    # a window of -inf only keeps its first in-bounds pixel, as PyTorch does (the clip finds it)
    argmax[...] = np.clip(rows, 0, h - 1) * w + np.clip(cols, 0, w - 1)


@kernel(_max_pool_forward_np)
def max_pool_forward(x, kh, kw, sh, sw, pt, pl, out, argmax):
    """out[n, c, i, j] = max of x over the window at (i sh - pt, j sw - pl), kh x kw, clipped to the
    image; argmax[n, c, i, j] = the winner's flat index u W + v. Ties: the first in row-major order
    (``val > best``); a NaN always takes over (the last NaN wins), as PyTorch's CPU kernel."""
    b, c, h, w = x.shape
    oh, ow = out.shape[2], out.shape[3]
    for n in range(b):
        for ch in range(c):
            for i in range(oh):
                u0 = i * sh - pt
                ua, ub = max(u0, 0), min(u0 + kh, h)
                for j in range(ow):
                    v0 = j * sw - pl
                    va, vb = max(v0, 0), min(v0 + kw, w)
                    best = -np.inf
                    idx = ua * w + va
                    for u in range(ua, ub):
                        for v in range(va, vb):
                            val = x[n, ch, u, v]
                            if val > best or val != val:
                                best = val
                                idx = u * w + v
                    out[n, ch, i, j] = x[n, ch, idx // w, idx % w]
                    argmax[n, ch, i, j] = idx


def _max_pool_backward_np(dy, argmax, out):
    b, c, h, w = out.shape
    flat = (np.arange(b * c).reshape(b, c, 1, 1) * (h * w) + argmax).ravel()
    out[...] = np.bincount(flat, weights=dy.ravel(), minlength=b * c * h * w).reshape(out.shape)


@kernel(_max_pool_backward_np)
def max_pool_backward(dy, argmax, out):
    """out = 0, then out[n, c].flat[argmax[n, c, i, j]] += dy[n, c, i, j]."""
    b, c, h, w = out.shape
    oh, ow = dy.shape[2], dy.shape[3]
    out[...] = 0.0
    for n in range(b):
        for ch in range(c):
            for i in range(oh):
                for j in range(ow):
                    idx = argmax[n, ch, i, j]
                    out[n, ch, idx // w, idx % w] += dy[n, ch, i, j]


def _upsample_forward_np(x, sh, sw, out):
    b, c, h, w = x.shape
    out.reshape(b, c, h, sh, w, sw)[...] = x[:, :, :, None, :, None]


@kernel(_upsample_forward_np)
def upsample_forward(x, sh, sw, out):
    """out[n, c, i, j] = x[n, c, i // sh, j // sw]."""
    b, c, h, w = out.shape
    for n in range(b):
        for ch in range(c):
            for i in range(h):
                for j in range(w):
                    out[n, ch, i, j] = x[n, ch, i // sh, j // sw]


def _upsample_backward_np(dy, sh, sw, out):
    b, c, h, w = out.shape
    out[...] = dy.reshape(b, c, h, sh, w, sw).sum(axis=(3, 5))


@kernel(_upsample_backward_np)
def upsample_backward(dy, sh, sw, out):
    """out[n, c, u, v] = sum of dy over the block [u sh, u sh + sh) x [v sw, v sw + sw)."""
    b, c, h, w = out.shape
    for n in range(b):
        for ch in range(c):
            for u in range(h):
                for v in range(w):
                    acc = 0.0
                    for a in range(sh):
                        for e in range(sw):
                            acc += dy[n, ch, u * sh + a, v * sw + e]
                    out[n, ch, u, v] = acc


# ----------------------------------------------------------------------------- direct correlations
# A convolution with one input or one output channel gives im2col a product of K = kH kW rows or
# N = 1 column, where BLAS runs at a few GFLOP/s and the column matrix (kH kW times the input) costs
# more to write than the product; these loops correlate directly. Both keep the innermost loop
# elementwise over an output row (no reduction there), so LLVM vectorises it without fastmath.


def _window(xp, a, b, sh, sw, oh, ow):
    """xp[:, :, i sh + a, j sw + b] for i < oh, j < ow: (B, C, oh, ow), a view."""
    return xp[:, :, a : a + (oh - 1) * sh + 1 : sh, b : b + (ow - 1) * sw + 1 : sw]


def _conv_direct_forward_np(xp, w, sh, sw, out):
    oh, ow = out.shape[2:]
    out[...] = 0
    for a in range(w.shape[2]):
        for b in range(w.shape[3]):
            out += np.einsum("nchw,oc->nohw", _window(xp, a, b, sh, sw, oh, ow), w[:, :, a, b])


@kernel(_conv_direct_forward_np)
def conv_direct_forward(xp, w, sh, sw, out):
    """out[n, o, i, j] = sum_{c, a, b} w[o, c, a, b] xp[n, c, i sh + a, j sw + b] (a padded input's
    correlation with w (O, C, kH, kW); out (B, O, OH, OW)), tap by tap over whole output rows."""
    bsz, c_in = xp.shape[0], xp.shape[1]
    c_out, kh, kw = w.shape[0], w.shape[2], w.shape[3]
    oh, ow = out.shape[2], out.shape[3]
    for n in range(bsz):
        for o in range(c_out):
            y = out[n, o]
            y[:, :] = 0.0
            for c in range(c_in):
                img = xp[n, c]
                for a in range(kh):
                    if kw == 3 and sw == 1:  # the common 3x3 kernel: a row's three taps in one pass
                        w0, w1, w2 = w[o, c, a, 0], w[o, c, a, 1], w[o, c, a, 2]
                        for i in range(oh):
                            row = img[i * sh + a]
                            for j in range(ow):
                                y[i, j] += w0 * row[j] + w1 * row[j + 1] + w2 * row[j + 2]
                        continue
                    for b in range(kw):
                        wv = w[o, c, a, b]
                        for i in range(oh):
                            row = img[i * sh + a]
                            if sw == 1:
                                for j in range(ow):
                                    y[i, j] += wv * row[j + b]
                            else:
                                for j in range(ow):
                                    y[i, j] += wv * row[j * sw + b]


def _conv_direct_weight_grad_np(xp, dy, sh, sw, work, dw):
    oh, ow = dy.shape[2:]
    for a in range(dw.shape[2]):
        for b in range(dw.shape[3]):
            dw[:, :, a, b] = np.einsum("nohw,nchw->oc", dy, _window(xp, a, b, sh, sw, oh, ow), dtype=np.float64)


@kernel(_conv_direct_weight_grad_np)
def conv_direct_weight_grad(xp, dy, sh, sw, work, dw):
    """dw[o, c, a, b] = sum_{n, i, j} dy[n, o, i, j] xp[n, c, i sh + a, j sw + b] (dy (B, O, OH, OW),
    dw (O, C, kH, kW)); work (O, C, kH, kW, OW) float64 scratch holds one partial sum per output
    column (so the inner loop is elementwise), summed at the end."""
    acc = work
    bsz, c_in = xp.shape[0], xp.shape[1]
    c_out, kh, kw = dw.shape[0], dw.shape[2], dw.shape[3]
    oh, ow = dy.shape[2], dy.shape[3]
    acc[...] = 0.0
    for n in range(bsz):
        for o in range(c_out):
            g = dy[n, o]
            for c in range(c_in):
                img = xp[n, c]
                for a in range(kh):
                    if kw == 3 and sw == 1:  # the common 3x3 kernel: a row's three taps in one pass
                        s0, s1, s2 = acc[o, c, a, 0], acc[o, c, a, 1], acc[o, c, a, 2]
                        for i in range(oh):
                            row = img[i * sh + a]
                            for j in range(ow):
                                v = g[i, j]
                                s0[j] += v * row[j]
                                s1[j] += v * row[j + 1]
                                s2[j] += v * row[j + 2]
                        continue
                    for b in range(kw):
                        s = acc[o, c, a, b]
                        for i in range(oh):
                            row = img[i * sh + a]
                            if sw == 1:
                                for j in range(ow):
                                    s[j] += g[i, j] * row[j + b]
                            else:
                                for j in range(ow):
                                    s[j] += g[i, j] * row[j * sw + b]
    for o in range(c_out):
        for c in range(c_in):
            for a in range(kh):
                for b in range(kw):
                    t = 0.0
                    for j in range(ow):
                        t += acc[o, c, a, b, j]
                    dw[o, c, a, b] = t



def _col2im_np(cols, kh, kw, sh, sw, top, left, h, w, out):
    out[...] = 0
    n, c_out, oh, ow = out.shape
    c6 = cols.reshape(n, c_out, kh, kw, h, w)
    for a in range(kh):
        i0 = max(0, -(-(top - a) // sh))  # the first input row landing at u = i sh + a - top >= 0
        i1 = min(h, (oh - 1 + top - a) // sh + 1) if oh - 1 + top - a >= 0 else 0
        for b in range(kw):
            j0 = max(0, -(-(left - b) // sw))
            j1 = min(w, (ow - 1 + left - b) // sw + 1) if ow - 1 + left - b >= 0 else 0
            if i1 > i0 and j1 > j0:
                u0, v0 = i0 * sh + a - top, j0 * sw + b - left
                out[:, :, u0 : u0 + (i1 - i0 - 1) * sh + 1 : sh, v0 : v0 + (j1 - j0 - 1) * sw + 1 : sw] += \
                    c6[:, :, a, b, i0:i1, j0:j1]


@kernel(_col2im_np)
def col2im(cols, kh, kw, sh, sw, top, left, h, w, out):
    """out[n, o, i sh + a - top, j sw + b - left] += cols[n, (o, a, b), i w + j] over the taps (a, b)
    and input pixels (i, j) whose target lies in out (B, C_out, OH, OW) (zeroed first; targets outside
    it are cropped away). cols : (B, C_out kH kW, h w), the per-pixel contributions of a transposed
    convolution."""
    bsz, c_out, oh, ow = out.shape
    for n in range(bsz):
        for o in range(c_out):
            y = out[n, o]
            y[:, :] = 0.0
            for a in range(kh):
                for b in range(kw):
                    src = cols[n, (o * kh + a) * kw + b]
                    for i in range(h):
                        u = i * sh + a - top
                        if u < 0 or u >= oh:
                            continue
                        for j in range(w):
                            v = j * sw + b - left
                            if v >= 0 and v < ow:
                                y[u, v] += src[i * w + j]
