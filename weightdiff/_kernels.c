/*
 * Fused element-wise pass for weightdiff (metrics.md section 1), one read of each input.
 *
 * The pure-torch path in weightdiff/metrics/elementwise.py is the reference: it makes a dozen passes over
 * each chunk. This kernel computes the same numbers in a single pass per element: every value is widened
 * exactly to double, compared as a number (+0 == -0, NaN never equal), rounded to bfloat16 with
 * round-to-nearest-even on its bit pattern, and fed to float64 accumulators. Counts are exact integers.
 *
 * It does no memory management and holds no state: the caller passes pointers to contiguous data it keeps
 * alive and gets plain numbers back. The GIL is released while it runs, so Python threads can run it on
 * separate chunks in parallel. Building it is optional; weightdiff falls back to torch when it is missing.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

enum { DT_F64 = 0, DT_F32 = 1, DT_F16 = 2, DT_BF16 = 3 };

static float half_table[65536];
static int half_ready = 0;

static float half_to_float(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16;
    uint32_t exp = (h >> 10) & 0x1f;
    uint32_t man = h & 0x3ff;
    uint32_t bits;
    if (exp == 0) {
        if (man == 0) {
            bits = sign;
        } else { /* subnormal: renormalise */
            int e = -1;
            do { e++; man <<= 1; } while ((man & 0x400) == 0);
            bits = sign | ((uint32_t)(127 - 15 - e) << 23) | ((man & 0x3ff) << 13);
        }
    } else if (exp == 0x1f) {
        bits = sign | 0x7f800000u | (man << 13);
    } else {
        bits = sign | ((exp + 127 - 15) << 23) | (man << 13);
    }
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

static inline uint16_t f32_to_bf16(uint32_t u) {
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40); /* NaN stays NaN */
    uint32_t lsb = (u >> 16) & 1u;
    return (uint16_t)((u + 0x7fffu + lsb) >> 16);
}

/* float64 -> bfloat16, round-to-nearest-even without double rounding: narrow to float32 with round-to-odd. */
static inline uint16_t f64_to_bf16(double x) {
    if (isnan(x)) return 0x7fc0;
    float f = (float)x;
    if (isinf(x) || (double)f == x) {
        uint32_t u; memcpy(&u, &f, 4); return f32_to_bf16(u);
    }
    if (fabs((double)f) > fabs(x)) f = nextafterf(f, 0.0f);
    uint32_t u; memcpy(&u, &f, 4);
    u |= 1u;
    return f32_to_bf16(u);
}

static inline double bf16_to_double(uint16_t b) {
    uint32_t u = (uint32_t)b << 16; float f; memcpy(&f, &u, 4); return (double)f;
}

static inline __attribute__((always_inline)) void load(const void *p, int dt, int64_t i, double *v, uint16_t *b) {
    switch (dt) {
    case DT_BF16: { uint16_t h = ((const uint16_t *)p)[i]; *b = h; *v = bf16_to_double(h); break; }
    case DT_F16: { float f = half_table[((const uint16_t *)p)[i]]; uint32_t u; memcpy(&u, &f, 4);
                   *b = f32_to_bf16(u); *v = (double)f; break; }
    case DT_F32: { float f = ((const float *)p)[i]; uint32_t u; memcpy(&u, &f, 4);
                   *b = f32_to_bf16(u); *v = (double)f; break; }
    default: { double d = ((const double *)p)[i]; *b = f64_to_bf16(d); *v = d; break; }
    }
}

static inline int32_t ordered(uint16_t b) {
    return (b & 0x8000) ? -(int32_t)(b & 0x7fff) : (int32_t)b;
}

/* Bucket of a ULP distance d >= 1: 1 -> 0, 2 -> 1, 3-4 -> 2, ..., 65-128 -> 7, >= 129 -> 8. Branch-free. */
static inline int ulp_bucket(uint32_t d) {
    uint32_t m = d > 1 ? d - 1 : 1;
    int k = d > 1 ? 32 - __builtin_clz(m) : 0;
    return k < 8 ? k : 8;
}

