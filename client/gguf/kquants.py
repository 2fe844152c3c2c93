"""Q4_K and Q6_K block encoders, which the `gguf` package can read but not write.

Both are llama.cpp's "K-quants": super-blocks of 256 values (`QK_K`).

Q4_K (144 bytes a block): fp16 `d` and `dmin`, 12 bytes of eight 6-bit
sub-block scales and eight 6-bit mins, then 128 bytes of 4-bit codes. A value
of sub-block `i` (32 values) is `d * sc[i] * q - dmin * m[i]`, `q` in 0..15.
Codes of values `64j + l` and `64j + 32 + l` share byte `32j + l` (low, high
nibble). The scales pack as llama.cpp's `get_scale_min_k4` reads them: bytes
0-3 hold `sc[0..3]` in their low 6 bits and `sc[4..7] >> 4` in their top 2,
bytes 4-7 the same for the mins, bytes 8-11 `sc[4..7] & 15 | (m[4..7] & 15) << 4`.

Q6_K (210 bytes a block): 128 bytes of low nibbles, 64 bytes of high 2-bit
pairs, sixteen int8 sub-block scales, fp16 `d`. A value of sub-block `i` (16
values) is `d * sc[i] * (q - 32)`, `q` in 0..63.

The scale search is simpler than llama.cpp's reference (`make_qkx2_quants`,
`make_qx_quants`): a small grid of candidate scales per sub-block, each
refitted by least squares to its codes, the best kept. The files are read by
llama.cpp as its own; the tests check the layout by decoding with the `gguf`
package's dequantizers and by loading in llama.cpp.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray

QK_K = 256
Q4_K_BYTES = 144
Q6_K_BYTES = 210
_GRID = np.linspace(-0.5, 0.5, 11, dtype=np.float32)  # offsets of the tried inverse scales

Float = NDArray[np.float32]
Bytes = NDArray[np.uint8]


def _fp16(values: Float) -> Bytes:
    return values.astype(np.float16).reshape(-1, 1).view(np.uint8)


def _fit_min_scale(x: Float) -> tuple[Float, Float]:
    """Per row of `x` (n, 32): scale `s` >= 0 and min `m` >= 0 with x ~ s * q - m, q in 0..15."""
    low = np.minimum(x.min(axis=1), 0.0)
    high = x.max(axis=1)
    span = np.maximum(high - low, 1e-30)
    best_s = span / 15.0
    best_m = -low
    best_err = _q4_error(x, best_s, best_m)
    for offset in _GRID:
        inverse = (15.0 + offset) / span
        q = np.clip(np.rint((x - low[:, None]) * inverse[:, None]), 0, 15)
        # least squares of x ~ s * q - m over the codes
        n = x.shape[1]
        sq = q.sum(axis=1)
        sqq = (q * q).sum(axis=1)
        sx = x.sum(axis=1)
        sqx = (q * x).sum(axis=1)
        det = n * sqq - sq * sq
        ok = det > 0
        s = np.where(ok, (n * sqx - sq * sx) / np.where(ok, det, 1), best_s)
        m = np.where(ok, (sq * sqx - sqq * sx) / np.where(ok, det, 1), best_m)
        m = np.maximum(m, 0.0)
        s = np.maximum(s, 0.0)
        err = _q4_error(x, s, m)
        better = err < best_err
        best_s = np.where(better, s, best_s)
        best_m = np.where(better, m, best_m)
        best_err = np.where(better, err, best_err)
    return best_s.astype(np.float32), best_m.astype(np.float32)


def _q4_error(x: Float, s: Float, m: Float) -> Float:
    safe = np.where(s > 0, s, 1.0)
    q = np.clip(np.rint((x + m[:, None]) / safe[:, None]), 0, 15)
    result: Float = ((s[:, None] * q - m[:, None] - x) ** 2).sum(axis=1)
    return result


def quantize_q4_k(values: Float) -> Bytes:
    """Rows of `values` (any count of 256-value blocks per row) as Q4_K bytes, row-major."""
    rows, columns = values.shape
    blocks = values.reshape(-1, QK_K).astype(np.float32)
    n = blocks.shape[0]
    sub = blocks.reshape(n * 8, 32)
    s, m = _fit_min_scale(sub)
    s = s.reshape(n, 8)
    m = m.reshape(n, 8)
    d = s.max(axis=1) / 63.0
    dmin = m.max(axis=1) / 63.0
    sc = np.clip(np.rint(s / np.where(d > 0, d, 1.0)[:, None]), 0, 63).astype(np.uint8)
    mn = np.clip(np.rint(m / np.where(dmin > 0, dmin, 1.0)[:, None]), 0, 63).astype(np.uint8)
    d16 = d.astype(np.float16).astype(np.float32)
    dmin16 = dmin.astype(np.float16).astype(np.float32)
    scale = (d16[:, None] * sc).reshape(n, 8, 1)
    offset = (dmin16[:, None] * mn).reshape(n, 8, 1)
    safe = np.where(scale > 0, scale, 1.0)
    q = np.clip(np.rint((blocks.reshape(n, 8, 32) + offset) / safe), 0, 15).astype(np.uint8)
    q = np.where(scale > 0, q, 0).astype(np.uint8)
    packed_scales = np.zeros((n, 12), dtype=np.uint8)
    packed_scales[:, 0:4] = (sc[:, 0:4] & 63) | ((sc[:, 4:8] >> 4) << 6)
    packed_scales[:, 4:8] = (mn[:, 0:4] & 63) | ((mn[:, 4:8] >> 4) << 6)
    packed_scales[:, 8:12] = (sc[:, 4:8] & 15) | ((mn[:, 4:8] & 15) << 4)
    pairs = q.reshape(n, 4, 2, 32)  # chunk j of 64 values: low nibble then high nibble
    qs = (pairs[:, :, 0, :] | (pairs[:, :, 1, :] << 4)).reshape(n, 128)
    out = np.concatenate([_fp16(d), _fp16(dmin), packed_scales, qs], axis=1)
    return out.reshape(rows, columns // QK_K * Q4_K_BYTES)


def _fit_symmetric(x: Float) -> Float:
    """Per row of `x` (n, 16): scale `s` with x ~ s * q, q in -32..31 (sign kept so the
    largest magnitude maps to -32, as llama.cpp does)."""
    index = np.abs(x).argmax(axis=1)
    peak = x[np.arange(x.shape[0]), index]
    best = np.where(peak != 0, peak / -32.0, 0.0).astype(np.float32)
    best_err = _q6_error(x, best)
    for offset in _GRID:
        inverse = np.where(peak != 0, -(32.0 + offset) / np.where(peak != 0, peak, 1.0), 0.0)
        q = np.clip(np.rint(x * inverse[:, None]), -32, 31)
        qq = (q * q).sum(axis=1)
        s = np.where(qq > 0, (q * x).sum(axis=1) / np.where(qq > 0, qq, 1.0), 0.0)
        err = _q6_error(x, s.astype(np.float32))
        better = err < best_err
        best = np.where(better, s, best).astype(np.float32)
        best_err = np.where(better, err, best_err)
    return best


def _q6_error(x: Float, s: Float) -> Float:
    safe = np.where(s != 0, s, 1.0)
    q = np.where(s[:, None] != 0, np.clip(np.rint(x / safe[:, None]), -32, 31), 0)
    result: Float = ((s[:, None] * q - x) ** 2).sum(axis=1)
    return result


def quantize_q6_k(values: Float) -> Bytes:
    """Rows of `values` (any count of 256-value blocks per row) as Q6_K bytes, row-major."""
    rows, columns = values.shape
    blocks = values.reshape(-1, QK_K).astype(np.float32)
    n = blocks.shape[0]
    s = _fit_symmetric(blocks.reshape(n * 16, 16)).reshape(n, 16)
    index = np.abs(s).argmax(axis=1)
    peak = s[np.arange(n), index]
    d = np.where(peak != 0, peak / -128.0, 0.0).astype(np.float32)
    sc = np.clip(np.rint(s / np.where(d != 0, d, 1.0)[:, None]), -128, 127).astype(np.int8)
    d16 = d.astype(np.float16).astype(np.float32)
    scale = (d16[:, None] * sc.astype(np.float32)).reshape(n, 16, 1)
    safe = np.where(scale != 0, scale, 1.0)
    q = np.clip(np.rint(blocks.reshape(n, 16, 16) / safe), -32, 31)
    q = np.where(scale != 0, q, 0)
    codes = (q + 32).astype(np.uint8).reshape(n, 2, 4, 32)  # half h, quarter k, lane l
    ql = np.concatenate(
        [
            codes[:, :, 0, :] & 15 | ((codes[:, :, 2, :] & 15) << 4),
            codes[:, :, 1, :] & 15 | ((codes[:, :, 3, :] & 15) << 4),
        ],
        axis=2,
    ).reshape(n, 128)
    qh = (
        (codes[:, :, 0, :] >> 4)
        | ((codes[:, :, 1, :] >> 4) << 2)
        | ((codes[:, :, 2, :] >> 4) << 4)
        | ((codes[:, :, 3, :] >> 4) << 6)
    ).reshape(n, 64)
    out = np.concatenate([ql, qh, sc.view(np.uint8), _fp16(d)], axis=1)
    return out.reshape(rows, columns // QK_K * Q6_K_BYTES)


__all__ = ["QK_K", "quantize_q4_k", "quantize_q6_k"]
