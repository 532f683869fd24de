/* graphopt MCU kernels, int8: convolution and fully connected layers on 8-bit
 * activations and int8 symmetric per-channel weights, int32 accumulators, and
 * requantization by a fixed-point multiplier and shift with TFLite Micro's rounding
 * (MultiplyByQuantizedMultiplier). Quantize/dequantize convert at float edges.
 * Define GRAPHOPT_PLAIN_KERNELS for the plain loops (one product at a time, the zero
 * point subtracted from each input): the faster paths below give the same integers. */
#include <math.h>
#include <stdint.h>
#include <string.h>
#if defined(__ARM_FEATURE_SIMD32) && !defined(GRAPHOPT_PLAIN_KERNELS)
#include <arm_acle.h>
#endif

#include "graphopt_kernels.h"

/* round(a * b / 2^31), saturating the one overflowing case (TFLite's
 * SaturatingRoundingDoublingHighMul) */
static int32_t doubling_high_mul(int32_t a, int32_t b)
{
    int64_t ab;
    int32_t nudge;
    if (a == b && a == INT32_MIN)
        return INT32_MAX;
    ab = (int64_t)a * (int64_t)b;
    nudge = ab >= 0 ? (1 << 30) : (1 - (1 << 30));
    return (int32_t)((ab + nudge) / ((int64_t)1 << 31));
}

/* x / 2^exponent rounded half away from zero (TFLite's RoundingDivideByPOT) */
static int32_t divide_by_pot(int32_t x, int exponent)
{
    const int32_t mask = (int32_t)(((int64_t)1 << exponent) - 1);
    const int32_t remainder = x & mask;
    const int32_t threshold = (mask >> 1) + (x < 0 ? 1 : 0);
    return (x >> exponent) + (remainder > threshold ? 1 : 0);
}

int32_t go_requantize(int32_t acc, int32_t multiplier, int shift)
{
    const int left = shift > 0 ? shift : 0, right = shift > 0 ? 0 : -shift;
    return divide_by_pot(doubling_high_mul((int32_t)((uint32_t)acc << left), multiplier),
                         right);
}

static void store(const go_qout *o, int m, long at, int32_t acc)
{
    if (o->y8) {
        int32_t v = o->zp + go_requantize(acc, o->mult[m], (int)o->shift[m]);
        v = v < o->lo ? o->lo : (v > o->hi ? o->hi : v);
        o->y8[at] = (int8_t)v;
    } else {
        float v = (float)acc * o->scale[m];
        o->yf[at] = v < o->flo ? o->flo : (v > o->fhi ? o->fhi : v);
    }
}

/* sum((x[t] - zp) * w[t]) over k int8 pairs, added to acc: the inner loop of the fully
 * connected layer (a convolution's rows are a few pixels: written out there). On a core
 * with the DSP extension (Cortex-M4, M7, M33, M55: __ARM_FEATURE_SIMD32) four pairs at a
 * time: SXTAB16 widens bytes 0 and 2 of x (and, rotated by 8, bytes 1 and 3) into two
 * int16 halves with -zp added (x - zp fits in int16), SXTB16 widens w likewise, and SMLAD
 * adds both 16x16 products to the accumulator in one instruction. Elsewhere four
 * products per iteration. Integer sums in another order: the plain loop's int32. */
#if !defined(GRAPHOPT_PLAIN_KERNELS)
static int32_t dot_s8(const int8_t *x, const int8_t *w, int k, int zp, int32_t acc)
{
    int t = 0;
#if defined(__ARM_FEATURE_SIMD32)
    const uint32_t minus_zp = ((uint32_t)(-zp) & 0xffffu) * 0x10001u;
    for (; t + 4 <= k; t += 4) {
        uint32_t xv, wv;
        memcpy(&xv, x + t, 4); /* one unaligned LDR: Cortex-M3 and up allow it */
        memcpy(&wv, w + t, 4);
        acc = __smlad(__sxtab16(minus_zp, xv), __sxtb16(wv), acc);
        acc = __smlad(__sxtab16(minus_zp, (xv >> 8) | (xv << 24)),
                      __sxtb16((wv >> 8) | (wv << 24)), acc);
    }
#else
    for (; t + 4 <= k; t += 4)
        acc += (x[t] - zp) * w[t] + (x[t + 1] - zp) * w[t + 1] +
               (x[t + 2] - zp) * w[t + 2] + (x[t + 3] - zp) * w[t + 3];
#endif
    for (; t < k; ++t)
        acc += ((int32_t)x[t] - zp) * w[t];
    return acc;
}
#endif

