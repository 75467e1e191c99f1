// The decoder's patches and their nearest neighbours in the memory bank.
//
// Patches of one bank layer are the columns of Qt (dim x nq_total, row-major): column q is patch
// q % per_frame of frame q / per_frame. The similarities of a chunk of bank rows come from one GEMM
// (cuBLAS, or gemm_tiled) as S[b * nq + q]; knn_partial scans a slice of them per query (windowed
// and global best, lowest index on ties, as the CPU), knn_merge folds the slices into the running
// best and knn_finish turns it into a distance.

// PatchCore's k x k neighbourhood mean with replicated edges on an (n, c, h, w) map: rows first,
// then columns, summed in the CPU's order; `norm` is 1 / k^2.
extern "C" __global__ void box_pool(const float* x, float* y, long long planes, int h, int w, int r, float norm) {
    long long idx = gid();
    if (idx >= planes * h * w) return;
    int xx = (int)(idx % w);
    int yy = (int)((idx / w) % h);
    const float* p = x + (idx / ((long long)h * w)) * h * w;
    float s = 0.0f;
    for (int dy = -r; dy <= r; ++dy) {
        int sy = min(max(yy + dy, 0), h - 1);
        float row = 0.0f;
        for (int dx = -r; dx <= r; ++dx) row = __fadd_rn(row, p[sy * w + min(max(xx + dx, 0), w - 1)]);
        s = __fadd_rn(s, row);
    }
    y[idx] = __fmul_rn(s, norm);
}

// Unit length for every position of an (n, c, hw) map, over its c channels (cosine layers).
extern "C" __global__ void normalize_positions(float* x, int n, int c, int hw) {
    long long idx = gid();
    if (idx >= (long long)n * hw) return;
    float* p = x + (idx / hw) * (long long)c * hw + idx % hw;
    float s = 0.0f;
    for (int k = 0; k < c; ++k) s = madd(s, p[(size_t)k * hw], p[(size_t)k * hw]);
    float nrm = __fsqrt_rn(s);
    if (nrm > 1e-12f) {
        float inv = __fdiv_rn(1.0f, nrm);
        for (int k = 0; k < c; ++k) p[(size_t)k * hw] = __fmul_rn(p[(size_t)k * hw], inv);
    }
}

// Rows [offset, offset + c) of Qt from one part (n, c, ph, pw), sampled bilinearly on the layer's
// grid (gh x gw) with the host's taps; a zero weight skips its corner, as the CPU does.
extern "C" __global__ void gather_part(const float* part, int c, int ph, int pw, float* qt, long long nq_total,
                                       int offset, int gh, int gw, int frames, const int* y0, const int* y1,
                                       const float* ty, const int* x0, const int* x1, const float* tx) {
    long long idx = gid();
    long long per = (long long)gh * gw;
    if (idx >= (long long)frames * c * per) return;
    int q = (int)(idx % per);
    int ch = (int)((idx / per) % c);
    int f = (int)(idx / (per * c));
    int gy = q / gw, gx = q % gw;
    const float* p = part + ((size_t)f * c + ch) * ph * pw;
    float wy = ty[gy], wx = tx[gx];
    float w00 = __fmul_rn(1.0f - wy, 1.0f - wx), w01 = __fmul_rn(1.0f - wy, wx);
    float w10 = __fmul_rn(wy, 1.0f - wx), w11 = __fmul_rn(wy, wx);
    float acc = 0.0f;
    if (w00 != 0.0f) acc = madd(acc, w00, p[y0[gy] * pw + x0[gx]]);
    if (w01 != 0.0f) acc = madd(acc, w01, p[y0[gy] * pw + x1[gx]]);
    if (w10 != 0.0f) acc = madd(acc, w10, p[y1[gy] * pw + x0[gx]]);
    if (w11 != 0.0f) acc = madd(acc, w11, p[y1[gy] * pw + x1[gx]]);
    qt[(size_t)(offset + ch) * nq_total + (size_t)f * per + q] = acc;
}

