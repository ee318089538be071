"""Builds native/ against the llama-cpp-python that pip installs next to it.

The extension links to llama_cpp's own libllama/libggml-base, so scope_edge and
llama_cpp share one loaded llama.cpp.
"""
import importlib.util
import os
import sys

from setuptools import Extension, setup
from setuptools.command.build_py import build_py


class build_py_with_registry(build_py):
    """Ships models/registry.json inside the package as scope_edge/registry.json."""

    def run(self) -> None:
        super().run()
        if getattr(self, "editable_mode", False):
            return  # an editable install imports from the checkout and reads models/ there
        source = os.path.join(os.path.dirname(os.path.abspath(__file__)), "models", "registry.json")
        if not os.path.isfile(source):
            sys.exit(f"scope-edge: {source} not found; build from a complete checkout")
        target = os.path.join(self.build_lib, "scope_edge", "registry.json")
        self.mkpath(os.path.dirname(target))
        self.copy_file(source, target)


def _llama_cpp_dirs() -> tuple[str, str]:
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or spec.origin is None:
        sys.exit("scope-edge: llama-cpp-python==0.3.36 must be installed in the build environment")
    pkg = os.path.dirname(spec.origin)
    include = os.path.join(os.path.dirname(pkg), "include")
    lib = os.path.join(pkg, "lib")
    for path in (os.path.join(include, "llama.h"), lib):
        if not os.path.exists(path):
            sys.exit(f"scope-edge: {path} not found; reinstall llama-cpp-python==0.3.36")
    return include, lib


# The hook, split by concern behind native/scope_hook_impl.h. Every native/*.c is listed here:
# tests/memcheck_hook.py builds its sanitizer variant from native/*.c, and MANIFEST.in ships native/.
NATIVE_SOURCES = [
    "native/scope_hook.c",
    "native/scope_hook_map.c",
    "native/scope_hook_graph.c",
    "native/scope_hook_capture.c",
    "native/scope_hook_sketch.c",
    "native/module.c",
]

include_dir, lib_dir = _llama_cpp_dirs()
# Installed: llama_cpp/lib beside scope_edge. In place (editable): the build-time dir.
rpath = [("@loader_path" if sys.platform == "darwin" else "$ORIGIN") + "/../llama_cpp/lib", lib_dir]

setup(
    cmdclass={"build_py": build_py_with_registry},
    ext_modules=[
        Extension(
            "scope_edge._scope_hook",
            sources=NATIVE_SOURCES,
            depends=["native/scope_hook.h", "native/scope_hook_impl.h"],
            include_dirs=["native", include_dir],
            library_dirs=[lib_dir],
            libraries=["llama", "ggml-base"],
            runtime_library_dirs=None if sys.platform == "darwin" else rpath,
            extra_link_args=[f"-Wl,-rpath,{r}" for r in rpath] if sys.platform == "darwin" else [],
            extra_compile_args=["-O3", "-std=c11", "-Wall", "-Wextra", "-Wno-unused-parameter"],
        )
    ],
)
