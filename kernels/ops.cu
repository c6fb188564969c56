// Fused encoder kernels for the CUDA engine: fp16/bf16/fp32 in memory, fp32 arithmetic inside.
// Each kernel is instantiated per dtype as <name>_f16, <name>_bf16 and <name>_f32 (extern "C").
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <stdint.h>

__device__ __forceinline__ float to_f32(float x) { return x; }
__device__ __forceinline__ float to_f32(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_f32(__nv_bfloat16 x) { return __bfloat162float(x); }
template <typename T> __device__ __forceinline__ T from_f32(float x);
template <> __device__ __forceinline__ float from_f32<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_f32<__half>(float x) { return __float2half(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float x) { return __float2bfloat16(x); }

// Sum over the block; every thread gets the result. `scratch` holds 32 floats.
__device__ float block_sum(float value, float* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  for (int offset = 16; offset > 0; offset >>= 1) value += __shfl_xor_sync(0xffffffff, value, offset);
  __syncthreads();
  if (lane == 0) scratch[warp] = value;
  __syncthreads();
  const int warps = (blockDim.x + 31) >> 5;
  value = threadIdx.x < warps ? scratch[threadIdx.x] : 0.0f;
  if (warp == 0) {
    for (int offset = 16; offset > 0; offset >>= 1) value += __shfl_xor_sync(0xffffffff, value, offset);
    if (lane == 0) scratch[0] = value;
  }
  __syncthreads();
  return scratch[0];
}

__device__ float block_max(float value, float* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  for (int offset = 16; offset > 0; offset >>= 1) value = fmaxf(value, __shfl_xor_sync(0xffffffff, value, offset));
  __syncthreads();
  if (lane == 0) scratch[warp] = value;
  __syncthreads();
  const int warps = (blockDim.x + 31) >> 5;
  value = threadIdx.x < warps ? scratch[threadIdx.x] : -INFINITY;
  if (warp == 0) {
    for (int offset = 16; offset > 0; offset >>= 1) value = fmaxf(value, __shfl_xor_sync(0xffffffff, value, offset));
    if (lane == 0) scratch[0] = value;
  }
  __syncthreads();
  return scratch[0];
}

// LayerNorm of one row held in shared memory (`row`, n floats), written to `out` with gamma and beta.
template <typename T>
__device__ void layer_norm_row(const float* row, int n, const T* gamma, const T* beta, float eps, T* out,
                               float* scratch) {
  float sum = 0.0f;
  for (int i = threadIdx.x; i < n; i += blockDim.x) sum += row[i];
  const float mean = block_sum(sum, scratch) / n;
  float squares = 0.0f;
  for (int i = threadIdx.x; i < n; i += blockDim.x) {
    const float d = row[i] - mean;
    squares += d * d;
  }
  const float inv = rsqrtf(block_sum(squares, scratch) / n + eps);
  for (int i = threadIdx.x; i < n; i += blockDim.x)
    out[i] = from_f32<T>((row[i] - mean) * inv * to_f32(gamma[i]) + to_f32(beta[i]));
}

// 1. Embeddings: word + position + token type (type table optional), then LayerNorm. One block per token.
template <typename T>
__device__ void embed_layer_norm(const uint32_t* ids, const uint32_t* positions, const uint32_t* types,
                                 const T* word, const T* position, const T* type_table, const T* gamma,
                                 const T* beta, T* out, int hidden, float eps) {
  extern __shared__ float row[];
  __shared__ float scratch[32];
  const int token = blockIdx.x;
  const T* w = word + (size_t)ids[token] * hidden;
  const T* p = position + (size_t)positions[token] * hidden;
  const T* t = type_table ? type_table + (size_t)types[token] * hidden : nullptr;
  for (int i = threadIdx.x; i < hidden; i += blockDim.x)
    row[i] = to_f32(w[i]) + to_f32(p[i]) + (t ? to_f32(t[i]) : 0.0f);
  __syncthreads();
  layer_norm_row(row, hidden, gamma, beta, eps, out + (size_t)token * hidden, scratch);
}

// 2. LayerNorm(x + bias + residual). One block per row.
template <typename T>
__device__ void add_bias_layer_norm(const T* x, const T* bias, const T* residual, const T* gamma, const T* beta,
                                    T* out, int n, float eps) {
  extern __shared__ float row[];
  __shared__ float scratch[32];
  const size_t offset = (size_t)blockIdx.x * n;
  for (int i = threadIdx.x; i < n; i += blockDim.x)
    row[i] = to_f32(x[offset + i]) + to_f32(bias[i]) + to_f32(residual[offset + i]);
  __syncthreads();
  layer_norm_row(row, n, gamma, beta, eps, out + offset, scratch);
}

// 3. act(x + bias) over [rows, n]: 0 exact GELU (erf), 1 GELU tanh approximation, 2 ReLU, 3 tanh.
template <typename T>
__device__ void bias_act(const T* x, const T* bias, T* out, size_t total, int n, int act) {
  for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += (size_t)gridDim.x * blockDim.x) {
    const float v = to_f32(x[i]) + to_f32(bias[i % n]);
    float y;
    switch (act) {
      case 0: y = 0.5f * v * (1.0f + erff(v * 0.70710678118654752f)); break;
      case 1: y = 0.5f * v * (1.0f + tanhf(0.7978845608028654f * (v + 0.044715f * v * v * v))); break;
      case 2: y = fmaxf(v, 0.0f); break;
      default: y = tanhf(v); break;
    }
    out[i] = from_f32<T>(y);
  }
}

// 4. softmax(scores * scale) over each row's real keys; padding keys get 0. scores: [batch, heads, q_rows, seq],
// one block per row; lengths[b] real keys for sequence b. Every sequence has a real key, so no row is empty
// and padded query rows stay finite.
// Scores may be fp32 (from a GEMM with fp32 output) while the probabilities are written in the model dtype.
template <typename TIn, typename T>
__device__ void masked_softmax(const TIn* scores, const uint32_t* lengths, T* out, int rows_per_sequence, int seq,
                               float scale) {
  __shared__ float scratch[32];
  const size_t row = blockIdx.x;
  const int len = max(1, min((int)lengths[row / rows_per_sequence], seq));
  const TIn* s = scores + row * seq;
  T* o = out + row * seq;
  float local_max = -INFINITY;
  for (int j = threadIdx.x; j < len; j += blockDim.x) local_max = fmaxf(local_max, to_f32(s[j]) * scale);
  const float row_max = block_max(local_max, scratch);
  float local_sum = 0.0f;
  for (int j = threadIdx.x; j < len; j += blockDim.x) local_sum += __expf(to_f32(s[j]) * scale - row_max);
  const float inv = 1.0f / block_sum(local_sum, scratch);
  for (int j = threadIdx.x; j < seq; j += blockDim.x)
    o[j] = from_f32<T>(j < len ? __expf(to_f32(s[j]) * scale - row_max) * inv : 0.0f);
}

#define INSTANTIATE(T, SUFFIX)                                                                                   \
  extern "C" __global__ void embed_layer_norm_##SUFFIX(const uint32_t* ids, const uint32_t* positions,          \
      const uint32_t* types, const T* word, const T* position, const T* type_table, const T* gamma,             \
      const T* beta, T* out, int hidden, float eps) {                                                            \
    embed_layer_norm<T>(ids, positions, types, word, position, type_table, gamma, beta, out, hidden, eps);       \
  }                                                                                                              \
  extern "C" __global__ void add_bias_layer_norm_##SUFFIX(const T* x, const T* bias, const T* residual,         \
      const T* gamma, const T* beta, T* out, int n, float eps) {                                                 \
    add_bias_layer_norm<T>(x, bias, residual, gamma, beta, out, n, eps);                                         \
  }                                                                                                              \
  extern "C" __global__ void bias_act_##SUFFIX(const T* x, const T* bias, T* out, size_t total, int n, int act) { \
    bias_act<T>(x, bias, out, total, n, act);                                                                    \
  }                                                                                                              \
  extern "C" __global__ void masked_softmax_##SUFFIX(const T* scores, const uint32_t* lengths, T* out,          \
      int rows_per_sequence, int seq, float scale) {                                                             \
    masked_softmax<T, T>(scores, lengths, out, rows_per_sequence, seq, scale);                                   \
  }                                                                                                              \
  extern "C" __global__ void masked_softmax_from_f32_##SUFFIX(const float* scores, const uint32_t* lengths,      \
      T* out, int rows_per_sequence, int seq, float scale) {                                                     \
    masked_softmax<float, T>(scores, lengths, out, rows_per_sequence, seq, scale);                               \
  }

INSTANTIATE(float, f32)
INSTANTIATE(__half, f16)
INSTANTIATE(__nv_bfloat16, bf16)
