// Shared by every anomalyd kernel file; NVRTC compiles them as one program (no system headers).
// Arithmetic that the CPU reference does in a fixed order uses the _rn intrinsics, so that the
// compiler does not contract it into fused multiply-adds and the GPU rounds exactly as the CPU does.
#define NEG_INF __int_as_float(0xff800000)
typedef unsigned char u8;
typedef unsigned int u32;

__device__ __forceinline__ float madd(float acc, float a, float b) { return __fadd_rn(acc, __fmul_rn(a, b)); }
__device__ __forceinline__ long long gid() { return (long long)blockIdx.x * blockDim.x + threadIdx.x; }
