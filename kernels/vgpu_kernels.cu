// Kernels of vgpu's built-in operations (src/executor/cuda.rs).
//
// The committed kernels/vgpu_kernels.ptx is generated from this file on the
// GPU machine with
//
//     nvcc -ptx -arch=compute_80 -O3 -o kernels/vgpu_kernels.ptx kernels/vgpu_kernels.cu
//
// (__launch_bounds__(256, 2) on sgemm_f32 keeps it at 128 registers.)
//
// compute_80 PTX is JIT-compiled by the driver for the GPU it runs on (sm_90 on
// H100/H200) when the executor loads the module, once per process. Shipping PTX
// instead of a cubin keeps the build free of nvcc and the binary independent of
// the exact GPU generation.
//
// All kernels are extern "C" so that their names are not mangled.

#include <stdint.h>

extern "C" __global__ void scalar_add_i32(int a, int b, int *out)
{
	// Wrapping add, as the contract asks (unsigned arithmetic is defined).
	*out = (int)((unsigned int)a + (unsigned int)b);
}

extern "C" __global__ void vector_add_f32(const float *__restrict__ a,
					  const float *__restrict__ b,
					  float *__restrict__ out, unsigned int n)
{
	for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
	     i += (size_t)blockDim.x * gridDim.x)
		out[i] = a[i] + b[i];
}

extern "C" __global__ void saxpy_f32(float a, const float *__restrict__ x,
				     const float *__restrict__ y,
				     float *__restrict__ out, unsigned int n)
{
	for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
	     i += (size_t)blockDim.x * gridDim.x)
		out[i] = fmaf(a, x[i], y[i]);
}

static __device__ __forceinline__ unsigned long long globaltimer(void)
{
	unsigned long long t;
	asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
	return t;
}

// Holds one SM for `ns` nanoseconds of the GPU's global timer.
extern "C" __global__ void busy_wait(unsigned long long ns)
{
	unsigned long long start = globaltimer();
	while (globaltimer() - start < ns)
		;
}

// C = A * B, A m x k, B k x n, C m x n, all row-major, FP32.
//
// Classic two-level tiling: a 128 x 128 tile of C per block of 256 threads,
// 16-deep slices of A and B staged in shared memory, each thread accumulating
// an 8 x 8 sub-tile in registers. A thread's rows and columns are strided by 16
// so that shared-memory reads are conflict-free (B) or broadcasts (A) and the
// stores to C are coalesced. Edges are handled by zero-filling the tiles.
#define BM 128
#define BN 128
#define BK 16
#define TM 8
#define TN 8
#define NT 256

extern "C" __global__ void __launch_bounds__(NT, 2)
sgemm_f32(unsigned int M, unsigned int N, unsigned int K,
	  const float *__restrict__ A, const float *__restrict__ B,
	  float *__restrict__ C)
{
	__shared__ float As[BK][BM + 4];
	__shared__ float Bs[BK][BN];

	const int tid = threadIdx.x;
	const int tr = tid / (BN / TN); // 0..15
	const int tc = tid % (BN / TN); // 0..15
	const size_t row0 = (size_t)blockIdx.y * BM;
	const size_t col0 = (size_t)blockIdx.x * BN;

	float acc[TM][TN];
#pragma unroll
	for (int i = 0; i < TM; i++)
#pragma unroll
		for (int j = 0; j < TN; j++)
			acc[i][j] = 0.0f;

	for (size_t k0 = 0; k0 < K; k0 += BK) {
#pragma unroll
		for (int l = 0; l < (BM * BK) / NT; l++) {
			int idx = tid + l * NT;
			int r = idx / BK, c = idx % BK;
			size_t gr = row0 + r, gc = k0 + c;
			As[c][r] = (gr < M && gc < K) ? A[gr * K + gc] : 0.0f;
		}
#pragma unroll
		for (int l = 0; l < (BK * BN) / NT; l++) {
			int idx = tid + l * NT;
			int r = idx / BN, c = idx % BN;
			size_t gr = k0 + r, gc = col0 + c;
			Bs[r][c] = (gr < K && gc < N) ? B[gr * N + gc] : 0.0f;
		}
		__syncthreads();
#pragma unroll
		for (int kk = 0; kk < BK; kk++) {
			float ra[TM], rb[TN];
#pragma unroll
			for (int i = 0; i < TM; i++)
				ra[i] = As[kk][tr + 16 * i];
#pragma unroll
			for (int j = 0; j < TN; j++)
				rb[j] = Bs[kk][tc + 16 * j];
#pragma unroll
			for (int i = 0; i < TM; i++)
#pragma unroll
				for (int j = 0; j < TN; j++)
					acc[i][j] = fmaf(ra[i], rb[j], acc[i][j]);
		}
		__syncthreads();
	}

#pragma unroll
	for (int i = 0; i < TM; i++) {
		size_t r = row0 + tr + 16 * i;
		if (r >= M)
			continue;
#pragma unroll
		for (int j = 0; j < TN; j++) {
			size_t c = col0 + tc + 16 * j;
			if (c < N)
				C[r * N + c] = acc[i][j];
		}
	}
}
