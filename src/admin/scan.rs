//! Lists the hypervisor's VMs: XCP-ng through `xe`, libvirt through `virsh`,
//! whichever is on PATH (`xe` first).

use std::ffi::OsStr;
use std::fmt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde::Serialize;

use super::store::VmUuid;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("neither xe (XCP-ng) nor virsh (libvirt) found on PATH")]
    NoHypervisor,
    #[error("cannot run {tool}: {source}")]
    Run {
        tool: PathBuf,
        source: std::io::Error,
    },
    #[error("`{command}` failed ({status}): {stderr}")]
    Failed {
        command: String,
        status: std::process::ExitStatus,
        stderr: String,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Hypervisor {
    Xcpng,
    Libvirt,
}

impl fmt::Display for Hypervisor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Hypervisor::Xcpng => "XCP-ng (xe)",
            Hypervisor::Libvirt => "libvirt (virsh)",
        })
    }
}

/// A VM as the hypervisor knows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HostVm {
    pub uuid: VmUuid,
    pub name: String,
    pub power_state: String,
}

/// Parses `xe vm-list params=uuid,name-label,power-state`: blocks of
/// `key ( RO)  : value` lines separated by blank lines. Blocks without a
/// well-formed UUID are skipped with a warning.
pub fn parse_xe_vm_list(text: &str) -> Vec<HostVm> {
    let mut vms = Vec::new();
    let mut block: Vec<(String, String)> = Vec::new();
    for line in text.lines().chain(std::iter::once("")) {
        let line = line.trim_end_matches('\r');
        if line.trim().is_empty() {
            if !block.is_empty() {
                vms.extend(xe_block(&block));
                block.clear();
            }
            continue;
        }
        // "     name-label ( RW): a: b" -> key "name-label", value "a: b"
        let field = line.split_once(": ").or_else(|| line.split_once(':'));
        let Some((head, value)) = field else {
            log::warn!("xe output: ignoring line {line:?}");
            continue;
        };
        let key = head.split('(').next().unwrap_or(head).trim().to_string();
        if key == "uuid" && !block.is_empty() {
            vms.extend(xe_block(&block));
            block.clear();
        }
        block.push((key, value.trim().to_string()));
    }
    vms
}

fn xe_block(block: &[(String, String)]) -> Option<HostVm> {
    let get = |k: &str| {
        block
            .iter()
            .find(|(key, _)| key == k)
            .map(|(_, v)| v.clone())
    };
    let raw = get("uuid").unwrap_or_default();
    match raw.parse() {
        Ok(uuid) => Some(HostVm {
            uuid,
            name: get("name-label").unwrap_or_default(),
            power_state: get("power-state").unwrap_or_default(),
        }),
        Err(_) => {
            log::warn!("xe output: skipping a VM without a valid uuid ({raw:?})");
            None
        }
    }
}

/// Domain states as `virsh list` prints them.
const VIRSH_STATES: &[&str] = &[
    "running",
    "idle",
    "paused",
    "in shutdown",
    "shut off",
    "crashed",
    "pmsuspended",
    "blocked",
    "no state",
];

/// Parses `virsh list --all` (`Id Name State` table) into (name, state).
/// Names may contain spaces: the Id is the first column and the state is
/// one of the known states at the end of the line.
pub fn parse_virsh_list(text: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        let mut parts = line.splitn(2, char::is_whitespace);
        let (Some(id), Some(rest)) = (parts.next(), parts.next()) else {
            continue;
        };
        if !(id == "-" || id.bytes().all(|c| c.is_ascii_digit())) {
            continue; // header, separator
        }
        let rest = rest.trim();
        let Some(state) = VIRSH_STATES.iter().find(|s| rest.ends_with(*s)) else {
            log::warn!("virsh output: ignoring line {line:?}");
            continue;
        };
        let name = rest[..rest.len() - state.len()].trim();
        if !name.is_empty() {
            out.push((name.to_string(), state.to_string()));
        }
    }
    out
}

/// `tool` in one of the directories of `path_var`, if executable.
pub(crate) fn find_on_path(tool: &str, path_var: Option<&OsStr>) -> Option<PathBuf> {
    std::env::split_paths(path_var?)
        .map(|dir| dir.join(tool))
        .find(|p| {
            p.metadata()
                .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
                .unwrap_or(false)
        })
}

