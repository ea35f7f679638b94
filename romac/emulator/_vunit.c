/* The vector unit's per-position operations (RMSNORM, ROPE, LORA, ATTN) as a C extension: the decode hot path
 * of the native kernel. On SmolLM2-135M a decode step runs ~360 of them on a few hundred floats each, so numpy's
 * cost per call (allocating temporaries, broadcasting, a BLAS call per head) was a third of the step
 * (docs/performance.md); here each is one call that writes into an array the caller allocated.
 *
 * romac/emulator/ops.py is the definition: each function computes exactly what its handler there computes, in the
 * same order, with the same roundings (built with -ffp-contract=off: no fused multiply-add), so the results are the
 * same bits (tests/test_vunit.py compares them). Every sum is ops.tree_sum's balanced tree (tree_rows, in
 * _vunit_sums.h), exp is computed in float64 and rounded to float32. A position is computed the same way whatever
 * else is in the batch, so a prefill and the decode steps of the same positions agree.
 */
#include "_vunit_sums.h"

/* q . k as the tree of tree_rows over its hd terms, for a power-of-two hd known to the compiler (then each level
 * is a few whole vectors, with no loop set-up) */
static inline float dot_tree_pow2(const float *restrict q, const float *restrict k, float *restrict prod,
                                  const Py_ssize_t hd) {
    for (Py_ssize_t d = 0; d < hd; d++) prod[d] = q[d] * k[d];
    for (Py_ssize_t h = hd / 2; h >= 1; h /= 2)
        for (Py_ssize_t i = 0; i < h; i++) prod[i] += prod[i + h];
    return prod[0];
}

/* One head's scores q . k_j for the positions j < seen (rows of k kv_dim apart), each a tree over its hd terms
 * (scratch: hd floats), into score[0 .. seen) */
VUNIT_FAST static void head_scores(float *restrict score, float *restrict prod, const float *restrict q,
                                   const float *restrict k, Py_ssize_t kv_dim, Py_ssize_t seen, Py_ssize_t hd) {
    if (hd == 64) {
        for (Py_ssize_t j = 0; j < seen; j++) score[j] = dot_tree_pow2(q, k + j * kv_dim, prod, 64);
    } else if (hd == 128) {
        for (Py_ssize_t j = 0; j < seen; j++) score[j] = dot_tree_pow2(q, k + j * kv_dim, prod, 128);
    } else {
        for (Py_ssize_t j = 0; j < seen; j++) {
            const float *kj = k + j * kv_dim;
            for (Py_ssize_t d = 0; d < hd; d++) prod[d] = q[d] * kj[d];
            tree_rows(prod, hd, 1);
            score[j] = prod[0];
        }
    }
}

/* ---- argument handling: float32 C-contiguous buffers of known sizes ---- */

typedef struct {
    Py_buffer view[8];
    int n;
} views;

static void release(views *v) {
    for (int i = 0; i < v->n; i++) PyBuffer_Release(&v->view[i]);
    v->n = 0;
}

/* a float32 C-contiguous buffer of at least `count` floats (writable if asked), or NULL with an exception */
static float *floats(views *v, PyObject *obj, Py_ssize_t count, int writable, const char *name) {
    Py_buffer *b = &v->view[v->n];
    int flags = PyBUF_C_CONTIGUOUS | PyBUF_FORMAT | (writable ? PyBUF_WRITABLE : 0);
    if (PyObject_GetBuffer(obj, b, flags) < 0) return NULL;
    v->n++;
    if (b->itemsize != 4 || b->format == NULL || strcmp(b->format, "f") != 0) {
        PyErr_Format(PyExc_TypeError, "%s: a float32 array is needed", name);
        return NULL;
    }
    if (b->len / 4 < count) {
        PyErr_Format(PyExc_ValueError, "%s holds %zd floats, %zd are needed", name, b->len / 4, count);
        return NULL;
    }
    return (float *)b->buf;
}

/* a C-contiguous buffer of at least `count` bytes, or NULL with an exception */
static const uint8_t *bytes_of(views *v, PyObject *obj, Py_ssize_t count, const char *name) {
    Py_buffer *b = &v->view[v->n];
    if (PyObject_GetBuffer(obj, b, PyBUF_C_CONTIGUOUS) < 0) return NULL;
    v->n++;
    if (b->len < count) {
        PyErr_Format(PyExc_ValueError, "%s holds %zd bytes, %zd are needed", name, b->len, count);
        return NULL;
    }
    return (const uint8_t *)b->buf;
}

static int sizes(PyObject *const *args, Py_ssize_t first, Py_ssize_t n, Py_ssize_t *out) {
    for (Py_ssize_t i = 0; i < n; i++) {
        out[i] = PyLong_AsSsize_t(args[first + i]);
        if (out[i] < 0) {
            if (!PyErr_Occurred()) PyErr_SetString(PyExc_ValueError, "sizes must not be negative");
            return -1;
        }
    }
    return 0;
}

static int nargs_is(Py_ssize_t nargs, Py_ssize_t want, const char *fn) {
    if (nargs == want) return 0;
    PyErr_Format(PyExc_TypeError, "%s takes %zd arguments, not %zd", fn, want, nargs);
    return -1;
}