void go_conv2d_s8(const go_conv_params *p, int x_zp, const int8_t *x, const int8_t *w,
                  const int32_t *b, const go_qout *o)
{
    const int cg = p->c / p->group, mg = p->m / p->group;
    const long window = (long)cg * p->kh * p->kw;
    int n, g, m, oy, ox, c, ky, kx;
    for (n = 0; n < p->n; ++n) {
        for (g = 0; g < p->group; ++g) {
            for (m = g * mg; m < (g + 1) * mg; ++m) {
                const int8_t *wm = w + (long)m * window;
                const long base = ((long)n * p->m + m) * p->oh * p->ow;
                for (oy = 0; oy < p->oh; ++oy) {
                    const int iy0 = oy * p->sh - p->pt;
                    const int rows_in = iy0 >= 0 && iy0 + (p->kh - 1) * p->dh < p->h;
                    for (ox = 0; ox < p->ow; ++ox) {
                        const int ix0 = ox * p->sw - p->pl;
                        int32_t acc = b[m];
#if !defined(GRAPHOPT_PLAIN_KERNELS)
                        if (rows_in && ix0 >= 0 && ix0 + (p->kw - 1) * p->dw < p->w) {
                            /* the whole window inside the image: no bounds checks */
                            for (c = 0; c < cg; ++c) {
                                const int8_t *xc = x + ((long)n * p->c + g * cg + c) *
                                                   p->h * p->w + (long)iy0 * p->w + ix0;
                                const int8_t *wc = wm + (long)c * p->kh * p->kw;
                                for (ky = 0; ky < p->kh; ++ky) {
                                    const int8_t *xr = xc + (long)ky * p->dh * p->w;
                                    const int8_t *wr = wc + ky * p->kw;
                                    if (p->kw == 3 && p->dw == 1) /* the usual 3x3 */
                                        acc += (xr[0] - x_zp) * wr[0] +
                                               (xr[1] - x_zp) * wr[1] +
                                               (xr[2] - x_zp) * wr[2];
                                    else
                                        for (kx = 0; kx < p->kw; ++kx)
                                            acc += (xr[kx * p->dw] - x_zp) * wr[kx];
                                }
                            }
                            store(o, m, base + oy * p->ow + ox, acc);
                            continue;
                        }
#else
                        (void)rows_in;
#endif
                        for (c = 0; c < cg; ++c) {
                            const int8_t *xc = x + ((long)n * p->c + g * cg + c) * p->h * p->w;
                            const int8_t *wc = wm + (long)c * p->kh * p->kw;
                            for (ky = 0; ky < p->kh; ++ky) {
                                const int iy = iy0 + ky * p->dh;
                                const int8_t *xr, *wr;
                                if (iy < 0 || iy >= p->h)
                                    continue; /* padding: x - x_zp is zero there */
                                xr = xc + (long)iy * p->w;
                                wr = wc + ky * p->kw;
                                for (kx = 0; kx < p->kw; ++kx) {
                                    const int ix = ix0 + kx * p->dw;
                                    if (ix >= 0 && ix < p->w)
                                        acc += ((int32_t)xr[ix] - x_zp) * wr[kx];
                                }
                            }
                        }
                        store(o, m, base + oy * p->ow + ox, acc);
                    }
                }
            }
        }
    }
}

void go_fc_s8(int x_zp, const int8_t *x, const int8_t *w, const int32_t *b, int m, int k,
              int n, const go_qout *o)
{
    int i, j, t;
    for (i = 0; i < m; ++i) {
        const int8_t *xi = x + (long)i * k;
        for (j = 0; j < n; ++j) {
            const int8_t *wj = w + (long)j * k;
            int32_t acc = b[j];
#if !defined(GRAPHOPT_PLAIN_KERNELS)
            (void)t;
            acc = dot_s8(xi, wj, k, x_zp, acc);
#else
            for (t = 0; t < k; ++t)
                acc += ((int32_t)xi[t] - x_zp) * wj[t];
#endif
            store(o, j, (long)i * n + j, acc);
        }
    }
}

void go_quantize(const float *x, int8_t *y, int count, float scale, int zp)
{
    int i;
    for (i = 0; i < count; ++i) {
        /* ONNX QuantizeLinear: x / scale, rounded half to even, plus zp, saturated */
        float v = nearbyintf(x[i] / scale) + (float)zp;
        y[i] = (int8_t)(v < -128.0f ? -128 : (v > 127.0f ? 127 : (int)v));
    }
}

void go_dequantize(const int8_t *x, float *y, int count, float scale, int zp)
{
    int i;
    for (i = 0; i < count; ++i)
        y[i] = (float)((int32_t)x[i] - zp) * scale;
}
