// Element-wise and row-wise kernels: RMSNorm, RoPE (interleaved and NeoX), the gated
// activations (SwiGLU, GeGLU-tanh) and an in-place add. f32 activations, row-major.
// Compiled at run time by NVRTC (daemon/cuda); each has a CPU twin in agentd-kernels.

// One block per row; blockDim.x is a power of two <= 1024.
// out[r, i] = x[r, i] / sqrt(mean(x[r, :]^2) + eps) * w[i]
extern "C" __global__ void rms_norm_f32(const float* __restrict__ x,
                                        const float* __restrict__ w,
                                        float* __restrict__ out, int cols, float eps) {
    extern __shared__ float partial[];
    const int row = blockIdx.x;
    const float* xr = x + (size_t)row * cols;
    float* outr = out + (size_t)row * cols;
    float sum = 0.0f;
    for (int i = threadIdx.x; i < cols; i += blockDim.x) {
        float v = xr[i];
        sum += v * v;
    }
    partial[threadIdx.x] = sum;
    __syncthreads();
    for (int s = blockDim.x / 2; s > 0; s >>= 1) {
        if (threadIdx.x < s) partial[threadIdx.x] += partial[threadIdx.x + s];
        __syncthreads();
    }
    const float scale = rsqrtf(partial[0] / (float)cols + eps);
    for (int i = threadIdx.x; i < cols; i += blockDim.x) {
        outr[i] = xr[i] * scale * w[i];
    }
}

// RoPE in place on x[rows, heads, head_dim]; row r is at position pos[r].
// Pairs (2i, 2i+1) when neox == 0 (llama), (i, i + head_dim/2) when neox != 0 (qwen2, gemma3).
// The angle of pair i is pos * base^(-2i / rot_dim); only the first rot_dim dims rotate.
// Grid: (rows, heads); block: rot_dim / 2 threads.
extern "C" __global__ void rope_f32(float* __restrict__ x, const int* __restrict__ pos,
                                    int heads, int head_dim, int rot_dim, float base,
                                    int neox) {
    const int row = blockIdx.x;
    const int head = blockIdx.y;
    const int i = threadIdx.x;
    if (2 * i >= rot_dim) return;
    float* h = x + ((size_t)row * heads + head) * head_dim;
    const float theta = (float)pos[row] * powf(base, -2.0f * (float)i / (float)rot_dim);
    float s, c;
    sincosf(theta, &s, &c);
    const int a = neox ? i : 2 * i;
    const int b = neox ? i + rot_dim / 2 : 2 * i + 1;
    const float x0 = h[a];
    const float x1 = h[b];
    h[a] = x0 * c - x1 * s;
    h[b] = x0 * s + x1 * c;
}

// out[i] = silu(gate[i]) * up[i]
extern "C" __global__ void swiglu_f32(const float* __restrict__ gate,
                                      const float* __restrict__ up,
                                      float* __restrict__ out, int n) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) {
        const float g = gate[i];
        out[i] = g / (1.0f + expf(-g)) * up[i];
    }
}

// out[i] = gelu_tanh(gate[i]) * up[i]
extern "C" __global__ void geglu_tanh_f32(const float* __restrict__ gate,
                                          const float* __restrict__ up,
                                          float* __restrict__ out, int n) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) {
        const float g = gate[i];
        const float inner = 0.7978845608028654f * (g + 0.044715f * g * g * g);
        out[i] = 0.5f * g * (1.0f + tanhf(inner)) * up[i];
    }
}

// x[i] += y[i]
extern "C" __global__ void add_f32(float* __restrict__ x, const float* __restrict__ y, int n) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) x[i] += y[i];
}
