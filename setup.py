"""Builds fusedlm._C by driving CMake (CMakeLists.txt holds the sources); everything else is in
pyproject.toml. Environment knobs:
  FUSEDLM_CUDA=ON|OFF|AUTO      build the CUDA kernels (AUTO: when torch has CUDA and nvcc exists)
  TORCH_CUDA_ARCH_LIST="9.0a"   CUDA architectures (default: the local GPU's)
  FUSEDLM_SANITIZE=address,undefined   compile _C with sanitizers (see tests/run_sanitized)
  MAX_JOBS=N                    parallel compile jobs (default: all cores)
  FUSEDLM_BUILD_DIR=path        CMake build folder (default: build/cmake-<python>)
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


class CMakeBuild(build_ext):
    def build_extension(self, ext: Extension) -> None:
        target = Path(self.get_ext_fullpath(ext.name)).resolve()
        default_dir = ROOT / "build" / f"cmake-py{sys.version_info.major}{sys.version_info.minor}"
        build_dir = Path(os.environ.get("FUSEDLM_BUILD_DIR", default_dir)).resolve()
        build_dir.mkdir(parents=True, exist_ok=True)
        configure = [
            "cmake", "-S", str(ROOT), "-B", str(build_dir),
            f"-DPython3_EXECUTABLE={sys.executable}",
            f"-DFUSEDLM_CUDA={os.environ.get('FUSEDLM_CUDA', 'AUTO')}",
            f"-DFUSEDLM_SANITIZE={os.environ.get('FUSEDLM_SANITIZE', '')}",
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={build_dir / 'lib'}",
        ]
        if shutil.which("ninja") and not (build_dir / "Makefile").exists():
            configure += ["-G", "Ninja"]
        jobs = os.environ.get("MAX_JOBS", str(os.cpu_count() or 1))
        subprocess.run(configure, check=True)
        subprocess.run(["cmake", "--build", str(build_dir), "--parallel", jobs], check=True)

        built = sorted((build_dir / "lib").glob("_C*.so"), key=lambda p: p.stat().st_mtime)
        if not built:
            raise RuntimeError(f"CMake finished but produced no _C*.so under {build_dir / 'lib'}")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(built[-1], target)


setup(
    ext_modules=[Extension("fusedlm._C", sources=[])],
    cmdclass={"build_ext": CMakeBuild},
)
