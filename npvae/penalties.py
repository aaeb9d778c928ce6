"""Penalties on an encoder's code and on its Jacobian: the sparse and contractive autoencoders' regularisers.

Pure forward/backward pairs in the conventions of :mod:`npvae.ops` (``forward -> (value, cache)``,
``backward(dvalue, cache) -> grads``, ``dfoo`` of ``foo``'s shape, reductions as in ops' table):

- :func:`l1_activity_forward` / :func:`l1_activity_backward`: ``sum_j |h_ij|`` per example, Keras'
  ``activity_regularizer=l1(w)`` without the weight;
- :func:`kl_sparsity_forward` / :func:`kl_sparsity_backward`: ``sum_j KL(rho || rho_hat_j)`` with
  ``rho_hat`` the batch's mean activation of unit j (Ng's sparse autoencoder notes);
- :func:`batch_l2_norm_forward` / :func:`batch_l2_norm_backward`: ``||Z||_F``, one norm of a whole batch
  of codes (the poor man's VAE's write-up);
- :func:`contractive_penalty_forward` / :func:`contractive_penalty_backward`: ``||dh/dx||_F^2`` per
  example for a stack of dense layers ``h = f_L(W_L f_{L-1}(... f_1(W_1 x + b_1) ...) + b_L)``
  (Rifai et al. 2011), closed form for one layer, exact for any depth; its gradient needs the
  activations' second derivatives (:func:`activation_derivatives`).

NumPy only: the work is a few matrix products per layer, which BLAS does; no loop here is worth a kernel.
"""

from __future__ import annotations

import numpy as np

from .ops import ACTIVATIONS, _buffer, _check_reduction, _float_array, _reduce, _row_scale, activation_info


# ----------------------------------------------------------------------------- activation derivatives


def activation_derivatives(y, name: str, alpha: float = 0.01):
    """First and second derivatives of an activation, read off its output ``y = f(a)``.

    ==============  =============================  ==================================================
    name            f'(a)                          f''(a)
    ==============  =============================  ==================================================
    ``identity``    1                              0
    ``relu``        [y > 0]                        0 (almost everywhere; torch's double backward too)
    ``leaky_relu``  1 if y > 0 else alpha          0
    ``sigmoid``     y (1 - y)                      y (1 - y) (1 - 2y)
    ``tanh``        1 - y^2                        -2 y (1 - y^2)
    ``softplus``    s = -expm1(-y) (= sigmoid(a))  s e^{-y} (= sigmoid(a) (1 - sigmoid(a)))
    ==============  =============================  ==================================================

    Parameters
    ----------
    y : (B, H) array, the activation's output
    name : str, one of :data:`npvae.ops.ACTIVATIONS`
    alpha : float, LeakyReLU's slope

    Returns
    -------
    d1, d2 : (B, H) arrays of y's dtype, f'(a) and f''(a)
    """
    entry = ACTIVATIONS[name]
    y = _float_array(y, "y", ndim=None)
    d1 = entry.derivative(y, alpha)
    return d1, entry.second_derivative(y, d1, alpha)


# ----------------------------------------------------------------------------- sparsity


def l1_activity_forward(h, reduction="none"):
    """The L1 activity penalty of a code, per example (Keras ``activity_regularizer=l1``, unweighted).

    .. math:: \\Omega_i = \\textstyle\\sum_j |h_{ij}|

    Parameters
    ----------
    h : (B, H) array
    reduction : {"none", "sum", "batchmean", "mean"}

    Returns
    -------
    loss : (B,) array or scalar
    cache : tuple ``(h, reduction)``
    """
    h = _float_array(h, "h")
    _check_reduction(reduction)
    rows = np.abs(h).sum(axis=1, dtype=np.float64).astype(h.dtype)
    return _reduce(rows, reduction, h.shape[1]), (h, reduction)


