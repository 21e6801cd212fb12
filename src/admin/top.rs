//! `vgpu-admin top`: a live view of every VM and GPU, fed from the daemon's
//! control socket (`status`), drawn with ratatui on crossterm.
//!
//! Keys: `q`, Esc or Ctrl-C quit (exit 0); `s` / `S` next / previous sort
//! column; `r` reverses the order. Borders and units are plain ASCII, so it
//! works on any terminal (a console, tmux, an ssh session). With `--once`,
//! or when standard output is not a terminal, it prints one plain table and
//! exits.

use std::collections::BTreeMap;
use std::io::{self, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ratatui::backend::CrosstermBackend;
use ratatui::crossterm::event::{self, Event, KeyCode, KeyEventKind, KeyModifiers};
use ratatui::crossterm::terminal::{
    disable_raw_mode, enable_raw_mode, EnterAlternateScreen, LeaveAlternateScreen,
};
use ratatui::crossterm::{cursor, execute};
use ratatui::layout::{Constraint, Layout};
use ratatui::style::{Modifier, Style};
use ratatui::symbols::border;
use ratatui::text::Line;
use ratatui::widgets::{Block, Borders, Cell, Paragraph, Row, Table};
use ratatui::{Frame, Terminal};

use crate::control::{self, GpuStatus, VmStatus};

/// Sort keys, in the order `s` walks through them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SortKey {
    Vm,
    Pool,
    Priority,
    Queued,
    InFlight,
    Rate,
    P50,
    P99,
    Errors,
}

impl SortKey {
    const ALL: [SortKey; 9] = [
        SortKey::Vm,
        SortKey::Pool,
        SortKey::Priority,
        SortKey::Queued,
        SortKey::InFlight,
        SortKey::Rate,
        SortKey::P50,
        SortKey::P99,
        SortKey::Errors,
    ];

    fn name(self) -> &'static str {
        match self {
            SortKey::Vm => "vm",
            SortKey::Pool => "pool",
            SortKey::Priority => "priority",
            SortKey::Queued => "queued",
            SortKey::InFlight => "in-flight",
            SortKey::Rate => "req/s",
            SortKey::P50 => "p50",
            SortKey::P99 => "p99",
            SortKey::Errors => "errors",
        }
    }

    fn step(self, by: isize) -> SortKey {
        let n = SortKey::ALL.len() as isize;
        let i = SortKey::ALL.iter().position(|&k| k == self).unwrap_or(0) as isize;
        SortKey::ALL[(i + by).rem_euclid(n) as usize]
    }
}

/// What `top` was asked for.
#[derive(Debug, Clone)]
pub struct Options {
    pub control: PathBuf,
    pub interval: Duration,
    pub sort: SortKey,
    pub reverse: bool,
    pub once: bool,
}

/// One VM row: the status plus the request rate since the last refresh.
#[derive(Debug, Clone)]
struct VmRow {
    s: VmStatus,
    rate: f64,
}

#[derive(Debug, Clone)]
struct GpuRow {
    s: GpuStatus,
    rate: f64,
    busy: f64,
}

/// When the last status came, with each VM's `done` and each GPU's
/// (`dispatched`, `busy_ns`) then.
type Sample = (Instant, BTreeMap<u32, u64>, BTreeMap<u32, (u64, u64)>);

/// The figures on screen, and what the next refresh compares with.
struct View {
    vms: Vec<VmRow>,
    gpus: Vec<GpuRow>,
    error: Option<String>,
    last: Option<Sample>,
}

impl View {
    fn new() -> View {
        View {
            vms: Vec::new(),
            gpus: Vec::new(),
            error: None,
            last: None,
        }
    }

