/* The masked SGD update of dst/kernels.py as one loop, compiled for the machine it runs on.
 *
 * For n contiguous float32 weights p, gradients g, momentum buffers b and a byte mask m
 * (1 active, 0 inactive), with weights and momentum already zero off the mask:
 *
 *     d = m*g + wd*p;   b = mu*b + d;   p = p - lr*(d + mu*b)   (Nesterov; else p - lr*b)
 *
 * Only the gradient needs the mask: off the mask p and b are zero on entry, so d, b and p
 * stay zero. `m[i] ? g[i] : 0` compiles to a masked (zeroing) load, which costs next to nothing
 * on top of plain SGD, where multiplying by a converted 0/1 mask costs a few instructions per
 * element (benchmarks/mask_enforcement.py). Written as plain C so the compiler vectorizes it
 * for whatever CPU it runs on; dst/kernels.py builds it with -O3 -march=native.
 */
#include <stddef.h>
#include <stdint.h>

void dst_masked_sgd_f32(float *restrict p, const float *restrict g, float *restrict b,
                        const uint8_t *restrict m, int64_t n, float lr, float wd, float mu,
                        int nesterov) {
    if (nesterov) {
        for (int64_t i = 0; i < n; ++i) {
            float d = (m[i] ? g[i] : 0.0f) + wd * p[i];
            float bb = mu * b[i] + d;
            b[i] = bb;
            p[i] = p[i] - lr * (d + mu * bb);
        }
    } else {
        for (int64_t i = 0; i < n; ++i) {
            float d = (m[i] ? g[i] : 0.0f) + wd * p[i];
            float bb = mu * b[i] + d;
            b[i] = bb;
            p[i] = p[i] - lr * bb;
        }
    }
}

/* Zero x off the mask: x = m ? x : 0 (weights or momentum after the mask changed). */
void dst_mask_f32(float *restrict x, const uint8_t *restrict m, int64_t n) {
    for (int64_t i = 0; i < n; ++i) {
        x[i] = m[i] ? x[i] : 0.0f;
    }
}