def l1_activity_backward(dloss, cache, out=None):
    """Backward of :func:`l1_activity_forward`.

    .. math:: dh_{ij} = \\frac{\\partial L}{\\partial \\Omega_i} \\operatorname{sign}(h_{ij})

    with sign(0) = 0 (torch's subgradient of ``abs`` at 0).

    Parameters
    ----------
    dloss : (B,) array for reduction "none", else a scalar
    cache : from :func:`l1_activity_forward`
    out : (B, H) array, optional

    Returns
    -------
    dh : (B, H) array
    """
    h, reduction = cache
    scale = _row_scale(dloss, reduction, h.shape[0], h.shape[1], h.dtype)  # (B,)
    out = _buffer(out, h.shape, h.dtype, "out")
    np.sign(h, out=out)
    out *= scale[:, None]
    return out


def kl_sparsity_forward(h, target: float):
    """The KL sparsity penalty: each unit's mean activation over the batch pulled towards ``target``.

    .. math:: \\hat\\rho_j = \\tfrac{1}{B} \\textstyle\\sum_i h_{ij}, \\qquad
              \\Omega = \\textstyle\\sum_j \\rho \\log\\frac{\\rho}{\\hat\\rho_j}
              + (1 - \\rho) \\log\\frac{1 - \\rho}{1 - \\hat\\rho_j}

    One number per batch (a statistic of the batch, not a sum over examples). The codes must lie in
    [0, 1] (sigmoid codes); ``rho_hat`` is clamped into [eps, 1 - eps] (eps the dtype's machine
    epsilon), where a saturated unit's float32 mean can land on 0 or 1, with the clamp's gradient
    (zero outside) in the backward.

    Parameters
    ----------
    h : (B, H) array with values in [0, 1]
    target : float in (0, 1), rho

    Returns
    -------
    loss : scalar of h's dtype
    cache : tuple ``(rho_hat, inside, target, B)``: rho_hat (H,) clamped, inside (H,) bool
    """
    h = _float_array(h, "h")
    target = float(target)
    if not 0.0 < target < 1.0:
        raise ValueError(f"expected the sparsity target rho in (0, 1), got {target}")
    if h.size and (h.min() < 0 or h.max() > 1):
        raise ValueError(f"the KL sparsity penalty needs codes in [0, 1] (sigmoid codes), got range "
                         f"[{h.min():g}, {h.max():g}]")
    eps = float(np.finfo(h.dtype).eps)
    mean = h.mean(axis=0, dtype=np.float64)  # (H,)
    inside = (mean >= eps) & (mean <= 1 - eps)
    rho_hat = np.clip(mean, eps, 1 - eps)
    kl = target * np.log(target / rho_hat) + (1 - target) * np.log((1 - target) / (1 - rho_hat))
    return h.dtype.type(kl.sum()), (rho_hat.astype(h.dtype), inside, target, h.shape[0])


def kl_sparsity_backward(dloss, cache, out=None):
    """Backward of :func:`kl_sparsity_forward`.

    .. math:: dh_{ij} = \\frac{dL}{d\\Omega} \\frac{1}{B}
              \\left(\\frac{1 - \\rho}{1 - \\hat\\rho_j} - \\frac{\\rho}{\\hat\\rho_j}\\right)
              [\\epsilon \\le \\hat\\rho_j \\le 1 - \\epsilon]
              = \\frac{dL}{d\\Omega} \\frac{1}{B} \\frac{\\hat\\rho_j - \\rho}{\\hat\\rho_j (1 - \\hat\\rho_j)}
              [\\ldots]

    The same for every example i (each contributes 1/B of the mean). Computed in the second form,
    which does not cancel when rho_hat is near rho (the first loses digits there).

    Parameters
    ----------
    dloss : scalar
    cache : from :func:`kl_sparsity_forward`
    out : (B, H) array, optional

    Returns
    -------
    dh : (B, H) array
    """
    rho_hat, inside, target, batch = cache
    if np.ndim(dloss) != 0:
        raise ValueError(f"expected a scalar dloss (the KL sparsity penalty is one number per batch), got shape "
                         f"{np.shape(dloss)}")
    one = rho_hat.dtype.type(1)
    col = (rho_hat - target) / (rho_hat * (one - rho_hat)) * (float(dloss) / batch)  # (H,)
    col[~inside] = 0
    out = _buffer(out, (batch, rho_hat.shape[0]), rho_hat.dtype, "out")
    out[...] = col
    return out


# ----------------------------------------------------------------------------- the batch's code norm


