// Atomics: a histogram and a global counter, plus a __device__ variable
// read back with cudaMemcpyFromSymbol.
#include "common.h"
__device__ unsigned int total;
__global__ void hist(const unsigned *x, unsigned *bins, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) { atomicAdd(&bins[x[i] % 64], 1u); atomicAdd(&total, x[i] & 7); }
}
int main() {
    const int n = 1 << 20;
    unsigned *x = new unsigned[n];
    unsigned long long expect = 0;
    for (int i = 0; i < n; i++) { x[i] = (i * 2654435761u) >> 7; expect += x[i] & 7; }
    unsigned *dx, *dbins;
    CHECK(cudaMalloc(&dx, n * 4)); CHECK(cudaMalloc(&dbins, 64 * 4));
    CHECK(cudaMemset(dbins, 0, 64 * 4));
    unsigned zero = 0;
    CHECK(cudaMemcpyToSymbol(total, &zero, 4));
    CHECK(cudaMemcpy(dx, x, n * 4, cudaMemcpyHostToDevice));
    hist<<<n / 256, 256>>>(dx, dbins, n);
    CHECK(cudaGetLastError());
    unsigned bins[64], t = 0;
    CHECK(cudaMemcpy(bins, dbins, sizeof bins, cudaMemcpyDeviceToHost));
    CHECK(cudaMemcpyFromSymbol(&t, total, 4));
    unsigned long long s = 0;
    for (int i = 0; i < 64; i++) s += bins[i];
    printf("atomics bins_sum=%llu bin0=%u bin63=%u total=%u expect=%llu\n", s, bins[0], bins[63], t, expect);
    return s != (unsigned long long)n || t != (unsigned)expect;
}
