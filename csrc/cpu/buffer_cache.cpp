// The buffer cache: memory for the activations a training forward saves for its backward (`act`,
// and the cell states when the caller does not keep them), kept after the tensors die so that the
// next forward reuses it.
//
// Why: these buffers are large ([T, B, 6H] float32 is 96 MiB at H = 1024, B = 64, T = 64). glibc
// serves allocations over 32 MiB with fresh mmap pages and returns them to the system on free, so
// every training forward faulted in and zeroed its buffers page by page on its threads' first
// writes (measured in bench/kernels/NOTES-cpu.md, "The buffer cache"). Smaller allocations come back
// from glibc's heap without it.
//
// Policy, the CUDA caching allocator's in miniature: a request takes the smallest cached block that
// holds it and wastes at most a quarter of the block, else new memory. A dying tensor's block goes
// back to the cache, the oldest cached blocks are freed while the cache would hold more than its
// limit (set_buffer_cache_limit; 0 turns it off), and empty_buffer_cache() frees every cached block.
// A training loop thus holds between iterations the one block its next forward takes: no more
// memory than the loop already had at its peak. The tensors' storage cannot be resized (from_blob);
// they never reach the user.
//
// Fork: a thread of the parent may hold the cache's lock when another forks, and the child, where
// that thread does not exist, would wait for it forever at its first training forward (or when a
// tensor from the cache dies). pthread_atfork handlers take the lock around fork() and release it
// in both processes, so the child starts with the cache as it was, unlocked.

#include "driver.h"

#include <algorithm>
#include <cstdint>
#include <limits>
#include <mutex>
#include <vector>

#if !defined(_WIN32)
#include <pthread.h>
#endif

#include <ATen/ops/from_blob.h>
#include <c10/core/impl/alloc_cpu.h>
#include <c10/util/accumulate.h>

namespace fastmlstm {
namespace cpu {
namespace {

struct Block {
  void* ptr;
  size_t bytes;
};

class BufferCache {
 public:
  // A block of at least `bytes` (its size in *got): a cached one, else new memory.
  void* take(size_t bytes, size_t* got) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      auto best = free_.end();
      for (auto it = free_.begin(); it != free_.end(); ++it) {
        if (it->bytes >= bytes && it->bytes - bytes <= it->bytes / 4 &&
            (best == free_.end() || it->bytes < best->bytes)) {
          best = it;
        }
      }
      if (best != free_.end()) {
        void* ptr = best->ptr;
        *got = best->bytes;
        cached_ -= best->bytes;
        free_.erase(best);
        return ptr;
      }
    }
    *got = bytes;
    return c10::alloc_cpu(bytes);
  }

  // Called when a tensor from take() dies (on whichever thread frees it: autograd's too).
  void give(void* ptr, size_t bytes) {
    std::vector<void*> drop;
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (bytes > limit_) {  // never fits: keep the cache as it is
        drop.push_back(ptr);
      } else {
        free_.push_back({ptr, bytes});
        cached_ += bytes;
        evict_locked(drop);
      }
    }
    free_all(drop);
  }

  int64_t set_limit(int64_t bytes) {
    TORCH_CHECK(bytes >= 0, kWho, "the buffer cache's limit must be >= 0 bytes, got ", bytes);
    std::vector<void*> drop;
    int64_t previous;
    {
      std::lock_guard<std::mutex> lock(mu_);
      previous = static_cast<int64_t>(limit_);
      limit_ = static_cast<size_t>(bytes);
      evict_locked(drop);
    }
    free_all(drop);
    return previous;
  }

  int64_t clear() {
    std::vector<Block> drop;
    {
      std::lock_guard<std::mutex> lock(mu_);
      drop.swap(free_);
      cached_ = 0;
    }
    int64_t freed = 0;
    for (const Block& b : drop) {
      c10::free_cpu(b.ptr);
      freed += static_cast<int64_t>(b.bytes);
    }
    return freed;
  }

  int64_t cached_bytes() {
    std::lock_guard<std::mutex> lock(mu_);
    return static_cast<int64_t>(cached_);
  }

  void lock_for_fork() { mu_.lock(); }  // around fork() (see "Fork" above), in the forking thread
  void unlock_after_fork() { mu_.unlock(); }

 private:
  // Takes the oldest blocks out while the cache holds more than its limit; the caller frees them
  // outside the lock.
  void evict_locked(std::vector<void*>& drop) {
    while (!free_.empty() && cached_ > limit_) {
      drop.push_back(free_.front().ptr);
      cached_ -= free_.front().bytes;
      free_.erase(free_.begin());
    }
  }

  static void free_all(const std::vector<void*>& blocks) {
    for (void* p : blocks) {
      c10::free_cpu(p);
    }
  }

  std::mutex mu_;
  std::vector<Block> free_;  // oldest first
  size_t cached_ = 0;
  size_t limit_ = 0;  // off until the Python layer sets it (fastmlstm/ops/cpu/buffer_cache.py)
};

// Never destroyed: tensors may die after static destructors have run.
BufferCache* g_cache = nullptr;

void lock_for_fork() { g_cache->lock_for_fork(); }
void unlock_after_fork() { g_cache->unlock_after_fork(); }

BufferCache& cache() {
  static BufferCache* instance = [] {
    g_cache = new BufferCache();
#if !defined(_WIN32)  // (no fork there)
    pthread_atfork(&lock_for_fork, &unlock_after_fork, &unlock_after_fork);
#endif
    return g_cache;
  }();
  return *instance;
}

}  // namespace

Tensor saved_buffer(at::IntArrayRef shape, const at::TensorOptions& options, bool poison) {
  const size_t bytes =
      static_cast<size_t>(c10::multiply_integers(shape)) * c10::elementSize(c10::typeMetaToScalarType(options.dtype()));
  if (bytes == 0) {
    return new_buffer(shape, options, poison);
  }
  size_t got = 0;
  void* ptr = cache().take(bytes, &got);
  Tensor out = at::from_blob(ptr, shape, [got](void* p) { cache().give(p, got); }, options);
  if (poison) {
    out.fill_(std::numeric_limits<double>::quiet_NaN());
  }
  return out;
}

int64_t set_buffer_cache_limit(int64_t bytes) { return cache().set_limit(bytes); }

int64_t empty_buffer_cache() { return cache().clear(); }

int64_t buffer_cache_bytes() { return cache().cached_bytes(); }

}  // namespace cpu
}  // namespace fastmlstm
