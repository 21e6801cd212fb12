//! The guest CUDA library against a real daemon with the CPU executor (no
//! GPU needed): the real vhost-user protocol over a unix socket, memfd guest
//! memory, the daemon's real parser and scheduler.
//!
//! * In this process, through the library's Rust face: every entry point
//!   answers the documented "no CUDA device" (CUDA_ERROR_NO_DEVICE /
//!   cudaErrorNoDevice = 100), never a crash.
//! * A C program linked against `libcudart.so.13` and `libcuda.so.1` (both
//!   symlinks to the built cdylib, as installed) asks cudaGetDeviceCount and
//!   cuInit through the dynamic loader, with the library's symbol versions.

use std::ffi::c_void;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::str::FromStr;

use vgpu::config::{DaemonConfig, FileConfig, VmSpec};
use vgpu::daemon::{Daemon, VmSource};

fn cpu_daemon(dir: &Path) -> (Daemon, PathBuf) {
    let sock = dir.join("vm1.sock");
    let spec = VmSpec::from_str(&format!(
        "id=1,pool=A,priority=high,socket={}",
        sock.display()
    ))
    .unwrap();
    let cpu = FileConfig::parse("executor = \"cpu\"", Path::new("t.toml")).unwrap();
    let cfg =
        DaemonConfig::resolve(FileConfig::embedded().unwrap().merge(cpu), Vec::new()).unwrap();
    let d = Daemon::start_with(&cfg, VmSource::Static(vec![spec])).unwrap();
    for _ in 0..200 {
        if sock.exists() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    (d, sock)
}

/// The cdylib cargo built with this test: in the deps directory beside it
/// (`cargo test` links it there and copies it up only on `cargo build`, so
/// the copy above may be stale).
fn cdylib() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let deps = exe.parent().unwrap();
    let lib = [deps, deps.parent().unwrap()]
        .iter()
        .map(|d| d.join("libvgpucuda.so"))
        .find(|l| l.exists());
    lib.unwrap_or_else(|| panic!("libvgpucuda.so not built near {}", deps.display()))
}

const PROGRAM: &str = r#"
#include <stdio.h>
typedef int cudaError_t;
typedef int CUresult;
extern cudaError_t cudaGetDeviceCount(int *);
extern const char *cudaGetErrorString(cudaError_t);
extern cudaError_t cudaMalloc(void **, unsigned long);
extern cudaError_t cudaGetLastError(void);
extern CUresult cuInit(unsigned);
extern CUresult cuGetExportTable(const void **, const void *);
int main(void) {
    int n = -1;
    cudaError_t e = cudaGetDeviceCount(&n);
    printf("count %d error %d %s\n", n, e, cudaGetErrorString(e));
    void *p = 0;
    printf("malloc %d last %d\n", cudaMalloc(&p, 16), cudaGetLastError());
    printf("cuInit %d\n", cuInit(0));
    const void *t = 0;
    printf("export table %d\n", cuGetExportTable(&t, 0));
    return 0;
}
"#;

