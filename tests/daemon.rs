//! The real `vgpu-vhost-user` binary driven over real vhost-user sockets by
//! simulated guests: memfd guest RAM, split rings, kick and call eventfds.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::*;
use vgpu::protocol::*;
use vgpu_sim::{Desc, SimGuest, SimOptions, Used};

fn status(h: &RespHdr) -> Status {
    Status::from_u32(h.status).expect("known status")
}

#[test]
fn config_space_of_each_vm() {
    let d = DaemonProc::start(&[(1, "A", "high"), (7, "B", "0"), (42, "c", "medium")], &[]);
    for (id, pool, prio) in [(1u32, b'A', 2u32), (7, b'B', 0), (42, b'C', 1)] {
        let mut g = d.guest(id);
        let cfg = g.config_space().unwrap();
        assert_eq!(cfg.len(), CONFIG_SIZE);
        let word = |o: usize| u32::from_le_bytes(cfg[o..o + 4].try_into().unwrap());
        assert_eq!(word(CFG_MAGIC), MAGIC);
        assert_eq!(word(CFG_VERSION), VERSION);
        assert_eq!(word(CFG_POOL_ID), pool as u32);
        assert_eq!(word(CFG_PRIORITY), prio);
        assert_eq!(word(CFG_VM_ID), id);
        assert!(cfg[0x14..].iter().all(|&b| b == 0));
        // A partial read at an offset.
        assert_eq!(g.config(CFG_VM_ID as u32, 4).unwrap(), id.to_le_bytes());
    }
}

#[test]
fn every_opcode_gives_correct_results() {
    let d = DaemonProc::start(&[(1, "A", "high")], &["--exec-limit-ms", "200"]);
    let mut g = d.guest_with(
        1,
        SimOptions {
            slot_size: 64 << 10,
            ..Default::default()
        },
    );

    let (h, out) = g.call(Opcode::Ping as u16, 11, &[], 0).unwrap();
    assert_eq!(
        (status(&h), h.tag, h.output_len, out.len()),
        (Status::Ok, 11, 0, 0)
    );
    assert!(h.dispatch_seq > 0, "PING goes through the scheduler");

    let (h, out) = g.call(Opcode::GetInfo as u16, 12, &[], INFO_SIZE).unwrap();
    assert_eq!((status(&h), h.output_len as usize), (Status::Ok, INFO_SIZE));
    let info = DeviceInfo::decode(&out).unwrap();
    assert_eq!(info.executor, ExecutorKind::Cpu);
    assert_eq!(info.exec_limit_ms, 200);
    assert!(!info.name.is_empty());

    let (h, _) = g
        .call(
            Opcode::BusyWait as u16,
            13,
            &busy_payload(Duration::from_millis(20)),
            0,
        )
        .unwrap();
    assert_eq!(status(&h), Status::Ok);
    assert!(
        h.exec_ns >= 20_000_000,
        "BUSY_WAIT holds the slot: {}",
        h.exec_ns
    );
    // Past the execution limit: held for the limit, then TIMEOUT.
    let (h, _) = g
        .call(
            Opcode::BusyWait as u16,
            14,
            &busy_payload(Duration::from_secs(5)),
            0,
        )
        .unwrap();
    assert_eq!(status(&h), Status::Timeout);
    assert!(h.exec_ns >= 200_000_000 && h.exec_ns < 5_000_000_000);

    for (a, b) in [(100, 200), (-5, 3), (i32::MAX, 1), (i32::MIN, -1)] {
        let (h, out) = g
            .call(Opcode::ScalarAddI32 as u16, 15, &add_payload(a, b), 4)
            .unwrap();
        assert_eq!((status(&h), h.output_len), (Status::Ok, 4));
        assert_eq!(
            i32::from_le_bytes(out[..4].try_into().unwrap()),
            a.wrapping_add(b)
        );
    }

    for n in [0usize, 1, 1000, 4000] {
        let a: Vec<f32> = (0..n).map(|i| i as f32 * 0.5 - 7.0).collect();
        let b: Vec<f32> = (0..n).map(|i| (i * i % 97) as f32).collect();
        let mut payload = (n as u32).to_le_bytes().to_vec();
        payload.extend_from_slice(&0u32.to_le_bytes());
        payload.extend(a.iter().chain(&b).flat_map(|v| v.to_le_bytes()));
        let (h, out) = g
            .call(Opcode::VectorAddF32 as u16, 16, &payload, 4 * n)
            .unwrap();
        assert_eq!((status(&h), h.output_len as usize), (Status::Ok, 4 * n));
        for i in 0..n {
            let v = f32::from_le_bytes(out[4 * i..4 * i + 4].try_into().unwrap());
            assert_eq!(v, a[i] + b[i]);
        }
    }
}

