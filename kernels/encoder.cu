// The encoder's layers (netplan::Conv): convolution + bias, then the activation, then the residual.
// act: 0 none, 1 clip to [lo, hi]. Pointers that may be absent (bias, residual) are 0.

__device__ __forceinline__ float epilogue(float v, int act, float lo, float hi) {
    return act ? fminf(fmaxf(v, lo), hi) : v;
}

// Any convolution, one thread per output element (the stem and the depthwise layers).
extern "C" __global__ void conv_direct(const float* x, const float* wt, const float* bias, const float* res,
                                       float* y, int batch, int cin, int h, int w, int cout, int ho, int wo,
                                       int kh, int kw, int sh, int sw, int dh, int dw, int pt, int pl,
                                       int groups, int act, float lo, float hi) {
    long long idx = gid();
    long long total = (long long)batch * cout * ho * wo;
    if (idx >= total) return;
    int ox = (int)(idx % wo);
    long long t = idx / wo;
    int oy = (int)(t % ho);
    t /= ho;
    int co = (int)(t % cout);
    int n = (int)(t / cout);
    int cig = cin / groups, cog = cout / groups, g = co / cog;
    const float* xb = x + ((size_t)n * cin + (size_t)g * cig) * h * w;
    const float* wb = wt + (size_t)co * cig * kh * kw;
    float s = bias ? bias[co] : 0.0f;
    for (int ci = 0; ci < cig; ++ci) {
        const float* plane = xb + (size_t)ci * h * w;
        for (int ky = 0; ky < kh; ++ky) {
            int iy = oy * sh + ky * dh - pt;
            if (iy < 0 || iy >= h) continue;
            for (int kx = 0; kx < kw; ++kx) {
                int ix = ox * sw + kx * dw - pl;
                if (ix < 0 || ix >= w) continue;
                s += wb[(ci * kh + ky) * kw + kx] * plane[iy * w + ix];
            }
        }
    }
    s = epilogue(s, act, lo, hi);
    if (res) s += res[idx];
    y[idx] = s;
}

// C[z] (m x n) = A[z] (m x k) * B[z] (k x n), row-major, + bias[row], act, + R[z]; batch z = blockIdx.z
// with element strides sa, sb, sc (sa = 0 shares A: the 1x1 convolutions' weights). 64 x 64 tiles,
// 256 threads, 4 x 4 outputs each. Also the nearest-neighbour similarities when cuBLAS is absent.
#define TM 64
#define TN 64
#define TK 16
extern "C" __global__ void gemm_tiled(const float* A, const float* B, float* C, const float* bias, const float* R,
                                      int m, int n, int k, long long sa, long long sb, long long sc, int act,
                                      float lo, float hi) {
    __shared__ float As[TK][TM];
    __shared__ float Bs[TK][TN];
    int tid = threadIdx.x;
    int tx = tid % 16, ty = tid / 16;
    int m0 = blockIdx.y * TM, n0 = blockIdx.x * TN;
    A += blockIdx.z * sa;
    B += blockIdx.z * sb;
    C += blockIdx.z * sc;
    if (R) R += blockIdx.z * sc;
    float acc[4][4];
    for (int i = 0; i < 4; ++i)
        for (int j = 0; j < 4; ++j) acc[i][j] = 0.0f;
    for (int k0 = 0; k0 < k; k0 += TK) {
        for (int r = 0; r < 4; ++r) {
            int e = tid + 256 * r;
            int row = e / TK, kk = e % TK;
            int gm = m0 + row, gk = k0 + kk;
            As[kk][row] = (gm < m && gk < k) ? A[(size_t)gm * k + gk] : 0.0f;
            int kb = e / TN, col = e % TN;
            int gkb = k0 + kb, gn = n0 + col;
            Bs[kb][col] = (gkb < k && gn < n) ? B[(size_t)gkb * n + gn] : 0.0f;
        }
        __syncthreads();
        for (int kk = 0; kk < TK; ++kk) {
            float a[4], b[4];
            for (int i = 0; i < 4; ++i) a[i] = As[kk][ty + 16 * i];
            for (int j = 0; j < 4; ++j) b[j] = Bs[kk][tx + 16 * j];
            for (int i = 0; i < 4; ++i)
                for (int j = 0; j < 4; ++j) acc[i][j] += a[i] * b[j];
        }
        __syncthreads();
    }
    for (int i = 0; i < 4; ++i) {
        int gm = m0 + ty + 16 * i;
        if (gm >= m) continue;
        float bv = bias ? bias[gm] : 0.0f;
        for (int j = 0; j < 4; ++j) {
            int gn = n0 + tx + 16 * j;
            if (gn >= n) continue;
            size_t o = (size_t)gm * n + gn;
            float v = epilogue(acc[i][j] + bv, act, lo, hi);
            if (R) v += R[o];
            C[o] = v;
        }
    }
}
