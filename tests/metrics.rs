//! The daemon's Prometheus endpoint: the real binary with
//! `--metrics-addr 127.0.0.1:0`, a known sequence of requests from simulated
//! guests, then a scrape whose counts must be exactly those requests.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{add_payload, daemon_binary, DaemonProc, T};
use vgpu::protocol::{Opcode, ReqHdr};

/// Starts the daemon with metrics on an ephemeral loopback port and returns
/// it with the address it printed.
fn start(vms: &[&str]) -> (DaemonProc, String) {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cmd = Command::new(daemon_binary());
    cmd.args(["--executor", "cpu", "--metrics-addr", "127.0.0.1:0"]);
    for spec in vms {
        let id = spec
            .split(',')
            .find_map(|kv| kv.strip_prefix("id="))
            .expect("id");
        let sock = dir.path().join(format!("vm{id}.sock"));
        cmd.arg("--vm")
            .arg(format!("{spec},socket={}", sock.display()));
    }
    cmd.env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped());
    let mut child = cmd.spawn().expect("spawn vgpu-vhost-user");
    let stdout = child.stdout.take().expect("stdout");
    let mut line = String::new();
    BufReader::new(stdout)
        .read_line(&mut line)
        .expect("read the metrics line");
    let addr = line
        .trim()
        .strip_prefix("metrics: http://")
        .and_then(|s| s.strip_suffix("/metrics"))
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
        .to_string();
    (DaemonProc { child, dir }, addr)
}

fn http_get(addr: &str, path: &str) -> (String, String) {
    let mut s = TcpStream::connect(addr).expect("connect to the metrics port");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: {addr}\r\n\r\n").unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    let (head, body) = resp.split_once("\r\n\r\n").expect("HTTP response");
    (head.to_string(), body.to_string())
}

/// The value of the one sample of `name` whose labels contain every
/// `k="v"` of `labels`; panics unless there is exactly one.
fn sample(text: &str, name: &str, labels: &[&str]) -> f64 {
    let hits: Vec<f64> = text
        .lines()
        .filter_map(|l| {
            let rest = l.strip_prefix(name)?.strip_prefix('{')?;
            let (lbl, value) = rest.rsplit_once("} ")?;
            let lbl: Vec<&str> = lbl.split(',').collect();
            labels
                .iter()
                .all(|want| lbl.contains(want))
                .then(|| value.trim().parse::<f64>().expect("a number"))
        })
        .collect();
    assert_eq!(
        hits.len(),
        1,
        "{name} {labels:?}: {} samples in\n{text}",
        hits.len()
    );
    hits[0]
}

#[test]
fn scrape_counts_a_known_sequence_of_requests() {
    let (mut d, addr) = start(&[
        "id=1,pool=A,priority=high",
        "id=2,pool=B,priority=low,max-queued=2",
    ]);
    let mut g1 = d.guest(1);
    let mut g2 = d.guest(2);
    for i in 0..5 {
        g1.call(Opcode::Ping as u16, i, &[], 0).unwrap();
    }
    for i in 0..3 {
        let (h, out) = g1
            .call(Opcode::ScalarAddI32 as u16, i, &add_payload(40, 2), 4)
            .unwrap();
        assert_eq!(h.status, 0);
        assert_eq!(out[..4], 42i32.to_le_bytes());
    }
    g1.call(Opcode::GetInfo as u16, 9, &[], 96).unwrap();
    // An opcode nobody defined: refused at once, never scheduled.
    let (h, _) = g1.call(0x7777, 10, &[], 0).unwrap();
    assert_eq!(h.status, 2);
    // Six chains in one kick against a cap of two: the pump stops at the cap.
    let hdr = ReqHdr::new(Opcode::ScalarAddI32 as u16, 0, 8);
    let heads: Vec<u16> = (0..6)
        .map(|slot| g2.submit(slot, &hdr, &add_payload(1, 2), 4).unwrap())
        .collect();
    g2.kick().unwrap();
    g2.wait_all(&heads, T).unwrap();
    for slot in 0..heads.len() {
        let (h, out) = g2.response(slot, 8, 4).unwrap();
        assert_eq!((h.status, &out[..4]), (0, &3i32.to_le_bytes()[..]));
    }

    let (head, text) = http_get(&addr, "/metrics");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(head.contains("application/openmetrics-text"), "{head}");
    assert!(text.trim_end().ends_with("# EOF"), "{text}");

    let vm1 = [
        "vm_id=\"1\"",
        "pool=\"A\"",
        "priority=\"high\"",
        "gpu=\"0\"",
    ];
    let vm2 = ["vm_id=\"2\"", "pool=\"B\"", "priority=\"low\"", "gpu=\"0\""];
    let req = |vm: &[&str], op: &str, st: &str| {
        let mut l = vm.to_vec();
        let (op, st) = (format!("opcode=\"{op}\""), format!("status=\"{st}\""));
        l.push(&op);
        l.push(&st);
        sample(&text, "vgpu_requests_total", &l)
    };
    assert_eq!(req(&vm1, "ping", "ok"), 5.0);
    assert_eq!(req(&vm1, "scalar_add_i32", "ok"), 3.0);
    assert_eq!(req(&vm1, "get_info", "ok"), 1.0);
    assert_eq!(req(&vm1, "invalid", "unsupported"), 1.0);
    assert_eq!(req(&vm2, "scalar_add_i32", "ok"), 6.0);
    let n = |name: &str, vm: &[&str]| sample(&text, name, vm);
    // Histograms see the scheduled requests only (not the refused one).
    assert_eq!(n("vgpu_queue_wait_seconds_count", &vm1), 9.0);
    assert_eq!(n("vgpu_exec_seconds_count", &vm1), 9.0);
    assert_eq!(n("vgpu_queue_wait_seconds_count", &vm2), 6.0);
    assert!(n("vgpu_backpressure_events_total", &vm2) >= 1.0);
    assert!(!text.contains("vgpu_backpressure_events_total{vm_id=\"1\""));
    assert_eq!(n("vgpu_vm_queued", &vm1), 0.0);
    assert_eq!(n("vgpu_vm_in_flight", &vm2), 0.0);
    assert_eq!(n("vgpu_vm_connected", &vm1), 1.0);
    assert_eq!(n("vgpu_vm_guest_memory_bytes", &vm1), (16u64 << 20) as f64);
    assert_eq!(
        n("vgpu_vm_gpu_memory_quota_bytes", &vm2),
        (4096u64 << 20) as f64
    );
    assert_eq!(
        sample(&text, "vgpu_gpu_dispatched_total", &["gpu=\"0\""]),
        15.0
    );
    assert!(sample(&text, "vgpu_gpu_busy_seconds_total", &["gpu=\"0\""]) > 0.0);

    let (head, _) = http_get(&addr, "/nothing");
    assert!(head.starts_with("HTTP/1.1 404"), "{head}");
    assert!(d.terminate().success());
}

#[test]
fn a_non_loopback_metrics_address_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("vm1.sock");
    let out = Command::new(daemon_binary())
        .args(["--executor", "cpu", "--metrics-addr", "0.0.0.0:0", "--vm"])
        .arg(format!(
            "id=1,pool=A,priority=high,socket={}",
            sock.display()
        ))
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--metrics-allow-remote"), "{err}");
    assert!(!sock.exists(), "nothing may be served");
}
