//! QEMU arguments that attach a registered VM to the daemon.

use std::path::Path;

use serde::Serialize;

use super::store::VmRecord;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    #[error("invalid memory size '{0}' (expected e.g. 4G, 8192M)")]
    BadMemory(String),
    #[error("socket directory '{0}' must be an absolute path without spaces, quotes, commas, '$', '`' or '\\'")]
    BadSocketDir(String),
}

/// Placeholder printed when the VM's memory size is not given.
pub const RAM_PLACEHOLDER: &str = "<RAM>";

/// The arguments, each option and its value as one string.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct QemuArgs {
    /// `[option, value]` pairs, e.g. `["-device", "vgpu-stub,..."]`.
    pub args: Vec<[String; 2]>,
}

impl QemuArgs {
    /// One line, as QEMU's command line or XCP-ng's `device-model-args` takes it.
    pub fn one_line(&self) -> String {
        self.args
            .iter()
            .map(|[o, v]| format!("{o} {v}"))
            .collect::<Vec<_>>()
            .join(" ")
    }

    /// One option per line, joined by shell continuations.
    pub fn shell_lines(&self) -> String {
        self.args
            .iter()
            .map(|[o, v]| format!("{o} {v}"))
            .collect::<Vec<_>>()
            .join(" \\\n")
    }
}

/// Checks a QEMU size such as `4G`, `8192M` or `4294967296`.
pub fn check_memory(size: &str) -> Result<(), Error> {
    let digits = size.trim_end_matches(|c: char| "bBkKmMgGtT".contains(c));
    let suffix_len = size.len() - digits.len();
    if !digits.is_empty() && digits.bytes().all(|c| c.is_ascii_digit()) && suffix_len <= 1 {
        Ok(())
    } else {
        Err(Error::BadMemory(size.to_string()))
    }
}

fn check_socket_dir(dir: &Path) -> Result<&str, Error> {
    let s = dir.to_str().unwrap_or("");
    let ok = dir.is_absolute()
        && !s.is_empty()
        && !s
            .chars()
            .any(|c| c.is_whitespace() || c.is_control() || "\"',$`\\".contains(c));
    if ok {
        Ok(s.trim_end_matches('/'))
    } else {
        Err(Error::BadSocketDir(dir.display().to_string()))
    }
}

/// The arguments for `vm`. `memory: None` prints [`RAM_PLACEHOLDER`].
/// `xen`: no memfd memory backend (Xen guest RAM reaches the daemon through
/// XEN_MMAP foreign mappings, see xen/README.md).
pub fn qemu_args(
    vm: &VmRecord,
    socket_dir: &Path,
    memory: Option<&str>,
    xen: bool,
) -> Result<QemuArgs, Error> {
    if let Some(m) = memory {
        check_memory(m)?;
    }
    let dir = check_socket_dir(socket_dir)?;
    let id = vm.vm_id;
    let mut args: Vec<[String; 2]> = Vec::new();
    let mut push = |o: &str, v: String| args.push([o.to_string(), v]);
    if !xen {
        let size = memory.unwrap_or(RAM_PLACEHOLDER);
        push(
            "-object",
            format!("memory-backend-memfd,id=vgpu-mem,size={size},share=on"),
        );
        push("-machine", "memory-backend=vgpu-mem".into());
    }
    push(
        "-chardev",
        format!(
            "socket,id=vgpu{id},path={}",
            crate::config::vm_socket(Path::new(dir), id).display()
        ),
    );
    push(
        "-device",
        format!("vhost-user-vgpu-pci,id=vgpu{id},chardev=vgpu{id}"),
    );
    // vgpu= makes the legacy registers show the virtio device's live config
    // space; the static values are what they show without it.
    push(
        "-device",
        format!(
            "vgpu-stub,vgpu=vgpu{id},pool_id={},priority={},vm_id={id}",
            vm.pool, vm.priority as u32
        ),
    );
    Ok(QemuArgs { args })
}

/// The `xe` command that stores `args` as the VM's device-model-args.
pub fn xe_command(vm: &VmRecord, args: &QemuArgs) -> String {
    format!(
        "xe vm-param-set uuid={} platform:device-model-args=\"{}\"",
        vm.uuid,
        args.one_line()
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::Priority;

    fn vm() -> VmRecord {
        VmRecord {
            uuid: "9b2c6f1e-4a7d-4c1b-8e3f-1d2a3b4c5d6e".parse().unwrap(),
            vm_id: 3,
            name: None,
            pool: "B".parse().unwrap(),
            priority: Priority::High,
            max_queued: 64,
            gpu_mem_quota_mib: 4096,
            register: crate::config::Register::All,
            max_guest_memory_mib: None,
            gpu_index: 0,
            created_at: String::new(),
            updated_at: String::new(),
        }
    }

    #[test]
    fn kvm_and_xen() {
        let a = qemu_args(&vm(), Path::new("/run/vgpu/"), Some("4G"), false).unwrap();
        assert_eq!(
            a.one_line(),
            "-object memory-backend-memfd,id=vgpu-mem,size=4G,share=on \
             -machine memory-backend=vgpu-mem \
             -chardev socket,id=vgpu3,path=/run/vgpu/vm3.sock \
             -device vhost-user-vgpu-pci,id=vgpu3,chardev=vgpu3 \
             -device vgpu-stub,vgpu=vgpu3,pool_id=B,priority=2,vm_id=3"
        );
        let x = qemu_args(&vm(), Path::new("/run/vgpu"), None, true).unwrap();
        assert_eq!(
            xe_command(&vm(), &x),
            "xe vm-param-set uuid=9b2c6f1e-4a7d-4c1b-8e3f-1d2a3b4c5d6e \
             platform:device-model-args=\"-chardev socket,id=vgpu3,path=/run/vgpu/vm3.sock \
             -device vhost-user-vgpu-pci,id=vgpu3,chardev=vgpu3 \
             -device vgpu-stub,vgpu=vgpu3,pool_id=B,priority=2,vm_id=3\""
        );
        let p = qemu_args(&vm(), Path::new("/run/vgpu"), None, false).unwrap();
        assert!(p.one_line().contains("size=<RAM>,"));
    }

    #[test]
    fn rejects_bad_input() {
        for m in ["", "G", "4GG", "4.5G", "-1", "4 G"] {
            assert!(check_memory(m).is_err(), "{m}");
        }
        for m in ["4G", "512m", "1073741824"] {
            assert!(check_memory(m).is_ok(), "{m}");
        }
        for d in ["run/vgpu", "/run/a b", "/run/a,b", "/run/\"x"] {
            assert!(qemu_args(&vm(), Path::new(d), None, false).is_err(), "{d}");
        }
    }
}