    fn refresh(&mut self, path: &Path) {
        let resp = match control::request(path, &control::Request::Status) {
            Ok(r) => r,
            Err(e) => {
                self.error = Some(e.to_string());
                return;
            }
        };
        self.error = None;
        let now = Instant::now();
        let vms = resp.vms.unwrap_or_default();
        let gpus = resp.gpus.unwrap_or_default();
        let (dt, done_before, gpu_before) = match &self.last {
            Some((t, d, g)) => (now.duration_since(*t).as_secs_f64(), d.clone(), g.clone()),
            None => (0.0, BTreeMap::new(), BTreeMap::new()),
        };
        let per_s = |now: u64, before: Option<u64>| match before {
            Some(b) if dt > 0.0 => now.saturating_sub(b) as f64 / dt,
            _ => 0.0,
        };
        self.vms = vms
            .iter()
            .map(|s| VmRow {
                rate: per_s(s.done, done_before.get(&s.vm_id).copied()),
                s: s.clone(),
            })
            .collect();
        self.gpus = gpus
            .iter()
            .map(|s| {
                let before = gpu_before.get(&s.gpu).copied();
                let busy = match before {
                    Some((_, b)) if dt > 0.0 => {
                        (s.busy_ns.saturating_sub(b) as f64 / 1e9 / dt * 100.0).min(100.0)
                    }
                    _ => 0.0,
                };
                GpuRow {
                    rate: per_s(s.dispatched, before.map(|b| b.0)),
                    busy,
                    s: s.clone(),
                }
            })
            .collect();
        self.last = Some((
            now,
            vms.iter().map(|s| (s.vm_id, s.done)).collect(),
            gpus.iter()
                .map(|s| (s.gpu, (s.dispatched, s.busy_ns)))
                .collect(),
        ));
    }

    fn sorted(&self, key: SortKey, reverse: bool) -> Vec<&VmRow> {
        let mut v: Vec<&VmRow> = self.vms.iter().collect();
        let prio = |r: &VmRow| match r.s.priority.as_str() {
            "high" => 2,
            "medium" => 1,
            _ => 0,
        };
        v.sort_by(|a, b| {
            let by = match key {
                SortKey::Vm => a.s.vm_id.cmp(&b.s.vm_id),
                SortKey::Pool => a.s.pool.cmp(&b.s.pool),
                // Most important first.
                SortKey::Priority => prio(b).cmp(&prio(a)),
                SortKey::Queued => b.s.queued.cmp(&a.s.queued),
                SortKey::InFlight => b.s.in_flight.cmp(&a.s.in_flight),
                SortKey::Rate => b.rate.total_cmp(&a.rate),
                SortKey::P50 => b.s.wait_p50_ns.cmp(&a.s.wait_p50_ns),
                SortKey::P99 => b.s.wait_p99_ns.cmp(&a.s.wait_p99_ns),
                SortKey::Errors => b.s.errors.cmp(&a.s.errors),
            };
            by.then(a.s.vm_id.cmp(&b.s.vm_id))
        });
        if reverse {
            v.reverse();
        }
        v
    }
}

/// A wait in ASCII units.
fn wait(ns: u64) -> String {
    let ns = ns as f64;
    if ns < 1e3 {
        format!("{ns:.0}ns")
    } else if ns < 1e6 {
        format!("{:.1}us", ns / 1e3)
    } else if ns < 1e9 {
        format!("{:.1}ms", ns / 1e6)
    } else {
        format!("{:.2}s", ns / 1e9)
    }
}

const VM_HEADER: [&str; 10] = [
    "VM", "POOL", "PRIO", "CONN", "QUEUED", "INFLIGHT", "REQ/S", "P50WAIT", "P99WAIT", "ERRORS",
];
const GPU_HEADER: [&str; 6] = ["GPU", "STATE", "QUEUED", "DISPATCH/S", "BUSY%", "EXECUTOR"];

fn vm_cells(r: &VmRow) -> [String; 10] {
    [
        r.s.vm_id.to_string(),
        r.s.pool.clone(),
        r.s.priority.clone(),
        if r.s.connected { "yes" } else { "no" }.into(),
        r.s.queued.to_string(),
        r.s.in_flight.to_string(),
        format!("{:.0}", r.rate),
        wait(r.s.wait_p50_ns),
        wait(r.s.wait_p99_ns),
        r.s.errors.to_string(),
    ]
}

