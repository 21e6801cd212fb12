/* Driver API: load a PTX module and a cubin module (paths on the command
 * line), get a kernel, launch with kernelParams, copy back. */
#include <stdio.h>
#include <stdlib.h>
#include <cuda.h>
#define CK(x) do { CUresult r_ = (x); if (r_ != CUDA_SUCCESS) { const char *s_ = 0; cuGetErrorName(r_, &s_); \
    printf("error %d (%s) at line %d\n", (int)r_, s_ ? s_ : "?", __LINE__); return 1; } } while (0)
static char *slurp(const char *path) {
    FILE *f = fopen(path, "rb"); if (!f) return 0;
    fseek(f, 0, SEEK_END); long n = ftell(f); fseek(f, 0, SEEK_SET);
    char *b = malloc(n + 1); if (fread(b, 1, n, f) != (size_t)n) { fclose(f); return 0; }
    b[n] = 0; fclose(f); return b;
}
static int run(CUmodule m, const char *what) {
    CUfunction f;
    CK(cuModuleGetFunction(&f, m, "saxpy"));
    int n = 4096; float a = 3.0f;
    float *x = malloc(n * 4), *y = malloc(n * 4);
    for (int i = 0; i < n; i++) { x[i] = i; y[i] = 1000 - i; }
    CUdeviceptr dx, dy;
    CK(cuMemAlloc(&dx, n * 4)); CK(cuMemAlloc(&dy, n * 4));
    CK(cuMemcpyHtoD(dx, x, n * 4)); CK(cuMemcpyHtoD(dy, y, n * 4));
    void *args[] = { &n, &a, &dx, &dy };
    CK(cuLaunchKernel(f, n / 128, 1, 1, 128, 1, 1, 0, 0, args, 0));
    CK(cuCtxSynchronize());
    CK(cuMemcpyDtoH(y, dy, n * 4));
    double s = 0; for (int i = 0; i < n; i++) s += y[i];
    printf("%s: sum=%.1f y[10]=%.1f\n", what, s, y[10]);
    CK(cuMemFree(dx)); CK(cuMemFree(dy)); free(x); free(y);
    return 0;
}
int main(int argc, char **argv) {
    if (argc < 3) { printf("usage: driver_api saxpy.ptx saxpy.cubin\n"); return 2; }
    CK(cuInit(0));
    CUdevice d; CK(cuDeviceGet(&d, 0));
    char name[128]; CK(cuDeviceGetName(name, sizeof name, d));
    int major = 0; CK(cuDeviceGetAttribute(&major, CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, d));
    printf("device %s cc major %d\n", name, major);
    CUcontext ctx; CK(cuDevicePrimaryCtxRetain(&ctx, d)); CK(cuCtxSetCurrent(ctx));
    char *ptx = slurp(argv[1]), *cubin = slurp(argv[2]);
    if (!ptx || !cubin) { printf("cannot read modules\n"); return 2; }
    CUmodule mp, mc;
    CK(cuModuleLoadData(&mp, ptx));
    if (run(mp, "ptx")) return 1;
    CK(cuModuleLoadData(&mc, cubin));
    if (run(mc, "cubin")) return 1;
    CK(cuModuleUnload(mp)); CK(cuModuleUnload(mc));
    /* An unknown kernel name is an error, not a crash. */
    CUfunction f; CUresult r = cuModuleGetFunction(&f, mc, "nope");
    printf("unknown function -> %d\n", (int)r);
    CK(cuDevicePrimaryCtxRelease(d));
    return 0;
}
