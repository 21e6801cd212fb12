// cuBLAS through the guest library (issue 10): handles, streams, math
// modes, cublasSgemm_v2 and cublasGemmEx (FP32 and TF32 compute) on
// non-square matrices with padded leading dimensions and transposes,
// checked against a CPU reference in double precision; argument errors
// cuBLAS reports synchronously. Built with nvcc -cudart shared -lcublas.
// Prints what must equal the native run; version and texts go to stderr.
#include "common.h"
#include <cmath>
#include <cstdlib>
#include <vector>
#include <cublas_v2.h>

#define BCHECK(x) do { cublasStatus_t s_ = (x); if (s_ != CUBLAS_STATUS_SUCCESS) { \
    printf("cublas %d (%s) at %s:%d\n", (int)s_, cublasGetStatusName(s_), __FILE__, __LINE__); return 1; } } while (0)

// Column-major element (r, c) of a matrix with leading dimension ld.
static float at(const std::vector<float> &x, int ld, int r, int c) { return x[(size_t)c * ld + r]; }

// Largest |C - ref| / (|ref| + 1) of C = alpha op(A) op(B) + beta C0.
static double check(const std::vector<float> &A, int lda, bool ta, const std::vector<float> &B, int ldb,
                    bool tb, const std::vector<float> &C0, const std::vector<float> &C, int ldc, int m,
                    int n, int k, float alpha, float beta, double *sum) {
    double worst = 0;
    *sum = 0;
    for (int j = 0; j < n; j++)
        for (int i = 0; i < m; i++) {
            double acc = 0;
            for (int p = 0; p < k; p++) {
                double a = ta ? at(A, lda, p, i) : at(A, lda, i, p);
                double b = tb ? at(B, ldb, j, p) : at(B, ldb, p, j);
                acc += a * b;
            }
            double ref = alpha * acc + beta * at(C0, ldc, i, j);
            double got = at(C, ldc, i, j);
            worst = fmax(worst, fabs(got - ref) / (fabs(ref) + 1));
            *sum += got;
        }
    return worst;
}