fn gpu_cells(g: &GpuRow) -> [String; 6] {
    [
        g.s.gpu.to_string(),
        g.s.state.clone(),
        g.s.queued.to_string(),
        format!("{:.0}", g.rate),
        format!("{:.1}", g.busy),
        g.s.executor.clone(),
    ]
}

/// ASCII borders: no line-drawing characters needed.
const ASCII: border::Set = border::Set {
    top_left: "+",
    top_right: "+",
    bottom_left: "+",
    bottom_right: "+",
    vertical_left: "|",
    vertical_right: "|",
    horizontal_top: "-",
    horizontal_bottom: "-",
};

fn draw(f: &mut Frame, view: &View, o: &Options) {
    let gpu_h = view.gpus.len().max(1) as u16 + 3;
    let [top, gpus, vms] = Layout::vertical([
        Constraint::Length(2),
        Constraint::Length(gpu_h),
        Constraint::Min(3),
    ])
    .areas(f.area());
    let state = match &view.error {
        Some(e) => format!("daemon not reachable: {e}"),
        None => format!("{} VMs, {} GPUs", view.vms.len(), view.gpus.len()),
    };
    let head = vec![
        Line::from(format!(
            "vgpu top - {} - {state} - every {:.1} s",
            o.control.display(),
            o.interval.as_secs_f64()
        )),
        Line::from(format!(
            "sort: {}{}   keys: s/S sort, r reverse, q quit",
            o.sort.name(),
            if o.reverse { " (reversed)" } else { "" }
        )),
    ];
    f.render_widget(Paragraph::new(head), top);
    let bold = Style::default().add_modifier(Modifier::BOLD);
    let block = |title: &str| {
        Block::default()
            .borders(Borders::ALL)
            .border_set(ASCII)
            .title(title.to_string())
    };
    let gpu_rows = view
        .gpus
        .iter()
        .map(|g| Row::new(gpu_cells(g).map(Cell::from)));
    let gpu_table = Table::new(
        gpu_rows,
        [
            Constraint::Length(4),
            Constraint::Length(11),
            Constraint::Length(7),
            Constraint::Length(11),
            Constraint::Length(6),
            Constraint::Min(10),
        ],
    )
    .header(Row::new(GPU_HEADER).style(bold))
    .block(block("GPUs"));
    f.render_widget(gpu_table, gpus);
    let rows = view
        .sorted(o.sort, o.reverse)
        .into_iter()
        .map(|r| Row::new(vm_cells(r).map(Cell::from)));
    let vm_table = Table::new(
        rows,
        [
            Constraint::Length(5),
            Constraint::Length(4),
            Constraint::Length(6),
            Constraint::Length(4),
            Constraint::Length(6),
            Constraint::Length(8),
            Constraint::Length(8),
            Constraint::Length(8),
            Constraint::Length(8),
            Constraint::Length(6),
        ],
    )
    .header(Row::new(VM_HEADER).style(bold))
    .block(block("VMs"));
    f.render_widget(vm_table, vms);
}

/// The plain-text table of `--once`.
fn print_once(out: &mut dyn Write, view: &View, o: &Options) -> io::Result<()> {
    if let Some(e) = &view.error {
        writeln!(out, "daemon not reachable: {e}")?;
    }
    let table = |out: &mut dyn Write, header: &[&str], rows: Vec<Vec<String>>| {
        let mut w: Vec<usize> = header.iter().map(|h| h.len()).collect();
        for r in &rows {
            for (i, c) in r.iter().enumerate() {
                w[i] = w[i].max(c.len());
            }
        }
        let line = |cells: Vec<String>| {
            cells
                .iter()
                .enumerate()
                .map(|(i, c)| format!("{c:<w$}", w = w[i]))
                .collect::<Vec<_>>()
                .join("  ")
                .trim_end()
                .to_string()
        };
        writeln!(
            out,
            "{}",
            line(header.iter().map(|s| s.to_string()).collect())
        )?;
        for r in rows {
            writeln!(out, "{}", line(r))?;
        }
        io::Result::Ok(())
    };
    table(
        out,
        &GPU_HEADER,
        view.gpus.iter().map(|g| gpu_cells(g).to_vec()).collect(),
    )?;
    writeln!(out)?;
    table(
        out,
        &VM_HEADER,
        view.sorted(o.sort, o.reverse)
            .into_iter()
            .map(|r| vm_cells(r).to_vec())
            .collect(),
    )
}

