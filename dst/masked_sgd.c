/* The masked SGD update of dst/kernels.py as one loop, compiled for the machine it runs on.
 *
 * For n contiguous float32 weights p, gradients g, momentum buffers b and a mask m
 * (1 active, 0 inactive), with weights and momentum already zero off the mask:
 *
 *     d = m*g + wd*p;   b = mu*b + d;   p = p - lr*(d + mu*b)   (Nesterov; else p - lr*b)
 *
 * Only the gradient needs the mask: off the mask p and b are zero on entry, so d, b and p
 * stay zero. `m ? g : 0` compiles to a masked (zeroing) load, which costs next to nothing on
 * top of plain SGD, where multiplying by a converted 0/1 mask costs a few instructions per
 * element (benchmarks/mask_enforcement.py). Written as plain C so the compiler vectorizes it
 * for whatever CPU it runs on; dst/kernels.py builds it with -O3 -march=native.
 */
#include <stddef.h>
#include <stdint.h>
#include <string.h>

/* The mask arrives as packed bits (bit i of byte i/8, least significant first), 1/8 of the
 * bytes of a bool mask: right after backward the caches are cold, and reading a byte per weight
 * cost about 0.1 ms per large-MLP step where the bits cost nothing measurable. */
#define DST_STEP(KEEP, I)                                                      \
    do {                                                                       \
        float d = ((KEEP) ? g[I] : 0.0f) + wd * p[I];                          \
        float bb = mu * b[I] + d;                                              \
        b[I] = bb;                                                             \
        p[I] = p[I] - lr * (nesterov ? d + mu * bb : bb);                      \
    } while (0)

static void masked_sgd(float *restrict p, const float *restrict g, float *restrict b,
                       const uint8_t *restrict bits, int64_t n, float lr, float wd, float mu,
                       const int nesterov) {
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        uint16_t word;
        memcpy(&word, bits + (i >> 3), sizeof word); /* little-endian: bit j = weight i + j */
        for (int j = 0; j < 16; ++j) {
            DST_STEP((word >> j) & 1u, i + j);
        }
    }
    for (; i < n; ++i) {
        DST_STEP((bits[i >> 3] >> (i & 7)) & 1u, i);
    }
}

void dst_masked_sgd_f32(float *restrict p, const float *restrict g, float *restrict b,
                        const uint8_t *restrict bits, int64_t n, float lr, float wd, float mu,
                        int nesterov) {
    /* two calls with a constant flag, so the compiler specializes each loop */
    if (nesterov) {
        masked_sgd(p, g, b, bits, n, lr, wd, mu, 1);
    } else {
        masked_sgd(p, g, b, bits, n, lr, wd, mu, 0);
    }
}

/* Zero x off the mask: x = m ? x : 0 (weights or momentum after the mask changed). */
void dst_mask_f32(float *restrict x, const uint8_t *restrict m, int64_t n) {
    for (int64_t i = 0; i < n; ++i) {
        x[i] = m[i] ? x[i] : 0.0f;
    }
}
