// The per-thread scratch blocks of workspace.h.
#include "workspace.h"

#include <cstdlib>

namespace fastdiff {
namespace cpu {

std::vector<at::Tensor> workspace(const std::vector<std::vector<int64_t>>& shapes, const at::TensorOptions& opt) {
  struct Block {
    void* p = nullptr;
    size_t n = 0;
    ~Block() { std::free(p); }
  };
  thread_local Block block;
  const size_t elem = opt.dtype().itemsize();
  std::vector<size_t> offsets;
  size_t total = 0;
  for (const auto& s : shapes) {
    size_t n = elem;
    for (int64_t d : s) n *= size_t(d);
    offsets.push_back(total);
    total += (n + 63) / 64 * 64;
  }
  std::vector<at::Tensor> out;
  if (total > (size_t(64) << 20)) {
    for (const auto& s : shapes) out.push_back(at::empty(s, opt));
    return out;
  }
  if (block.n < total) {
    std::free(block.p);
    block.n = (total + 4095) / 4096 * 4096;
    block.p = std::aligned_alloc(4096, block.n);
    TORCH_CHECK(block.p != nullptr, "fastdiff: could not allocate ", block.n, " bytes of scratch memory");
  }
  for (size_t i = 0; i < shapes.size(); i++)
    out.push_back(at::from_blob(static_cast<char*>(block.p) + offsets[i], shapes[i], opt));
  return out;
}


}  // namespace cpu
}  // namespace fastdiff
