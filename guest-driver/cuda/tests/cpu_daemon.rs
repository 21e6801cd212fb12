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

/// The cdylib cargo built beside this test's deps directory.
fn cdylib() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().unwrap().parent().unwrap();
    let lib = dir.join("libvgpucuda.so");
    assert!(lib.exists(), "{} not built", lib.display());
    lib
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
