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

static inline void load(const void *p, int dt, int64_t i, double *v, uint16_t *b) {
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

static inline int ulp_bucket(int32_t d) {
    int k = 0;
    while (k < 8 && d > (1 << k)) k++;
    return k;
}

#define BLOCK 4096

/* elementwise(ptr_a, dtype_a, ptr_b, dtype_b, n, atol) ->
 *   (changed_exact, changed_bf16, changed_atol, nonfinite_a, nonfinite_b, hist[9],
 *    base2, delta2, dot, nx2, ny2, delta_max) */
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
    int64_t ce = 0, cb = 0, ca = 0, nfa = 0, nfb = 0;
    int64_t hist[9] = {0};
    double s_base = 0, s_delta = 0, s_dot = 0, s_x = 0, s_y = 0, dmax = -1.0;

    Py_BEGIN_ALLOW_THREADS
    for (int64_t start = 0; start < n; start += BLOCK) {
        int64_t end = start + BLOCK < n ? start + BLOCK : n;
        /* Per-block partial sums, added to the totals once per block: a two-level sum whose error does not
         * grow with the tensor size the way a single running sum's would. */
        double p_base = 0, p_delta = 0, p_dot = 0, p_x = 0, p_y = 0;
        for (int64_t i = start; i < end; i++) {
            double x, y;
            uint16_t xb, yb;
            load(a, da, i, &x, &xb);
            load(b, db, i, &y, &yb);
            int fx = isfinite(x), fy = isfinite(y);
            nfa += !fx;
            nfb += !fy;
            ce += !(x == y);
            double xbd = bf16_to_double(xb), ybd = bf16_to_double(yb);
            int chb = !(xbd == ybd);
            cb += chb;
            if (chb && isfinite(xbd) && isfinite(ybd)) {
                int32_t dist = ordered(yb) - ordered(xb);
                if (dist < 0) dist = -dist;
                hist[ulp_bucket(dist)]++;
            }
            double d = y - x;
            ca += !(fabs(d) <= atol);
            if (fx) p_base += x * x;
            if (fx && fy) {
                p_delta += d * d;
                p_dot += x * y;
                p_x += x * x;
                p_y += y * y;
                double ad = fabs(d);
                if (ad > dmax) dmax = ad;
            }
        }
        s_base += p_base; s_delta += p_delta; s_dot += p_dot; s_x += p_x; s_y += p_y;
    }
    Py_END_ALLOW_THREADS

    return Py_BuildValue("(LLLLL(LLLLLLLLL)dddddd)", (long long)ce, (long long)cb, (long long)ca,
                         (long long)nfa, (long long)nfb, (long long)hist[0], (long long)hist[1],
                         (long long)hist[2], (long long)hist[3], (long long)hist[4], (long long)hist[5],
                         (long long)hist[6], (long long)hist[7], (long long)hist[8], s_base, s_delta, s_dot,
                         s_x, s_y, dmax);
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
