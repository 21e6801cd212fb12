// Vector add through the runtime API (-cudart shared): malloc, copies,
// a <<<>>> launch, synchronize. Prints a checksum and a few values.
#include <cstdio>
#include <cuda_runtime.h>

__global__ void vadd(const float *a, const float *b, float *c, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) c[i] = a[i] + b[i];
}

#define CHECK(x) do { cudaError_t e = (x); if (e != cudaSuccess) { \
    printf("error %d (%s) at %s:%d\n", (int)e, cudaGetErrorString(e), __FILE__, __LINE__); return 1; } } while (0)

int main() {
    const int n = 1 << 20;
    float *a = new float[n], *b = new float[n], *c = new float[n];
    for (int i = 0; i < n; i++) { a[i] = i * 0.5f; b[i] = (n - i) * 0.25f; }
    float *da, *db, *dc;
    CHECK(cudaMalloc(&da, n * sizeof(float)));
    CHECK(cudaMalloc(&db, n * sizeof(float)));
    CHECK(cudaMalloc(&dc, n * sizeof(float)));
    CHECK(cudaMemcpy(da, a, n * sizeof(float), cudaMemcpyHostToDevice));
    CHECK(cudaMemcpy(db, b, n * sizeof(float), cudaMemcpyHostToDevice));
    vadd<<<(n + 255) / 256, 256>>>(da, db, dc, n);
    CHECK(cudaGetLastError());
    CHECK(cudaDeviceSynchronize());
    CHECK(cudaMemcpy(c, dc, n * sizeof(float), cudaMemcpyDefault));
    double sum = 0;
    int bad = 0;
    for (int i = 0; i < n; i++) { sum += c[i]; if (c[i] != a[i] + b[i]) bad++; }
    printf("vadd n=%d sum=%.6e c[7]=%g c[n-1]=%g mismatches=%d\n", n, sum, c[7], c[n - 1], bad);
    CHECK(cudaFree(da)); CHECK(cudaFree(db)); CHECK(cudaFree(dc));
    delete[] a; delete[] b; delete[] c;
    return bad != 0;
}
