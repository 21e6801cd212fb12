// Batched SCALAR_ADD_I32 for the CUDA executor's execute_batch: n requests'
// operand pairs in, n results out, one launch. kernels/vgpu_batch.ptx is
// generated from this file on the GPU machine with
//   nvcc -ptx -arch=compute_80 -O3 -o kernels/vgpu_batch.ptx kernels/vgpu_batch.cu
// It is loaded separately from vgpu_kernels.ptx; if the driver refuses it the
// executor falls back to one scalar_add_i32 launch per request.
extern "C" __global__ void scalar_add_i32_batch(const int *ab, int *out, unsigned n)
{
    unsigned i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n)
        out[i] = ab[2 * i] + ab[2 * i + 1];
}
