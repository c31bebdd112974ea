// Quantized kernels on GGUF blocks: activations quantized to 8 bits per 32 elements, the
// quantized matrix-vector product (int8 dot products with __dp4a, as llama.cpp's MMVQ), and
// embedding rows dequantized. Formats: Q8_0, Q4_0, Q4_1 (K-quants to follow).
// Block layouts are GGUF's, byte for byte; half values are read as raw bits.

__device__ __forceinline__ float half_to_float(unsigned short h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}

struct block_q8_0 { unsigned short d; signed char qs[32]; };                 // 34 bytes
struct block_q4_0 { unsigned short d; unsigned char qs[16]; };               // 18 bytes
struct block_q4_1 { unsigned short d; unsigned short m; unsigned char qs[16]; }; // 20 bytes
// Activations: scale d, s = d * sum(qs), 32 int8 values (4-byte aligned for __dp4a).
struct block_q8_1 { float d; float s; int qs[8]; };                            // 40 bytes

__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// x[rows, cols] (cols a multiple of 32) -> y[rows, cols / 32] blocks. One warp per block:
// blockDim = (32, 8), grid = (ceil(cols / 32 / 8), rows).
extern "C" __global__ void quantize_q8_1(const float* __restrict__ x,
                                         block_q8_1* __restrict__ y, int cols) {
    const int blocks = cols / 32;
    const int b = blockIdx.x * blockDim.y + threadIdx.y;
    const int row = blockIdx.y;
    if (b >= blocks) return;
    const float v = x[(size_t)row * cols + b * 32 + threadIdx.x];
    const float amax = warp_max(fabsf(v));
    const float d = amax / 127.0f;
    const int q = amax == 0.0f ? 0 : __float2int_rn(v / d);
    const int sum = (int)warp_sum((float)q);
    block_q8_1* out = y + (size_t)row * blocks + b;
    reinterpret_cast<signed char*>(out->qs)[threadIdx.x] = (signed char)q;
    if (threadIdx.x == 0) {
        out->d = d;
        out->s = d * (float)sum;
    }
}

__device__ __forceinline__ int pack4(const signed char* p) {
    return (int)(unsigned char)p[0] | ((int)(unsigned char)p[1] << 8) |
           ((int)(unsigned char)p[2] << 16) | ((int)(unsigned char)p[3] << 24);
}

__device__ __forceinline__ float dot_q8_0(const block_q8_0& w, const block_q8_1& a) {
    int acc = 0;
    #pragma unroll
    for (int i = 0; i < 8; ++i) acc = __dp4a(pack4(w.qs + 4 * i), a.qs[i], acc);
    return half_to_float(w.d) * a.d * (float)acc;
}

// Nibbles: element j < 16 is the low nibble of qs[j], element j + 16 its high nibble.
__device__ __forceinline__ int q4_dot(const unsigned char* qs, const block_q8_1& a) {
    int acc = 0;
    #pragma unroll
    for (int i = 0; i < 4; ++i) {
        const int packed = (int)qs[4 * i] | ((int)qs[4 * i + 1] << 8) |
                           ((int)qs[4 * i + 2] << 16) | ((int)qs[4 * i + 3] << 24);
        acc = __dp4a(packed & 0x0f0f0f0f, a.qs[i], acc);
        acc = __dp4a((packed >> 4) & 0x0f0f0f0f, a.qs[i + 4], acc);
    }
    return acc;
}

__device__ __forceinline__ float dot_q4_0(const block_q4_0& w, const block_q8_1& a) {
    // sum((q - 8) * qa) * dw * da = dw * (da * sum(q * qa) - 8 * s)
    const float dw = half_to_float(w.d);
    return dw * (a.d * (float)q4_dot(w.qs, a) - 8.0f * a.s);
}

__device__ __forceinline__ float dot_q4_1(const block_q4_1& w, const block_q8_1& a) {
    return half_to_float(w.d) * a.d * (float)q4_dot(w.qs, a) + half_to_float(w.m) * a.s;
}

// y[t, r] = sum_b dot(w[r, b], x[t, b]): one warp per output row, blockDim = (32, 4),
// grid = (ceil(rows / 4), tokens). w: rows x (cols / 32) blocks; x: tokens x (cols / 32).
#define MMVQ(NAME, BLOCK, DOT)                                                              \
extern "C" __global__ void NAME(const BLOCK* __restrict__ w,                                \
                                const block_q8_1* __restrict__ x,                           \
                                float* __restrict__ y, int rows, int cols) {                \
    const int blocks = cols / 32;                                                           \
    const int r = blockIdx.x * blockDim.y + threadIdx.y;                                    \
    const int t = blockIdx.y;                                                               \
    if (r >= rows) return;                                                                  \
    const BLOCK* wr = w + (size_t)r * blocks;                                               \
    const block_q8_1* xt = x + (size_t)t * blocks;                                          \
    float acc = 0.0f;                                                                       \
    for (int b = threadIdx.x; b < blocks; b += 32) acc += DOT(wr[b], xt[b]);                \
    acc = warp_sum(acc);                                                                    \
    if (threadIdx.x == 0) y[(size_t)t * rows + r] = acc;                                    \
}

MMVQ(mmvq_q8_0, block_q8_0, dot_q8_0)
MMVQ(mmvq_q4_0, block_q4_0, dot_q4_0)
MMVQ(mmvq_q4_1, block_q4_1, dot_q4_1)

// out[t, :] = dequantized row ids[t] of w (rows x cols). One block per token, 256 threads.
extern "C" __global__ void get_rows_q8_0(const block_q8_0* __restrict__ w,
                                         const int* __restrict__ ids,
                                         float* __restrict__ out, int cols) {
    const int blocks = cols / 32;
    const block_q8_0* row = w + (size_t)ids[blockIdx.x] * blocks;
    float* o = out + (size_t)blockIdx.x * cols;
    for (int i = threadIdx.x; i < cols; i += blockDim.x) {
        const block_q8_0& b = row[i / 32];
        o[i] = half_to_float(b.d) * (float)b.qs[i % 32];
    }
}

extern "C" __global__ void get_rows_q4_0(const block_q4_0* __restrict__ w,
                                         const int* __restrict__ ids,
                                         float* __restrict__ out, int cols) {
    const int blocks = cols / 32;
    const block_q4_0* row = w + (size_t)ids[blockIdx.x] * blocks;
    float* o = out + (size_t)blockIdx.x * cols;
    for (int i = threadIdx.x; i < cols; i += blockDim.x) {
        const block_q4_0& b = row[i / 32];
        const int j = i % 32;
        const int q = j < 16 ? (b.qs[j] & 0x0f) : (b.qs[j - 16] >> 4);
        o[i] = half_to_float(b.d) * (float)(q - 8);
    }
}

extern "C" __global__ void get_rows_q4_1(const block_q4_1* __restrict__ w,
                                         const int* __restrict__ ids,
                                         float* __restrict__ out, int cols) {
    const int blocks = cols / 32;
    const block_q4_1* row = w + (size_t)ids[blockIdx.x] * blocks;
    float* o = out + (size_t)blockIdx.x * cols;
    for (int i = threadIdx.x; i < cols; i += blockDim.x) {
        const block_q4_1& b = row[i / 32];
        const int j = i % 32;
        const int q = j < 16 ? (b.qs[j] & 0x0f) : (b.qs[j - 16] >> 4);
        o[i] = half_to_float(b.d) * (float)q + half_to_float(b.m);
    }
}
