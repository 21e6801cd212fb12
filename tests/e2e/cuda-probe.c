// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//
// A small CUDA program for the e2e guest: asks the runtime and the driver
// API how many devices there are, through the guest CUDA library
// (libcudart.so.13 and libcuda.so.1, both libvgpucuda.so) over /dev/vgpu0.
// Built with gcc on the host, dynamically linked like every real CUDA
// program; no CUDA headers are needed (the prototypes are declared here).
//
//   cuda-probe    -> one line per call, e.g. against the CPU executor:
//   cudaGetDeviceCount count=0 error=100 cudaErrorNoDevice
//   cuInit error=100 CUDA_ERROR_NO_DEVICE
//   cuDeviceGetCount count=0 error=100 CUDA_ERROR_NO_DEVICE
#include <stdio.h>

typedef int cudaError_t;
typedef int CUresult;
extern cudaError_t cudaGetDeviceCount(int *count);
extern const char *cudaGetErrorName(cudaError_t e);
extern CUresult cuInit(unsigned int flags);
extern CUresult cuDeviceGetCount(int *count);
extern CUresult cuGetErrorName(CUresult e, const char **name);

static const char *cu_name(CUresult e)
{
	const char *s = "?";

	if (cuGetErrorName(e, &s) != 0 || !s)
		s = "?";
	return s;
}

int main(void)
{
	int n = -1;
	cudaError_t e = cudaGetDeviceCount(&n);

	printf("cudaGetDeviceCount count=%d error=%d %s\n", n, e, cudaGetErrorName(e));
	CUresult r = cuInit(0);
	printf("cuInit error=%d %s\n", r, cu_name(r));
	n = -1;
	r = cuDeviceGetCount(&n);
	printf("cuDeviceGetCount count=%d error=%d %s\n", n, r, cu_name(r));
	return 0;
}
