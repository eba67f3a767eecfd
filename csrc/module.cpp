// The Python module metricloss_kernels._C.  Importing it loads this shared library, whose TORCH_LIBRARY static
// initialisers register the knn op (csrc/knn.cpp); its one Python function is parallel_tasks.

#include <Python.h>

#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>

#include <algorithm>
#include <atomic>
#include <string>

namespace {

// parallel_tasks(count, fn): calls fn(task, worker) once for every task in [0, count), on the intra-op threads
// (worker in [0, at::get_num_threads())), tasks claimed one at a time from a shared counter: on a shared machine a
// worker that is descheduled for a while leaves its share to the others instead of holding every barrier.
// Torch ops that fn calls run inside the OpenMP region, hence single-threaded (ATen runs a parallel_for inline
// there; MKL does not nest), with the caller's thread-local state (grad and inference mode, autocast, dispatch
// keys).  That rests on one OpenMP runtime in the process: this library's libgomp.so.1 resolves to the one torch
// loaded first (torch's pip wheels ship libgomp under that name).  The first exception is raised in the caller
// once all workers stop; the tasks not yet started are then skipped.  Called from inside a parallel region (a task
// calling parallel_tasks), the tasks run in order in the calling thread.
PyObject* parallel_tasks(PyObject*, PyObject* args) {
  Py_ssize_t count = 0;
  PyObject* fn = nullptr;
  if (!PyArg_ParseTuple(args, "nO:parallel_tasks", &count, &fn)) return nullptr;
  if (!PyCallable_Check(fn)) {
    PyErr_SetString(PyExc_TypeError, "parallel_tasks: fn must be callable");
    return nullptr;
  }
  const at::ThreadLocalState state;
  std::atomic<Py_ssize_t> next{0};
  std::atomic<bool> failed{false};
  PyObject *type = nullptr, *value = nullptr, *traceback = nullptr;
  std::string internal_error;
  const int64_t workers = std::min<int64_t>(count, std::max(1, at::get_num_threads()));
  Py_BEGIN_ALLOW_THREADS
  try {
    at::parallel_for(0, workers, 1, [&](int64_t worker, int64_t) {
      at::ThreadLocalStateGuard guard(state);
      // One Python thread state per worker for the whole call, the GIL held only while fn's Python runs (torch
      // ops release it).
      PyGILState_STATE gil = PyGILState_Ensure();
      PyThreadState* thread = PyEval_SaveThread();
      for (Py_ssize_t task = next++; task < count && !failed; task = next++) {
        PyEval_RestoreThread(thread);
        PyObject* result = PyObject_CallFunction(fn, "nn", task, static_cast<Py_ssize_t>(worker));
        if (result != nullptr) {
          Py_DECREF(result);
        } else if (!failed.exchange(true)) {
          PyErr_Fetch(&type, &value, &traceback);
        } else {
          PyErr_Clear();
        }
        thread = PyEval_SaveThread();
      }
      PyEval_RestoreThread(thread);
      PyGILState_Release(gil);
    });
  } catch (const std::exception& e) {  // from ATen (thread setup), never from fn: not to cross the C API
    internal_error = e.what();
  }
  Py_END_ALLOW_THREADS
  if (!internal_error.empty()) {
    Py_XDECREF(type);
    Py_XDECREF(value);
    Py_XDECREF(traceback);
    PyErr_SetString(PyExc_RuntimeError, internal_error.c_str());
    return nullptr;
  }
  if (failed) {
    PyErr_Restore(type, value, traceback);
    return nullptr;
  }
  Py_RETURN_NONE;
}

PyMethodDef methods[] = {
    {"parallel_tasks", parallel_tasks, METH_VARARGS,
     "parallel_tasks(count, fn): fn(task, worker) for every task in range(count), spread over the intra-op "
     "threads, torch ops inside single-threaded."},
    {nullptr, nullptr, 0, nullptr},
};

}  // namespace

extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT,
      "_C",     // name
      nullptr,  // documentation
      -1,       // per-interpreter state size: the module has none
      methods,
  };
  return PyModule_Create(&module_def);
}
