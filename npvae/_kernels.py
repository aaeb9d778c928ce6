"""Hot loops, each written once as a Numba-compilable loop and paired with a NumPy twin.

Every kernel writes into caller-provided arrays (the last arguments) and returns nothing, so a
training step can run without allocating. Loops read no globals; row sums accumulate in float64
and are stored in the output's dtype, so float32 stays float32. The math of each op is documented
in :mod:`npvae.ops`, which is the public face of these kernels.

Activation codes (``code`` arguments): see :data:`ACTIVATION_CODES`.
"""

from __future__ import annotations

import math

import numpy as np

from .backend import kernel

ACTIVATION_CODES = {"identity": 0, "relu": 1, "leaky_relu": 2, "sigmoid": 3, "tanh": 4, "softplus": 5}


def _stable_sigmoid(v):
    e = np.exp(-np.abs(v))
    return np.where(v >= 0, 1.0, e) / (1.0 + e)


def _softplus(v):
    return np.maximum(v, 0) + np.log1p(np.exp(-np.abs(v)))


def _rowsum(values, rows):
    rows[...] = np.sum(values, axis=1, dtype=np.float64)


# ----------------------------------------------------------------------------- activations


def _bias_act_forward_np(a, b, code, alpha, out):
    np.add(a, b, out=out)
    if code == 1:
        np.maximum(out, 0, out=out)
    elif code == 2:
        np.multiply(out, np.where(out > 0, 1.0, alpha).astype(out.dtype), out=out)
    elif code == 3:
        out[...] = _stable_sigmoid(out)
    elif code == 4:
        np.tanh(out, out=out)
    elif code == 5:
        out[...] = _softplus(out)


@kernel(_bias_act_forward_np)
def bias_act_forward(a, b, code, alpha, out):
    """out[i, j] = act(a[i, j] + b[j]); ``a`` may alias ``out``."""
    n, m = a.shape
    for i in range(n):
        for j in range(m):
            v = a[i, j] + b[j]
            if code == 1:
                v = v if v > 0 else 0.0
            elif code == 2:
                v = v if v > 0 else alpha * v
            elif code == 3:
                e = math.exp(-abs(v))
                v = 1.0 / (1.0 + e) if v >= 0 else e / (1.0 + e)
            elif code == 4:
                v = math.tanh(v)
            elif code == 5:
                v = max(v, 0.0) + math.log1p(math.exp(-abs(v)))
            out[i, j] = v


def _act_backward_np(dy, y, code, alpha, out):
    if code == 0:
        out[...] = dy
    elif code == 1:
        np.multiply(dy, y > 0, out=out)
    elif code == 2:
        np.multiply(dy, np.where(y > 0, 1.0, alpha).astype(out.dtype), out=out)
    elif code == 3:
        np.multiply(dy, y * (1 - y), out=out)
    elif code == 4:
        np.multiply(dy, 1 - y * y, out=out)
    elif code == 5:
        np.multiply(dy, -np.expm1(-y), out=out)


@kernel(_act_backward_np)
def act_backward(dy, y, code, alpha, out):
    """out = dy * act'(a), with act' written through the output y = act(a); ``dy`` may alias ``out``."""
    n, m = dy.shape
    for i in range(n):
        for j in range(m):
            g = dy[i, j]
            v = y[i, j]
            if code == 1:
                g = g if v > 0 else 0.0
            elif code == 2:
                g = g if v > 0 else alpha * g
            elif code == 3:
                g = g * v * (1.0 - v)
            elif code == 4:
                g = g * (1.0 - v * v)
            elif code == 5:
                g = g * -math.expm1(-v)
            out[i, j] = g


def _bias_grad_np(d, out):
    out[...] = np.sum(d, axis=0, dtype=np.float64)


@kernel(_bias_grad_np)
def bias_grad(d, out):
    """out[j] = sum_i d[i, j]."""
    n, m = d.shape
    acc = np.zeros(m, dtype=np.float64)
    for i in range(n):
        for j in range(m):
            acc[j] += d[i, j]
    for j in range(m):
        out[j] = acc[j]


