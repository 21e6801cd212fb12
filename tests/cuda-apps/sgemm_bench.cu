// Benchmark: a cuBLAS SGEMM loop at 4096^3 (FP32 math), one synchronize at
// the end. Prints a checksum (compared with the native run) and the time
// (reported, not compared).
#include "common.h"
#include <chrono>
#include <vector>
#include <cublas_v2.h>
__global__ void fill(float *x, size_t n, unsigned seed) {
    size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x;
    if (i < n) x[i] = (float)((i * 2654435761u + seed) % 1000u) / 1000.0f - 0.5f;
}
int main() {
    const int N = 4096, iters = 20;
    const size_t n = (size_t)N * N;
    float *a, *b, *c;
    CHECK(cudaMalloc(&a, n * 4));
    CHECK(cudaMalloc(&b, n * 4));
    CHECK(cudaMalloc(&c, n * 4));
    fill<<<(n + 255) / 256, 256>>>(a, n, 1);
    fill<<<(n + 255) / 256, 256>>>(b, n, 2);
    cublasHandle_t h;
    if (cublasCreate(&h) != CUBLAS_STATUS_SUCCESS) { printf("cublasCreate failed\n"); return 1; }
    const float one = 1, zero = 0;
    // Warm-up (kernel selection, workspace), then the timed loop.
    if (cublasSgemm(h, CUBLAS_OP_N, CUBLAS_OP_N, N, N, N, &one, a, N, b, N, &zero, c, N)) return 1;
    CHECK(cudaDeviceSynchronize());
    auto t0 = std::chrono::steady_clock::now();
    for (int i = 0; i < iters; i++)
        if (cublasSgemm(h, CUBLAS_OP_N, CUBLAS_OP_N, N, N, N, &one, a, N, b, N, &zero, c, N)) return 1;
    CHECK(cudaDeviceSynchronize());
    auto t1 = std::chrono::steady_clock::now();
    std::vector<float> out(4096);
    CHECK(cudaMemcpy(out.data(), c, out.size() * 4, cudaMemcpyDeviceToHost));
    double sum = 0;
    for (float v : out) sum += v;
    printf("sgemm4096 first_column_sum=%.4e\n", sum);
    double ms = std::chrono::duration<double, std::milli>(t1 - t0).count() / iters;
    fprintf(stderr, "TIME sgemm 4096^3 x%d: %.3f ms per SGEMM = %.1f TFLOP/s\n", iters, ms,
            2.0 * N * N * (double)N / (ms * 1e-3) / 1e12);
    cublasDestroy(h);
    return 0;
}
