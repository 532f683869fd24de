/* graphopt MCU kernels: portable C99 float32 reference kernels (see graphopt_kernels.h).
 * Loops are ordered so the innermost one walks contiguous memory; bounds checks of
 * padded windows are hoisted out of the multiply-accumulate loops. */
#include <math.h>
#include <string.h>

#include "graphopt_kernels.h"

static float clampf(float v, float lo, float hi)
{
    return v < lo ? lo : (v > hi ? hi : v);
}

void go_conv2d(const go_conv_params *p, const float *x, const float *w, const float *b,
               float *y)
{
    const int cg = p->c / p->group, mg = p->m / p->group;
    int n, g, m, oy, ox, c, ky, kx;
    for (n = 0; n < p->n; ++n) {
        for (g = 0; g < p->group; ++g) {
            for (m = g * mg; m < (g + 1) * mg; ++m) {
                const float *wm = w + (long)m * cg * p->kh * p->kw;
                float *ym = y + ((long)n * p->m + m) * p->oh * p->ow;
                for (oy = 0; oy < p->oh; ++oy) {
                    const int iy0 = oy * p->sh - p->pt;
                    for (ox = 0; ox < p->ow; ++ox) {
                        const int ix0 = ox * p->sw - p->pl;
                        float acc = b[m];
                        for (c = 0; c < cg; ++c) {
                            const float *xc = x + ((long)n * p->c + g * cg + c) * p->h * p->w;
                            const float *wc = wm + (long)c * p->kh * p->kw;
                            for (ky = 0; ky < p->kh; ++ky) {
                                const int iy = iy0 + ky * p->dh;
                                const float *xr, *wr;
                                if (iy < 0 || iy >= p->h)
                                    continue;
                                xr = xc + (long)iy * p->w;
                                wr = wc + ky * p->kw;
                                for (kx = 0; kx < p->kw; ++kx) {
                                    const int ix = ix0 + kx * p->dw;
                                    if (ix >= 0 && ix < p->w)
                                        acc += xr[ix] * wr[kx];
                                }
                            }
                        }
                        ym[oy * p->ow + ox] = clampf(acc, p->lo, p->hi);
                    }
                }
            }
        }
    }
}

void go_fc(const float *x, const float *w, const float *b, float *y, int m, int k, int n,
           int kn, float lo, float hi)
{
    int i, j, t;
    for (i = 0; i < m; ++i) {
        const float *xi = x + (long)i * k;
        for (j = 0; j < n; ++j) {
            float acc = b ? b[j] : 0.0f;
            if (kn) {
                for (t = 0; t < k; ++t)
                    acc += xi[t] * w[(long)t * n + j];
            } else {
                const float *wj = w + (long)j * k;
                for (t = 0; t < k; ++t)
                    acc += xi[t] * wj[t];
            }
            y[(long)i * n + j] = clampf(acc, lo, hi);
        }
    }
}

static float apply(int op, float a, float b)
{
    switch (op) {
    case 0: return a + b;
    case 1: return a - b;
    case 2: return a * b;
    default: return a / b;
    }
}

void go_binary(int op, const float *a, const int *a_strides, const float *b,
               const int *b_strides, float *y, const int *shape, int rank)
{
    int index[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    long ia = 0, ib = 0, total = 1, i;
    int d;
    for (d = 0; d < rank; ++d)
        total *= shape[d];
    for (i = 0; i < total; ++i) {
        y[i] = apply(op, a[ia], b[ib]);
        /* advance the output index like an odometer, the input offsets with it */
        for (d = rank - 1; d >= 0; --d) {
            ia += a_strides[d];
            ib += b_strides[d];
            if (++index[d] < shape[d])
                break;
            ia -= (long)a_strides[d] * shape[d];
            ib -= (long)b_strides[d] * shape[d];
            index[d] = 0;
        }
    }
}

void go_unary(int op, const float *x, float *y, int count, float a, float b)
{
    int i;
    for (i = 0; i < count; ++i) {
        const float v = x[i];
        switch (op) {
        case 0: y[i] = v > 0.0f ? v : 0.0f; break;
        case 1: y[i] = clampf(v, a, b); break;
        case 2: y[i] = 1.0f / (1.0f + expf(-v)); break;
        case 3: y[i] = tanhf(v); break;
        case 4: y[i] = clampf(a * v + b, 0.0f, 1.0f); break;
        case 5: y[i] = v * clampf(v / 6.0f + 0.5f, 0.0f, 1.0f); break;
        default: y[i] = v >= 0.0f ? v : a * v; break;
        }
    }
}

void go_pool2d(const go_pool_params *p, const float *x, float *y)
{
    int nc, oy, ox, ky, kx;
    for (nc = 0; nc < p->n * p->c; ++nc) {
        const float *xc = x + (long)nc * p->h * p->w;
        float *yc = y + (long)nc * p->oh * p->ow;
        for (oy = 0; oy < p->oh; ++oy) {
            for (ox = 0; ox < p->ow; ++ox) {
                const int iy0 = oy * p->sh - p->pt, ix0 = ox * p->sw - p->pl;
                float acc = p->is_max ? -HUGE_VALF : 0.0f;
                int count = 0, padded = 0;
                for (ky = 0; ky < p->kh; ++ky) {
                    const int iy = iy0 + ky * p->dh;
                    for (kx = 0; kx < p->kw; ++kx) {
                        const int ix = ix0 + kx * p->dw;
                        if (iy < -p->pt || iy >= p->h + p->pb || ix < -p->pl ||
                            ix >= p->w + p->pr)
                            continue;
                        ++padded;
                        if (iy < 0 || iy >= p->h || ix < 0 || ix >= p->w)
                            continue;
                        ++count;
                        if (p->is_max) {
                            const float v = xc[iy * p->w + ix];
                            acc = v > acc ? v : acc;
                        } else {
                            acc += xc[iy * p->w + ix];
                        }
                    }
                }
                if (!p->is_max)
                    acc /= (float)(p->include_pad ? padded : (count ? count : 1));
                yc[oy * p->ow + ox] = acc;
            }
        }
    }
}

void go_global_avgpool(const float *x, float *y, int nc, int hw)
{
    int i, j;
    for (i = 0; i < nc; ++i) {
        float acc = 0.0f;
        for (j = 0; j < hw; ++j)
            acc += x[(long)i * hw + j];
        y[i] = acc / (float)hw;
    }
}

void go_concat_part(const float *x, float *y, int outer, int inner, int out_inner,
                    int offset)
{
    int o;
    for (o = 0; o < outer; ++o)
        memmove(y + (long)o * out_inner + offset, x + (long)o * inner,
                (size_t)inner * sizeof(float));
}

void go_softmax(const float *x, float *y, int outer, int n, int inner)
{
    int o, i, j;
    for (o = 0; o < outer; ++o) {
        for (j = 0; j < inner; ++j) {
            const float *xr = x + (long)o * n * inner + j;
            float *yr = y + (long)o * n * inner + j;
            float top = xr[0], sum = 0.0f;
            for (i = 1; i < n; ++i)
                top = xr[(long)i * inner] > top ? xr[(long)i * inner] : top;
            for (i = 0; i < n; ++i) {
                yr[(long)i * inner] = expf(xr[(long)i * inner] - top);
                sum += yr[(long)i * inner];
            }
            for (i = 0; i < n; ++i)
                yr[(long)i * inner] /= sum;
        }
    }
}

void go_copy(const float *x, float *y, int count)
{
    if (x != y)
        memmove(y, x, (size_t)count * sizeof(float));
}