// Cosine layers of several parts: each part's segment of a column to unit length, then the column.
// seg holds nseg + 1 row offsets.
__device__ void unit_rows(float* q, long long stride, int from, int to) {
    float s = 0.0f;
    for (int k = from; k < to; ++k) s = madd(s, q[k * stride], q[k * stride]);
    float nrm = __fsqrt_rn(s);
    if (nrm > 1e-12f) {
        float inv = __fdiv_rn(1.0f, nrm);
        for (int k = from; k < to; ++k) q[k * stride] = __fmul_rn(q[k * stride], inv);
    }
}

extern "C" __global__ void normalize_segments(float* qt, long long nq_total, const int* seg, int nseg) {
    long long q = gid();
    if (q >= nq_total) return;
    for (int s = 0; s < nseg; ++s) unit_rows(qt + q, nq_total, seg[s], seg[s + 1]);
    unit_rows(qt + q, nq_total, 0, seg[nseg]);
}

// |q|^2 of every column (L2 layers).
extern "C" __global__ void column_sq(const float* qt, long long nq_total, int dim, float* out) {
    long long q = gid();
    if (q >= nq_total) return;
    float s = 0.0f;
    for (int k = 0; k < dim; ++k) s = madd(s, qt[k * nq_total + q], qt[k * nq_total + q]);
    out[q] = s;
}

// Best similarity (L2: 2 q.b - |b|^2) of query q over bank rows [b0 + split * per_split, ...) of
// this chunk (nb rows): windowed (|dx|, |dy| <= r around the query's place) and global.
extern "C" __global__ void knn_partial(const float* S, long long nq, int nb, int b0, int per_split,
                                       const float* bsq, const float* bpos, int gw, int gh, int use_window,
                                       float r, float* pbest, int* parg) {
    long long q = gid();
    if (q >= nq) return;
    int split = blockIdx.y, nsplit = gridDim.y;
    int from = split * per_split, to = min(nb, from + per_split);
    int local = (int)(q % ((long long)gw * gh));
    float qx = ((float)(local % gw) + 0.5f) / (float)gw;
    float qy = ((float)(local / gw) + 0.5f) / (float)gh;
    float wb = NEG_INF, gb = NEG_INF;
    int wa = 0, ga = 0;
    for (int b = from; b < to; ++b) {
        float v = S[(size_t)b * nq + q];
        int row = b0 + b;
        if (bsq) v = 2.0f * v - bsq[row];
        if (v > gb) {
            gb = v;
            ga = row;
        }
        if (use_window && v > wb && fabsf(bpos[2 * row] - qx) <= r && fabsf(bpos[2 * row + 1] - qy) <= r) {
            wb = v;
            wa = row;
        }
    }
    pbest[(size_t)split * nq + q] = wb;
    parg[(size_t)split * nq + q] = wa;
    pbest[(size_t)(nsplit + split) * nq + q] = gb;
    parg[(size_t)(nsplit + split) * nq + q] = ga;
}

// Folds the slices (in bank order) into best[2][nq] / arg[2][nq] (windowed, global).
extern "C" __global__ void knn_merge(const float* pbest, const int* parg, int nsplit, long long nq, float* best,
                                     int* arg, int first) {
    long long q = gid();
    if (q >= nq) return;
    for (int kind = 0; kind < 2; ++kind) {
        float b = first ? NEG_INF : best[kind * nq + q];
        int a = first ? 0 : arg[kind * nq + q];
        for (int s = 0; s < nsplit; ++s) {
            float v = pbest[(size_t)(kind * nsplit + s) * nq + q];
            if (v > b) {
                b = v;
                a = parg[(size_t)(kind * nsplit + s) * nq + q];
            }
        }
        best[kind * nq + q] = b;
        arg[kind * nq + q] = a;
    }
}

// Distance: cosine 1 - s (at least 0), L2 sqrt(|q|^2 - s); a query whose window held no bank row
// takes its global nearest.
extern "C" __global__ void knn_finish(const float* best, const int* arg, const float* qsq, long long nq,
                                      int use_window, float* dist, int* nearest) {
    long long q = gid();
    if (q >= nq) return;
    int kind = (use_window && best[q] != NEG_INF) ? 0 : 1;
    float s = best[kind * nq + q];
    nearest[q] = arg[kind * nq + q];
    dist[q] = qsq ? __fsqrt_rn(fmaxf(__fadd_rn(qsq[q], -s), 0.0f)) : fmaxf(__fadd_rn(1.0f, -s), 0.0f);
}