/// Puts the terminal back however `run` ends.
struct Restore;

impl Drop for Restore {
    fn drop(&mut self) {
        let _ = disable_raw_mode();
        let _ = execute!(io::stdout(), LeaveAlternateScreen, cursor::Show);
    }
}

/// Runs `top` until `q`, Esc, Ctrl-C, SIGTERM or SIGHUP.
pub fn run(mut o: Options, out: &mut dyn Write) -> io::Result<()> {
    let mut view = View::new();
    if o.once || !io::stdout().is_terminal() {
        // Two samples, so that rates mean something.
        view.refresh(&o.control);
        std::thread::sleep(o.interval.min(Duration::from_secs(1)));
        view.refresh(&o.control);
        return print_once(out, &view, &o);
    }
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [
        signal_hook::consts::SIGTERM,
        signal_hook::consts::SIGHUP,
        signal_hook::consts::SIGINT,
    ] {
        signal_hook::flag::register(sig, stop.clone())?;
    }
    enable_raw_mode()?;
    let _restore = Restore;
    execute!(io::stdout(), EnterAlternateScreen, cursor::Hide)?;
    let mut terminal = Terminal::new(CrosstermBackend::new(io::stdout()))?;
    terminal.clear()?;
    let mut next = Instant::now();
    loop {
        if Instant::now() >= next {
            view.refresh(&o.control);
            next = Instant::now() + o.interval;
        }
        terminal.draw(|f| draw(f, &view, &o))?;
        // Input until the next refresh, in short slices so that a signal
        // is seen promptly.
        while Instant::now() < next {
            if stop.load(Ordering::Relaxed) {
                return Ok(());
            }
            let slice = next
                .saturating_duration_since(Instant::now())
                .min(Duration::from_millis(100));
            if !event::poll(slice)? {
                continue;
            }
            match event::read()? {
                Event::Key(k) if k.kind != KeyEventKind::Release => match k.code {
                    KeyCode::Char('q') | KeyCode::Esc => return Ok(()),
                    KeyCode::Char('c') if k.modifiers.contains(KeyModifiers::CONTROL) => {
                        return Ok(())
                    }
                    KeyCode::Char('s') => o.sort = o.sort.step(1),
                    KeyCode::Char('S') => o.sort = o.sort.step(-1),
                    KeyCode::Char('r') => o.reverse = !o.reverse,
                    _ => continue,
                },
                Event::Resize(..) => {}
                _ => continue,
            }
            terminal.draw(|f| draw(f, &view, &o))?;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sort_keys_cycle_and_waits_format() {
        assert_eq!(SortKey::Vm.step(1), SortKey::Pool);
        assert_eq!(SortKey::Vm.step(-1), SortKey::Errors);
        assert_eq!(wait(950), "950ns");
        assert_eq!(wait(12_340), "12.3us");
        assert_eq!(wait(2_500_000), "2.5ms");
        assert_eq!(wait(3_000_000_000), "3.00s");
    }

    #[test]
    fn sorting_puts_the_busiest_first() {
        let mut view = View::new();
        for (id, prio, queued) in [(1, "low", 5), (2, "high", 0), (3, "medium", 9)] {
            view.vms.push(VmRow {
                s: VmStatus {
                    vm_id: id,
                    priority: prio.into(),
                    queued,
                    ..VmStatus::default()
                },
                rate: 0.0,
            });
        }
        let ids = |k, r| -> Vec<u32> { view.sorted(k, r).iter().map(|r| r.s.vm_id).collect() };
        assert_eq!(ids(SortKey::Vm, false), [1, 2, 3]);
        assert_eq!(ids(SortKey::Priority, false), [2, 3, 1]);
        assert_eq!(ids(SortKey::Queued, false), [3, 1, 2]);
        assert_eq!(ids(SortKey::Queued, true), [2, 1, 3]);
    }
}
