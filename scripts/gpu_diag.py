"""Diagnostics for the lent GPU, run by scripts/gpu_check.sh after the build (not a test).

The first GPU run (H200, torch 2.11.0+cu130, 2026-12-04) left three questions, each answered here
in one call:

* a test that passes bad arguments to the CUDA ``ce_head`` entry point segfaulted instead of
  raising; is it every C++ exception out of the extension (the CPU entry points too, i.e. the
  toolchain: the build used /opt/gcc/bin/g++) or the CUDA glue? Each case runs in its own
  process, and if the CUDA one crashes a second copy is built with /usr/bin/g++ and tried;
* ``torch.func.vmap`` disagreed with the eager reference by 8-12 % (K >= 4, float32): is that
  cuDNN's TF32 convolutions (on by default) or a real disagreement? Compared with cuDNN TF32
  on and off and in float64, next to the batched engine;
* which compilers and libstdc++ the extension was built and linked with.
"""
import os, subprocess, sys, shutil

def sh(cmd):
    print("$", cmd, flush=True)
    subprocess.run(cmd, shell=True)

sh("which gcc g++ c++; c++ --version | head -1; g++ --version | head -1; ls /usr/bin/g++* /usr/bin/gcc* 2>/dev/null; echo CXX=${CXX:-}; echo CC=${CC:-}")
sh("ldd fastdistill/_C*.so | grep -E 'stdc|gcc_s|libc10|libtorch' ")
sh(sys.executable + " -c \"import torch;print(torch.__config__.show())\" | grep -iE 'compiler|CXX_FLAGS' | cut -c1-300")
sh("ls -la fastdistill/_kernels kernels 2>&1 | head -3; " + sys.executable + " -c 'import fastdistill._kernels as k; print(k.__file__)'")

CASES = {
    "cpu-gd_update-bad-lr": "x=torch.randn(8); ops.gd_update(x, x, torch.tensor([0.1]))",
    "cpu-gd_update-noncontig": "x=torch.randn(8,8); ops.gd_update(x.t(), x, torch.tensor(0.1))",
    "cuda-gd_update-bad-lr": "x=torch.randn(8, device='cuda'); ops.gd_update(x, x, torch.tensor([0.1], device='cuda'))",
    "cuda-ce_head-noncontig": "z=torch.randn(2,4,3,device='cuda'); ops.ce_head(z.transpose(1,2).contiguous().transpose(1,2), z, torch.tensor(1.0,device='cuda'))",
    "torch-own-error": "torch.ops.aten.mm(torch.randn(2,3), torch.randn(2,3))",
}


def run_case(name, cwd=None, tag=""):
    """Run CASES[name] in a fresh process (a segfault shows as its exit status); return the rc."""
    prog = ("import torch, fastdistill._C\nops=torch.ops.fastdistill\ntry:\n    " + CASES[name] +
            "\n    print('NO ERROR RAISED')\nexcept RuntimeError as e:\n    print('RuntimeError:', str(e).splitlines()[0][:160])\n")
    r = subprocess.run([sys.executable, "-c", prog], capture_output=True, text=True, cwd=cwd)
    print(f"[{tag}{name}] rc {r.returncode}: {r.stdout.strip()} {r.stderr.strip()[-300:] if r.returncode else ''}",
          flush=True)
    return r.returncode


rcs = {name: run_case(name) for name in CASES}

import torch
sys.path.insert(0, os.path.join(os.getcwd(), "benches"))
import bench_gpu as B
for dtype, tf32 in ((torch.float32, True), (torch.float32, False), (torch.float64, False)):
    torch.backends.cudnn.allow_tf32 = tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    B.DTYPE = dtype
    m, th, prob, lam = B.problem(4)
    ref = B.reference_steps(m, prob, th, lam)
    errs = {}
    for impl in ("vmap", "batched", "batched-cuda"):
        try:
            got = B.implementation(impl, m, prob)(th, lam)
            errs[impl] = [f"{float((a - b).abs().max() / b.abs().max()):.1e}" for a, b in zip(got, ref)]
        except Exception as e:  # noqa: BLE001
            errs[impl] = repr(e)[:200]
    print(f"[vmap-check {dtype} cudnn.tf32={tf32}] rel err (g, Hλ, ∇x):", errs, flush=True)

# If a C++ exception from the CUDA glue crashed, build a second copy with the system compiler
# (not the first g++ on PATH) and try the same call there.
if rcs["cuda-ce_head-noncontig"] != 0 and os.path.exists("/usr/bin/g++"):
    sh("rm -rf /tmp/alt && mkdir /tmp/alt && cp -r setup.py pyproject.toml csrc fastdistill kernels /tmp/alt/ && rm -f /tmp/alt/fastdistill/_C*.so")
    sh("cd /tmp/alt && CC=/usr/bin/gcc CXX=/usr/bin/g++ MAX_JOBS=16 TORCH_CUDA_ARCH_LIST=9.0 FASTDISTILL_REQUIRE_EXT=1 "
       + sys.executable + " setup.py build_ext --inplace > /tmp/alt/build.log 2>&1; echo build rc $?; tail -2 /tmp/alt/build.log")
    for name in ("cuda-ce_head-noncontig", "cpu-gd_update-bad-lr"):
        run_case(name, cwd="/tmp/alt", tag="system-g++ build: ")