/* ---- RMSNORM: y = x / sqrt(sum(x * x) / n + eps) * w, per position ---- */

static PyObject *rmsnorm(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    /* rmsnorm(x, w, eps, y, positions, n) */
    Py_ssize_t sz[2];
    if (nargs_is(nargs, 6, "rmsnorm") < 0 || sizes(args, 4, 2, sz) < 0) return NULL;
    Py_ssize_t t = sz[0], n = sz[1];
    float eps = (float)PyFloat_AsDouble(args[2]);
    if (PyErr_Occurred()) return NULL;
    views v = {.n = 0};
    const float *x = floats(&v, args[0], t * n, 0, "x");
    const float *w = x ? floats(&v, args[1], n, 0, "w") : NULL;
    float *y = w ? floats(&v, args[3], t * n, 1, "y") : NULL;
    float *sq = y ? malloc((size_t)(n ? n : 1) * sizeof(float)) : NULL;
    if (y && !sq) PyErr_NoMemory();
    if (!sq) {
        release(&v);
        return NULL;
    }
    for (Py_ssize_t p = 0; p < t; p++) {
        const float *xr = x + p * n;
        float *yr = y + p * n;
        for (Py_ssize_t j = 0; j < n; j++) sq[j] = xr[j] * xr[j];
        tree_rows(sq, n, 1);
        float var = sq[0];
        var /= (float)n;
        var += eps;
        float s = sqrtf(var);
        for (Py_ssize_t j = 0; j < n; j++) yr[j] = (xr[j] / s) * w[j];
    }
    free(sq);
    release(&v);
    Py_RETURN_NONE;
}

/* ---- ROPE: y = x * cos + rotate_half(x) * sin, per position and head ---- */

static PyObject *rope(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    /* rope(x, cos, sin, y, positions, heads, head_dim) */
    Py_ssize_t sz[3];
    if (nargs_is(nargs, 7, "rope") < 0 || sizes(args, 4, 3, sz) < 0) return NULL;
    Py_ssize_t t = sz[0], heads = sz[1], hd = sz[2], half = hd / 2;
    views v = {.n = 0};
    const float *x = floats(&v, args[0], t * heads * hd, 0, "x");
    const float *c = x ? floats(&v, args[1], t * hd, 0, "cos") : NULL;
    const float *s = c ? floats(&v, args[2], t * hd, 0, "sin") : NULL;
    float *y = s ? floats(&v, args[3], t * heads * hd, 1, "y") : NULL;
    if (!y) {
        release(&v);
        return NULL;
    }
    for (Py_ssize_t p = 0; p < t; p++) {
        const float *cp = c + p * hd, *sp = s + p * hd;
        for (Py_ssize_t h = 0; h < heads; h++) {
            const float *xh = x + (p * heads + h) * hd;
            float *yh = y + (p * heads + h) * hd;
            for (Py_ssize_t j = 0; j < half; j++) yh[j] = xh[j] * cp[j] - xh[j + half] * sp[j];
            for (Py_ssize_t j = half; j < hd; j++) yh[j] = xh[j] * cp[j] + xh[j - half] * sp[j];
        }
    }
    release(&v);
    Py_RETURN_NONE;
}

/* ---- LORA: y = dst + ((x @ A^T) @ B^T) * scaling, from A's and B's codes as they lie in SRAM ---- */

static PyObject *lora(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    /* lora(x, a_codes [rank, in], a_scale, bt_codes [rank, out], b_scale, values, code_bytes, scaling, dst, y,
     *      positions, in, rank, out); bt_codes: B's codes transposed (B is [out, rank] in SRAM) */
    Py_ssize_t sz[4];
    if (nargs_is(nargs, 14, "lora") < 0 || sizes(args, 10, 4, sz) < 0) return NULL;
    Py_ssize_t t = sz[0], in = sz[1], rank = sz[2], out = sz[3];
    float a_scale = (float)PyFloat_AsDouble(args[2]), b_scale = (float)PyFloat_AsDouble(args[4]);
    float scaling = (float)PyFloat_AsDouble(args[7]);
    long width = PyLong_AsLong(args[6]);
    if (PyErr_Occurred()) return NULL;
    if (width != 1 && width != 2) {
        PyErr_SetString(PyExc_ValueError, "codes of 1 or 2 bytes");
        return NULL;
    }
    views v = {.n = 0};
    const float *x = floats(&v, args[0], t * in, 0, "x");
    const uint8_t *a = x ? bytes_of(&v, args[1], rank * in * width, "a_codes") : NULL;
    const uint8_t *b = a ? bytes_of(&v, args[3], out * rank * width, "bt_codes") : NULL;
    const float *values = b ? floats(&v, args[5], (Py_ssize_t)1 << (8 * width), 0, "values") : NULL;
    const float *dst = values ? floats(&v, args[8], t * out, 0, "dst") : NULL;
    float *y = dst ? floats(&v, args[9], t * out, 1, "y") : NULL;
    if (!y) {
        release(&v);
        return NULL;
    }
    int oom = lora_sums(x, a, a_scale, b, b_scale, values, (int)width, t, in, rank, out, y);
    if (!oom)
        for (Py_ssize_t k = 0; k < t * out; k++) y[k] = y[k] * scaling + dst[k];
    release(&v);
    if (oom) return PyErr_NoMemory();
    Py_RETURN_NONE;
}