/// Writes `bytes` in pieces cut at `cuts`, spread apart in guest memory.
fn pieces(
    g: &vgpu_sim::SimGuest,
    base: u64,
    bytes: &[u8],
    cuts: &[usize],
    writable: bool,
) -> Vec<Desc> {
    let mut out = Vec::new();
    let mut start = 0;
    for &end in cuts.iter().chain(std::iter::once(&bytes.len())) {
        let at = base + 3 * start as u64 + 8;
        g.write(at, &bytes[start..end]).unwrap();
        out.push(Desc {
            addr: at,
            len: (end - start) as u32,
            writable,
        });
        start = end;
    }
    out
}

#[test]
fn split_layouts_and_indirect_chains() {
    let d = DaemonProc::start(&[(1, "A", "high")], &[]);
    let mut g = d.guest(1);
    let mut req = ReqHdr::new(Opcode::ScalarAddI32 as u16, 99, 8)
        .encode()
        .to_vec();
    req.extend_from_slice(&add_payload(40, 2));
    let layouts: [(&[usize], &[usize]); 6] = [
        (&[], &[]),
        (&[24], &[40]),
        (&[1, 2, 3, 23, 24, 30], &[1, 39, 40, 41]),
        (&[12], &[20]),
        (&[28], &[8, 16, 24, 32, 43]),
        (&[5, 10, 15, 20, 25], &[4]),
    ];
    for (rcuts, wcuts) in layouts {
        let base = g.slot(0);
        let mut descs = pieces(&g, base, &req, rcuts, false);
        descs.extend(pieces(&g, base + 0x400, &[0u8; 44], wcuts, true));
        let head = g.add_chain(&descs).unwrap();
        g.kick().unwrap();
        let used = g.wait_all(&[head], T).unwrap();
        assert_eq!(used, vec![Used { head, len: 44 }]);
        // Reassemble the writable bytes.
        let mut resp = Vec::new();
        for dsc in descs.iter().filter(|d| d.writable) {
            resp.extend(g.read(dsc.addr, dsc.len as usize).unwrap());
        }
        let h = RespHdr::decode(&resp).unwrap();
        assert_eq!(
            (status(&h), h.tag),
            (Status::Ok, 99),
            "layout {rcuts:?} {wcuts:?}"
        );
        assert_eq!(i32::from_le_bytes(resp[40..44].try_into().unwrap()), 42);
    }

    // The same request as one indirect descriptor.
    let base = g.slot(1);
    g.write(base, &req).unwrap();
    let descs = [
        Desc::r(base, 10),
        Desc::r(base + 10, 22),
        Desc::w(base + 64, 44),
    ];
    let head = g.add_indirect_chain(&descs, g.slot(2)).unwrap();
    g.kick().unwrap();
    assert_eq!(g.wait_all(&[head], T).unwrap()[0].len, 44);
    let h = RespHdr::decode(&g.read(base + 64, 40).unwrap()).unwrap();
    assert_eq!(status(&h), Status::Ok);
    assert_eq!(g.read(base + 104, 4).unwrap(), 42i32.to_le_bytes());
}

struct Malformed {
    name: &'static str,
    descs: Vec<Desc>,
    /// None: no room for a response, used length must be 0.
    want: Option<Status>,
    resp_at: u64,
}

