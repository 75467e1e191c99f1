// Preprocessing: an RGB8 frame -> the encoder input, exactly as the CPU does it (image's triangle
// resize: a vertical pass into f32 rows, then a horizontal pass rounded to u8), then normalised NCHW.
// Filter taps come from the host (left index, count, offset into the weight list) per output line.

// tmp[y][i] for i over the w*3 bytes of a row: the vertical filter over source rows.
extern "C" __global__ void resize_v(const u8* src, int w3, int dst_h, const int* left, const int* count,
                                    const int* offset, const float* weights, float* tmp) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    int y = blockIdx.y;
    if (i >= w3 || y >= dst_h) return;
    int l = left[y], n = count[y], o = offset[y];
    float t = 0.0f;
    for (int k = 0; k < n; ++k) t = madd(t, (float)src[(size_t)(l + k) * w3 + i], weights[o + k]);
    tmp[(size_t)y * w3 + i] = t;
}

// out[y][x][c]: the horizontal filter over tmp's columns, clamped and rounded half away from zero.
extern "C" __global__ void resize_h(const float* tmp, int src_w, int dst_w, int h, const int* left,
                                    const int* count, const int* offset, const float* weights, u8* out) {
    int x = blockIdx.x * blockDim.x + threadIdx.x;
    int y = blockIdx.y;
    if (x >= dst_w || y >= h) return;
    int l = left[x], n = count[x], o = offset[x];
    float r = 0.0f, g = 0.0f, b = 0.0f;
    for (int k = 0; k < n; ++k) {
        const float* p = tmp + ((size_t)y * src_w + l + k) * 3;
        float wk = weights[o + k];
        r = madd(r, p[0], wk);
        g = madd(g, p[1], wk);
        b = madd(b, p[2], wk);
    }
    u8* q = out + ((size_t)y * dst_w + x) * 3;
    q[0] = (u8)roundf(fminf(fmaxf(r, 0.0f), 255.0f));
    q[1] = (u8)roundf(fminf(fmaxf(g, 0.0f), 255.0f));
    q[2] = (u8)roundf(fminf(fmaxf(b, 0.0f), 255.0f));
}

// HWC u8 -> CHW f32 with v * mul[c] + add[c] (mul = scale / std, add = -mean / std).
extern "C" __global__ void to_nchw(const u8* img, int hw, float m0, float m1, float m2, float a0, float a1,
                                   float a2, float* out) {
    long long i = gid();
    if (i >= hw) return;
    const u8* p = img + i * 3;
    out[i] = __fadd_rn(__fmul_rn((float)p[0], m0), a0);
    out[hw + i] = __fadd_rn(__fmul_rn((float)p[1], m1), a1);
    out[2 * (long long)hw + i] = __fadd_rn(__fmul_rn((float)p[2], m2), a2);
}