#define BLOCK 4096

typedef struct {
    int64_t ce, cb, ca, nfa, nfb;
    int64_t hist[9];
    double s_base, s_delta, s_dot, s_x, s_y, dmax;
} totals;

/* One pass over [0, n), a block at a time. The element loop has no data-dependent branches (fine-tuning
 * flips "changed" at random for about half of the elements, and mispredictions would cost more than the
 * arithmetic) and no histogram update, so the compiler can vectorise it; each element's ULP bucket (or 9 for
 * "not counted") goes to a small buffer that a second, scalar loop tallies. Always inlined and called with
 * constant dtype codes, so each dtype pair gets its own specialised loop. */
static inline __attribute__((always_inline)) void run(const void *a, int da, const void *b, int db, int64_t n,
                                                      double atol, totals *t) {
    uint8_t bucket[BLOCK];
    for (int64_t start = 0; start < n; start += BLOCK) {
        int64_t len = n - start < BLOCK ? n - start : BLOCK;
        /* Per-block partial sums, added to the totals once per block: a two-level sum whose error does not
         * grow with the tensor size the way a single running sum's would. */
        double p_base = 0, p_delta = 0, p_dot = 0, p_x = 0, p_y = 0, p_max = -1.0;
        int64_t ce = 0, cb = 0, ca = 0, nfa = 0, nfb = 0;
        for (int64_t j = 0; j < len; j++) {
            int64_t i = start + j;
            double x, y;
            uint16_t xb, yb;
            load(a, da, i, &x, &xb);
            load(b, db, i, &y, &yb);
            int fx = isfinite(x), fy = isfinite(y), both = fx & fy;
            nfa += !fx;
            nfb += !fy;
            ce += !(x == y);
            double xbd = bf16_to_double(xb), ybd = bf16_to_double(yb);
            int chb = !(xbd == ybd);
            cb += chb;
            int32_t dist = ordered(yb) - ordered(xb);
            uint32_t adist = (uint32_t)(dist < 0 ? -dist : dist);
            int counted = chb & isfinite(xbd) & isfinite(ybd);
            bucket[j] = counted ? (uint8_t)ulp_bucket(adist) : 9;
            double d = y - x;
            ca += !(fabs(d) <= atol);
            double xf = fx ? x : 0.0;
            p_base += xf * xf;
            double x2 = both ? x : 0.0, y2 = both ? y : 0.0, d2 = both ? d : 0.0;
            p_delta += d2 * d2;
            p_dot += x2 * y2;
            p_x += x2 * x2;
            p_y += y2 * y2;
            double ad = both ? fabs(d) : -1.0;
            p_max = ad > p_max ? ad : p_max;
        }
        /* Four interleaved tallies break the store-to-load dependency between equal consecutive buckets. */
        int64_t h[4][10] = {{0}};
        int64_t j = 0;
        for (; j + 4 <= len; j += 4) {
            h[0][bucket[j]]++; h[1][bucket[j + 1]]++; h[2][bucket[j + 2]]++; h[3][bucket[j + 3]]++;
        }
        for (; j < len; j++) h[0][bucket[j]]++;
        for (int k = 0; k < 9; k++) t->hist[k] += h[0][k] + h[1][k] + h[2][k] + h[3][k];
        t->ce += ce; t->cb += cb; t->ca += ca; t->nfa += nfa; t->nfb += nfb;
        t->s_base += p_base; t->s_delta += p_delta; t->s_dot += p_dot; t->s_x += p_x; t->s_y += p_y;
        if (p_max > t->dmax) t->dmax = p_max;
    }
}

/* Compiled once per x86-64 level (AVX-512, AVX2, baseline) and picked at load time by the CPU's features. */
/* WEIGHTDIFF_ONE_TARGET builds the loops once, for whatever -m flags say (the tests use it to check the
 * AVX2 and baseline code against the clone this machine picks). */