int main() {
    const int m = 300, n = 200, k = 150;
    const int lda = 160, ldb = 208, ldc = 304;  // padded; A is k x m (transposed), B is k x n
    std::vector<float> A((size_t)lda * m), B((size_t)ldb * n), C0((size_t)ldc * n), C(C0.size());
    srand(7);
    for (auto &x : A) x = (float)(rand() % 2001 - 1000) / 1000.0f;
    for (auto &x : B) x = (float)(rand() % 2001 - 1000) / 1000.0f;
    for (auto &x : C0) x = (float)(rand() % 2001 - 1000) / 1000.0f;
    float *dA, *dB, *dC;
    CHECK(cudaMalloc(&dA, A.size() * 4));
    CHECK(cudaMalloc(&dB, B.size() * 4));
    CHECK(cudaMalloc(&dC, C.size() * 4));
    CHECK(cudaMemcpy(dA, A.data(), A.size() * 4, cudaMemcpyHostToDevice));
    CHECK(cudaMemcpy(dB, B.data(), B.size() * 4, cudaMemcpyHostToDevice));

    cublasHandle_t h;
    BCHECK(cublasCreate(&h));
    int version = 0;
    BCHECK(cublasGetVersion(h, &version));
    fprintf(stderr, "cuBLAS version %d\n", version);
    printf("version_major=%d\n", version / 10000);
    cudaStream_t s;
    CHECK(cudaStreamCreate(&s));
    BCHECK(cublasSetStream(h, s));
    cudaStream_t got_s = 0;
    BCHECK(cublasGetStream(h, &got_s));
    printf("stream_kept=%d\n", got_s == s);

    const float alpha = 1.5f, beta = -0.5f;
    struct Case { const char *name; int api; cublasMath_t math; cublasComputeType_t compute; double tol; };
    const Case cases[] = {
        {"sgemm_fp32", 0, CUBLAS_DEFAULT_MATH, CUBLAS_COMPUTE_32F, 1e-5},
        {"sgemm_tf32_math", 0, CUBLAS_TF32_TENSOR_OP_MATH, CUBLAS_COMPUTE_32F, 1e-2},
        {"gemmex_fp32", 1, CUBLAS_DEFAULT_MATH, CUBLAS_COMPUTE_32F, 1e-5},
        {"gemmex_tf32", 1, CUBLAS_DEFAULT_MATH, CUBLAS_COMPUTE_32F_FAST_TF32, 1e-2},
        {"gemmex_pedantic", 1, CUBLAS_PEDANTIC_MATH, CUBLAS_COMPUTE_32F_PEDANTIC, 1e-5},
    };
    for (const Case &c : cases) {
        CHECK(cudaMemcpyAsync(dC, C0.data(), C0.size() * 4, cudaMemcpyHostToDevice, s));
        BCHECK(cublasSetMathMode(h, c.math));
        cublasMath_t mm;
        BCHECK(cublasGetMathMode(h, &mm));
        if (c.api == 0)
            BCHECK(cublasSgemm(h, CUBLAS_OP_T, CUBLAS_OP_N, m, n, k, &alpha, dA, lda, dB, ldb, &beta, dC, ldc));
        else
            BCHECK(cublasGemmEx(h, CUBLAS_OP_T, CUBLAS_OP_N, m, n, k, &alpha, dA, CUDA_R_32F, lda, dB,
                                CUDA_R_32F, ldb, &beta, dC, CUDA_R_32F, ldc, c.compute, CUBLAS_GEMM_DEFAULT));
        CHECK(cudaMemcpyAsync(C.data(), dC, C.size() * 4, cudaMemcpyDeviceToHost, s));
        CHECK(cudaStreamSynchronize(s));
        double sum, err = check(A, lda, true, B, ldb, false, C0, C, ldc, m, n, k, alpha, beta, &sum);
        fprintf(stderr, "%s maxerr %.3g sum %.6e\n", c.name, err, sum);
        printf("%s mode=%d err_ok=%d sum=%.3e\n", c.name, (int)mm, err < c.tol, sum);
    }

    // Both operands transposed, B as n x k, on the default stream.
    BCHECK(cublasSetStream(h, 0));
    BCHECK(cublasSetMathMode(h, CUBLAS_DEFAULT_MATH));
    std::vector<float> Bt((size_t)n * k);  // n x k, ld n
    for (int p = 0; p < k; p++)
        for (int j = 0; j < n; j++) Bt[(size_t)p * n + j] = at(B, ldb, p, j);
    float *dBt;
    CHECK(cudaMalloc(&dBt, Bt.size() * 4));
    CHECK(cudaMemcpy(dBt, Bt.data(), Bt.size() * 4, cudaMemcpyHostToDevice));
    CHECK(cudaMemcpy(dC, C0.data(), C0.size() * 4, cudaMemcpyHostToDevice));
    BCHECK(cublasSgemm(h, CUBLAS_OP_T, CUBLAS_OP_T, m, n, k, &alpha, dA, lda, dBt, n, &beta, dC, ldc));
    CHECK(cudaMemcpy(C.data(), dC, C.size() * 4, cudaMemcpyDeviceToHost));
    {
        double sum, err = check(A, lda, true, Bt, n, true, C0, C, ldc, m, n, k, alpha, beta, &sum);
        printf("sgemm_tt err_ok=%d sum=%.3e\n", err < 1e-5, sum);
    }

    // Errors cuBLAS reports at the call.
    printf("m<0: %s\n", cublasGetStatusName(cublasSgemm(h, CUBLAS_OP_N, CUBLAS_OP_N, -1, n, k, &alpha, dA, lda, dB, ldb, &beta, dC, ldc)));
    printf("lda<m: %s\n", cublasGetStatusName(cublasSgemm(h, CUBLAS_OP_N, CUBLAS_OP_N, m, n, k, &alpha, dA, m - 1, dB, ldb, &beta, dC, ldc)));
    fprintf(stderr, "math mode 5: %s\n", cublasGetStatusName(cublasSetMathMode(h, (cublasMath_t)5)));
    // Unsupported here (FP16 data): the status, on stderr (native runs it).
    cublasStatus_t f16 = cublasGemmEx(h, CUBLAS_OP_N, CUBLAS_OP_N, 16, 16, 16, &alpha, dA, CUDA_R_16F, 16, dB,
                                      CUDA_R_16F, 16, &beta, dC, CUDA_R_16F, 16, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
    fprintf(stderr, "fp16 gemmex: %s (%s)\n", cublasGetStatusName(f16), cublasGetStatusString(f16));
    fprintf(stderr, "strings: %s | %s\n", cublasGetStatusString(CUBLAS_STATUS_INVALID_VALUE), cublasGetStatusString(CUBLAS_STATUS_NOT_SUPPORTED));
    CHECK(cudaDeviceSynchronize());

    BCHECK(cublasDestroy(h));
    CHECK(cudaStreamDestroy(s));
    CHECK(cudaFree(dA));
    CHECK(cudaFree(dB));
    CHECK(cudaFree(dBt));
    CHECK(cudaFree(dC));
    printf("done\n");
    return 0;
}
