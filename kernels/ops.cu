// Fused encoder kernels for the CUDA engine: fp16/bf16/fp32 in memory, fp32 arithmetic inside.
// Each kernel is instantiated per model dtype T as <name>_f16, <name>_bf16 and <name>_f32 (extern "C").
// The residual stream (LayerNorm outputs) and the LayerNorm parameters are fp32 whatever T is: rounding them to
// fp16 at every sublayer is the largest source of drift from an fp32 reference. Each LayerNorm kernel also
// writes its output in T, the input of the next GEMM.
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <stdint.h>
#include <mma.h>

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

__device__ __forceinline__ float warp_sum(float v) {
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffff, v, offset);
  return v;
}

// Rows of up to WARP_ROW_MAX values are normalized by one warp with the row in registers; longer rows by a block.
constexpr int WARP_ROW_MAX = 1024;
constexpr int PER_LANE = WARP_ROW_MAX / 32;

// LayerNorm of `v` (this lane's values i = lane + 32k of an n-wide row) written to out (fp32) and gemm_out (T,
// optional).
template <typename T>
__device__ void layer_norm_warp_row(float (&v)[PER_LANE], int n, const float* gamma, const float* beta, float eps,
                                    float* out, T* gemm_out) {
  const int lane = threadIdx.x & 31;
  float sum = 0.0f;
#pragma unroll
  for (int k = 0; k < PER_LANE; ++k)
    if (lane + 32 * k < n) sum += v[k];
  const float mean = warp_sum(sum) / n;
  float squares = 0.0f;
#pragma unroll
  for (int k = 0; k < PER_LANE; ++k)
    if (lane + 32 * k < n) squares += (v[k] - mean) * (v[k] - mean);
  const float inv = rsqrtf(warp_sum(squares) / n + eps);
#pragma unroll
  for (int k = 0; k < PER_LANE; ++k) {
    const int i = lane + 32 * k;
    if (i < n) {
      const float y = (v[k] - mean) * inv * gamma[i] + beta[i];
      out[i] = y;
      if (gemm_out) gemm_out[i] = from_f32<T>(y);
    }
  }
}

// The same for rows of any length: one block per row, the row in shared memory (`row`, n floats).
template <typename T>
__device__ void layer_norm_block_row(const float* row, int n, const float* gamma, const float* beta, float eps,
                                     float* out, T* gemm_out, float* scratch) {
  float sum = 0.0f;
  for (int i = threadIdx.x; i < n; i += blockDim.x) sum += row[i];
  const float mean = block_sum(sum, scratch) / n;
  float squares = 0.0f;
  for (int i = threadIdx.x; i < n; i += blockDim.x) squares += (row[i] - mean) * (row[i] - mean);
  const float inv = rsqrtf(block_sum(squares, scratch) / n + eps);
  for (int i = threadIdx.x; i < n; i += blockDim.x) {
    const float y = (row[i] - mean) * inv * gamma[i] + beta[i];
    out[i] = y;
    if (gemm_out) gemm_out[i] = from_f32<T>(y);
  }
}

// 1. Embeddings: word + position + token type, then LayerNorm. One warp per token (hidden <= WARP_ROW_MAX).
template <typename T>
__device__ void embed_layer_norm(const uint32_t* ids, const uint32_t* positions, const uint32_t* types,
                                 const T* word, const T* position, const T* type_table, const float* gamma,
                                 const float* beta, float* out, T* gemm_out, int tokens, int hidden, float eps) {
  const int token = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5), lane = threadIdx.x & 31;
  if (token >= tokens) return;
  const T* w = word + (size_t)ids[token] * hidden;
  const T* p = position + (size_t)positions[token] * hidden;
  const T* t = type_table + (size_t)types[token] * hidden;
  float v[PER_LANE];
#pragma unroll
  for (int k = 0; k < PER_LANE; ++k) {
    const int i = lane + 32 * k;
    v[k] = i < hidden ? to_f32(w[i]) + to_f32(p[i]) + to_f32(t[i]) : 0.0f;
  }
  const size_t offset = (size_t)token * hidden;
  layer_norm_warp_row(v, hidden, gamma, beta, eps, out + offset, gemm_out ? gemm_out + offset : nullptr);
}