def batch_l2_norm_forward(z):
    """One Euclidean norm of a whole batch of codes: the poor man's VAE's penalty as its write-up computes
    it (``z.pow(2).sum().sqrt()``), beside :func:`npvae.ops.l2_norm_forward`'s one norm per example.

    .. math:: \\Omega = \\lVert Z \\rVert_F = \\sqrt{\\textstyle\\sum_{i,j} z_{ij}^2}

    One number per batch (a statistic of the batch, like :func:`kl_sparsity_forward`). For codes of
    similar size it is about sqrt(B) times one example's norm, so a batch mean of per-example norms
    weighs the codes about sqrt(B) times more than this norm shared out over the batch (Omega / B each).

    Parameters
    ----------
    z : (B, Z) array

    Returns
    -------
    norm : scalar of z's dtype
    cache : tuple ``(z, norm)``, the norm accumulated in float64
    """
    z = _float_array(z, "z")
    norm = float(np.sqrt(np.square(z, dtype=np.float64).sum()))
    return z.dtype.type(norm), (z, norm)


def batch_l2_norm_backward(dloss, cache, out=None):
    """Backward of :func:`batch_l2_norm_forward`.

    .. math:: dz_{ij} = \\frac{dL}{d\\Omega} \\frac{z_{ij}}{\\lVert Z \\rVert_F}, \\qquad dZ = 0
              \\text{ where } Z = 0

    At Z = 0 the norm has no gradient; 0 is its minimal-norm subgradient (``torch.linalg.vector_norm``
    returns the same; the write-up's ``z.pow(2).sum().sqrt()`` gives NaN there, which no run should train on).

    Parameters
    ----------
    dloss : scalar
    cache : from :func:`batch_l2_norm_forward`
    out : (B, Z) array, optional

    Returns
    -------
    dz : (B, Z) array
    """
    z, norm = cache
    if np.ndim(dloss) != 0:
        raise ValueError(f"expected a scalar dloss (the batch's code norm is one number per batch), got shape "
                         f"{np.shape(dloss)}")
    out = _buffer(out, z.shape, z.dtype, "out")
    if norm == 0.0:
        out.fill(0)
        return out
    np.multiply(z, z.dtype.type(float(dloss) / norm), out=out)
    return out


# ----------------------------------------------------------------------------- contraction


def _stacked(a, m):
    """``a[b] @ m`` for every b: (B, n, k) @ (k, p) -> (B, n, p) as one matrix product (a broadcast
    stacked matmul runs one small product per b, several times slower)."""
    flat = np.ascontiguousarray(a).reshape(-1, a.shape[2])  # (B n, k)
    return (flat @ m).reshape(a.shape[0], a.shape[1], m.shape[1])


def _transposed(a):
    """Each matrix of a stack (B, n, k) transposed: (B, k, n), contiguous."""
    return np.ascontiguousarray(a.transpose(0, 2, 1))


def _check_dense_caches(caches):
    """The layers of ``caches`` (from :func:`npvae.ops.dense_forward`) as (x, w, y, name, alpha)."""
    if not isinstance(caches, (list, tuple)) or not caches:
        raise ValueError("expected a non-empty list of dense_forward caches, one per encoder layer")
    layers = []
    for i, cache in enumerate(caches):
        if not (isinstance(cache, tuple) and len(cache) == 5):
            raise ValueError(f"layer {i}: expected a dense_forward cache (x, w, y, code, alpha), got "
                             f"{type(cache).__name__}")
        x, w, y, code, alpha = cache
        if i and x.shape != layers[-1][2].shape:
            raise ValueError(f"layer {i}: its input {x.shape} is not layer {i - 1}'s output {layers[-1][2].shape}")
        layers.append((x, w, y, activation_info(code).name, alpha))
    return layers


