"""Build script. Metadata lives in pyproject.toml; this file builds the CUDA library of csrc/.

With nvcc on the PATH (or SHARDKIT_BUILD_CUDA=1) the DDA kernels are compiled into
``shardkit/_dda.so`` (cudart linked statically; loaded with ctypes, no torch headers involved).
Without nvcc, or with SHARDKIT_BUILD_CUDA=0, the pure-Python/Triton package installs alone, with a
one-line notice. CMakeLists.txt builds the same sources plus their unit test.
"""
import os
import shutil
import subprocess

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = os.path.dirname(os.path.abspath(__file__))
SOURCES = ["csrc/dda/all_reduce.cu", "csrc/dda/ll_all_reduce.cu", "csrc/dda/c_api.cu"]
ARCHS = os.environ.get("SHARDKIT_CUDA_ARCHS", "90").split(",")


def build_cuda_library(out_dir: str) -> None:
    mode = os.environ.get("SHARDKIT_BUILD_CUDA", "auto")
    nvcc = shutil.which("nvcc") or (os.path.join(os.environ["CUDA_HOME"], "bin", "nvcc") if "CUDA_HOME" in os.environ else None)
    if mode == "0" or (mode == "auto" and not nvcc):
        print("shardkit: CUDA kernels not built (no nvcc or SHARDKIT_BUILD_CUDA=0); the Triton kernels are used")
        return
    if not nvcc:
        raise RuntimeError("SHARDKIT_BUILD_CUDA=1 but nvcc was not found")
    gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in ARCHS]
    cmd = [nvcc, "-O3", "-std=c++17", "-shared", "-Xcompiler", "-fPIC", "-cudart", "static", *gencode,
           "-I", os.path.join(ROOT, "csrc"), *[os.path.join(ROOT, s) for s in SOURCES],
           "-o", os.path.join(out_dir, "_dda.so")]
    subprocess.run(cmd, check=True)


class BuildWithCuda(build_py):
    def run(self):
        super().run()
        # In-tree for editable installs, and into the build tree for wheels.
        for target in {os.path.join(ROOT, "shardkit"), os.path.join(self.build_lib, "shardkit")}:
            if os.path.isdir(target):
                build_cuda_library(target)
                break


setup(cmdclass={"build_py": BuildWithCuda})