// 2. LayerNorm(x + bias + residual): x and bias in T (a GEMM's output and bias), the residual in fp32.
// One warp per row (n <= WARP_ROW_MAX).
template <typename T>
__device__ void add_bias_layer_norm(const T* x, const T* bias, const float* residual, const float* gamma,
                                    const float* beta, float* out, T* gemm_out, int rows, int n, float eps) {
  const int row = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5), lane = threadIdx.x & 31;
  if (row >= rows) return;
  const size_t offset = (size_t)row * n;
  float v[PER_LANE];
#pragma unroll
  for (int k = 0; k < PER_LANE; ++k) {
    const int i = lane + 32 * k;
    v[k] = i < n ? to_f32(x[offset + i]) + to_f32(bias[i]) + residual[offset + i] : 0.0f;
  }
  layer_norm_warp_row(v, n, gamma, beta, eps, out + offset, gemm_out ? gemm_out + offset : nullptr);
}

// Four consecutive values as fp32, from and to memory aligned to four elements.
template <typename T>
__device__ __forceinline__ void load4(const T* p, float (&out)[4]) {
  if constexpr (sizeof(T) == 4) {
    const float4 t = *reinterpret_cast<const float4*>(p);
    out[0] = t.x, out[1] = t.y, out[2] = t.z, out[3] = t.w;
  } else {
    __align__(8) T t[4];
    *reinterpret_cast<uint2*>(t) = *reinterpret_cast<const uint2*>(p);
#pragma unroll
    for (int j = 0; j < 4; ++j) out[j] = to_f32(t[j]);
  }
}

template <typename T>
__device__ __forceinline__ void store4(T* p, const float (&in)[4]) {
  if constexpr (sizeof(T) == 4) {
    *reinterpret_cast<float4*>(p) = make_float4(in[0], in[1], in[2], in[3]);
  } else {
    __align__(8) T t[4];
#pragma unroll
    for (int j = 0; j < 4; ++j) t[j] = from_f32<T>(in[j]);
    *reinterpret_cast<uint2*>(p) = *reinterpret_cast<const uint2*>(t);
  }
}

// 2a. add_bias_layer_norm for rows that are a multiple of 128 values: each lane moves 4 consecutive values per
// access (wider transactions), otherwise identical.
template <typename T>
__device__ void add_bias_layer_norm_vec(const T* x, const T* bias, const float* residual, const float* gamma,
                                        const float* beta, float* out, T* gemm_out, int rows, int n, float eps) {
  constexpr int GROUPS = PER_LANE / 4;
  const int row = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5), lane = threadIdx.x & 31;
  if (row >= rows) return;
  const size_t offset = (size_t)row * n;
  const int groups = n / 128;
  float v[GROUPS][4];
  float sum = 0.0f;
#pragma unroll
  for (int g = 0; g < GROUPS; ++g) {
    if (g < groups) {
      const int i = (lane + 32 * g) * 4;
      float xs[4], bs[4], rs[4];
      load4(x + offset + i, xs);
      load4(bias + i, bs);
      load4(residual + offset + i, rs);
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        v[g][j] = xs[j] + bs[j] + rs[j];
        sum += v[g][j];
      }
    }
  }
  const float mean = warp_sum(sum) / n;
  float squares = 0.0f;
#pragma unroll
  for (int g = 0; g < GROUPS; ++g)
    if (g < groups)
#pragma unroll
      for (int j = 0; j < 4; ++j) squares += (v[g][j] - mean) * (v[g][j] - mean);
  const float inv = rsqrtf(warp_sum(squares) / n + eps);
#pragma unroll
  for (int g = 0; g < GROUPS; ++g) {
    if (g < groups) {
      const int i = (lane + 32 * g) * 4;
      float gs[4], be[4], y[4];
      load4(gamma + i, gs);
      load4(beta + i, be);
#pragma unroll
      for (int j = 0; j < 4; ++j) y[j] = (v[g][j] - mean) * inv * gs[j] + be[j];
      store4(out + offset + i, y);
      if (gemm_out) store4(gemm_out + offset + i, y);
    }
  }
}

