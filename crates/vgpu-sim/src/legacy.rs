//! The system vgpu replaces, reproduced on a local directory so that its
//! request path can be timed beside vgpu's in the same run (shared/seeds:
//! `mediator_async.c`, `vm_client_vector.c`, `test_mediator_client.c`).
//!
//! * The client writes `pool:priority:vm_id:num1:num2\n` into
//!   `ROOT/vm<ID>/request.txt` (open, truncate, write, flush, fsync, close),
//!   then polls `response.txt` every 100 ms until it holds a result, reads
//!   it and clears the file.
//! * The mediator scans `ROOT` once a second: for every `vm*` directory
//!   whose `request.txt` is not empty it clears the old `response.txt`,
//!   parses the request, clears `request.txt` and inserts the request into a
//!   single queue sorted by priority, then by a `time_t` timestamp (one
//!   second resolution; equal stamps keep insertion order, that is the
//!   directory's scan order). After the scan it processes the queue head
//!   first: num1 + num2, written as `%d\n` to `response.txt` with fflush and
//!   fsync. Then it sleeps a second.
//!
//! The one deviation: a request file that does not parse is left for the
//! next scan instead of being discarded (the original loses a request it
//! read half-written; here it would only make the benchmark flaky). The
//! NFS hop itself is not reproduced: a local directory is the legacy path's
//! best case.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// The mediator's scan interval (`sleep(1)` in its main loop).
pub const MEDIATOR_POLL: Duration = Duration::from_secs(1);
/// The client's response poll interval (`usleep(100000)`).
pub const CLIENT_POLL: Duration = Duration::from_millis(100);
/// How long the client waits for a response before it gives up.
pub const CLIENT_TIMEOUT: Duration = Duration::from_secs(30);

/// One request as the legacy wire format carries it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    pub pool: char,
    /// 2 high, 1 medium, 0 low.
    pub priority: u32,
    pub vm_id: u32,
    pub num1: i32,
    pub num2: i32,
}

impl Request {
    /// `pool:priority:vm_id:num1:num2`, the format of `request.txt`.
    pub fn line(&self) -> String {
        format!(
            "{}:{}:{}:{}:{}",
            self.pool, self.priority, self.vm_id, self.num1, self.num2
        )
    }

    /// Parses a request line the way the mediator's `sscanf("%c:%u:%u:%d:%d")`
    /// and its validation do (pool A or B, priority 0..=2).
    pub fn parse(line: &str) -> Option<Request> {
        let mut f = line.trim().split(':');
        let pool = f.next()?;
        let mut chars = pool.chars();
        let pool = chars.next().filter(|c| matches!(c, 'A' | 'B'))?;
        if chars.next().is_some() {
            return None;
        }
        let priority: u32 = f.next()?.parse().ok().filter(|p| *p <= 2)?;
        let vm_id: u32 = f.next()?.parse().ok()?;
        let num1: i32 = f.next()?.parse().ok()?;
        let num2: i32 = f.next()?.parse().ok()?;
        if f.next().is_some() {
            return None;
        }
        Some(Request {
            pool,
            priority,
            vm_id,
            num1,
            num2,
        })
    }
}

/// A request the mediator answered, in the order it answered them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Processed {
    pub req: Request,
    pub result: i32,
    /// 1 for the first request the mediator processed.
    pub seq: u64,
    /// The `time_t` stamp it was queued with.
    pub timestamp: u64,
}

/// The directory of one VM.
pub fn vm_dir(root: &Path, vm_id: u32) -> PathBuf {
    root.join(format!("vm{vm_id}"))
}

/// Creates `ROOT/vm<ID>/` for each VM (the seeds' setup script).
pub fn setup_dirs(root: &Path, vm_ids: impl IntoIterator<Item = u32>) -> std::io::Result<()> {
    for id in vm_ids {
        std::fs::create_dir_all(vm_dir(root, id))?;
    }
    Ok(())
}

/// fopen(path, "w"), fprintf, fflush, fsync, fclose.
fn write_synced(path: &Path, text: &str) -> std::io::Result<()> {
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)?;
    f.write_all(text.as_bytes())?;
    f.flush()?;
    f.sync_all()
}

/// fopen(path, "w"); fclose: truncate.
fn clear(path: &Path) -> std::io::Result<()> {
    File::create(path).map(drop)
}

fn read_text(path: &Path) -> Option<String> {
    let mut s = String::new();
    File::open(path).ok()?.read_to_string(&mut s).ok()?;
    Some(s)
}

fn time_t() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

struct Queued {
    req: Request,
    timestamp: u64,
}

/// The mediator daemon, on a thread.
pub struct Mediator {
    stop: Arc<AtomicBool>,
    log: Arc<Mutex<Vec<Processed>>>,
    thread: Option<JoinHandle<()>>,
}

impl Mediator {
    /// Starts scanning `root` every [`MEDIATOR_POLL`].
    pub fn start(root: &Path) -> std::io::Result<Mediator> {
        Mediator::start_with(root, MEDIATOR_POLL)
    }

    /// Same with another scan interval (for tests of the logic only; every
    /// measurement uses [`MEDIATOR_POLL`]).
    pub fn start_with(root: &Path, poll: Duration) -> std::io::Result<Mediator> {
        let stop = Arc::new(AtomicBool::new(false));
        let log = Arc::new(Mutex::new(Vec::new()));
        let (root, stop2, log2) = (root.to_path_buf(), stop.clone(), log.clone());
        let thread = std::thread::Builder::new()
            .name("legacy-mediator".into())
            .spawn(move || run(&root, poll, &stop2, &log2))?;
        Ok(Mediator {
            stop,
            log,
            thread: Some(thread),
        })
    }