#[test]
fn malformed_chains_get_the_right_status_and_the_vm_keeps_working() {
    let d = DaemonProc::start(&[(1, "A", "high")], &[]);
    let mut g = d.guest(1);
    let mem_end = g.options().mem_size as u64;
    let hdr = |op: u16, len: u32| ReqHdr::new(op, 0x5151, len).encode().to_vec();
    let with = |mut h: Vec<u8>, p: &[u8]| {
        h.extend_from_slice(p);
        h
    };
    let vec_payload = |n: u32, pad: u32, floats: usize| {
        let mut p = n.to_le_bytes().to_vec();
        p.extend_from_slice(&pad.to_le_bytes());
        p.extend(std::iter::repeat_n(0u8, 4 * floats));
        p
    };
    let mut bad_version = hdr(1, 0);
    bad_version[0] = 2;
    let mut zero_version = hdr(1, 0);
    zero_version[0] = 0;
    let mut flags = hdr(1, 0);
    flags[4] = 1;
    let mut reserved = hdr(1, 0);
    reserved[23] = 0x80;

    // Each case: readable bytes, then how the writable part looks.
    let cases: Vec<(&'static str, Vec<u8>, usize, Option<Status>)> = vec![
        (
            "short header",
            hdr(1, 0)[..23].to_vec(),
            40,
            Some(Status::BadRequest),
        ),
        ("version 2", bad_version, 40, Some(Status::BadRequest)),
        ("version 0", zero_version, 40, Some(Status::BadRequest)),
        ("flags set", flags, 40, Some(Status::BadRequest)),
        ("reserved set", reserved, 40, Some(Status::BadRequest)),
        (
            "unknown opcode",
            hdr(0x7777, 0),
            40,
            Some(Status::Unsupported),
        ),
        (
            "reserved op range",
            hdr(0x01ff, 0),
            40,
            Some(Status::Unsupported),
        ),
        (
            "payload past end",
            with(hdr(0x0100, 100), &add_payload(1, 2)),
            44,
            Some(Status::BadRequest),
        ),
        (
            "payload_len max",
            with(hdr(0x0100, u32::MAX), &add_payload(1, 2)),
            44,
            Some(Status::BadRequest),
        ),
        (
            "add payload short",
            with(hdr(0x0100, 4), &[1, 0, 0, 0]),
            44,
            Some(Status::BadRequest),
        ),
        (
            "add payload long",
            with(hdr(0x0100, 12), &[0; 12]),
            44,
            Some(Status::BadRequest),
        ),
        (
            "add no output room",
            with(hdr(0x0100, 8), &add_payload(1, 2)),
            40,
            Some(Status::TooLarge),
        ),
        (
            "vector n mismatch",
            with(hdr(0x0101, 8 + 8 * 3), &vec_payload(4, 0, 6)),
            56,
            Some(Status::BadRequest),
        ),
        (
            "vector pad set",
            with(hdr(0x0101, 8 + 8), &vec_payload(1, 9, 2)),
            44,
            Some(Status::BadRequest),
        ),
        (
            "vector too large",
            with(hdr(0x0101, 8), &vec_payload(u32::MAX, 0, 0)),
            40,
            Some(Status::TooLarge),
        ),
        (
            "vector output short",
            with(hdr(0x0101, 8 + 16), &vec_payload(2, 0, 4)),
            44,
            Some(Status::TooLarge),
        ),
        (
            "vector header short",
            with(hdr(0x0101, 4), &[1, 0, 0, 0]),
            44,
            Some(Status::BadRequest),
        ),
        (
            "busy payload short",
            with(hdr(0x0003, 4), &[1, 0, 0, 0]),
            40,
            Some(Status::BadRequest),
        ),
        (
            "info output short",
            hdr(0x0002, 0),
            50,
            Some(Status::TooLarge),
        ),
        ("no writable part", hdr(1, 0), 0, None),
        ("writable too small", hdr(1, 0), 39, None),
    ];
    let mut all: Vec<Malformed> = Vec::new();
    for (i, (name, readable, wlen, want)) in cases.into_iter().enumerate() {
        let base = g.slot(i);
        g.write(base, &readable).unwrap();
        let resp_at = base + 2048;
        let mut descs = vec![Desc::r(base, readable.len() as u32)];
        if wlen > 0 {
            descs.push(Desc::w(resp_at, wlen as u32));
        }
        all.push(Malformed {
            name,
            descs,
            want,
            resp_at,
        });
    }
    let ok_hdr = hdr(1, 0);
    let s = g.slot(40);
    g.write(s, &ok_hdr).unwrap();
    let outside = mem_end + 0x1000;
    all.push(Malformed {
        name: "readable after writable",
        descs: vec![Desc::r(s, 24), Desc::w(s + 2048, 40), Desc::r(s, 8)],
        want: Some(Status::BadRequest),
        resp_at: s + 2048,
    });
    all.push(Malformed {
        name: "readable outside guest memory",
        descs: vec![Desc::r(s, 24), Desc::r(outside, 8), Desc::w(s + 2048, 40)],
        want: Some(Status::BadRequest),
        resp_at: s + 2048,
    });
    all.push(Malformed {
        name: "header outside guest memory",
        descs: vec![Desc::r(outside, 24), Desc::w(s + 2048, 40)],
        want: Some(Status::BadRequest),
        resp_at: s + 2048,
    });
    all.push(Malformed {
        name: "address wraps",
        descs: vec![Desc::r(u64::MAX - 8, 24), Desc::w(s + 2048, 40)],
        want: Some(Status::BadRequest),
        resp_at: s + 2048,
    });
    all.push(Malformed {
        name: "writable outside guest memory",
        descs: vec![Desc::r(s, 24), Desc::w(outside, 40)],
        want: None,
        resp_at: 0,
    });
    all.push(Malformed {
        name: "no readable part",
        descs: vec![Desc::w(s + 2048, 40)],
        want: Some(Status::BadRequest),
        resp_at: s + 2048,
    });
    assert!(all.len() >= 20);

    for m in &all {
        let head = g.add_chain(&m.descs).unwrap();
        g.kick().unwrap();
        let used = g.wait_all(&[head], T).unwrap();
        match m.want {
            None => assert_eq!(used[0].len, 0, "{}", m.name),
            Some(want) => {
                assert!(used[0].len >= 40, "{}: used len {}", m.name, used[0].len);
                let h = RespHdr::decode(&g.read(m.resp_at, 40).unwrap()).unwrap();
                assert_eq!(status(&h), want, "{}", m.name);
            }
        }
        // The VM still works after each one.
        assert_eq!(status(&ping(&mut g)), Status::Ok, "after {}", m.name);
    }
}

