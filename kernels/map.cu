// The anomaly map: background and zone masking, layer averaging, bilinear upsampling, Gaussian smoothing
// (reflected edges, host weights) and the image score (mean of the top k patch scores).

// Zeroes a grid cell whose cell (dilated by one) shows no foreground pixel of the prepared image.
extern "C" __global__ void mask_background(float* grid, int gw, int gh, int frames, const u8* img, int w, int h,
                                           float br, float bg, float bb, float tol) {
    long long idx = gid();
    if (idx >= (long long)frames * gw * gh) return;
    int cell = (int)(idx % ((long long)gw * gh));
    int f = (int)(idx / ((long long)gw * gh));
    int gx = cell % gw, gy = cell / gw;
    float cw = (float)w / (float)gw, ch = (float)h / (float)gh;
    u32 x0 = (u32)fmaxf(__fmul_rn((float)gx - 1.0f, cw), 0.0f);
    u32 y0 = (u32)fmaxf(__fmul_rn((float)gy - 1.0f, ch), 0.0f);
    u32 x1 = min((u32)__fmul_rn((float)(gx + 2), cw), (u32)w);
    u32 y1 = min((u32)__fmul_rn((float)(gy + 2), ch), (u32)h);
    const u8* im = img + (size_t)f * w * h * 3;
    for (u32 y = y0; y < y1; ++y)
        for (u32 x = x0; x < x1; ++x) {
            const u8* p = im + ((size_t)y * w + x) * 3;
            float d0 = __fadd_rn((float)p[0], -br), d1 = __fadd_rn((float)p[1], -bg), d2 = __fadd_rn((float)p[2], -bb);
            float d = __fsqrt_rn(madd(madd(__fmul_rn(d0, d0), d1, d1), d2, d2));
            if (d > tol) return;
        }
    grid[idx] = 0.0f;
}

// Zeroes the cells the operator's zones leave out: `keep` holds one flag per cell of one frame.
extern "C" __global__ void mask_cells(float* grid, int cells, int frames, const u8* keep) {
    long long idx = gid();
    if (idx >= (long long)frames * cells) return;
    if (!keep[idx % cells]) grid[idx] = 0.0f;
}

// dst (frames x dh x dw) = [dst +] bilinear resize of src (frames x sh x sw): a horizontal pass on
// the two source rows, then the vertical one, as Grid::resize.
extern "C" __global__ void grid_resize(const float* src, int sh, int sw, float* dst, int dh, int dw, int frames,
                                       const int* ya, const int* yb, const float* yt, const int* xa,
                                       const int* xb, const float* xt, int accumulate) {
    long long idx = gid();
    if (idx >= (long long)frames * dh * dw) return;
    int x = (int)(idx % dw), y = (int)((idx / dw) % dh), f = (int)(idx / ((long long)dh * dw));
    const float* s = src + (size_t)f * sh * sw;
    float t = xt[x];
    const float* ra = s + ya[y] * sw;
    const float* rb = s + yb[y] * sw;
    float ha = __fadd_rn(__fmul_rn(ra[xa[x]], 1.0f - t), __fmul_rn(ra[xb[x]], t));
    float hb = __fadd_rn(__fmul_rn(rb[xa[x]], 1.0f - t), __fmul_rn(rb[xb[x]], t));
    float u = yt[y];
    float v = __fadd_rn(__fmul_rn(ha, 1.0f - u), __fmul_rn(hb, u));
    dst[idx] = accumulate ? __fadd_rn(dst[idx], v) : v;
}

extern "C" __global__ void divide(float* x, long long n, float d) {
    long long i = gid();
    if (i < n) x[i] = __fdiv_rn(x[i], d);
}

__device__ __forceinline__ int reflect(int i, int n) {
    for (;;) {
        if (i < 0) i = -i - 1;
        else if (i >= n) i = 2 * n - i - 1;
        else return i;
    }
}

// One separable Gaussian pass over frames x h x w; horizontal when `vertical` is 0.
extern "C" __global__ void blur(const float* src, float* dst, int h, int w, int frames, const float* k, int r,
                                int vertical) {
    long long idx = gid();
    if (idx >= (long long)frames * h * w) return;
    int x = (int)(idx % w), y = (int)((idx / w) % h);
    const float* plane = src + (idx / ((long long)h * w)) * h * w;
    float s = 0.0f;
    for (int j = 0; j <= 2 * r; ++j) {
        float v = vertical ? plane[reflect(y + j - r, h) * w + x] : plane[y * w + reflect(x + j - r, w)];
        s = madd(s, k[j], v);
    }
    dst[idx] = s;
}

// Order-preserving map of floats to unsigned keys (total order, as f32::total_cmp).
__device__ __forceinline__ u32 key_of(float f) {
    u32 u = __float_as_uint(f);
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}
__device__ __forceinline__ float value_of(u32 key) {
    return __uint_as_float((key & 0x80000000u) ? (key & 0x7fffffffu) : ~key);
}

// Image score of each frame (one block of 256 threads per frame): the mean of its k largest values,
// found exactly by a 4-pass radix select of the k-th largest.
extern "C" __global__ void top_mean(const float* v, int len, int k, float* out) {
    __shared__ u32 hist[256];
    __shared__ u32 prefix, mask;
    __shared__ int need;
    __shared__ float red[256];
    const float* x = v + (size_t)blockIdx.x * len;
    int tid = threadIdx.x;
    if (tid == 0) {
        prefix = 0;
        mask = 0;
        need = k;
    }
    for (int shift = 24; shift >= 0; shift -= 8) {
        hist[tid] = 0;
        __syncthreads();
        for (int i = tid; i < len; i += 256) {
            u32 key = key_of(x[i]);
            if ((key & mask) == prefix) atomicAdd(&hist[(key >> shift) & 255u], 1u);
        }
        __syncthreads();
        if (tid == 0) {
            int left = need, bin = 255;
            for (; bin > 0; --bin) {
                if ((int)hist[bin] >= left) break;
                left -= (int)hist[bin];
            }
            prefix |= (u32)bin << shift;
            mask |= 255u << shift;
            need = left;
        }
        __syncthreads();
    }
    float s = 0.0f;
    for (int i = tid; i < len; i += 256)
        if (key_of(x[i]) > prefix) s += x[i];
    red[tid] = s;
    __syncthreads();
    for (int stride = 128; stride > 0; stride >>= 1) {
        if (tid < stride) red[tid] += red[tid + stride];
        __syncthreads();
    }
    if (tid == 0) out[blockIdx.x] = (red[0] + (float)need * value_of(prefix)) / (float)k;
}
