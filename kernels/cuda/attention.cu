// Paged attention for decode rows over f16 K/V pages: one query row per sequence, keys read
// through the sequence's page table, online softmax (FlashAttention-style), grouped-query
// heads without repeating K/V, and an optional sliding window.
//
// Pool layout (one layer): [pages][page_size][kv_heads][head_dim] raw IEEE halves, K and V
// in separate pools. head_dim is a multiple of 32, at most 256.

__device__ __forceinline__ float h2f(unsigned short h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}

#define MAX_PER_LANE 8
#define NEG_INF __int_as_float(0xff800000)

// Grid: (sequences, heads); block: 32 * W threads (W warps, at most 8). Dynamic shared memory:
// W * (2 + head_dim) floats. q, out: [sequences, heads, head_dim]; page_table: [sequences,
// max_pages]; seq_len: keys per sequence (the query is at position seq_len - 1).
extern "C" __global__ void paged_attention_decode_f16(
    const float* __restrict__ q, const unsigned short* __restrict__ k_pool,
    const unsigned short* __restrict__ v_pool, const int* __restrict__ page_table,
    const int* __restrict__ seq_len, float* __restrict__ out, int heads, int kv_heads,
    int head_dim, int page_size, int max_pages, int window, float scale) {
    extern __shared__ float smem[];
    const int seq = blockIdx.x;
    const int head = blockIdx.y;
    const int kvh = head / (heads / kv_heads);
    const int warp = threadIdx.x / 32;
    const int lane = threadIdx.x % 32;
    const int warps = blockDim.x / 32;
    const int per_lane = head_dim / 32;
    const int len = seq_len[seq];
    const int first = window > 0 ? max(0, len - window) : 0;

    float qv[MAX_PER_LANE];
    float acc[MAX_PER_LANE];
    const float* qh = q + ((size_t)seq * heads + head) * head_dim;
    for (int i = 0; i < MAX_PER_LANE; ++i) {
        qv[i] = i < per_lane ? qh[lane + 32 * i] * scale : 0.0f;
        acc[i] = 0.0f;
    }
    float m = NEG_INF, l = 0.0f;
    for (int key = first + warp; key < len; key += warps) {
        const int page = page_table[(size_t)seq * max_pages + key / page_size];
        const size_t base =
            (((size_t)page * page_size + key % page_size) * kv_heads + kvh) * head_dim;
        float s = 0.0f;
        for (int i = 0; i < per_lane; ++i) s += qv[i] * h2f(k_pool[base + lane + 32 * i]);
        for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
        const float m_new = fmaxf(m, s);
        const float corr = expf(m - m_new);
        const float p = expf(s - m_new);
        l = l * corr + p;
        for (int i = 0; i < per_lane; ++i)
            acc[i] = acc[i] * corr + p * h2f(v_pool[base + lane + 32 * i]);
        m = m_new;
    }
    float* sm = smem;                 // [warps]
    float* sl = smem + warps;         // [warps]
    float* sacc = smem + 2 * warps;   // [warps][head_dim]
    if (lane == 0) {
        sm[warp] = m;
        sl[warp] = l;
    }
    for (int i = 0; i < per_lane; ++i) sacc[warp * head_dim + lane + 32 * i] = acc[i];
    __syncthreads();
    float mx = NEG_INF;
    for (int w = 0; w < warps; ++w) mx = fmaxf(mx, sm[w]);
    float total = 0.0f;
    for (int w = 0; w < warps; ++w) total += sm[w] == NEG_INF ? 0.0f : sl[w] * expf(sm[w] - mx);
    float* oh = out + ((size_t)seq * heads + head) * head_dim;
    for (int d = threadIdx.x; d < head_dim; d += blockDim.x) {
        float v = 0.0f;
        for (int w = 0; w < warps; ++w)
            if (sm[w] != NEG_INF) v += sacc[w * head_dim + d] * expf(sm[w] - mx);
        oh[d] = total > 0.0f ? v / total : 0.0f;
    }
}