#[test]
fn priorities_contending_behind_a_busy_wait_dispatch_in_order() {
    let d = DaemonProc::start(
        &[(1, "A", "high"), (2, "B", "medium"), (3, "A", "low")],
        &[],
    );
    let mut high = d.guest(1);
    let mut med = d.guest(2);
    let mut low = d.guest(3);
    // Hold the GPU, then queue requests lowest priority first.
    let busy = ReqHdr::new(Opcode::BusyWait as u16, 0, 8);
    let busy_head = low
        .submit(0, &busy, &busy_payload(Duration::from_millis(1500)), 0)
        .unwrap();
    low.kick().unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let mut heads = BTreeMap::new();
    for (name, g) in [("low", &mut low), ("medium", &mut med), ("high", &mut high)] {
        let mut hs = Vec::new();
        for i in 0..3 {
            let slot = if name == "low" { i + 1 } else { i };
            let h = ReqHdr::new(Opcode::Ping as u16, i as u64, 0);
            hs.push((slot, g.submit(slot, &h, &[], 0).unwrap()));
        }
        g.kick().unwrap();
        heads.insert(name, hs);
    }
    let mut seqs = BTreeMap::new();
    for (name, g) in [("high", &mut high), ("medium", &mut med), ("low", &mut low)] {
        let hs = &heads[name];
        let mut want: Vec<u16> = hs.iter().map(|&(_, h)| h).collect();
        if name == "low" {
            want.push(busy_head);
        }
        g.wait_all(&want, T).unwrap();
        let s: Vec<u64> = hs
            .iter()
            .map(|&(slot, _)| g.response(slot, 0, 0).unwrap().0.dispatch_seq)
            .collect();
        seqs.insert(name, s);
    }
    let busy_seq = low.response(0, 8, 0).unwrap().0.dispatch_seq;
    let order: Vec<u64> = ["high", "medium", "low"]
        .iter()
        .flat_map(|n| seqs[n].clone())
        .collect();
    // Strictly increasing: every high before every medium before every low,
    // and arrival order within each.
    assert!(
        order.windows(2).all(|w| w[0] < w[1]),
        "dispatch order {seqs:?}"
    );
    assert!(busy_seq < order[0]);
}

#[test]
fn a_thousand_pipelined_requests_none_lost_or_duplicated() {
    let d = DaemonProc::start(&[(1, "A", "medium")], &[]);
    let mut g = d.guest(1);
    let total = 1000usize;
    let window = 128usize;
    let mut next = 0usize;
    let mut inflight: BTreeMap<u16, usize> = BTreeMap::new();
    let mut seen = vec![0u32; total];
    let mut seqs = Vec::new();
    while seen.contains(&0) {
        while next < total && inflight.len() < window {
            let slot = next % window;
            // Slot reuse is safe: a slot's previous request is complete when its
            // head came back, and we refill only freed slots.
            if inflight.values().any(|&i| i % window == slot) {
                break;
            }
            let h = ReqHdr::new(Opcode::ScalarAddI32 as u16, next as u64, 8);
            let head = g
                .submit(slot, &h, &add_payload(next as i32, 1_000_000), 4)
                .unwrap();
            inflight.insert(head, next);
            next += 1;
        }
        g.kick().unwrap();
        for u in g.wait_used(T).unwrap() {
            let i = inflight.remove(&u.head).expect("known head");
            let (h, out) = g.response(i % window, 8, 4).unwrap();
            assert_eq!(status(&h), Status::Ok);
            assert_eq!(h.tag as usize, i);
            assert_eq!(
                i32::from_le_bytes(out[..4].try_into().unwrap()),
                i as i32 + 1_000_000
            );
            seen[i] += 1;
            seqs.push(h.dispatch_seq);
        }
    }
    assert!(seen.iter().all(|&c| c == 1));
    seqs.sort_unstable();
    seqs.dedup();
    assert_eq!(seqs.len(), total, "dispatch_seq unique");
}