// 2b. The same for rows longer than WARP_ROW_MAX: one block per row.
template <typename T>
__device__ void add_bias_layer_norm_wide(const T* x, const T* bias, const float* residual, const float* gamma,
                                         const float* beta, float* out, T* gemm_out, int n, float eps) {
  extern __shared__ float row[];
  __shared__ float scratch[32];
  const size_t offset = (size_t)blockIdx.x * n;
  for (int i = threadIdx.x; i < n; i += blockDim.x) row[i] = to_f32(x[offset + i]) + to_f32(bias[i]) + residual[offset + i];
  __syncthreads();
  layer_norm_block_row(row, n, gamma, beta, eps, out + offset, gemm_out ? gemm_out + offset : nullptr, scratch);
}

// 3. act(x + bias) over [rows, n]: 0 exact GELU (erf), 1 GELU tanh approximation, 2 ReLU, 3 tanh, 4 SiLU.
// Grid: (rows, column blocks), so no per-element division. Each thread takes VEC consecutive columns with one
// 16-byte load and store when VEC * sizeof(T) == 16 (n a multiple of VEC), one column otherwise.
__device__ __forceinline__ float activate(float v, int act) {
  switch (act) {
    case 0: return 0.5f * v * (1.0f + erff(v * 0.70710678118654752f));
    case 1: return 0.5f * v * (1.0f + tanhf(0.7978845608028654f * (v + 0.044715f * v * v * v)));
    case 2: return fmaxf(v, 0.0f);
    case 4: return v / (1.0f + expf(-v));
    default: return tanhf(v);
  }
}

template <typename T, int VEC>
__device__ void bias_act(const T* x, const T* bias, T* out, int n, int act) {
  const int col = (blockIdx.y * blockDim.x + threadIdx.x) * VEC;
  if (col >= n) return;
  const size_t i = (size_t)blockIdx.x * n + col;
  if (VEC == 1) {
    out[i] = from_f32<T>(activate(to_f32(x[i]) + to_f32(bias[col]), act));
    return;
  }
  __align__(16) T vals[VEC];
  *reinterpret_cast<uint4*>(vals) = *reinterpret_cast<const uint4*>(x + i);
#pragma unroll
  for (int j = 0; j < VEC; ++j) vals[j] = from_f32<T>(activate(to_f32(vals[j]) + to_f32(bias[col + j]), act));
  *reinterpret_cast<uint4*>(out + i) = *reinterpret_cast<uint4*>(vals);
}

// 4a. softmax(scores * scale) over each row's real keys; padding keys get 0. scores: [batch, heads, q_rows, seq],
// one block per row; lengths[b] real keys for sequence b. Used where the fused kernel below does not apply
// (fp32 models, head sizes other than 32 and 64). Every sequence has a real key, so padded query rows stay finite.
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

// 4b. Fused self-attention for a padded batch, on tensor cores (fp16/bf16 operands, fp32 accumulation).
// qkv: the fused projection's output without its bias, [batch * seq, 3 * hidden], Q | K | V with heads of D
// columns each; bias: [3 * hidden]. out: [batch * q_rows, hidden], the context of each sequence's first q_rows
// rows (q_rows = seq for a full layer, 1 for the [CLS]-only last layer). Rows past a sequence's length get zeros.
// Block: 4 warps and 64 query rows of one (sequence, head); each warp owns 16 rows. Keys come in chunks of 64.
// Two passes over the keys keep the softmax exact in fp32: the first finds each row's max and sum, the second
// forms the normalized probabilities (rounded to T) and accumulates P·V. Scores never leave fp32.
namespace fused {
constexpr int WARPS = 4;
constexpr int Q_TILE = 16 * WARPS;
constexpr int K_TILE = 64;
constexpr int SCORE_LD = K_TILE + 4;  // floats per score row (padded against bank conflicts)

template <int D> struct Dims {
  static constexpr int LD = D + 8;  // elements per staged row
};

// One 64-row tile of one head's columns (`column` within a qkv row), moved global -> registers -> shared memory
// in two steps, so the next tile's loads are in flight while the current one is used. Each thread moves whole
// 16-byte vectors and always the same 8 columns, so it keeps the bias of those columns in registers. Rows at or
// past `limit` become zeros.
template <typename T, int D>
struct Tile {
  static constexpr int VEC = 8, THREADS = WARPS * 32, PER_THREAD = K_TILE * D / VEC / THREADS;
  static_assert(Q_TILE == K_TILE, "query and key tiles share the loader");
  uint4 raw[PER_THREAD];
  uint4 bias;  // VEC values of T

