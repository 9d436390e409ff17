"""float64 references for the fused bf16 vision encoder (tests/test_cpu_vision_encoder.py): the same arithmetic as
the kernels (operands rounded to bf16 at each product, the attention's online softmax over blocks of 64 keys with
its probabilities rounded after each block's shift), with error bounds for the float32 sums.

The products' operands are float32 values the kernel computed itself (LN outputs, q/k/v, probabilities, GELU
outputs), so the kernel and the reference round slightly different numbers: where a value lies within its float32
error of a bf16 rounding midpoint, the two may round it to neighbouring bf16 values (a "flip", one bf16 step). The
attention bound counts those flips exactly (`attention`); through a whole encoder they propagate, so `encoder`
can instead round every such value the other way (flip=True): a reference that flips everything the kernel
likely could."""
from __future__ import annotations

import numpy as np

U32 = 2.0**-24  # float32 unit roundoff
BLOCK = 64      # keys per online-softmax step (csrc/cpu/vision_attention.cpp kKeys)


def gamma(n: int) -> float:
    """Higham's bound on the relative error (to the sum of |terms|) of a float32 sum of n terms."""
    return n * U32 / (1 - n * U32)


def likely(n: int) -> float:
    """Higham and Mary's probabilistic bound for the same, 3 sqrt(n) u: sums whose rounding errors behave like
    independent random variables exceed it with a probability of order n exp(-4.5). For where a kernel may flip a
    rounding, not for bounds."""
    return 3 * np.sqrt(n) * U32


def spacing(v: np.ndarray) -> np.ndarray:
    """The bf16 step at |v| (8 significant bits); 0 at 0."""
    a = np.abs(v)
    with np.errstate(divide="ignore"):
        return np.where(a > 0, 2.0 ** (np.floor(np.log2(np.where(a > 0, a, 1.0))) - 7), 0.0)


def bf16(v, delta=None) -> np.ndarray:
    """v (float64) rounded to bf16, nearest even. delta (>= 0, v's shape): where v is within delta of a rounding
    midpoint, the other neighbour instead: what a kernel whose value is off by up to delta may pick."""
    v = np.asarray(v, dtype=np.float64)
    m, e = np.frexp(v)
    r = np.ldexp(np.round(m * 256) / 256, e)
    if delta is None:
        return r
    sp = spacing(v)
    a = np.abs(v)
    low = np.floor(a / np.where(sp > 0, sp, 1)) * sp  # the bf16 value at or below |v|
    near = np.abs(a - (low + sp / 2)) <= delta
    other = np.where(np.abs(r) == low, low + sp, low) * np.sign(v)
    return np.where(near & (sp > 0), other, r)


def midpoint_distance(v: np.ndarray) -> np.ndarray:
    """How far |v| is from the nearest bf16 rounding midpoint."""
    sp = spacing(v)
    frac = np.abs(v) / np.where(sp > 0, sp, 1)
    return np.abs(frac - np.floor(frac) - 0.5) * sp


def layer_norm(x, w, b, eps, err=gamma):
    """(y, its float32 error bound): two passes as small_ops.cpp, D terms each."""
    D = x.shape[-1]
    xc = x - x.mean(-1, keepdims=True)
    y = xc / np.sqrt((xc * xc).mean(-1, keepdims=True) + eps) * w
    return y + b, err(2 * D + 8) * (np.abs(y) + np.abs(b))


def gelu(z):
    return 0.5 * z * (1 + np.tanh(np.sqrt(2 / np.pi) * (z + 0.044715 * z**3)))


def gelu_slope(z):
    return (gelu(z + 1e-6) - gelu(z - 1e-6)) / 2e-6


def linear(x, w, b, delta=None, err=gamma):
    """(bf16(x) @ bf16(w).T + b, the float32 error bound of the sum): x rounded as the kernel rounds its input
    (flipped within delta when given), w exactly as packed."""
    xb, wb = bf16(x, delta), bf16(w)
    K = x.shape[-1]
    return xb @ wb.T + b, err(K + 2) * (np.abs(xb) @ np.abs(wb).T + np.abs(b))


