// Two streams with async copies, kernels, an event wait between streams,
// and event timing (the time is checked > 0, not printed: it differs run to run).
#include "common.h"
__global__ void scale(float *x, float a, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) x[i] = x[i] * a + 1.0f;
}
int main() {
    const int n = 1 << 16;
    float *h0, *h1;
    CHECK(cudaMallocHost(&h0, n * sizeof(float)));
    CHECK(cudaMallocHost(&h1, n * sizeof(float)));
    for (int i = 0; i < n; i++) { h0[i] = i; h1[i] = -i; }
    float *d0, *d1;
    CHECK(cudaMalloc(&d0, n * sizeof(float))); CHECK(cudaMalloc(&d1, n * sizeof(float)));
    cudaStream_t s0, s1;
    CHECK(cudaStreamCreate(&s0)); CHECK(cudaStreamCreateWithFlags(&s1, cudaStreamNonBlocking));
    cudaEvent_t start, done0, stop;
    CHECK(cudaEventCreate(&start)); CHECK(cudaEventCreate(&done0)); CHECK(cudaEventCreate(&stop));
    CHECK(cudaEventRecord(start, s0));
    CHECK(cudaMemcpyAsync(d0, h0, n * sizeof(float), cudaMemcpyHostToDevice, s0));
    CHECK(cudaMemcpyAsync(d1, h1, n * sizeof(float), cudaMemcpyHostToDevice, s1));
    for (int k = 0; k < 10; k++) scale<<<n / 256, 256, 0, s0>>>(d0, 1.5f, n);
    CHECK(cudaEventRecord(done0, s0));
    CHECK(cudaStreamWaitEvent(s1, done0, 0));
    // s1 adds d0 (finished on s0) into d1 through a DtoD copy and a kernel.
    CHECK(cudaMemcpyAsync(d1, d0, n / 2 * sizeof(float), cudaMemcpyDeviceToDevice, s1));
    scale<<<n / 256, 256, 0, s1>>>(d1, 2.0f, n);
    CHECK(cudaMemcpyAsync(h1, d1, n * sizeof(float), cudaMemcpyDeviceToHost, s1));
    CHECK(cudaMemcpyAsync(h0, d0, n * sizeof(float), cudaMemcpyDeviceToHost, s0));
    CHECK(cudaEventRecord(stop, s1));
    CHECK(cudaStreamSynchronize(s0));
    CHECK(cudaStreamSynchronize(s1));
    CHECK(cudaEventSynchronize(stop));
    float ms = -1;
    CHECK(cudaEventElapsedTime(&ms, start, stop));
    double s = 0;
    for (int i = 0; i < n; i++) s += h0[i] + h1[i];
    printf("streams sum=%.6e h0[3]=%.3f h1[3]=%.3f h1[n-1]=%.3f timed=%d\n", s, h0[3], h1[3], h1[n - 1], ms > 0);
    CHECK(cudaEventDestroy(start)); CHECK(cudaEventDestroy(done0)); CHECK(cudaEventDestroy(stop));
    CHECK(cudaStreamDestroy(s0)); CHECK(cudaStreamDestroy(s1));
    CHECK(cudaFree(d0)); CHECK(cudaFree(d1)); CHECK(cudaFreeHost(h0)); CHECK(cudaFreeHost(h1));
    return 0;
}