  __device__ static int row_of(int k) { return (threadIdx.x + k * THREADS) / (D / VEC); }
  __device__ static int column_of() { return (threadIdx.x % (D / VEC)) * VEC; }

  __device__ void load_bias(const T* all_bias, int column) {
    bias = *reinterpret_cast<const uint4*>(all_bias + column + column_of());
  }

  __device__ void load(const T* base, int column, int row0, int limit, int stride) {
#pragma unroll
    for (int k = 0; k < PER_THREAD; ++k) {
      const int row = row0 + row_of(k);
      raw[k] = row < limit ? *reinterpret_cast<const uint4*>(base + (size_t)row * stride + column + column_of())
                           : make_uint4(0, 0, 0, 0);
    }
  }

  __device__ void store(T* dst, int row0, int limit) const {
    constexpr int LD = Dims<D>::LD;
#pragma unroll
    for (int k = 0; k < PER_THREAD; ++k) {
      const int r = row_of(k);
      const T* in = reinterpret_cast<const T*>(&raw[k]);
      const T* b = reinterpret_cast<const T*>(&bias);
      __align__(16) T vals[VEC];
#pragma unroll
      for (int j = 0; j < VEC; ++j) vals[j] = from_f32<T>(row0 + r < limit ? to_f32(in[j]) + to_f32(b[j]) : 0.0f);
      *reinterpret_cast<uint4*>(dst + r * LD + column_of()) = *reinterpret_cast<const uint4*>(vals);
    }
  }
};

// This warp's 16 x K_TILE raw scores Q·Kᵀ into `scores` (row-major, SCORE_LD).
template <typename T, int D>
__device__ void score_tile(const nvcuda::wmma::fragment<nvcuda::wmma::matrix_a, 16, 16, 16, T, nvcuda::wmma::row_major> (&q)[D / 16],
                           const T* k_tile, float* scores) {
  using namespace nvcuda;
  constexpr int LD = Dims<D>::LD;
#pragma unroll
  for (int n = 0; n < K_TILE / 16; ++n) {
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
    wmma::fill_fragment(acc, 0.0f);
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> k;
      wmma::load_matrix_sync(k, k_tile + n * 16 * LD + kk * 16, LD);
      wmma::mma_sync(acc, q[kk], k, acc);
    }
    wmma::store_matrix_sync(scores + n * 16, acc, SCORE_LD, wmma::mem_row_major);
  }
}
}  // namespace fused

