"""Build pfgmpp_fast._C (C++ CPU kernels always, CUDA kernels when nvcc is present) with CMake.

Metadata and dependencies live in pyproject.toml; this file only drives CMakeLists.txt:

    pip install --no-build-isolation -e .     # or without -e

Environment:
    PFGMPP_FAST_NO_CUDA=1      build the CPU kernels only
    TORCH_CUDA_ARCH_LIST       CUDA architectures (default: "8.0;9.0", plus the visible GPU's)
    CUDA_HOME / CUDA_PATH      CUDA toolkit root (default: /usr/local/cuda, else nvcc on PATH)
    MAX_JOBS                   parallel compile jobs (default: 2)
"""

import glob
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


def _cmake_executable():
    """CMake from PyPI (4.x): Debian's 3.25 cannot give nvcc the C++20 torch needs."""
    try:
        import cmake

        exe = Path(cmake.CMAKE_BIN_DIR) / "cmake"
        if exe.exists():
            return str(exe)
    except ImportError:
        pass
    exe = shutil.which("cmake")
    if exe is None:
        raise RuntimeError("pfgmpp_fast: cmake not found; `pip install 'cmake>=3.30'`")
    return exe


def _ninja_executable():
    try:
        import ninja

        exe = Path(ninja.BIN_DIR) / "ninja"
        if exe.exists():
            return str(exe)
    except ImportError:
        pass
    return shutil.which("ninja")


def _cuda_home():
    for env in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(env) and Path(os.environ[env], "bin", "nvcc").exists():
            return Path(os.environ[env])
    if Path("/usr/local/cuda/bin/nvcc").exists():
        return Path("/usr/local/cuda")
    nvcc = shutil.which("nvcc")
    if nvcc:
        return Path(os.path.realpath(nvcc)).parent.parent
    return None


def _nvrtc_library(cuda_home):
    """libnvrtc for torch's CMake config: the toolkit's, else the one from the nvidia wheel."""
    if cuda_home is not None:
        for name in ("lib64/libnvrtc.so", "lib/libnvrtc.so"):
            if (cuda_home / name).exists():
                return None  # torch's config finds it itself
    roots = [sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]] + sys.path
    for root in roots:
        hits = sorted(glob.glob(os.path.join(root, "nvidia", "*", "lib", "libnvrtc.so*")))
        hits += sorted(glob.glob(os.path.join(root, "nvidia", "cuda_nvrtc", "lib", "libnvrtc.so*")))
        hits = [h for h in hits if "builtins" not in h and ".alt." not in h]
        if hits:
            return hits[0]
    return None


def _arch_list():
    if os.environ.get("TORCH_CUDA_ARCH_LIST"):
        return os.environ["TORCH_CUDA_ARCH_LIST"]
    archs = ["8.0", "9.0"]
    try:
        import torch

        if torch.cuda.is_available():
            for i in range(torch.cuda.device_count()):
                major, minor = torch.cuda.get_device_capability(i)
                if f"{major}.{minor}" not in archs:
                    archs.append(f"{major}.{minor}")
    except Exception:  # no driver: build for the default list
        pass
    return ";".join(archs)


class CMakeExtension(Extension):
    def __init__(self, name):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def copy_extensions_to_source(self):
        """Put the built library next to the sources under a temporary name, then rename it
        into place: a process that has the old library loaded keeps a valid mapping (an
        in-place overwrite crashes it)."""
        build_py = self.get_finalized_command("build_py")
        for ext in self.extensions:
            inplace_file, regular_file = self._get_inplace_equivalent(build_py, ext)
            tmp = f"{inplace_file}.tmp-{os.getpid()}"
            shutil.copyfile(regular_file, tmp)
            shutil.copymode(regular_file, tmp)
            os.replace(tmp, inplace_file)

    def build_extension(self, ext):
        import pybind11
        import torch

        out_dir = Path(self.get_ext_fullpath(ext.name)).parent.resolve()
        build_dir = Path(self.build_temp).resolve() / ext.name
        build_dir.mkdir(parents=True, exist_ok=True)

        env = os.environ.copy()
        cmake_args = [
            "-DCMAKE_BUILD_TYPE=Release",
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path};{pybind11.get_cmake_dir()}",
        ]
        ninja = _ninja_executable()
        if ninja:
            cmake_args += ["-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={ninja}"]

        cuda_home = _cuda_home()
        want_cuda = os.environ.get("PFGMPP_FAST_NO_CUDA", "0") not in ("1", "true", "yes")
        torch_has_cuda = torch.version.cuda is not None
        if want_cuda and cuda_home is not None and torch_has_cuda:
            env["TORCH_CUDA_ARCH_LIST"] = _arch_list()
            env.setdefault("CUDA_HOME", str(cuda_home))
            cmake_args += [
                "-DPFGMPP_WITH_CUDA=ON",
                f"-DCUDA_TOOLKIT_ROOT_DIR={cuda_home}",
                f"-DCMAKE_CUDA_COMPILER={cuda_home / 'bin' / 'nvcc'}",
            ]
            nvrtc = _nvrtc_library(cuda_home)
            if nvrtc:
                cmake_args.append(f"-DCUDA_nvrtc_LIBRARY={nvrtc}")
            print(f"pfgmpp_fast: building CUDA kernels for {env['TORCH_CUDA_ARCH_LIST']} with {cuda_home}", flush=True)
        else:
            # CMakeLists.txt then reads torch's headers and libraries without its CMake
            # config (which needs a CUDA toolkit whenever torch is a CUDA build).
            cmake_args.append("-DPFGMPP_WITH_CUDA=OFF")
            why = (
                "PFGMPP_FAST_NO_CUDA is set"
                if not want_cuda
                else "nvcc not found"
                if cuda_home is None
                else "torch is a CPU-only build"
            )
            print(f"pfgmpp_fast: building CPU kernels only ({why})", flush=True)

        jobs = os.environ.get("MAX_JOBS", "2")
        cmake = _cmake_executable()
        # A failing CUDA compile fails the build: no silent CPU-only fallback.
        subprocess.run([cmake, str(ROOT), *cmake_args], cwd=build_dir, env=env, check=True)
        subprocess.run([cmake, "--build", ".", "--config", "Release", "-j", jobs], cwd=build_dir, env=env, check=True)


setup(
    ext_modules=[CMakeExtension("pfgmpp_fast._C")],
    cmdclass={"build_ext": CMakeBuild},
)