/* ---- ATTN: causal softmax attention of new positions over the cached context, grouped-query ---- */

static PyObject *attn(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    /* attn(q [t, heads*hd], k [end, kv_heads*hd], v [end, kv_heads*hd], y [t, heads*hd], positions, pos0,
     *      heads, kv_heads, head_dim); end = pos0 + positions */
    Py_ssize_t sz[5];
    if (nargs_is(nargs, 9, "attn") < 0 || sizes(args, 4, 5, sz) < 0) return NULL;
    Py_ssize_t t = sz[0], pos0 = sz[1], heads = sz[2], kv_heads = sz[3], hd = sz[4];
    if (kv_heads == 0 || heads % kv_heads) {
        PyErr_SetString(PyExc_ValueError, "heads must be a multiple of kv_heads");
        return NULL;
    }
    Py_ssize_t end = pos0 + t, group = heads / kv_heads, kv_dim = kv_heads * hd;
    views v = {.n = 0};
    const float *q = floats(&v, args[0], t * heads * hd, 0, "q");
    const float *k = q ? floats(&v, args[1], end * kv_dim, 0, "k") : NULL;
    const float *vv = k ? floats(&v, args[2], end * kv_dim, 0, "v") : NULL;
    float *y = vv ? floats(&v, args[3], t * heads * hd, 1, "y") : NULL;
    /* one head's scores [end], and the terms of its sums: [hd] (a score), [end] (softmax's), [end][hd] (its output) */
    float *scratch = y ? malloc((size_t)(end + end * hd) * sizeof(float)) : NULL;
    if (y && !scratch) PyErr_NoMemory();
    if (!scratch) {
        release(&v);
        return NULL;
    }
    float *score = scratch, *terms = scratch + end;
    const float scale = (float)(1.0 / sqrt((double)hd));
    for (Py_ssize_t p = 0; p < t; p++) {
        Py_ssize_t seen = pos0 + p + 1; /* positions it attends to; the rest are masked */
        for (Py_ssize_t h = 0; h < heads; h++) {
            Py_ssize_t c = h / group;
            const float *qh = q + (p * heads + h) * hd;
            head_scores(score, terms, qh, k + c * hd, kv_dim, seen, hd);
            float top = -INFINITY;
            for (Py_ssize_t j = 0; j < seen; j++) {
                score[j] *= scale;
                if (score[j] > top) top = score[j];
            }
            for (Py_ssize_t j = 0; j < seen; j++) score[j] = (float)exp((double)(score[j] - top));
            for (Py_ssize_t j = seen; j < end; j++) score[j] = 0.0f; /* exp(-inf) */
            memcpy(terms, score, (size_t)end * sizeof(float));
            tree_rows(terms, end, 1);
            const float total = terms[0];
            for (Py_ssize_t j = 0; j < end; j++) score[j] /= total;
            scaled_rows(terms, score, vv + c * hd, end, hd, kv_dim);
            tree_rows(terms, end, hd);
            memcpy(y + (p * heads + h) * hd, terms, (size_t)hd * sizeof(float));
        }
    }
    free(scratch);
    release(&v);
    Py_RETURN_NONE;
}

static PyObject *fp8_values(PyObject *self, PyObject *noargs) {
    PyObject *out = PyList_New(256);
    for (int c = 0; out && c < 256; c++) PyList_SET_ITEM(out, c, PyFloat_FromDouble(fp8_e4m3_value((uint8_t)c)));
    return out;
}

static PyMethodDef methods[] = {
    {"fp8_values", fp8_values, METH_NOARGS, "the value the kernel gives each FP8 E4M3 code (256 floats)"},
    {"rmsnorm", (PyCFunction)(void (*)(void))rmsnorm, METH_FASTCALL,
     "rmsnorm(x, w, eps, y, positions, n): RMSNORM of romac.emulator.ops into y"},
    {"rope", (PyCFunction)(void (*)(void))rope, METH_FASTCALL,
     "rope(x, cos, sin, y, positions, heads, head_dim): ROPE of romac.emulator.ops into y"},
    {"lora", (PyCFunction)(void (*)(void))lora, METH_FASTCALL,
     "lora(x, a_codes, a_scale, b_codes, b_scale, values, code_bytes, scaling, dst, y, positions, in, rank, out): "
     "LORA of romac.emulator.ops into y, from the slot's codes in SRAM (B's transposed)"},
    {"attn", (PyCFunction)(void (*)(void))attn, METH_FASTCALL,
     "attn(q, k, v, y, positions, pos0, heads, kv_heads, head_dim): ATTN of romac.emulator.ops into y"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_vunit", NULL, -1, methods, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__vunit(void) { return PyModule_Create(&module); }
