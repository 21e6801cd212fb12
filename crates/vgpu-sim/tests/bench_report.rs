//! `vgpu-bench --quick` (CI's smoke test): it completes and writes a
//! well-formed report, whose PNGs open and show each plotted series in its
//! colour. Nothing here looks at the numbers.

use std::path::Path;
use std::process::{Command, Stdio};

use plotters::style::RGBColor;
use vgpu_sim::report::{BASELINE, HEIGHT, HIGH, LOW, MEDIUM, VGPU, VGPU2, WIDTH};

/// Decodes a PNG into (width, height, RGB pixels).
fn decode(path: &Path) -> (u32, u32, Vec<[u8; 3]>) {
    let file = std::fs::File::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut reader = png::Decoder::new(file)
        .read_info()
        .unwrap_or_else(|e| panic!("{}: not a PNG: {e}", path.display()));
    let mut buf = vec![0; reader.output_buffer_size()];
    let info = reader.next_frame(&mut buf).expect("a frame");
    let step = match info.color_type {
        png::ColorType::Rgb => 3,
        png::ColorType::Rgba => 4,
        other => panic!("{}: unexpected colour type {other:?}", path.display()),
    };
    assert_eq!(info.bit_depth, png::BitDepth::Eight);
    let px = buf[..info.buffer_size()]
        .chunks_exact(step)
        .map(|c| [c[0], c[1], c[2]])
        .collect();
    (info.width, info.height, px)
}

fn count(px: &[[u8; 3]], c: RGBColor) -> usize {
    px.iter().filter(|p| **p == [c.0, c.1, c.2]).count()
}

#[test]
fn quick_bench_writes_a_report_with_plots_of_every_series() {
    let out = tempfile::tempdir().unwrap();
    let status = Command::new(env!("CARGO_BIN_EXE_vgpu-bench"))
        .args(["--quick", "--gpu", "off", "--out"])
        .arg(out.path())
        .stdin(Stdio::null())
        .status()
        .expect("run vgpu-bench");
    assert!(status.success(), "vgpu-bench --quick failed");

    let md = std::fs::read_to_string(out.path().join("report.md")).expect("report.md");
    assert!(md.starts_with("# vgpu benchmark report"), "{md}");
    assert!(md.contains("| scenario | measurement | vgpu | baseline (same run) | ratio |"));
    for scenario in [
        "PING vs eventfd floor",
        "SCALAR_ADD",
        "VECTOR_ADD",
        "throughput (PING, mixed priorities) | 64 VMs",
        "contention",
        "isolation",
        "legacy baseline",
    ] {
        assert!(md.contains(scenario), "no {scenario} in\n{md}");
    }
    // Every table row has five cells.
    for line in md.lines().filter(|l| l.starts_with("| ")) {
        assert_eq!(line.matches(" | ").count(), 4, "{line}");
    }

    let plots: [(&str, &[RGBColor]); 6] = [
        ("ping_vs_floor.png", &[VGPU, BASELINE]),
        ("ops_sizes.png", &[VGPU, VGPU2, BASELINE]),
        ("throughput.png", &[VGPU]),
        ("latency_cdf.png", &[HIGH, MEDIUM, LOW]),
        ("isolation.png", &[HIGH, BASELINE]),
        ("legacy.png", &[VGPU, BASELINE]),
    ];
    for (file, colours) in plots {
        assert!(
            md.contains(&format!("]({file})")),
            "report.md does not show {file}"
        );
        let (w, h, px) = decode(&out.path().join(file));
        assert_eq!((w, h), (WIDTH, HEIGHT), "{file}");
        let background = px.iter().filter(|p| **p == [255, 255, 255]).count();
        assert!(background > px.len() / 4, "{file}: no white background");
        for &c in colours {
            assert!(
                count(&px, c) >= 20,
                "{file}: the series in {c:?} is not drawn ({} pixels)",
                count(&px, c)
            );
        }
    }
}
