/* graphopt MCU kernels: portable C99, float32, NCHW. Written for the code graphopt
 * generates (model.c): every shape and offset is a compile-time constant there, so
 * the kernels take plain integers and do no allocation, no I/O and no error checks. */
#ifndef GRAPHOPT_KERNELS_H
#define GRAPHOPT_KERNELS_H

#include <stdint.h>

typedef struct {
    int n, c, h, w;         /* input */
    int m, oh, ow;          /* output channels and size */
    int kh, kw, sh, sw, dh, dw, pt, pl;
    int group;
    float lo, hi;           /* output clamp: a fused Relu/Relu6/Clip */
} go_conv_params;

typedef struct {
    int is_max, n, c, h, w, oh, ow, kh, kw, sh, sw, dh, dw, pt, pl, pb, pr, include_pad;
} go_pool_params;

/* y[n, m, oh, ow] = clamp(b[m] + sum over c, kh, kw of x * w), groups included. */
void go_conv2d(const go_conv_params *p, const float *x, const float *w, const float *b,
               float *y);
/* y[m, n] = clamp(b[n] + sum_k x[m, k] * w): w is [n, k] (kn = 0) or [k, n] (kn = 1). */
void go_fc(const float *x, const float *w, const float *b, float *y, int m, int k, int n,
           int kn, float lo, float hi);
/* y = a OP b under broadcasting: element strides per dimension of the output's shape. */
void go_binary(int op, const float *a, const int *a_strides, const float *b,
               const int *b_strides, float *y, const int *shape, int rank);
/* op 0 Relu, 1 Clip [a, b], 2 Sigmoid, 3 Tanh, 4 HardSigmoid (alpha a, beta b),
 * 5 HardSwish, 6 LeakyRelu (alpha a). y may be x. */
void go_unary(int op, const float *x, float *y, int count, float a, float b);
void go_pool2d(const go_pool_params *p, const float *x, float *y);
void go_global_avgpool(const float *x, float *y, int nc, int hw);
/* One input of a Concat: outer blocks of `inner` floats into the output's blocks of
 * `out_inner` floats, starting `offset` floats into each. */
void go_concat_part(const float *x, float *y, int outer, int inner, int out_inner,
                    int offset);
void go_softmax(const float *x, float *y, int outer, int n, int inner);
void go_copy(const float *x, float *y, int count);

/* int8 (graphopt_kernels_int8.c). The output of an int8 layer: int8 (y8: requantized
 * by mult[m] * 2^(shift[m] - 31), plus zp, clamped to [lo, hi]) or float (yf: the
 * accumulator times scale[m], clamped to [flo, fhi]); the other pointer is null. */
typedef struct {
    int8_t *y8;
    const int32_t *mult;
    const int32_t *shift;
    int zp, lo, hi;
    float *yf;
    const float *scale;
    float flo, fhi;
} go_qout;

int32_t go_requantize(int32_t acc, int32_t multiplier, int shift);
/* The float convolution's parameters (lo/hi unused: the clamp is in go_qout). */
void go_conv2d_s8(const go_conv_params *p, int x_zp, const int8_t *x, const int8_t *w,
                  const int32_t *b, const go_qout *o);
/* w is [n, k] */
void go_fc_s8(int x_zp, const int8_t *x, const int8_t *w, const int32_t *b, int m, int k,
              int n, const go_qout *o);
void go_quantize(const float *x, int8_t *y, int count, float scale, int zp);
void go_dequantize(const int8_t *x, float *y, int count, float scale, int zp);

#endif