    /// What it answered so far, in order.
    pub fn processed(&self) -> Vec<Processed> {
        self.log.lock().map(|l| l.clone()).unwrap_or_default()
    }

    pub fn stop(mut self) {
        self.halt();
    }

    fn halt(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Mediator {
    fn drop(&mut self) {
        self.halt();
    }
}

fn run(root: &Path, poll: Duration, stop: &AtomicBool, log: &Mutex<Vec<Processed>>) {
    let mut queue: Vec<Queued> = Vec::new();
    let mut seq = 0u64;
    while !stop.load(Ordering::Acquire) {
        poll_requests(root, &mut queue);
        // process_queue: the head (highest priority, oldest stamp) first.
        for q in queue.drain(..) {
            let result = q.req.num1.wrapping_add(q.req.num2);
            let resp = vm_dir(root, q.req.vm_id).join("response.txt");
            // Logged before the client can see the answer, so that whoever
            // read a response finds it in `processed()`.
            let Ok(mut l) = log.lock() else { continue };
            if let Err(e) = write_synced(&resp, &format!("{result}\n")) {
                log::warn!("legacy mediator: {}: {e}", resp.display());
                continue;
            }
            seq += 1;
            l.push(Processed {
                req: q.req,
                result,
                seq,
                timestamp: q.timestamp,
            });
        }
        // sleep(1), in slices so that stop() does not wait a whole second.
        let until = Instant::now() + poll;
        while Instant::now() < until && !stop.load(Ordering::Acquire) {
            std::thread::sleep(Duration::from_millis(10).min(poll));
        }
    }
}

fn poll_requests(root: &Path, queue: &mut Vec<Queued>) {
    let Ok(dir) = std::fs::read_dir(root) else {
        return;
    };
    for entry in dir.flatten() {
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if !name.starts_with("vm") || !entry.path().is_dir() {
            continue;
        }
        let req_path = entry.path().join("request.txt");
        let Some(text) = read_text(&req_path) else {
            continue;
        };
        if text.trim().is_empty() {
            continue;
        }
        let Some(req) = Request::parse(&text) else {
            continue;
        };
        let _ = clear(&entry.path().join("response.txt"));
        let _ = clear(&req_path);
        // enqueue_request: sorted by priority DESC, timestamp ASC; after
        // the equals already there.
        let timestamp = time_t();
        let at = queue
            .iter()
            .position(|q| {
                q.req.priority < req.priority
                    || (q.req.priority == req.priority && q.timestamp > timestamp)
            })
            .unwrap_or(queue.len());
        queue.insert(at, Queued { req, timestamp });
    }
}

/// The VM client's side: one request, start to finish. Returns the result
/// and the time from writing the request to reading the response.
pub fn call(root: &Path, req: &Request) -> std::io::Result<(i32, Duration)> {
    let dir = vm_dir(root, req.vm_id);
    let resp = dir.join("response.txt");
    let t = Instant::now();
    write_synced(&dir.join("request.txt"), &format!("{}\n", req.line()))?;
    loop {
        if let Some(text) = read_text(&resp) {
            if let Ok(v) = text.trim().parse::<i32>() {
                let rtt = t.elapsed();
                clear(&resp)?;
                return Ok((v, rtt));
            }
        }
        if t.elapsed() > CLIENT_TIMEOUT {
            return Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("vm{}: no response within {CLIENT_TIMEOUT:?}", req.vm_id),
            ));
        }
        std::thread::sleep(CLIENT_POLL);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_lines() {
        let r = Request {
            pool: 'A',
            priority: 2,
            vm_id: 1,
            num1: 100,
            num2: 200,
        };
        assert_eq!(r.line(), "A:2:1:100:200");
        assert_eq!(Request::parse("A:2:1:100:200\n"), Some(r));
        assert_eq!(Request::parse("B:0:7:-5:3").map(|r| r.num1), Some(-5));
        for bad in [
            "",
            "C:2:1:1:1",
            "A:3:1:1:1",
            "A:2:1:1",
            "A:2:1:1:1:1",
            "AA:2:1:1:1",
        ] {
            assert_eq!(Request::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn one_scan_orders_by_priority_and_answers_everyone() {
        let dir = std::env::temp_dir().join(format!("vgpu-legacy-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        setup_dirs(&dir, 1..=3).unwrap();
        let reqs = [(1, 0, 1, 2), (2, 2, 10, 20), (3, 1, 100, 200)];
        // All three requests are on disk before the first scan.
        for &(vm_id, priority, num1, num2) in &reqs {
            let r = Request {
                pool: 'A',
                priority,
                vm_id,
                num1,
                num2,
            };
            write_synced(&vm_dir(&dir, vm_id).join("request.txt"), &r.line()).unwrap();
        }
        let m = Mediator::start_with(&dir, Duration::from_millis(20)).unwrap();
        let mut results = Vec::new();
        for &(vm_id, ..) in &reqs {
            let resp = vm_dir(&dir, vm_id).join("response.txt");
            loop {
                if let Some(v) = read_text(&resp).and_then(|t| t.trim().parse::<i32>().ok()) {
                    results.push(v);
                    clear(&resp).unwrap();
                    break;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        assert_eq!(results, [3, 30, 300]);
        let order: Vec<u32> = m.processed().iter().map(|p| p.req.vm_id).collect();
        assert_eq!(order, [2, 3, 1]);
        // A client round trip through the same mediator.
        let r = Request {
            pool: 'B',
            priority: 1,
            vm_id: 2,
            num1: i32::MAX,
            num2: 1,
        };
        assert_eq!(call(&dir, &r).unwrap().0, i32::MIN);
        m.stop();
        let _ = std::fs::remove_dir_all(&dir);
    }
}