def attention(qkv, B, S, H, mask, scale, delta=None, flip=False, err=gamma):
    """The encoder's attention in float64: qkv [B*S, 3 H Dh] -> (out [B*S, H Dh], bound [B*S, H Dh]).

    q, k, v are bf16(qkv) (flipped within delta with flip=True); scores scale q.k with -inf at masked keys; per block
    of 64 keys the running max m, p = bf16(exp(s - m)), l and the output rescaled by exp(old m - new m); out = O / l.
    The bound: float32 sums (scores over Dh, O and l over the keys and rescalings), the rescaling factors' error,
    and, unless flip, one bf16 step of every probability whose float32 error can reach a rounding midpoint."""
    Dh = qkv.shape[1] // (3 * H)
    parts = np.split(bf16(qkv, delta if flip else None), 3, axis=1)
    q, k, v = (a.reshape(B, S, H, Dh).transpose(0, 2, 1, 3) for a in parts)  # [B, H, S, Dh]
    s = scale * (q @ k.transpose(0, 1, 3, 2))  # [B, H, Sq, Sk]
    s_err = scale * err(Dh + 2) * (np.abs(q) @ np.abs(k).transpose(0, 1, 3, 2)) + U32 * np.abs(s)
    if mask is not None:
        s = np.where(mask[:, None, None, :], s, -np.inf)
        s_err = np.where(mask[:, None, None, :], s_err, 0)
    blocks = -(-S // BLOCK)
    block_of = np.arange(S) // BLOCK  # [Sk]
    block_max = np.stack([s[..., j * BLOCK:(j + 1) * BLOCK].max(-1) for j in range(blocks)], -1)  # [B, H, Sq, nb]
    running = np.maximum.accumulate(block_max, axis=-1)
    shift = np.where(np.isneginf(running), 0.0, running)  # the kernel's shift while every key so far is masked
    shift_k = shift[..., block_of]  # [B, H, Sq, Sk]: the shift key k's probability was taken at
    p = np.exp(s - shift_k)
    row_err = s_err.max(-1, keepdims=True)  # the running max is off by at most the largest score error
    p_rel = s_err + row_err + 16 * U32  # p's relative float32 error (+ exp16's, a few ulp)
    pb = bf16(p, p_rel * p if flip else None)
    factor = np.exp(shift_k - shift[..., -1:])  # the rescalings after key k's block
    w = pb * factor
    l = w.sum(-1, keepdims=True)  # [B, H, Sq, 1]
    o = (w @ v) / l  # [B, H, Sq, Dh]
    # first order: o = sum w v / sum w moves by sum dw (v - o) / l for weight errors dw
    dw = w * blocks * (2 * row_err + 2.0**-20)  # the rescaling factors (exp16 of shifts off by row_err)
    if not flip:  # a flipped probability (1 + 2^-7: l moves with it, second order)
        dw = dw + (midpoint_distance(p) <= p_rel * p) * spacing(p) * factor * (1 + 2.0**-7)
    spread = np.abs(v[:, :, None, :, :] - o[:, :, :, None, :])  # [B, H, Sq, Sk, Dh]
    bound = (dw[..., None] * spread).sum(-2) / l
    bound += err(S + 2 * blocks + 16) * ((w @ np.abs(v)) / l + np.abs(o)) + 2 * U32 * np.abs(o)
    to_rows = lambda a: a.transpose(0, 2, 1, 3).reshape(B * S, H * Dh)
    return to_rows(o), to_rows(bound)


def encoder(layers, post, heads, eps, x, B, S, mask, flip=False):
    """The fused encoder's arithmetic in float64 over x [B*S, D]: bf16 operands at every product, float32-style
    LayerNorms and sums. flip: every operand whose likely float32 error (`likely`) reaches a bf16 rounding midpoint
    rounded to the other neighbour."""
    x = x.astype(np.float64)
    Dh = x.shape[1] // heads
    scale = float(np.float32(1) / np.sqrt(np.float32(Dh)))
    for L in layers:
        h, dh = layer_norm(x, L["ln1_weight"], L["ln1_bias"], eps, likely)
        qkv, dqkv = product(h, dh, L["qkv_weight"], L["qkv_bias"], flip)
        a, da = attention(qkv, B, S, heads, mask, scale, dqkv, flip, likely)
        x = x + product(a, da, L["out_weight"], L["out_bias"], flip)[0]
        h, dh = layer_norm(x, L["ln2_weight"], L["ln2_bias"], eps, likely)
        u, du = product(h, dh, L["fc1_weight"], L["fc1_bias"], flip)
        g, dg = gelu(u), np.abs(gelu_slope(u)) * du + 4 * U32 * np.abs(u)
        x = x + product(g, dg, L["fc2_weight"], L["fc2_bias"], flip)[0]
    return layer_norm(x, post[0], post[1], eps)[0]


def product(x, dx, w, b, flip):
    """bf16(x) @ bf16(w).T + b and its likely float32 error; x flipped within its own dx when flip."""
    return linear(x, w, b, dx if flip else None, likely)