def contractive_penalty_forward(caches, reduction="none"):
    """The squared Frobenius norm of a dense stack's Jacobian, per example (Rifai et al. 2011).

    For layers ``a_l = h_{l-1} W_l^T + b_l``, ``h_l = f_l(a_l)``, ``h_0 = x`` and ``d_l = f_l'(a_l)``,
    example i's Jacobian is ``J_i = diag(d_L) W_L ... diag(d_1) W_1`` (H_L, D) and

    .. math:: \\Omega_i = \\|J_i\\|_F^2 = \\operatorname{tr}(J_i J_i^T)

    One layer, the closed form (sigmoid: ``sum_j (h_j (1 - h_j))^2 ||W_j||^2``):

    .. math:: \\Omega_i = \\textstyle\\sum_j d_{ij}^2 \\|W_j\\|^2

    Deeper stacks, through the Gram matrices of the partial Jacobians (never the (H, D) Jacobian itself,
    so the cost is independent of D after the first product): ``S_1 = W_1 W_1^T``,
    ``K_l = S_l * d_l d_l^T`` (elementwise), ``S_l = W_l K_{l-1} W_l^T`` and

    .. math:: \\Omega_i = \\operatorname{tr} K_L = \\textstyle\\sum_j d_{L,j}^2 (S_L)_{jj},
              \\quad (S_L)_{jj} = w_{L,j}^T K_{L-1} w_{L,j}

    which reads the one-layer formula with ``K_0 = I``. Memory: two (B, H_l, H_l) arrays per layer
    below the last.

    Parameters
    ----------
    caches : list of :func:`npvae.ops.dense_forward` caches, first layer first
        ``(x, w, y, code, alpha)``: each layer's input (B, H_{l-1}), weights (H_l, H_{l-1}) and output
        (B, H_l); the first layer's input is x (B, D).
    reduction : {"none", "sum", "batchmean", "mean"}

    Returns
    -------
    loss : (B,) array or scalar
    cache : tuple for :func:`contractive_penalty_backward`
    """
    _check_reduction(reduction)
    layers = _check_dense_caches(caches)
    derivs = [activation_derivatives(y, name, alpha) for _, _, y, name, alpha in layers]
    grams, ks = [], []  # S_l and K_l for the layers below the last
    k = None  # K_{l-1}; None stands for the identity K_0
    for (x, w, y, _, _), (d1, _) in zip(layers[:-1], derivs[:-1]):
        s = w @ w.T if k is None else _stacked(_transposed(_stacked(k, w.T)), w.T)  # (H, H) or (B, H, H): W K W^T
        k = s * d1[:, :, None] * d1[:, None, :]  # (B, H, H)
        grams.append(s)
        ks.append(k)
    w_last, d_last = layers[-1][1], derivs[-1][0]
    wk = None if k is None else _transposed(_stacked(k, w_last.T))  # (B, H_L, H_{L-1}): W_L K, K symmetric
    q = np.einsum("ij,ij->i", w_last, w_last) if k is None else np.einsum("bij,ij->bi", wk, w_last)  # (H_L,) or (B, H_L)
    rows = np.einsum("bj,bj->b", d_last * d_last, np.broadcast_to(q, d_last.shape))
    rows = rows.astype(d_last.dtype, copy=False)
    x0 = layers[0][0]
    return _reduce(rows, reduction, x0.shape[1] * w_last.shape[0]), (layers, derivs, grams, ks, wk, q, reduction)


