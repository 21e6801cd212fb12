// cudaMemset and cudaMemsetAsync on sub-ranges, read back.
#include "common.h"
int main() {
    const int n = 1 << 20;
    unsigned char *d;
    CHECK(cudaMalloc(&d, n));
    CHECK(cudaMemset(d, 0x11, n));
    CHECK(cudaMemset(d + 1000, 0xab, 5000));
    cudaStream_t s;
    CHECK(cudaStreamCreate(&s));
    CHECK(cudaMemsetAsync(d + n / 2, 0x7f, 3, s));
    CHECK(cudaStreamSynchronize(s));
    unsigned char *h = new unsigned char[n];
    CHECK(cudaMemcpy(h, d, n, cudaMemcpyDeviceToHost));
    unsigned long long sum = 0;
    for (int i = 0; i < n; i++) sum += h[i];
    printf("memset sum=%llu h[999]=%x h[1000]=%x h[5999]=%x h[6000]=%x h[n/2+2]=%x\n",
           sum, h[999], h[1000], h[5999], h[6000], h[n / 2 + 2]);
    // A range past the allocation is refused, not performed.
    cudaError_t e = cudaMemset(d + n - 1, 0, 2);
    fprintf(stderr, "memset out of range -> %d\n", (int)e);
    CHECK(cudaFree(d));
    return 0;
}