#[test]
fn back_pressure_leaves_chains_in_the_ring_and_loses_none() {
    let d = DaemonProc::start(&[(1, "A", "medium")], &["--max-queued", "2"]);
    let mut g = d.guest(1);
    let hold = Duration::from_millis(800);
    let busy = ReqHdr::new(Opcode::BusyWait as u16, 1000, 8);
    let mut heads = vec![g.submit(0, &busy, &busy_payload(hold), 0).unwrap()];
    for i in 1..=20 {
        heads.push(
            g.submit(i, &ReqHdr::new(Opcode::Ping as u16, i as u64, 0), &[], 0)
                .unwrap(),
        );
    }
    g.kick().unwrap();
    let used = g.wait_all(&heads, T).unwrap();
    assert_eq!(used.len(), 21, "every chain answered");
    let mut taken_during_hold = 0;
    for i in 1..=20 {
        let (h, _) = g.response(i, 0, 0).unwrap();
        assert_eq!((status(&h), h.tag), (Status::Ok, i as u64));
        // queue_ns counts from the chain leaving the ring: only chains taken
        // while the busy wait held the GPU waited for it.
        if h.queue_ns >= hold.as_nanos() as u64 / 2 {
            taken_during_hold += 1;
        }
    }
    assert!(
        taken_during_hold <= 1,
        "{taken_during_hold} pings were taken past the cap of 2"
    );
}

#[test]
fn frontend_disconnects_with_requests_in_flight_then_reconnects() {
    let mut d = DaemonProc::start(&[(1, "A", "high"), (2, "A", "low")], &[]);
    {
        let mut g = d.guest(1);
        let busy = ReqHdr::new(Opcode::BusyWait as u16, 1, 8);
        g.submit(0, &busy, &busy_payload(Duration::from_millis(300)), 0)
            .unwrap();
        for i in 1..10 {
            g.submit(i, &ReqHdr::new(Opcode::Ping as u16, i as u64, 0), &[], 0)
                .unwrap();
        }
        g.kick().unwrap();
        std::thread::sleep(Duration::from_millis(50));
    } // dropped: the socket closes with requests queued and one running.
    let mut other = d.guest(2);
    assert_eq!(status(&ping(&mut other)), Status::Ok);
    let mut g = d.guest(1);
    assert_eq!(status(&ping(&mut g)), Status::Ok);
    let (h, out) = g
        .call(Opcode::ScalarAddI32 as u16, 5, &add_payload(100, 200), 4)
        .unwrap();
    assert_eq!(
        (status(&h), out),
        (Status::Ok, 300i32.to_le_bytes().to_vec())
    );
    drop(g);
    // And once more, a third connection.
    let mut g = d.guest(1);
    assert_eq!(status(&ping(&mut g)), Status::Ok);
    assert!(d.is_running());
}

/// Descriptors the daemon process holds.
fn open_fds(d: &DaemonProc) -> usize {
    std::fs::read_dir(format!("/proc/{}/fd", d.child.id()))
        .expect("daemon's /proc/PID/fd")
        .count()
}

