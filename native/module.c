/* Makes the hook an importable extension module so pip builds and installs it.
 * Python reaches the hook's C API through ctypes (scope_edge/hook.py). */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

static struct PyModuleDef scope_hook_module = {
    .m_base = PyModuleDef_HEAD_INIT,
    .m_name = "_scope_hook",
    .m_doc = "llama.cpp KV-cache hook; use scope_edge.hook.",
    .m_size = -1,
};

PyMODINIT_FUNC PyInit__scope_hook(void) {
    return PyModule_Create(&scope_hook_module);
}