template <typename T, int D>
__device__ void attention_fused(const T* qkv, const T* bias, const uint32_t* lengths, T* out, int seq, int heads,
                                int q_rows, float scale) {
  using namespace nvcuda;
  using namespace fused;
  constexpr int LD = Dims<D>::LD;
  static_assert(D % 16 == 0 && D <= K_TILE, "head size must be a multiple of 16 and at most 64");
  __shared__ __align__(32) T q_tile[Q_TILE * LD];
  __shared__ __align__(32) T k_tile[K_TILE * LD];
  __shared__ __align__(32) T v_tile[K_TILE * LD];
  __shared__ __align__(32) float score_tiles[WARPS * 16 * SCORE_LD];

  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int b = blockIdx.z, h = blockIdx.y, q0 = blockIdx.x * Q_TILE;
  const int len = max(1, min((int)lengths[b], seq));
  const int hidden = heads * D, stride = 3 * hidden;
  const int q_limit = min(q_rows, len);
  const T* base = qkv + (size_t)b * seq * stride;
  T* out_rows = out + (size_t)b * q_rows * hidden + h * D;

  if (q0 >= q_limit) {  // only padding rows: their context is zero
    for (int i = threadIdx.x; i < Q_TILE * D; i += blockDim.x) {
      const int r = q0 + i / D;
      if (r < q_rows) out_rows[(size_t)r * hidden + i % D] = from_f32<T>(0.0f);
    }
    return;
  }

  const int q_column = h * D, k_column = hidden + h * D, v_column = 2 * hidden + h * D;
  Tile<T, D> q_load, k_load, v_load;
  q_load.load_bias(bias, q_column);
  k_load.load_bias(bias, k_column);
  v_load.load_bias(bias, v_column);
  q_load.load(base, q_column, q0, q_limit, stride);
  k_load.load(base, k_column, 0, len, stride);
  q_load.store(q_tile, q0, q_limit);
  __syncthreads();
  wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> q[D / 16];
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) wmma::load_matrix_sync(q[kk], q_tile + warp * 16 * LD + kk * 16, LD);

  float* scores = score_tiles + warp * 16 * SCORE_LD;
  // Lanes 2r and 2r+1 own row r of the warp's scores, the even and the odd keys (interleaved, so a warp's
  // reads spread over the shared memory banks).
  const int row = lane >> 1, parity = lane & 1;
  const int chunks = (len + K_TILE - 1) / K_TILE;

  // Pass 1: running max and sum of exp per row.
  float row_max = -INFINITY, row_sum = 0.0f;
  for (int c = 0; c < chunks; ++c) {
    const int key0 = c * K_TILE;
    __syncthreads();  // the previous chunk's tile is no longer read
    k_load.store(k_tile, key0, len);
    __syncthreads();
    // The next tile's loads (or pass 2's first) fly while this chunk is scored.
    k_load.load(base, k_column, c + 1 < chunks ? key0 + K_TILE : 0, len, stride);
    score_tile<T, D>(q, k_tile, scores);
    __syncwarp();
    float s[32];
    float chunk_max = -INFINITY;
#pragma unroll
    for (int j = 0; j < 32; ++j) {
      const int col = 2 * j + parity;
      s[j] = key0 + col < len ? scores[row * SCORE_LD + col] * scale : -INFINITY;
      chunk_max = fmaxf(chunk_max, s[j]);
    }
    chunk_max = fmaxf(chunk_max, __shfl_xor_sync(0xffffffff, chunk_max, 1));
    const float new_max = fmaxf(row_max, chunk_max);
    float chunk_sum = 0.0f;
#pragma unroll
    for (int j = 0; j < 32; ++j) chunk_sum += __expf(s[j] - new_max);
    chunk_sum += __shfl_xor_sync(0xffffffff, chunk_sum, 1);
    row_sum = row_sum * __expf(row_max - new_max) + chunk_sum;
    row_max = new_max;
    __syncwarp();
  }
  const float inv_sum = 1.0f / row_sum;

  // Pass 2: P = exp(s - max) / sum, rounded to T in place of the scores, then context += P·V.
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> context[D / 16];
#pragma unroll
  for (int n = 0; n < D / 16; ++n) wmma::fill_fragment(context[n], 0.0f);
  T* probs = reinterpret_cast<T*>(scores);
  constexpr int PROBS_LD = 2 * SCORE_LD;  // the same rows, seen as T
  v_load.load(base, v_column, 0, len, stride);
  for (int c = 0; c < chunks; ++c) {
    const int key0 = c * K_TILE;
    __syncthreads();
    k_load.store(k_tile, key0, len);
    v_load.store(v_tile, key0, len);
    __syncthreads();
    if (c + 1 < chunks) {
      k_load.load(base, k_column, key0 + K_TILE, len, stride);
      v_load.load(base, v_column, key0 + K_TILE, len, stride);
    }
    score_tile<T, D>(q, k_tile, scores);
    __syncwarp();
    float p[32];
#pragma unroll
    for (int j = 0; j < 32; ++j) {
      const int col = 2 * j + parity;
      p[j] = key0 + col < len ? __expf(scores[row * SCORE_LD + col] * scale - row_max) * inv_sum : 0.0f;
    }
    __syncwarp();  // every lane has read its scores before any overwrites them
#pragma unroll
    for (int j = 0; j < 32; ++j) probs[row * PROBS_LD + 2 * j + parity] = from_f32<T>(p[j]);
    __syncwarp();
#pragma unroll
    for (int kk = 0; kk < K_TILE / 16; ++kk) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> pf;
      wmma::load_matrix_sync(pf, probs + kk * 16, PROBS_LD);
#pragma unroll
      for (int n = 0; n < D / 16; ++n) {
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> vf;
        wmma::load_matrix_sync(vf, v_tile + kk * 16 * LD + n * 16, LD);
        wmma::mma_sync(context[n], pf, vf, context[n]);
      }
    }
  }

  __syncwarp();