/// Waits (up to the usual deadline) until the daemon holds at most `want`
/// descriptors; returns what it holds then.
fn settle_fds(d: &DaemonProc, want: usize) -> usize {
    let deadline = std::time::Instant::now() + T;
    loop {
        let n = open_fds(d);
        if n <= want || std::time::Instant::now() > deadline {
            return n;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn reconnects_leak_no_descriptors() {
    // Found by vgpu-soak: each connection left one eventfd behind (the exit
    // event vhost-user-backend takes with into_raw_fd and never closes).
    let d = DaemonProc::start(&[(1, "A", "high")], &[]);
    let cycle = || {
        let mut g = d.guest(1);
        assert_eq!(status(&ping(&mut g)), Status::Ok);
    };
    cycle();
    // What the daemon holds between connections, once it has seen a hang-up.
    std::thread::sleep(Duration::from_millis(300));
    let idle = open_fds(&d);
    for _ in 0..30 {
        cycle();
    }
    assert_eq!(
        settle_fds(&d, idle),
        idle,
        "descriptors after 30 reconnects"
    );
}

#[test]
fn one_vm_flooding_garbage_does_not_disturb_another() {
    let d = DaemonProc::start(&[(1, "A", "high"), (2, "A", "high")], &[]);
    let sock = d.socket(1);
    let flood = std::thread::spawn(move || {
        let mut g = vgpu_sim::SimGuest::connect_retry(&sock, SimOptions::default(), T).unwrap();
        let mut rng = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        for round in 0..300 {
            let n = 1 + (next() % 5) as usize;
            let descs: Vec<Desc> = (0..n)
                .map(|_| Desc {
                    addr: match next() % 3 {
                        0 => next(),
                        _ => vgpu_sim::DATA_BASE + next() % 0x8000,
                    },
                    len: (next() % 200) as u32,
                    writable: next() % 2 == 0,
                })
                .collect();
            let junk: Vec<u8> = (0..64).map(|_| next() as u8).collect();
            g.write(vgpu_sim::DATA_BASE + (round % 8) * 64, &junk)
                .unwrap();
            let head = g.add_chain(&descs).unwrap();
            g.kick().unwrap();
            g.wait_all(&[head], T).unwrap();
        }
        // Still a working VM afterwards.
        ping(&mut g)
    });
    let mut good = d.guest(2);
    for i in 0..300 {
        let (h, out) = good
            .call(Opcode::ScalarAddI32 as u16, i, &add_payload(i as i32, 1), 4)
            .unwrap();
        assert_eq!(status(&h), Status::Ok);
        assert_eq!(
            i32::from_le_bytes(out[..4].try_into().unwrap()),
            i as i32 + 1
        );
    }
    assert_eq!(status(&flood.join().unwrap()), Status::Ok);
}

#[test]
fn sigterm_answers_everything_taken_and_exits_zero() {
    let mut d = DaemonProc::start(&[(1, "A", "high")], &[]);
    let mut g = d.guest(1);
    let busy = ReqHdr::new(Opcode::BusyWait as u16, 1, 8);
    let mut heads = vec![g
        .submit(0, &busy, &busy_payload(Duration::from_millis(400)), 0)
        .unwrap()];
    for i in 1..6 {
        heads.push(
            g.submit(i, &ReqHdr::new(Opcode::Ping as u16, i as u64, 0), &[], 0)
                .unwrap(),
        );
    }
    g.kick().unwrap();
    std::thread::sleep(Duration::from_millis(100));
    let st = d.terminate();
    assert!(st.success(), "exit status {st:?}");
    let used = g.wait_all(&heads, Duration::from_secs(5)).unwrap();
    assert_eq!(used.len(), 6);
    assert_eq!(
        status(&g.response(0, 8, 0).unwrap().0),
        Status::Ok,
        "running request completes"
    );
    for i in 1..6 {
        let s = status(&g.response(i, 0, 0).unwrap().0);
        assert!(
            matches!(s, Status::Cancelled | Status::Ok),
            "queued request {i}: {s:?}"
        );
    }
}

#[test]
fn works_without_event_idx() {
    let d = DaemonProc::start(&[(1, "A", "high")], &[]);
    let mut g = d.guest_with(
        1,
        SimOptions {
            event_idx: false,
            ..Default::default()
        },
    );
    for i in 0..50 {
        let heads: Vec<u16> = (0..8)
            .map(|s| {
                g.submit(s, &ReqHdr::new(Opcode::Ping as u16, i, 0), &[], 0)
                    .unwrap()
            })
            .collect();
        g.kick().unwrap();
        assert_eq!(g.wait_all(&heads, T).unwrap().len(), 8);
    }
}

/// Issue 11, stall through the completion path: two VMs on one GPU,
/// `--max-queued 2`; the low VM has two BUSY_WAITs of 300 ms queued and
/// floods its ring with chains that are expensive to refuse (one indirect
/// descriptor each, to a table of 65,535 one-byte descriptors). The high
/// VM's PING is answered, and the low VM's own finished BUSY_WAITs come
/// back, while the flood still goes on (before its last chain is consumed).
/// No timing threshold: the flood ends when both have been seen, or after
/// `VGPU_TEST_FLOOD_CHAINS` chains (default 200,000), which fails the test.
#[test]
fn a_flood_of_expensive_malformed_chains_stalls_nobody() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    let d = DaemonProc::start(&[(1, "A", "low"), (2, "A", "high")], &["--max-queued", "2"]);
    let flood_max: u64 = std::env::var("VGPU_TEST_FLOOD_CHAINS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200_000);
    let ping_answered = Arc::new(AtomicBool::new(false));
    let flood_started = Arc::new(AtomicBool::new(false));
    let mut high = d.guest(2);
    let sock = d.socket(1);
    let (answered, started) = (ping_answered.clone(), flood_started.clone());
    let low = std::thread::spawn(move || {
        let opts = SimOptions {
            queue_size: 1024,
            ..Default::default()
        };
        let mut g = vgpu_sim::SimGuest::connect_retry(&sock, opts, T).unwrap();
        const ENTRIES: u32 = 65_535;
        let table = vgpu_sim::DATA_BASE + (8 << 20);
        let mut raw = Vec::with_capacity(16 * ENTRIES as usize);
        for i in 0..ENTRIES {
            let addr = vgpu_sim::DATA_BASE + 0x10_0000 + u64::from(i % 4096);
            let flags: u16 = if i + 1 < ENTRIES { 1 } else { 0 }; // NEXT
            raw.extend_from_slice(&addr.to_le_bytes());
            raw.extend_from_slice(&1u32.to_le_bytes());
            raw.extend_from_slice(&flags.to_le_bytes());
            raw.extend_from_slice(&((i + 1) as u16).to_le_bytes());
        }
        g.write(table, &raw).unwrap();
        let busy = ReqHdr::new(Opcode::BusyWait as u16, 1, 8);
        let payload = busy_payload(Duration::from_millis(300));
        // Heads of the BUSY_WAITs not yet back (a head is reused once back).
        let mut busy_heads: Vec<u16> = (0..2)
            .map(|slot| g.submit(slot, &busy, &payload, 0).unwrap())
            .collect();
        let mut busy_back_during_flood = 0;
        let (mut added, mut consumed) = (0u64, 0u64);
        let mut ping_during_flood = false;
        let mut limit = flood_max;
        while consumed < limit || !busy_heads.is_empty() {
            while added < limit && g.free_descriptors() > 0 {
                g.add_indirect_table(table, ENTRIES).unwrap();
                added += 1;
            }
            g.kick().unwrap();
            let used = match g.wait_used(Duration::from_millis(20)) {
                Ok(u) => u,
                Err(vgpu_sim::Error::Timeout(_)) => Vec::new(),
                Err(e) => panic!("low VM: {e}"),
            };
            for u in used {
                match busy_heads.iter().position(|&h| h == u.head) {
                    // Back while flood chains are still to be consumed?
                    Some(at) => {
                        busy_heads.remove(at);
                        if consumed < flood_max {
                            busy_back_during_flood += 1;
                        }
                    }
                    None => {
                        consumed += 1;
                        started.store(true, Ordering::Release);
                    }
                }
            }
            if !ping_during_flood && answered.load(Ordering::Acquire) {
                ping_during_flood = consumed < flood_max;
            }
            // Both seen: stop the flood, drain what is in the ring.
            if ping_during_flood && busy_back_during_flood == 2 {
                limit = added;
            }
        }
        (
            ping_during_flood,
            busy_back_during_flood,
            consumed,
            ping(&mut g),
        )
    });
    while !flood_started.load(Ordering::Acquire) {
        std::thread::sleep(Duration::from_millis(5));
    }
    let h = ping(&mut high);
    ping_answered.store(true, Ordering::Release);
    assert_eq!(status(&h), Status::Ok);
    let (ping_during_flood, busy_back, consumed, low_ping) = low.join().unwrap();
    assert!(
        ping_during_flood,
        "the high VM's PING was answered only after the flood ({consumed} chains)"
    );
    assert_eq!(
        busy_back, 2,
        "the low VM's finished BUSY_WAITs came back only after the flood ({consumed} chains)"
    );
    assert_eq!(status(&low_ping), Status::Ok);
}

#[test]
fn guest_memory_the_frontend_could_shrink_is_refused_and_sockets_are_private() {
    use std::os::unix::fs::PermissionsExt;
    let d = DaemonProc::start(&[(1, "A", "high"), (2, "A", "high")], &[]);
    let mut sealed = d.guest(1);
    // The default mode of config/vgpu.toml: only the owner may connect.
    for id in [1, 2] {
        let mode = std::fs::metadata(d.socket(id))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "vm{id} socket mode {mode:o}");
    }
    // An unsealed memfd: SET_MEM_TABLE fails and the frontend is dropped
    // (a shrink would otherwise SIGBUS the whole daemon).
    let unsealed = SimGuest::connect(
        &d.socket(2),
        SimOptions {
            seal: false,
            ..Default::default()
        },
    );
    assert!(unsealed.is_err(), "unsealed guest memory accepted");
    // The daemon and the other VM are unaffected, and the refused VM's
    // socket serves a sealed frontend next.
    assert_eq!(status(&common::ping(&mut sealed)), Status::Ok);
    let mut again = SimGuest::connect_retry(&d.socket(2), SimOptions::default(), T).unwrap();
    assert_eq!(status(&common::ping(&mut again)), Status::Ok);
}

/// Guest RAM arrives as memfds without FD_CLOEXEC; the daemon sets it, so
/// that no process it starts inherits a VM's memory.
#[test]
fn received_guest_memory_is_close_on_exec() {
    let d = DaemonProc::start(&[(1, "A", "high")], &[]);
    let mut g = d.guest(1);
    assert_eq!(status(&ping(&mut g)), Status::Ok);
    let pid = d.child.id();
    let mut memfds = 0;
    for e in std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .flatten()
    {
        let target = std::fs::read_link(e.path()).unwrap_or_default();
        if !target.to_string_lossy().starts_with("/memfd:") {
            continue;
        }
        memfds += 1;
        let info = std::fs::read_to_string(format!(
            "/proc/{pid}/fdinfo/{}",
            e.file_name().to_string_lossy()
        ))
        .unwrap();
        let flags = info
            .lines()
            .find_map(|l| l.strip_prefix("flags:"))
            .and_then(|f| u32::from_str_radix(f.trim(), 8).ok())
            .unwrap();
        assert_ne!(flags & libc::O_CLOEXEC as u32, 0, "{target:?}: {info}");
    }
    assert!(memfds > 0, "the daemon holds the guest's memfds");
}

#[test]
fn a_memory_table_larger_than_the_bound_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("vgpu.toml");
    std::fs::write(&cfg, "max_guest_memory_mib = 8\n").unwrap();
    let cfg = cfg.display().to_string();
    let d = DaemonProc::start(&[(1, "A", "high")], &["--config", &cfg]);
    let big = SimGuest::connect(
        &d.socket(1),
        SimOptions {
            mem_size: 16 << 20,
            ..Default::default()
        },
    );
    assert!(big.is_err(), "16 MiB table accepted under an 8 MiB bound");
    let mut small = SimGuest::connect_retry(
        &d.socket(1),
        SimOptions {
            mem_size: 8 << 20,
            ..Default::default()
        },
        T,
    )
    .unwrap();
    assert_eq!(status(&common::ping(&mut small)), Status::Ok);
}

/// `vm_socket_peer_uid`: a frontend of another uid is closed before the
/// daemon reads anything of it, and the socket keeps listening for the
/// right one. As root the test also connects with the expected uid (a
/// thread's own effective uid, which SO_PEERCRED records).
#[test]
fn a_peer_of_another_uid_is_refused_and_the_socket_keeps_listening() {
    // SAFETY: geteuid has no preconditions.
    let me = unsafe { libc::geteuid() };
    let other = me.wrapping_add(1000);
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("vgpu.toml");
    std::fs::write(
        &cfg,
        format!("vm_socket_peer_uid = \"{other}\"\nvm_socket_mode = 0o666\n"),
    )
    .unwrap();
    let cfg = cfg.display().to_string();
    let d = DaemonProc::start(&[(1, "A", "high")], &["--config", &cfg]);
    wait_for(&d.socket(1));
    for _ in 0..3 {
        assert!(
            SimGuest::connect(&d.socket(1), SimOptions::default()).is_err(),
            "uid {me} admitted, only {other} may connect"
        );
    }
    assert!(d.socket(1).exists(), "the socket keeps listening");
    if me == 0 {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(d.dir.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
        let sock = d.socket(1);
        let pong = std::thread::spawn(move || {
            // SAFETY: the raw syscall changes this thread's effective uid
            // only (glibc's wrapper would change every thread's); the saved
            // uid stays 0, so it can be changed back.
            let r = unsafe { libc::syscall(libc::SYS_setresuid, -1i32, other, -1i32) };
            assert_eq!(r, 0);
            let g = SimGuest::connect(&sock, SimOptions::default());
            // SAFETY: as above, back to root.
            unsafe { libc::syscall(libc::SYS_setresuid, -1i32, 0, -1i32) };
            let mut g = g.expect("the expected uid connects");
            common::ping(&mut g).status
        })
        .join()
        .unwrap();
        assert_eq!(pong, 0);
    }
    // The right uid (a daemon that expects ours) is served.
    std::fs::write(
        dir.path().join("vgpu.toml"),
        format!("vm_socket_peer_uid = \"{me}\"\n"),
    )
    .unwrap();
    let d2 = DaemonProc::start(&[(1, "A", "high")], &["--config", &cfg]);
    let mut g = d2.guest(1);
    assert_eq!(status(&common::ping(&mut g)), Status::Ok);
}
