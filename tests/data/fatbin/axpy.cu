// The fixture of tests/test_fatbin.py: one tiny kernel, compiled on 2026-12-02 by nvcc 13.0.88 from the hashed
// wheels of pinned/serve-cuda.txt (nvidia-cuda-nvcc, -crt, -nvvm, -cccl, -runtime) with the host's g++ 12:
//   nvcc -gencode arch=compute_90a,code=sm_90a -cudart=none -Xcompiler -fPIC -shared -o sm_90a.so axpy.cu
//   nvcc -gencode arch=compute_90,code=sm_90 -cudart=none -Xcompiler -fPIC -shared -o sm_90.so axpy.cu
//   nvcc -gencode arch=compute_80,code=[sm_80,compute_80] -cudart=none -Xcompiler -fPIC -shared -o sm_80ptx.so axpy.cu
// sm_90.so and sm_90a.so: the fatbin entry's flags word is 0x11 vs 0x100011; the cubins' e_flags are equal (they
// differ in the embedded "-arch sm_90a" ptxas options and one byte of a note).
extern "C" __global__ void axpy(float a, const float* x, float* y, int n) {
  int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) y[i] = a * x[i] + y[i];
}
