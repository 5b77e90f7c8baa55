// Launch plan of the CUDA loss kernel (cuda/loss.cu). Plain C++ without CUDA headers, so the
// module (module.cpp) exposes it to tests/test_cuda_compile.py, which checks the plan's idle
// threads and the kernel's occupancy from ptxas's register counts on the CPU.
#pragma once
#include <stdint.h>

namespace pfgmpp {

// Grid (chunks, rows) of blocks of `threads`: block (c, b) reduces the work units
// [c * chunk_units, min(units, (c + 1) * chunk_units)) of sample b (and of b + rows, ...).
struct LossPlan {
  int64_t chunk_units, chunks, threads;
};

constexpr int64_t kLossMaxThreads = 256;  // the kernel's __launch_bounds__ (cuda_detail::kThreads)
constexpr int64_t kLossMaxGridY = 65535;

// units: work units per sample (one thread each per round); B: samples; sms: multiprocessors;
// resident_threads: how many threads of the kernel the device runs at once (SMs x occupancy).
// Each block is whole warps and at most a sample's units, smaller (down to 64) while a grid of
// bigger blocks would leave SMs without one; a sample gets enough blocks to fill the device
// (resident_threads / rows threads), at most one thread per unit; and every chunk but a
// sample's last is whole rounds of its block, so only that last round can leave threads idle.
inline LossPlan loss_plan(int64_t units, int64_t B, int64_t sms, int64_t resident_threads) {
  const auto ceil_div = [](int64_t a, int64_t b) { return (a + b - 1) / b; };
  const auto whole_warps = [&](int64_t n) { return ceil_div(n, 32) * 32; };
  const auto at_least_1 = [](int64_t n) { return n > 1 ? n : int64_t(1); };
  units = at_least_1(units);
  const int64_t rows = at_least_1(B < kLossMaxGridY ? B : kLossMaxGridY);
  int64_t threads = whole_warps(units) < kLossMaxThreads ? whole_warps(units) : kLossMaxThreads;
  while (threads > 64 && rows * ceil_div(units, threads) < sms) threads = whole_warps(threads / 2);
  const int64_t wanted = ceil_div(ceil_div(at_least_1(resident_threads), rows), threads);
  const int64_t most = ceil_div(units, threads);
  const int64_t chunks = wanted < most ? at_least_1(wanted) : most;
  const int64_t chunk_units = ceil_div(ceil_div(units, chunks), threads) * threads;
  return LossPlan{chunk_units, ceil_div(units, chunk_units), threads};
}

}  // namespace pfgmpp
