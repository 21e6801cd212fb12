// Tiled matrix multiply with shared memory; compares against a CPU result.
#include "common.h"
#include <cmath>
#define T 16
__global__ void matmul(const float *A, const float *B, float *C, int n) {
    __shared__ float As[T][T], Bs[T][T];
    int r = blockIdx.y * T + threadIdx.y, c = blockIdx.x * T + threadIdx.x;
    float acc = 0;
    for (int t = 0; t < n / T; t++) {
        As[threadIdx.y][threadIdx.x] = A[r * n + t * T + threadIdx.x];
        Bs[threadIdx.y][threadIdx.x] = B[(t * T + threadIdx.y) * n + c];
        __syncthreads();
        for (int k = 0; k < T; k++) acc += As[threadIdx.y][k] * Bs[k][threadIdx.x];
        __syncthreads();
    }
    C[r * n + c] = acc;
}
int main() {
    const int n = 256;
    size_t bytes = n * n * sizeof(float);
    float *A = new float[n * n], *B = new float[n * n], *C = new float[n * n];
    for (int i = 0; i < n * n; i++) { A[i] = (i % 17) * 0.125f; B[i] = (i % 13) * 0.25f - 1; }
    float *dA, *dB, *dC;
    CHECK(cudaMalloc(&dA, bytes)); CHECK(cudaMalloc(&dB, bytes)); CHECK(cudaMalloc(&dC, bytes));
    CHECK(cudaMemcpy(dA, A, bytes, cudaMemcpyHostToDevice));
    CHECK(cudaMemcpy(dB, B, bytes, cudaMemcpyHostToDevice));
    matmul<<<dim3(n / T, n / T), dim3(T, T)>>>(dA, dB, dC, n);
    CHECK(cudaGetLastError());
    CHECK(cudaMemcpy(C, dC, bytes, cudaMemcpyDeviceToHost));
    double maxerr = 0, sum = 0;
    for (int i = 0; i < n; i++) for (int j = 0; j < n; j++) {
        double ref = 0;
        for (int k = 0; k < n; k++) ref += (double)A[i * n + k] * B[k * n + j];
        maxerr = fmax(maxerr, fabs(ref - C[i * n + j]));
        sum += C[i * n + j];
    }
    printf("matmul n=%d sum=%.6e C[5]=%.4f maxerr_ok=%d\n", n, sum, C[5], maxerr < 1e-2);
    CHECK(cudaFree(dA)); CHECK(cudaFree(dB)); CHECK(cudaFree(dC));
    return maxerr >= 1e-2;
}
