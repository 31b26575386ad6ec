"""What a CUDA image must carry, checked inside it without a GPU: `python cuda_checks.py serve|calibrate` prints
one JSON object {check: {"ok": bool, "detail": ...}} and exits 1 when any check fails.

serve (vLLM 0.32.0's wheel + the lock's toolchain):
- flashmla: vLLM's FlashMLA objects (GLM-5's sparse MLA) carry sm_90a cubins (wgmma/TMA need the "a" variant);
- marlin_moe: `_moe_C` (the W4A16 MoE kernels) carries code an sm_90 GPU loads: an sm_90/sm_90a cubin, or PTX of
  an older compute arch that the driver compiles at load time (which it is in vLLM 0.32.0's wheel: see README);
- deepgemm: DeepGEMM ships no device code (it JIT-compiles at run time): its extension and headers are there, and
  the image's nvcc compiles its sm90 indexer header (`sm90_fp8_mqa_logits.cuh`, GLM-5's DSA indexer) for sm_90a;
- nvcc: `nvcc --version` is the lock's nvidia-cuda-nvcc and kernels.in's CUDA release, and it is the one on PATH;
- imports: `import vllm, torch, compressed_tensors` with no GPU.
calibrate: imports (torch, llmcompressor, compressed_tensors) and torch's CUDA release.

Stdlib only, run by path (the image's Python, without importing the mtpquant package and its dependencies).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

if __package__:
    from mtpquant.images import fatbin
else:  # run by path inside an image: fatbin.py is this file's neighbour (the package's imports are not needed)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import fatbin  # type: ignore[no-redef]

PROJECT = Path(os.environ.get("MTPQUANT_HOME", "/opt/mtpquant"))
FLASHMLA = ("_flashmla_C.abi3.so", "_flashmla_extension_C.abi3.so")
MARLIN_MOE = "_moe_C_stable_libtorch.abi3.so"
DEEPGEMM_EXTENSION = "third_party/deep_gemm/_C_extension.abi3.so"
DEEPGEMM_PROBE = "deep_gemm/impls/sm90_fp8_mqa_logits.cuh"
# DeepGEMM's own JIT flags (from its extension's strings) and the arch GLM-5's kernels need.
NVCC_FLAGS = ("-std=c++20", "--expt-relaxed-constexpr", "--expt-extended-lambda",
              "-gencode", "arch=compute_90a,code=sm_90a", "-cudart=none", "-Xcompiler", "-fPIC", "-shared")
HOPPER = 90
_NVCC_VERSION = re.compile(r"release (\d+\.\d+), V(\d+\.\d+\.\d+)")
_PIN = re.compile(r"^nvidia-cuda-nvcc==(\S+)", re.M)


def result(ok: bool, detail) -> dict:
    return {"ok": bool(ok), "detail": detail}


def has_sm90a(path: Path) -> dict:
    archs = fatbin.archs(path)
    return result("sm_90a" in archs, {"file": str(path), "archs": archs})


def loads_on_hopper(path: Path) -> dict:
    """An sm_90(a) cubin, or else PTX of compute <= 90 (the driver compiles it for the GPU at load time)."""
    archs = fatbin.archs(path)
    cubin = [a for a in archs if a in ("sm_90", "sm_90a")]
    ptx = [a for a in archs if a.startswith("compute_") and int(re.sub(r"\D", "", a)) <= HOPPER]
    how = f"cubin {cubin[0]}" if cubin else (f"PTX {ptx[-1]}, compiled by the driver at load" if ptx else "none")
    return result(bool(cubin or ptx), {"file": str(path), "archs": archs, "on_sm90": how})


def nvcc_version(nvcc: str) -> tuple[str, str] | None:
    out = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout
    m = _NVCC_VERSION.search(out)
    return (m.group(1), m.group(2)) if m else None


def nvcc_matches_lock(nvcc: str | None, lock_text: str, kernels_in: dict) -> dict:
    """`nvcc --version` = the lock's nvidia-cuda-nvcc pin and kernels.in's CUDA release."""
    pin = _PIN.search(lock_text)
    want_release = ".".join(kernels_in["toolchain"]["cuda"].split(".")[:2])
    if nvcc is None:
        return result(False, "no nvcc on PATH")
    got = nvcc_version(nvcc)
    detail = {"nvcc": nvcc, "release": got and got[0], "version": got and got[1],
              "lock": pin and pin.group(1), "kernels.in cuda": kernels_in["toolchain"]["cuda"]}
    return result(bool(got and pin and got[1] == pin.group(1) and got[0] == want_release), detail)


def deepgemm_compiles(vllm_dir: Path, nvcc: str | None) -> dict:
    """DeepGEMM's sm90 indexer header compiled for sm_90a by the image's nvcc (and g++), then read back."""
    include = vllm_dir / "third_party" / "deep_gemm" / "include"
    if nvcc is None or not (include / DEEPGEMM_PROBE).is_file() or not (vllm_dir / DEEPGEMM_EXTENSION).is_file():
        return result(False, f"missing: nvcc={nvcc}, {include / DEEPGEMM_PROBE}, {vllm_dir / DEEPGEMM_EXTENSION}")
    with tempfile.TemporaryDirectory() as d:
        src, out = Path(d) / "probe.cu", Path(d) / "probe.so"
        src.write_text(f"#include <{DEEPGEMM_PROBE}>\n"
                       'extern "C" __global__ void probe(float* y) { y[threadIdx.x] = 1.0f; }\n')
        proc = subprocess.run([nvcc, *NVCC_FLAGS, "-I", str(include), str(src), "-o", str(out)],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            return result(False, {"nvcc": proc.stderr.strip().splitlines()[-5:]})
        archs = fatbin.archs(out)
    return result(archs == ["sm_90a"], {"header": DEEPGEMM_PROBE, "archs": archs})


def imports(modules: tuple[str, ...]) -> dict:
    code = (f"import importlib, json, torch; mods = {{m: importlib.import_module(m) for m in {modules!r}}}; "
            "print(json.dumps({m: getattr(v, '__version__', '?') for m, v in mods.items()} | "
            "{'torch.version.cuda': torch.version.cuda, 'cuda_available': torch.cuda.is_available()}))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    if proc.returncode != 0:
        return result(False, proc.stderr.strip().splitlines()[-3:])
    return result(True, json.loads(proc.stdout.strip().splitlines()[-1]))


def site_packages() -> Path:
    import sysconfig

    return Path(sysconfig.get_paths()["purelib"])


def serve_checks(project: Path = PROJECT) -> dict[str, dict]:
    vllm_dir = site_packages() / "vllm"
    nvcc = shutil.which("nvcc")
    kernels_in = tomllib.loads((project / "pinned" / "kernels.in").read_text())
    checks = {f"flashmla {name}": has_sm90a(vllm_dir / name) for name in FLASHMLA}
    checks["marlin_moe"] = loads_on_hopper(vllm_dir / MARLIN_MOE)
    checks["deepgemm_jit_sm90a"] = deepgemm_compiles(vllm_dir, nvcc)
    checks["nvcc"] = nvcc_matches_lock(nvcc, (project / "pinned" / "serve-cuda.txt").read_text(), kernels_in)
    checks["imports"] = imports(("vllm", "torch", "compressed_tensors"))
    return checks


def calibrate_checks(project: Path = PROJECT) -> dict[str, dict]:
    checks = {"imports": imports(("torch", "llmcompressor", "compressed_tensors"))}
    cuda = tomllib.loads((project / "pinned" / "kernels.in").read_text())["toolchain"]["cuda"]
    got = checks["imports"]["detail"].get("torch.version.cuda") if checks["imports"]["ok"] else None
    checks["torch_cuda"] = result(got == ".".join(cuda.split(".")[:2]), {"torch.version.cuda": got, "kernels.in": cuda})
    return checks


def main(argv: list[str] | None = None) -> int:
    which = (argv if argv is not None else sys.argv[1:]) or ["serve"]
    try:
        checks = serve_checks() if which[0] == "serve" else calibrate_checks()
    except (OSError, fatbin.FatbinError, KeyError) as e:
        checks = {"error": result(False, str(e))}
    print(json.dumps(checks, sort_keys=True))
    return 0 if all(c["ok"] for c in checks.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
