// Device count and properties.
#include "common.h"
int main() {
    int n = -1;
    cudaError_t e = cudaGetDeviceCount(&n);
    printf("devices: %d (error %d: %s)\n", n, (int)e, cudaGetErrorString(e));
    if (e != cudaSuccess) return 2;
    cudaDeviceProp p;
    CHECK(cudaGetDeviceProperties(&p, 0));
    printf("name=%s cc=%d.%d sms=%d warp=%d maxthreads=%d grid=%d,%d,%d smem/block=%zu regs/block=%d l2=%d bus=%d mem_gib=%zu\n",
           p.name, p.major, p.minor, p.multiProcessorCount, p.warpSize, p.maxThreadsPerBlock,
           p.maxGridSize[0], p.maxGridSize[1], p.maxGridSize[2], p.sharedMemPerBlock, p.regsPerBlock,
           p.l2CacheSize, p.memoryBusWidth, p.totalGlobalMem >> 30);
    int v = 0;
    CHECK(cudaDeviceGetAttribute(&v, cudaDevAttrMaxSharedMemoryPerBlockOptin, 0));
    printf("smem optin=%d\n", v);
    return 0;
}