# ----------------------------------------------------------------------------- reconstruction losses


def _bce_logits_forward_np(logits, target, rows, probs):
    _rowsum(_softplus(logits) - target * logits, rows)
    probs[...] = _stable_sigmoid(logits)


@kernel(_bce_logits_forward_np)
def bce_logits_forward(logits, target, rows, probs):
    """rows[i] = sum_j softplus(l) - x l; probs = sigmoid(l), from one exp(-|l|) per element."""
    n, m = logits.shape
    for i in range(n):
        acc = 0.0
        for j in range(m):
            v = logits[i, j]
            e = math.exp(-abs(v))
            acc += max(v, 0.0) + math.log1p(e) - target[i, j] * v
            probs[i, j] = 1.0 / (1.0 + e) if v >= 0 else e / (1.0 + e)
        rows[i] = acc


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
    for i in range(n):
        for j in range(m):
            s = math.exp(0.5 * logvar[i, j])
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


def _kl_normal_rows_np(mu, logvar, rows):
    _rowsum(0.5 * (mu * mu + np.expm1(logvar) - logvar), rows)


@kernel(_kl_normal_rows_np)
def kl_normal_rows(mu, logvar, rows):
    """rows[i] = 1/2 sum_j (mu^2 + expm1(logvar) - logvar) = KL(N(mu, e^logvar) || N(0, 1))."""
    n, m = mu.shape
    for i in range(n):
        acc = 0.0
        for j in range(m):
            v = logvar[i, j]
            acc += mu[i, j] * mu[i, j] + math.expm1(v) - v
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
            gl = s * 0.5 * math.expm1(logvar[i, j])
            if accumulate:
                dmu[i, j] += gm
                dlogvar[i, j] += gl
            else:
                dmu[i, j] = gm
                dlogvar[i, j] = gl


def _kl_gaussians_rows_np(mu, logvar, mu_p, logvar_p, rows):
    d = logvar - logvar_p
    diff = mu - mu_p
    _rowsum(0.5 * (np.expm1(d) - d + diff * diff * np.exp(-logvar_p)), rows)


@kernel(_kl_gaussians_rows_np)
def kl_gaussians_rows(mu, logvar, mu_p, logvar_p, rows):
    """rows[i] = KL(N(mu, e^logvar) || N(mu_p, e^logvar_p)), summed over j."""
    n, m = mu.shape
    for i in range(n):
        acc = 0.0
        for j in range(m):
            d = logvar[i, j] - logvar_p[i, j]
            diff = mu[i, j] - mu_p[i, j]
            acc += math.expm1(d) - d + diff * diff * math.exp(-logvar_p[i, j])
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
            inv_var_p = math.exp(-logvar_p[i, j])
            diff = mu[i, j] - mu_p[i, j]
            gm = s * diff * inv_var_p
            gl = s * 0.5 * math.expm1(logvar[i, j] - logvar_p[i, j])
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
    rows[...] = np.sqrt(np.sum(z * z, axis=1, dtype=np.float64))


@kernel(_l2_norm_rows_np)
def l2_norm_rows(z, rows):
    """rows[i] = sqrt(sum_j z[i, j]^2)."""
    n, m = z.shape
    for i in range(n):
        acc = 0.0
        for j in range(m):
            acc += z[i, j] * z[i, j]
        rows[i] = math.sqrt(acc)


def _l2_norm_backward_np(z, norms, scale, out):
    positive = norms > 0
    factor = np.where(positive, scale / np.where(positive, norms, 1.0), 0.0)
    np.multiply(z, factor[:, None], out=out)


@kernel(_l2_norm_backward_np)
def l2_norm_backward(z, norms, scale, out):
    """out[i] = scale[i] * z[i] / ||z[i]||, and 0 where ||z[i]|| = 0 (the minimal-norm subgradient)."""
    n, m = z.shape
    for i in range(n):
        r = norms[i]
        f = scale[i] / r if r > 0 else 0.0
        for j in range(m):
            out[i, j] = z[i, j] * f