#if defined(WEIGHTDIFF_ONE_TARGET)
#define MULTIVERSION
#elif defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 12
#define MULTIVERSION __attribute__((target_clones("arch=x86-64-v4", "avx2", "default")))
#elif defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define MULTIVERSION __attribute__((target_clones("avx2", "default")))
#else
#define MULTIVERSION
#endif

/* The common case, two bfloat16 tensors, in two vectorisable stages per block of BLOCK elements.
 *
 * Stage 1 works on the 16-bit patterns in 16-bit lanes (32 elements per AVX-512 register): numeric change,
 * cumulative ULP-bucket counts (how many changed elements are more than 1, 2, 4, ... 128 ULPs apart). It assumes
 * finite values: a block with a NaN or an Inf goes to the general loop, run(), instead, element by element, because
 * NaN breaks the bit-pattern shortcuts; trained weights almost never have one.
 * Stage 2 makes the float64 sums. With every value finite, the base-only and the both-finite sums of x^2 are
 * the same sum, and no element needs masking.
 * The floating-point sums are reassociated across vector lanes (-fassociative-math for this file), which
 * changes their rounding by a few units in the last place, never a count. */
static inline __attribute__((always_inline)) void bf16_counts(const uint16_t *a, const uint16_t *b, int32_t len,
                                                             int64_t g[9]) {
    /* 16-bit counters: len <= BLOCK < 65536, so none can wrap. */
    uint16_t ce = 0, g1 = 0, g2 = 0, g3 = 0, g4 = 0, g5 = 0, g6 = 0, g7 = 0, g8 = 0;
    for (int32_t j = 0; j < len; j++) {
        uint16_t ia = a[j], ib = b[j];
        uint16_t ma = ia & 0x7fff, mb = ib & 0x7fff;
        /* Finite values: +0 and -0 are equal numbers, anything else is equal only bit for bit. */
        uint16_t ch = (ia != ib) & ((ma | mb) != 0);
        /* ULP distance on the ordered number line, capped at 129 (everything above 128 is one bucket): the
         * magnitudes' difference when the signs agree, the sum of the capped magnitudes when they differ. */
        uint16_t dsame = ma > mb ? ma - mb : mb - ma;
        uint16_t ka = ma < 129 ? ma : 129, kb = mb < 129 ? mb : 129;
        uint16_t dist = ((ia ^ ib) & 0x8000) ? (uint16_t)(ka + kb) : dsame;
        uint16_t m = -ch;
        ce += ch;
        g1 += (dist > 1) & m; g2 += (dist > 2) & m; g3 += (dist > 4) & m; g4 += (dist > 8) & m;
        g5 += (dist > 16) & m; g6 += (dist > 32) & m; g7 += (dist > 64) & m; g8 += (dist > 128) & m;
    }
    g[0] = ce; g[1] = g1; g[2] = g2; g[3] = g3; g[4] = g4; g[5] = g5; g[6] = g6; g[7] = g7; g[8] = g8;
}