#pragma unroll
  for (int n = 0; n < D / 16; ++n) wmma::store_matrix_sync(scores + n * 16, context[n], SCORE_LD, wmma::mem_row_major);
  __syncwarp();
  for (int i = lane; i < 16 * D; i += 32) {
    const int r = i / D, d = i % D, q_row = q0 + warp * 16 + r;
    if (q_row < q_rows) out_rows[(size_t)q_row * hidden + d] = from_f32<T>(q_row < len ? scores[r * SCORE_LD + d] : 0.0f);
  }
}

#define INSTANTIATE(T, SUFFIX)                                                                                   \
  extern "C" __global__ void embed_layer_norm_##SUFFIX(const uint32_t* ids, const uint32_t* positions,          \
      const uint32_t* types, const T* word, const T* position, const T* type_table, const float* gamma,         \
      const float* beta, float* out, T* gemm_out, int tokens, int hidden, float eps) {                          \
    embed_layer_norm<T>(ids, positions, types, word, position, type_table, gamma, beta, out, gemm_out, tokens,  \
                        hidden, eps);                                                                            \
  }                                                                                                              \
  extern "C" __global__ void add_bias_layer_norm_##SUFFIX(const T* x, const T* bias, const float* residual,     \
      const float* gamma, const float* beta, float* out, T* gemm_out, int rows, int n, float eps) {              \
    add_bias_layer_norm<T>(x, bias, residual, gamma, beta, out, gemm_out, rows, n, eps);                         \
  }                                                                                                              \
  extern "C" __global__ void add_bias_layer_norm_vec_##SUFFIX(const T* x, const T* bias, const float* residual,  \
      const float* gamma, const float* beta, float* out, T* gemm_out, int rows, int n, float eps) {              \
    add_bias_layer_norm_vec<T>(x, bias, residual, gamma, beta, out, gemm_out, rows, n, eps);                     \
  }                                                                                                              \
  extern "C" __global__ void add_bias_layer_norm_wide_##SUFFIX(const T* x, const T* bias, const float* residual, \
      const float* gamma, const float* beta, float* out, T* gemm_out, int n, float eps) {                        \
    add_bias_layer_norm_wide<T>(x, bias, residual, gamma, beta, out, gemm_out, n, eps);                          \
  }                                                                                                              \
  extern "C" __global__ void bias_act_##SUFFIX(const T* x, const T* bias, T* out, int n, int act) {             \
    bias_act<T, 1>(x, bias, out, n, act);                                                                        \
  }                                                                                                              \
  extern "C" __global__ void bias_act_vec_##SUFFIX(const T* x, const T* bias, T* out, int n, int act) {         \
    bias_act<T, 16 / sizeof(T)>(x, bias, out, n, act);                                                           \
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

// Fused attention: fp16 on sm_70 and later, bf16 on sm_80 and later (the host checks the compute capability).
// At least 5 blocks (20 warps) per SM for D = 32 and 3 for D = 64 (its registers do not allow more without
// spilling): warps to hide the tile loads.
#define INSTANTIATE_ATTENTION(T, SUFFIX, D)                                                                      \
  extern "C" __global__ void __launch_bounds__(fused::WARPS * 32, D == 32 ? 5 : 3) attention_fused_d##D##_##SUFFIX( \
      const T* qkv, const T* bias, const uint32_t* lengths, T* out, int seq, int heads, int q_rows, float scale) { \
    attention_fused<T, D>(qkv, bias, lengths, out, seq, heads, q_rows, scale);                                   \
  }
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 700
INSTANTIATE_ATTENTION(__half, f16, 32)
INSTANTIATE_ATTENTION(__half, f16, 64)
#endif
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
INSTANTIATE_ATTENTION(__nv_bfloat16, bf16, 32)
INSTANTIATE_ATTENTION(__nv_bfloat16, bf16, 64)
#endif
