// Guest-side kernels for the CUDA remoting tests (tests/gpu.rs). The PTX next
// to this file is what a guest would send with MODULE_LOAD; regenerate with
//
//     nvcc -ptx -arch=compute_80 -O3 -o tests/kernels/remote_test.ptx tests/kernels/remote_test.cu

extern "C" __global__ void scale_add_f32(float *p, float s, float t, unsigned int n)
{
	unsigned int i = blockIdx.x * blockDim.x + threadIdx.x;
	if (i < n)
		p[i] = p[i] * s + t;
}

// Writes through a pointer the caller chose: with a bogus address this faults
// (CUDA_ERROR_ILLEGAL_ADDRESS), which must poison only the caller's context.
extern "C" __global__ void poke_u32(unsigned int *addr, unsigned int v)
{
	*addr = v;
}

extern "C" __global__ void spin_ns(unsigned long long ns)
{
	unsigned long long start, now;
	asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(start));
	do {
		asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(now));
	} while (now - start < ns);
}