MULTIVERSION static void run_bf16(const uint16_t *A, const uint16_t *B, int64_t n, double atol, totals *t) {
    for (int64_t start = 0; start < n; start += BLOCK) {
        int32_t len = (int32_t)(n - start < BLOCK ? n - start : BLOCK);
        const uint16_t *a = A + start, *b = B + start;
        /* The finiteness check is a loop of its own: folded into stage 1, it stopped GCC vectorising that. */
        uint16_t nf = 0;
        for (int32_t j = 0; j < len; j++) nf |= ((a[j] & 0x7f80) == 0x7f80) | ((b[j] & 0x7f80) == 0x7f80);
        if (nf) {
            run(a, DT_BF16, b, DT_BF16, len, atol, t);
            continue;
        }
        int64_t g[9];
        bf16_counts(a, b, len, g);
        for (int k = 0; k < 8; k++) t->hist[k] += g[k] - g[k + 1];
        t->hist[8] += g[8];
        double p_x = 0, p_delta = 0, p_dot = 0, p_y = 0;
        int64_t p_max = 0, ca = 0;
        for (int32_t j = 0; j < len; j++) {
            double x = bf16_to_double(a[j]), y = bf16_to_double(b[j]), d = y - x;
            p_x += x * x; p_y += y * y; p_dot += x * y; p_delta += d * d;
            double ad = fabs(d);
            ca += !(ad <= atol);
            /* max |d| as an integer max over the bit patterns of non-negative doubles (integer order is
             * numeric order there), which vectorises where a floating max with its NaN rules does not. */
            int64_t adb; memcpy(&adb, &ad, 8);
            p_max = adb > p_max ? adb : p_max;
        }
        t->ce += g[0]; t->cb += g[0]; t->ca += ca;
        t->s_base += p_x; t->s_delta += p_delta; t->s_dot += p_dot; t->s_x += p_x; t->s_y += p_y;
        double bm; memcpy(&bm, &p_max, 8);
        if (bm > t->dmax) t->dmax = bm;
    }
}


MULTIVERSION static void run_any(const void *a, int da, const void *b, int db, int64_t n, double atol, totals *t) {
    if (da == DT_BF16 && db == DT_BF16) run_bf16((const uint16_t *)a, (const uint16_t *)b, n, atol, t);
    else if (da == DT_F32 && db == DT_F32) run(a, DT_F32, b, DT_F32, n, atol, t);
    else if (da == DT_F16 && db == DT_F16) run(a, DT_F16, b, DT_F16, n, atol, t);
    else if (da == DT_F64 && db == DT_F64) run(a, DT_F64, b, DT_F64, n, atol, t);
    else run(a, da, b, db, n, atol, t);
}

/* elementwise(ptr_a, dtype_a, ptr_b, dtype_b, n, atol) ->
 *   (changed_exact, changed_bf16, changed_atol, nonfinite_a, nonfinite_b, hist[9],
 *    base2, delta2, dot, nx2, ny2, delta_max); delta_max is -1 when no element is finite on both sides. */
static PyObject *elementwise(PyObject *self, PyObject *args) {
    unsigned long long pa, pb;
    int da, db;
    long long n;
    double atol;
    if (!PyArg_ParseTuple(args, "KiKiLd", &pa, &da, &pb, &db, &n, &atol)) return NULL;
    if (da < 0 || da > 3 || db < 0 || db > 3 || n < 0) {
        PyErr_SetString(PyExc_ValueError, "bad dtype code or length");
        return NULL;
    }
    const void *a = (const void *)(uintptr_t)pa, *b = (const void *)(uintptr_t)pb;
    totals t;
    memset(&t, 0, sizeof t);
    t.dmax = -1.0;
    Py_BEGIN_ALLOW_THREADS
    run_any(a, da, b, db, n, atol, &t);
    Py_END_ALLOW_THREADS

    return Py_BuildValue("(LLLLL(LLLLLLLLL)dddddd)", (long long)t.ce, (long long)t.cb, (long long)t.ca,
                         (long long)t.nfa, (long long)t.nfb, (long long)t.hist[0], (long long)t.hist[1],
                         (long long)t.hist[2], (long long)t.hist[3], (long long)t.hist[4], (long long)t.hist[5],
                         (long long)t.hist[6], (long long)t.hist[7], (long long)t.hist[8], t.s_base, t.s_delta,
                         t.s_dot, t.s_x, t.s_y, t.dmax);
}

static PyMethodDef methods[] = {
    {"elementwise", elementwise, METH_VARARGS, "Fused element-wise metrics of two contiguous buffers."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_kernels", NULL, -1, methods};

PyMODINIT_FUNC PyInit__kernels(void) {
    if (!half_ready) {
        for (int i = 0; i < 65536; i++) half_table[i] = half_to_float((uint16_t)i);
        half_ready = 1;
    }
    return PyModule_Create(&module);
}
