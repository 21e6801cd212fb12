// Benchmark: 10,000 small asynchronous launches, then one synchronize.
// Prints the result (compared) and the time (reported, not compared).
#include "common.h"
#include <chrono>
__global__ void inc(int *x) { if (threadIdx.x == 0) atomicAdd(x, 1); }
int main() {
    int *d;
    CHECK(cudaMalloc(&d, 4));
    CHECK(cudaMemset(d, 0, 4));
    inc<<<1, 32>>>(d);
    CHECK(cudaDeviceSynchronize());
    const int n = 10000;
    auto t0 = std::chrono::steady_clock::now();
    for (int i = 0; i < n; i++) inc<<<1, 32>>>(d);
    CHECK(cudaDeviceSynchronize());
    auto t1 = std::chrono::steady_clock::now();
    int h = 0;
    CHECK(cudaMemcpy(&h, d, 4, cudaMemcpyDeviceToHost));
    printf("launches count=%d\n", h);
    double us = std::chrono::duration<double, std::micro>(t1 - t0).count();
    fprintf(stderr, "TIME launches %d in %.0f us = %.2f us/launch\n", n, us, us / n);
    return h != n + 1;
}
