// Multi-LoRA for decode-shaped batches on CPU, inference only:
//   out[t] += scale * (x[t] A[a]^T) B[a]^T   for every token t of adapter a (one adapter per token).
// The tokens come grouped by adapter (an AdapterPlan's sorted_token, adapters, offsets, counts); each
// group streams its adapter's A^T [d_in, r] and B^T [r, d_out] once, straight from the stored weights,
// with no gathered copy of x, no padded temporaries and no scatter: the groups run in parallel and each
// token's output row is written by its own group only.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

namespace {

// h[i][j] = sum_d x_i[d] A^T[d][j] for up to 4 tokens, JB columns of r at a time (4 x JB accumulators).
template <int JB>
void shrink4(const float* const* xs, int ni, const float* __restrict__ a_t, int64_t d_in, int64_t r, float* __restrict__ h) {
  for (int64_t j0 = 0; j0 < r; j0 += JB) {
    float acc[4][JB] = {};
    const float* x0 = xs[0];
    const float* x1 = xs[1];
    const float* x2 = xs[2];
    const float* x3 = xs[3];
    for (int64_t d = 0; d < d_in; ++d) {
      const float* __restrict__ row = a_t + d * r + j0;
      const float v0 = x0[d], v1 = x1[d], v2 = x2[d], v3 = x3[d];
      for (int jj = 0; jj < JB; ++jj) {
        const float w = row[jj];
        acc[0][jj] += v0 * w;
        acc[1][jj] += v1 * w;
        acc[2][jj] += v2 * w;
        acc[3][jj] += v3 * w;
      }
    }
    for (int i = 0; i < ni; ++i)
      for (int jj = 0; jj < JB; ++jj) h[i * r + j0 + jj] = acc[i][jj];
  }
}

// out_row[k] += sum_j h[j] B^T[j][k], KB outputs at a time kept in registers.
void expand(const float* __restrict__ h, const float* __restrict__ b_t, int64_t r, int64_t d_out, float* __restrict__ out_row) {
  constexpr int64_t KB = 64;
  int64_t k0 = 0;
  for (; k0 + KB <= d_out; k0 += KB) {
    float acc[KB];
    for (int k = 0; k < KB; ++k) acc[k] = out_row[k0 + k];
    for (int64_t j = 0; j < r; ++j) {
      const float hv = h[j];
      const float* __restrict__ row = b_t + j * d_out + k0;
      for (int k = 0; k < KB; ++k) acc[k] += hv * row[k];
    }
    for (int k = 0; k < KB; ++k) out_row[k0 + k] = acc[k];
  }
  for (; k0 < d_out; ++k0) {
    float acc = out_row[k0];
    for (int64_t j = 0; j < r; ++j) acc += h[j] * b_t[j * d_out + k0];
    out_row[k0] = acc;
  }
}

}  // namespace

// x [T, d_in]; a_t [K, d_in, r]; b_t [K, r, d_out]; out [T, d_out] (accumulated in place); all float32,
// contiguous, on CPU. Group g holds tokens sorted_token[offsets[g] : offsets[g] + counts[g]] of adapter adapters[g].
void lora_decode(const torch::Tensor& x, const torch::Tensor& a_t, const torch::Tensor& b_t, const torch::Tensor& sorted_token,
                 const std::vector<int64_t>& adapters, const std::vector<int64_t>& offsets, const std::vector<int64_t>& counts,
                 double scale, torch::Tensor& out) {
  for (const torch::Tensor* t : std::initializer_list<const torch::Tensor*>{&x, &a_t, &b_t, &out}) {
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == torch::kFloat32 && t->is_contiguous(),
                "lora_decode: expected contiguous float32 CPU tensors");
  }
  TORCH_CHECK(sorted_token.scalar_type() == torch::kInt64 && sorted_token.is_contiguous(), "lora_decode: sorted_token must be contiguous int64");
  const int64_t tokens = x.size(0), d_in = x.size(1), num_adapters = a_t.size(0), r = a_t.size(2), d_out = b_t.size(2);
  TORCH_CHECK(a_t.size(1) == d_in && b_t.size(0) == num_adapters && b_t.size(1) == r && out.size(0) == tokens && out.size(1) == d_out,
              "lora_decode: shapes do not fit");
  TORCH_CHECK(adapters.size() == offsets.size() && adapters.size() == counts.size(), "lora_decode: one offset and count per adapter");
  const float* xp = x.data_ptr<float>();
  const float* ap = a_t.data_ptr<float>();
  const float* bp = b_t.data_ptr<float>();
  const int64_t* tok = sorted_token.data_ptr<int64_t>();
  float* op = out.data_ptr<float>();
  const float s = static_cast<float>(scale);
  const std::vector<float> zeros(d_in, 0.f);  // stands in for missing tokens of a block of 4
  const int64_t groups = static_cast<int64_t>(adapters.size());
  for (int64_t g = 0; g < groups; ++g) {
    TORCH_CHECK(0 <= adapters[g] && adapters[g] < num_adapters && offsets[g] >= 0 && counts[g] >= 0 &&
                offsets[g] + counts[g] <= sorted_token.numel(), "lora_decode: group ", g, " out of range");
    for (int64_t i = offsets[g]; i < offsets[g] + counts[g]; ++i)
      TORCH_CHECK(0 <= tok[i] && tok[i] < tokens, "lora_decode: token ", tok[i], " out of range");
  }
  // groups dealt round-robin, largest first, so the threads get even shares of tokens and weights
  std::vector<int64_t> order(groups);
  for (int64_t g = 0; g < groups; ++g) order[g] = g;
  std::stable_sort(order.begin(), order.end(), [&](int64_t p, int64_t q) { return counts[p] > counts[q]; });
  const int64_t workers = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), groups));
  at::parallel_for(0, workers, 1, [&](int64_t w0, int64_t w1) {
    std::vector<float> h;
    for (int64_t w = w0; w < w1; ++w) {
      for (int64_t k = w; k < groups; k += workers) {
        const int64_t g = order[k];
        const int64_t a = adapters[g], off = offsets[g], n = counts[g];
        const float* a_g = ap + a * d_in * r;
        const float* b_g = bp + a * r * d_out;
        h.assign(n * r, 0.f);
        for (int64_t i0 = 0; i0 < n; i0 += 4) {
          const int ni = static_cast<int>(std::min<int64_t>(4, n - i0));
          const float* xs[4];
          for (int i = 0; i < 4; ++i) xs[i] = i < ni ? xp + tok[off + i0 + i] * d_in : zeros.data();
          float* h_block = h.data() + i0 * r;
          if (r % 16 == 0) shrink4<16>(xs, ni, a_g, d_in, r, h_block);
          else if (r % 8 == 0) shrink4<8>(xs, ni, a_g, d_in, r, h_block);
          else shrink4<1>(xs, ni, a_g, d_in, r, h_block);
        }
        for (float& v : h) v *= s;
        for (int64_t i = 0; i < n; ++i) expand(h.data() + i * r, b_g, r, d_out, op + tok[off + i] * d_out);
      }
    }
  });
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("lora_decode", &lora_decode, "multi-LoRA for decode-shaped batches, accumulated into out (CPU, float32, inference)");
}