fn run(tool: &Path, args: &[&str]) -> Result<String, Error> {
    let out = Command::new(tool)
        .args(args)
        .output()
        .map_err(|source| Error::Run {
            tool: tool.to_path_buf(),
            source,
        })?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        return Err(Error::Failed {
            command: format!("{} {}", tool.display(), args.join(" ")),
            status: out.status,
            stderr: stderr
                .lines()
                .find(|l| !l.trim().is_empty())
                .unwrap_or("")
                .to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Lists the VMs of the hypervisor whose tool is on PATH.
pub fn scan() -> Result<(Hypervisor, Vec<HostVm>), Error> {
    let path_var = std::env::var_os("PATH");
    if let Some(xe) = find_on_path("xe", path_var.as_deref()) {
        let text = run(
            &xe,
            &[
                "vm-list",
                "is-control-domain=false",
                "is-a-snapshot=false",
                "params=uuid,name-label,power-state",
            ],
        )?;
        return Ok((Hypervisor::Xcpng, parse_xe_vm_list(&text)));
    }
    if let Some(virsh) = find_on_path("virsh", path_var.as_deref()) {
        let mut vms = Vec::new();
        for (name, state) in parse_virsh_list(&run(&virsh, &["list", "--all"])?) {
            let raw = run(&virsh, &["domuuid", "--domain", &name])?;
            match raw.trim().parse() {
                Ok(uuid) => vms.push(HostVm {
                    uuid,
                    name,
                    power_state: state,
                }),
                Err(_) => log::warn!("virsh domuuid {name}: not a UUID: {:?}", raw.trim()),
            }
        }
        return Ok((Hypervisor::Libvirt, vms));
    }
    Err(Error::NoHypervisor)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn xe_sample() {
        let vms = parse_xe_vm_list(include_str!("../../tests/data/xe-vm-list.txt"));
        let got: Vec<_> = vms
            .iter()
            .map(|v| (v.uuid.as_str(), v.name.as_str(), v.power_state.as_str()))
            .collect();
        assert_eq!(
            got,
            [
                ("9b2c6f1e-4a7d-4c1b-8e3f-1d2a3b4c5d6e", "Test-1", "running"),
                ("0e8f4a2b-7c3d-4e5f-9a1b-2c3d4e5f6a7b", "Test-2", "halted"),
                (
                    "c4d5e6f7-1a2b-4c3d-8e9f-0a1b2c3d4e5f",
                    "ubuntu 22.04: build box",
                    "running"
                ),
                (
                    "3f4e5d6c-7b8a-4998-a7b6-c5d4e3f2a1b0",
                    "win10-gpu",
                    "suspended"
                ),
            ]
        );
    }

    #[test]
    fn xe_odd_input() {
        // CRLF, no blank line between blocks, a bad uuid, junk, missing fields.
        let text = "uuid ( RO)    : 9B2C6F1E-4A7D-4C1B-8E3F-1D2A3B4C5D6E\r\n\
                    name-label ( RW): a\r\n\
                    uuid ( RO)    : not-a-uuid\n\
                    name-label ( RW): b\n\
                    garbage\n\n\n\
                    uuid ( RO)    : 0e8f4a2b-7c3d-4e5f-9a1b-2c3d4e5f6a7b\n";
        let vms = parse_xe_vm_list(text);
        assert_eq!(vms.len(), 2);
        assert_eq!(vms[0].uuid.as_str(), "9b2c6f1e-4a7d-4c1b-8e3f-1d2a3b4c5d6e");
        assert_eq!(vms[0].name, "a");
        assert_eq!(vms[1].name, "");
        assert!(parse_xe_vm_list("").is_empty());
    }

    #[test]
    fn virsh_samples() {
        let new = parse_virsh_list(include_str!("../../tests/data/virsh-list-all.txt"));
        let pairs = |v: &[(String, String)]| -> Vec<(String, String)> { v.to_vec() };
        assert_eq!(
            pairs(&new),
            [
                ("debian12", "running"),
                ("win-11", "paused"),
                ("test vm 3", "shut off"),
                ("ubuntu22.04", "shut off"),
            ]
            .map(|(a, b)| (a.to_string(), b.to_string()))
        );
        let old = parse_virsh_list(include_str!("../../tests/data/virsh-list-all-old.txt"));
        assert_eq!(old.len(), 2);
        assert_eq!(old[1], ("rhel8-gpu".to_string(), "shut off".to_string()));
        assert!(parse_virsh_list(" Id   Name   State\n-----\n\n").is_empty());
    }
}