def contractive_penalty_backward(dloss, cache, need_dx: bool = True):
    """Backward of :func:`contractive_penalty_forward`: gradients w.r.t. every weight, bias and the input.

    Write ``s_i`` for dL/dOmega_i. Two paths reach the parameters: the weights appear in the
    Jacobian itself, and every layer's pre-activation ``a_l`` moves ``d_l = f_l'(a_l)`` (whose
    derivative is ``e_l = f_l''(a_l)``).

    Top layer, from ``Omega = sum_j d_j^2 q_j`` with ``q_j = (S_L)_{jj}``:

    .. math:: \\bar d_L = 2 s\\, d_L \\odot q, \\quad \\bar q = s\\, d_L^2, \\quad
              \\bar W_L \\mathrel{+}= 2 \\textstyle\\sum_i \\operatorname{diag}(\\bar q_i) W_L K_{L-1,i},
              \\quad \\bar K_{L-1} = W_L^T \\operatorname{diag}(\\bar q) W_L

    Going down (l = L-1, ..., 1), with every K, S, Kbar and Sbar symmetric,

    .. math:: \\bar S_l = \\bar K_l \\odot d_l d_l^T, \\quad
              \\bar d_l = 2 (\\bar K_l \\odot S_l)\\, d_l, \\quad
              \\bar W_l \\mathrel{+}= 2 \\textstyle\\sum_i \\bar S_{l,i} W_l K_{l-1,i}, \\quad
              \\bar K_{l-1} = W_l^T \\bar S_l W_l

    (for l = 1, ``K_0 = I`` and ``S_1 = W_1 W_1^T``: ``Wbar_1 += 2 (sum_i Sbar_{1,i}) W_1``).

    The second-order path then runs like an ordinary backward pass from the top,
    ``g_L = dbar_L * e_L`` and, below,

    .. math:: g_l = (g_{l+1} W_{l+1}) \\odot d_l + \\bar d_l \\odot e_l, \\quad
              \\bar W_l \\mathrel{+}= g_l^T h_{l-1}, \\quad \\bar b_l = \\textstyle\\sum_i g_{l,i},
              \\quad \\bar x = g_1 W_1

    One layer: ``dbar = 2 s d * ||W_j||^2``, ``Wbar = 2 (sum_i s_i d_i^2)_j W_j + (dbar * e)^T x``.

    Parameters
    ----------
    dloss : (B,) array for reduction "none", else a scalar
    cache : from :func:`contractive_penalty_forward`
    need_dx : bool
        Also return dL/dx (the first layer's input); None when False.

    Returns
    -------
    dx : (B, D) array or None
    dws : list of (H_l, H_{l-1}) arrays, first layer first
    dbs : list of (H_l,) arrays
    """
    layers, derivs, grams, ks, wk, q, reduction = cache
    x0, w_last = layers[0][0], layers[-1][1]
    d_last = derivs[-1][0]
    batch = x0.shape[0]
    s = _row_scale(dloss, reduction, batch, x0.shape[1] * w_last.shape[0], d_last.dtype)  # (B,)
    n = len(layers)
    dws = [None] * n
    dbars = [None] * n

    qbar = s[:, None] * d_last * d_last  # (B, H_L)
    dbars[-1] = 2 * s[:, None] * d_last * q
    if n == 1:
        dws[-1] = 2 * qbar.sum(axis=0)[:, None] * w_last
    else:
        dws[-1] = 2 * np.einsum("bj,bjk->jk", qbar, wk)
        kbar = _stacked(w_last.T * qbar[:, None, :], w_last)  # (B, H_{L-1}, H_{L-1})
        for l in range(n - 2, -1, -1):
            w, d1 = layers[l][1], derivs[l][0]
            sbar = kbar * d1[:, :, None] * d1[:, None, :]
            dbars[l] = 2 * ((kbar * grams[l]) @ d1[:, :, None])[:, :, 0]
            if l == 0:
                dws[0] = 2 * sbar.sum(axis=0) @ w
            else:
                sw = _stacked(sbar, w)  # (B, H_l, H_{l-1}): Sbar W
                k_below = ks[l - 1]
                dws[l] = 2 * (sw.transpose(1, 0, 2).reshape(w.shape[0], -1) @ k_below.reshape(-1, w.shape[1]))
                kbar = _stacked(_transposed(sw), w)  # W^T Sbar W = (Sbar W)^T W

    dbs = [None] * n
    g = None
    for l in range(n - 1, -1, -1):
        x, w = layers[l][0], layers[l][1]
        d1, d2 = derivs[l]
        g_l = dbars[l] * d2
        if g is not None:
            g_l += (g @ layers[l + 1][1]) * d1
        dws[l] = dws[l] + g_l.T @ x
        dbs[l] = g_l.sum(axis=0)
        g = g_l
    dx = g @ layers[0][1] if need_dx else None
    return dx, dws, dbs


def jacobian_frobenius(caches) -> np.ndarray:
    """``||dh/dx||_F`` per example (B,) of the dense stack behind ``caches``: the contraction a
    contractive autoencoder penalises (its square), reported by ``npvae evaluate``."""
    rows, _ = contractive_penalty_forward(caches, "none")
    return np.sqrt(np.maximum(rows, 0))
