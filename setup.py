"""Build script: the fastdistill packages plus the optional C++/CUDA extension ``fastdistill._C``.

The extension is optional: without torch at build time, without a compiler, or on a compile
error the install still succeeds and fastdistill runs on its pure-PyTorch reference ops; the
reason is printed. ``FASTDISTILL_REQUIRE_EXT=1`` turns any such failure into a hard error (CI).

CUDA sources are added only when the installed torch has CUDA *and* a CUDA toolkit is found:
the CPU torch wheel ships no CUDA headers or libraries, so ``.cu`` files cannot be linked into
the extension there (CI compile-checks the torch-free ``.cu`` files with nvcc instead).
"""
import glob
import os
import sys

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))
REQUIRE_EXT = os.environ.get("FASTDISTILL_REQUIRE_EXT", "0") == "1"


# pip hides a successful build's output, so the extension's fate is also written here, where
# scripts/install.sh prints it from.
STATUS_FILE = os.path.join(HERE, "build", "fastdistill-ext-status.txt")


def _say(msg, status=False):
    print(f"[fastdistill setup] {msg}", file=sys.stderr, flush=True)
    if status:
        try:
            os.makedirs(os.path.dirname(STATUS_FILE), exist_ok=True)
            with open(STATUS_FILE, "w") as fh:
                fh.write(msg + "\n")
        except OSError:
            pass


def _rel(pattern):
    return sorted(os.path.relpath(p, HERE) for p in glob.glob(os.path.join(HERE, pattern)))


def _extension_config():
    """Return ``(ext_modules, cmdclass)``; empty when the extension cannot be built here."""
    try:
        import torch
        from torch.utils import cpp_extension
    except Exception as exc:  # noqa: BLE001 - any import failure means "no torch here"
        msg = (f"torch is not importable at build time ({exc!r}); skipping the C++ extension. "
               "Install torch first and use `pip install --no-build-isolation -e .`.")
        if REQUIRE_EXT:
            raise RuntimeError(msg + " (FASTDISTILL_REQUIRE_EXT=1)") from exc
        _say(msg + " fastdistill will use its pure-PyTorch reference ops.", status=True)
        return [], {}

    cpu_sources = _rel("csrc/*.cpp") + _rel("csrc/cpu/*.cpp")
    if not cpu_sources:
        _say("no C++ sources under csrc/; skipping the extension.", status=True)
        return [], {}

    with_cuda = torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
    # -fno-math-errno: sqrt & co. need not set errno, so their loops vectorise; results are the
    # same IEEE values (unlike -ffast-math).
    cxx_flags = ["-O3", "-fopenmp", "-ffp-contract=off", "-fno-math-errno", "-fno-trapping-math", "-std=c++17"]
    kwargs = dict(extra_link_args=["-fopenmp"])
    if with_cuda:
        sources = cpu_sources + _rel("csrc/cuda/*.cu") + _rel("csrc/cuda/*_glue.cpp")
        # --fmad=false: the kernels must round like the reference (separate mul and sub).
        kwargs["extra_compile_args"] = {"cxx": cxx_flags + ["-DFASTDISTILL_WITH_CUDA"],
                                        "nvcc": ["-O3", "--fmad=false", "-DFASTDISTILL_WITH_CUDA"]}
        ext = cpp_extension.CUDAExtension("fastdistill._C", sources, **kwargs)
        _say(f"building fastdistill._C with CUDA {torch.version.cuda} "
             f"(CUDA_HOME={cpp_extension.CUDA_HOME})")
    else:
        why = ("torch has no CUDA" if torch.version.cuda is None else "no CUDA toolkit (CUDA_HOME)")
        kwargs["extra_compile_args"] = {"cxx": cxx_flags}
        ext = cpp_extension.CppExtension("fastdistill._C", cpu_sources, **kwargs)
        _say(f"building fastdistill._C for CPU only ({why})")

    class OptionalBuildExtension(cpp_extension.BuildExtension):
        """Build the extension, or print why not and fall back to the reference ops."""

        def _fallback(self, exc):
            if REQUIRE_EXT:
                _say(f"building fastdistill._C FAILED and FASTDISTILL_REQUIRE_EXT=1: {exc}")
                raise exc
            _say(f"could not build fastdistill._C ({type(exc).__name__}: {exc}). "
                 "Continuing without it: fastdistill will use its pure-PyTorch reference ops. "
                 "Set FASTDISTILL_REQUIRE_EXT=1 to make this an error (and see the compiler "
                 "output).", status=True)

        def finalize_options(self):
            super().finalize_options()
            # A stable object directory lets ninja rebuild only the translation units that
            # changed (each one including torch headers costs ~20 s).
            self.build_temp = os.path.join(HERE, "build", "temp-fastdistill")

        def build_extensions(self):
            self._failed = []
            try:  # the compiler/ABI probes live here, before any single extension is built
                super().build_extensions()
            except Exception as exc:  # noqa: BLE001
                self._fallback(exc)
                self._failed = list(self.extensions)
            # Forget what failed, or the editable/wheel step tries to copy a missing library.
            self.extensions = [e for e in self.extensions if e not in self._failed]

        def build_extension(self, ext):
            try:
                super().build_extension(ext)
            except Exception as exc:  # noqa: BLE001
                self._fallback(exc)
                self._failed.append(ext)
            else:
                _say(f"built {ext.name} from {len(ext.sources)} sources", status=True)

        def get_outputs(self):
            # Report only what was built, so an editable/wheel install does not look for a
            # missing shared library after a fallback.
            return [p for p in super().get_outputs() if os.path.exists(p)]

    return [ext], {"build_ext": OptionalBuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extension_config()

setup(
    packages=find_packages(include=["fastdistill", "fastdistill.*"]) + ["fastdistill._kernels"],
    package_dir={"fastdistill._kernels": "kernels"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    zip_safe=False,
)