#[test]
fn no_device_on_the_cpu_executor() {
    let dir = tempfile::tempdir().unwrap();
    let (daemon, sock) = cpu_daemon(dir.path());

    // A C program through the dynamic loader, the library installed under
    // both names.
    let lib = dir.path().join("lib");
    std::fs::create_dir(&lib).unwrap();
    for name in ["libcudart.so.13", "libcuda.so.1"] {
        std::os::unix::fs::symlink(cdylib(), lib.join(name)).unwrap();
    }
    let src = dir.path().join("p.c");
    let bin = dir.path().join("p");
    std::fs::write(&src, PROGRAM).unwrap();
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
    let out = Command::new(cc)
        .arg("-o")
        .arg(&bin)
        .arg(&src)
        .arg(lib.join("libcudart.so.13"))
        .arg(lib.join("libcuda.so.1"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = Command::new(&bin)
        .env("VGPU_SOCKET", &sock)
        .env("LD_LIBRARY_PATH", &lib)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}{stderr}");
    assert_eq!(
        stdout,
        "count 0 error 100 no CUDA-capable device is detected\nmalloc 100 last 100\ncuInit 100\nexport table 801\n"
    );
    assert!(
        !stderr.contains("version information"),
        "symbol versions: {stderr}"
    );
    // Programs built against NVIDIA's runtime need version
    // "libcudart.so.13" of libcudart.so.13: the library defines it.
    let v = Command::new("readelf")
        .arg("-V")
        .arg(cdylib())
        .output()
        .unwrap();
    let v = String::from_utf8_lossy(&v.stdout);
    assert!(v.contains("Name: libcudart.so.13"), "{v}");
    daemon.shutdown();
}

/// Stands in for NVIDIA's libcublas.so.13 at link time: its symbols carry
/// version "libcublas.so.13", as a program built with `-lcublas` then
/// requires of whatever library it loads under that name.
const FAKE_CUBLAS: &str = r#"
int cublasCreate_v2(void **h) { (void)h; return 0; }
int cublasDestroy_v2(void *h) { (void)h; return 0; }
int cublasSgemm_v2(void) { return 0; }
int cublasDgemm_v2(void) { return 0; }
const char *cublasGetStatusName(int s) { (void)s; return ""; }
"#;

const CUBLAS_PROGRAM: &str = r#"
#include <stdio.h>
extern int cublasCreate_v2(void **);
extern int cublasDestroy_v2(void *);
extern int cublasSgemm_v2(void *, int, int, int, int, int, const float *, const float *, int,
                          const float *, int, const float *, float *, int);
extern int cublasDgemm_v2(void);
extern const char *cublasGetStatusName(int);
int main(void) {
    void *h = 0;
    int s = cublasCreate_v2(&h);
    printf("create %d %s\n", s, cublasGetStatusName(s));
    float one = 1, zero = 0;
    printf("sgemm on a bad handle %d\n",
           cublasSgemm_v2((void *)8, 0, 0, 1, 1, 1, &one, 0, 1, 0, 1, &zero, 0, 1));
    printf("destroy %d\n", cublasDestroy_v2((void *)8));
    printf("dgemm %d %s\n", cublasDgemm_v2(), cublasGetStatusName(15));
    return 0;
}
"#;

fn cc(args: &[&std::ffi::OsStr]) {
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
    let out = Command::new(cc).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A program linked against a versioned libcublas.so.13 loads the library
/// in its place (the version node), and gets cuBLAS statuses on the CPU
/// executor: cublasCreate CUBLAS_STATUS_NOT_INITIALIZED (no device), an
/// unknown handle NOT_INITIALIZED, an unsupported call NOT_SUPPORTED.
#[test]
fn cublas_program_links_and_answers_statuses() {
    let dir = tempfile::tempdir().unwrap();
    let (daemon, sock) = cpu_daemon(dir.path());
    let d = dir.path();
    let fake = d.join("fake");
    std::fs::create_dir(&fake).unwrap();
    std::fs::write(d.join("fake.c"), FAKE_CUBLAS).unwrap();
    std::fs::write(
        d.join("fake.map"),
        "libcublas.so.13 { global: cublas*; local: *; };\n",
    )
    .unwrap();
    let fake_lib = fake.join("libcublas.so.13");
    let map_arg = format!("-Wl,--version-script={}", d.join("fake.map").display());
    cc(&[
        "-shared".as_ref(),
        "-fPIC".as_ref(),
        "-Wl,-soname,libcublas.so.13".as_ref(),
        map_arg.as_ref(),
        "-o".as_ref(),
        fake_lib.as_os_str(),
        d.join("fake.c").as_os_str(),
    ]);
    std::fs::write(d.join("p.c"), CUBLAS_PROGRAM).unwrap();
    let bin = d.join("p");
    cc(&[
        "-o".as_ref(),
        bin.as_os_str(),
        d.join("p.c").as_os_str(),
        fake_lib.as_os_str(),
    ]);
    let v = Command::new("readelf")
        .arg("-V")
        .arg(&bin)
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&v.stdout).contains("Name: libcublas.so.13"),
        "the program needs the version"
    );
    let lib = d.join("lib");
    std::fs::create_dir(&lib).unwrap();
    std::os::unix::fs::symlink(cdylib(), lib.join("libcublas.so.13")).unwrap();
    let out = Command::new(&bin)
        .env("VGPU_SOCKET", &sock)
        .env("LD_LIBRARY_PATH", &lib)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}{stderr}");
    assert_eq!(
        stdout,
        "create 1 CUBLAS_STATUS_NOT_INITIALIZED\nsgemm on a bad handle 1\ndestroy 1\n\
         dgemm 15 CUBLAS_STATUS_NOT_SUPPORTED\n"
    );
    assert!(!stderr.contains("version"), "symbol versions: {stderr}");
    daemon.shutdown();
}

#[test]
fn rust_face_answers_no_device_without_a_transport() {
    // No daemon at this path: every call is "no device", never a panic.
    std::env::set_var("VGPU_SOCKET", "/nonexistent/vgpu.sock");
    let mut n = -1;
    // SAFETY: valid out-pointer.
    assert_eq!(
        unsafe { vgpucuda::runtime::cudaGetDeviceCount(&mut n) },
        100
    );
    assert_eq!(n, 0);
    let mut p: *mut c_void = std::ptr::null_mut();
    // SAFETY: valid out-pointer.
    assert_eq!(unsafe { vgpucuda::runtime::cudaMalloc(&mut p, 8) }, 100);
    assert_eq!(vgpucuda::driver::cuInit(0), 100);
    assert_eq!(vgpucuda::runtime::cudaDeviceSynchronize(), 100);
    // The runtime names its errors as cudart does, the driver as libcuda.
    // SAFETY: both return static NUL-terminated strings.
    let rt_name = unsafe { std::ffi::CStr::from_ptr(vgpucuda::runtime::cudaGetErrorName(100)) };
    assert_eq!(rt_name.to_str().unwrap(), "cudaErrorNoDevice");
    let mut cu_name: *const std::ffi::c_char = std::ptr::null();
    // SAFETY: valid out-pointer.
    assert_eq!(
        unsafe { vgpucuda::driver::cuGetErrorName(100, &mut cu_name) },
        0
    );
    // SAFETY: set to a static NUL-terminated string above.
    let cu_name = unsafe { std::ffi::CStr::from_ptr(cu_name) };
    assert_eq!(cu_name.to_str().unwrap(), "CUDA_ERROR_NO_DEVICE");
    // Null out-pointers are errors, not crashes.
    // SAFETY: null is what is being tested.
    assert_eq!(
        unsafe { vgpucuda::driver::cuDriverGetVersion(std::ptr::null_mut()) },
        1
    );
}
