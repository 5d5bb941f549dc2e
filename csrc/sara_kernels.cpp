// The extension's module init, its settings and its record of what ran.
//
// The public ops are declared once, in Python (sara_kernels/_ops.py: schemas and fake kernels);
// this library registers its kernels under the same namespace per dispatch key:
//   csrc/cpu/*.cpp      TORCH_LIBRARY_IMPL(sara_kernels, CPU, m)
//   csrc/cuda/*.cu      TORCH_LIBRARY_IMPL(sara_kernels, CUDA, m)
//   csrc/autograd.cpp   TORCH_LIBRARY_IMPL(sara_kernels, Autograd / AutocastCPU / AutocastCUDA, m)
// so a call goes Python -> dispatcher -> C++ kernel once. The two private ops below exist only
// natively, so they are declared here.
#include <Python.h>
#include <torch/library.h>

#include <mutex>
#include <string>
#include <vector>

#include "checks.h"

namespace sara_kernels_check {

Settings& settings() {
  static Settings s;
  return s;
}

int64_t& thread_index_checks() {
  thread_local int64_t own = -1;
  return own;
}

namespace {

// What each op ran last: a fixed table of (name, backend, variant), filled on first use. Readers
// scan the first `count` slots without a lock; a new name is written under the lock before count
// is published.
struct Run {
  std::string name;
  std::atomic<int64_t> backend{0}, variant{0};
};
constexpr int kMaxOps = 64;
Run runs[kMaxOps];
std::atomic<int> run_count{0};
std::mutex run_lock;

// The op's slot, or nullptr when it never ran (a read never allocates).
const Run* find_slot(const char* op) {
  const int n = run_count.load(std::memory_order_acquire);
  for (int i = 0; i < n; ++i) {
    if (runs[i].name == op) return &runs[i];
  }
  return nullptr;
}

Run& run_slot(const char* op) {
  if (const Run* found = find_slot(op)) return const_cast<Run&>(*found);
  const std::lock_guard<std::mutex> guard(run_lock);
  const int m = run_count.load(std::memory_order_relaxed);
  for (int i = 0; i < m; ++i) {
    if (runs[i].name == op) return runs[i];
  }
  TORCH_CHECK(m < kMaxOps, "sara_kernels: more than ", num(kMaxOps), " ops recorded");
  runs[m].name = op;
  run_count.store(m + 1, std::memory_order_release);
  return runs[m];
}

}  // namespace

void record(const char* op, int64_t backend, int64_t variant) {
  Run& r = run_slot(op);
  r.backend.store(backend, std::memory_order_relaxed);
  r.variant.store(variant, std::memory_order_relaxed);
}

namespace {

// Read (value None) or set a setting; returns the value before the call.
int64_t setting(const std::string& name, std::optional<int64_t> value) {
  Settings& s = settings();
  std::atomic<int64_t>* slot = nullptr;
  int64_t lo = 0, hi = 0;
  if (name == "grad_variant") {
    slot = &s.grad_variant, hi = 3;
  } else if (name == "index_checks") {  // the calling thread's (-1: back to the process default)
    const int64_t previous = thread_index_checks();
    if (value.has_value()) {
      TORCH_CHECK_VALUE(*value >= -1 && *value <= 2, "sara_kernels._setting: index_checks=", num(*value),
                        " is out of range [-1, 2]");
      thread_index_checks() = *value;
    }
    return previous;
  } else if (name == "index_checks_default") {
    slot = &s.index_checks, hi = 2;
  } else if (name == "workspace_bytes") {
    slot = &s.workspace_bytes, hi = INT64_MAX;
  } else {
    TORCH_CHECK_VALUE(false, "sara_kernels._setting: unknown setting '", name,
                      "'; expected grad_variant, index_checks, index_checks_default or workspace_bytes");
  }
  const int64_t previous = slot->load();
  if (value.has_value()) {
    TORCH_CHECK_VALUE(*value >= lo && *value <= hi, "sara_kernels._setting: ", name, "=", num(*value),
                      " is out of range [", num(lo), ", ", num(hi), "]");
    slot->store(*value);
  }
  return previous;
}

// [backend, variant] the op ran last: backend 0 none yet, 1 cpu, 2 cuda, 3 reference, 4 triton;
// variant 0 none. With backend given, records that a Python kernel (reference, Triton) runs op.
std::vector<int64_t> last_run(const std::string& op, std::optional<int64_t> backend) {
  if (backend.has_value()) record(op.c_str(), *backend, 0);
  const Run* r = find_slot(op.c_str());
  if (r == nullptr) return {0, 0};
  return {r->backend.load(std::memory_order_relaxed), r->variant.load(std::memory_order_relaxed)};
}
}  // namespace


}  // namespace sara_kernels_check

extern "C" {
// Importing sara_kernels._C loads this library and runs the static registrations; the module
// itself holds nothing (no pybind11: everything is reached through torch.ops).
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY_FRAGMENT(sara_kernels, m) {
  m.def("_setting(str name, int? value=None) -> int", &sara_kernels_check::setting);
  m.def("_last_run(str op, int? backend=None) -> int[]", &sara_kernels_check::last_run);
}
