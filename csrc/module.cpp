// The Python module `pfgmpp_fast._C`. Importing it loads this shared library, whose static
// initialisers (ops.cpp) register the ops in torch.ops.pfgmpp_fast. Kept apart from ops.cpp
// (no torch headers here) so the two compile in parallel.
#include <pybind11/pybind11.h>

#include "loss_plan.h"
#include "philox.h"

PYBIND11_MODULE(_C, m) {
  m.doc() = "pfgmpp_fast C++/CUDA kernels; the ops live in torch.ops.pfgmpp_fast";
#ifdef PFGMPP_WITH_CUDA
  m.attr("built_with_cuda") = true;
#else
  m.attr("built_with_cuda") = false;
#endif
  // Raw Philox4x32-10 on 32-bit words (the full key range, for known-answer tests).
  m.def(
      "philox4x32_raw",
      [](uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0, uint32_t k1) {
        const pfgmpp::Philox4 r = pfgmpp::philox4x32_10(c0, c1, c2, c3, k0, k1);
        return pybind11::make_tuple(r.x0, r.x1, r.x2, r.x3);
      },
      pybind11::arg("c0"), pybind11::arg("c1"), pybind11::arg("c2"), pybind11::arg("c3"),
      pybind11::arg("k0"), pybind11::arg("k1"));
  // The CUDA loss kernel's launch plan for a device (tests/test_cuda_compile.py checks it).
  m.def(
      "loss_plan",
      [](int64_t units, int64_t B, int64_t sms, int64_t resident_threads) {
        const pfgmpp::LossPlan p = pfgmpp::loss_plan(units, B, sms, resident_threads);
        return pybind11::make_tuple(p.chunk_units, p.chunks, p.threads);
      },
      pybind11::arg("units"), pybind11::arg("B"), pybind11::arg("sms"), pybind11::arg("resident_threads"));
}
