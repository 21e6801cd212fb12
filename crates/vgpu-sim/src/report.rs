//! The benchmark report's plots (PNG, plotters' bitmap backend) and the
//! palette they are drawn in, so that a test can find each series by its
//! colour.
//!
//! Text needs a TrueType font at run time (plotters' `ab_glyph` feature: no
//! fontconfig or freetype): `$VGPU_FONT`, else DejaVu Sans or Liberation
//! Sans from the usual Debian paths (package `fonts-dejavu-core`).

use std::path::Path;
use std::sync::OnceLock;

use plotters::coord::Shift;
use plotters::prelude::*;

pub const HIGH: RGBColor = RGBColor(214, 39, 40);
pub const MEDIUM: RGBColor = RGBColor(255, 127, 14);
pub const LOW: RGBColor = RGBColor(31, 119, 180);
/// vgpu's own measurement.
pub const VGPU: RGBColor = RGBColor(44, 160, 44);
/// A baseline measured in the same run (eventfd floor, legacy path, alone).
pub const BASELINE: RGBColor = RGBColor(148, 103, 189);
/// A second vgpu series (VECTOR_ADD beside SCALAR_ADD).
pub const VGPU2: RGBColor = RGBColor(23, 190, 207);

pub const WIDTH: u32 = 900;
pub const HEIGHT: u32 = 520;

pub type Error = Box<dyn std::error::Error + Send + Sync>;

const FONT_PATHS: [&str; 4] = [
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
];

/// Registers the font plotters draws text with (once).
pub fn setup_font() -> Result<(), Error> {
    static DONE: OnceLock<Result<(), String>> = OnceLock::new();
    DONE.get_or_init(|| {
        let mut candidates: Vec<String> = std::env::var("VGPU_FONT").into_iter().collect();
        candidates.extend(FONT_PATHS.iter().map(|s| s.to_string()));
        for path in candidates {
            if let Ok(bytes) = std::fs::read(&path) {
                let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
                if plotters::style::register_font("sans-serif", FontStyle::Normal, bytes).is_ok() {
                    return Ok(());
                }
            }
        }
        Err(format!(
            "no TrueType font for the plots: install fonts-dejavu-core or set VGPU_FONT (looked in {})",
            FONT_PATHS.join(", ")
        ))
    })
    .clone()
    .map_err(Into::into)
}

/// A named series of points.
pub struct Series {
    pub name: String,
    pub color: RGBColor,
    pub points: Vec<(f64, f64)>,
}

/// The empirical CDF of `samples` (any order) as points, at most ~400.
pub fn cdf_points(samples: &[f64]) -> Vec<(f64, f64)> {
    let mut v: Vec<f64> = samples.iter().copied().filter(|x| x.is_finite()).collect();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n == 0 {
        return Vec::new();
    }
    let step = (n / 400).max(1);
    let mut out: Vec<(f64, f64)> = (0..n)
        .step_by(step)
        .map(|i| (v[i], (i + 1) as f64 / n as f64))
        .collect();
    out.push((v[n - 1], 1.0));
    out
}

fn root(path: &Path) -> DrawingArea<BitMapBackend<'_>, Shift> {
    let r = BitMapBackend::new(path, (WIDTH, HEIGHT)).into_drawing_area();
    let _ = r.fill(&WHITE);
    r
}

fn range(points: impl Iterator<Item = f64>, log: bool) -> (f64, f64) {
    let (mut lo, mut hi) = (f64::INFINITY, f64::NEG_INFINITY);
    for p in points.filter(|p| p.is_finite() && (!log || *p > 0.0)) {
        lo = lo.min(p);
        hi = hi.max(p);
    }
    if !lo.is_finite() {
        return (1.0, 10.0);
    }
    if log {
        (lo / 1.5, hi * 1.5)
    } else if hi > lo {
        (lo.min(0.0), hi * 1.08)
    } else {
        (lo.min(0.0), lo.max(1.0) * 1.1)
    }
}

/// Lines (with point marks) of several series; log axes where asked.
pub fn lines(
    path: &Path,
    title: &str,
    x_desc: &str,
    y_desc: &str,
    series: &[Series],
    log_x: bool,
    log_y: bool,
) -> Result<(), Error> {
    setup_font()?;
    let area = root(path);
    let xr = range(
        series.iter().flat_map(|s| s.points.iter().map(|p| p.0)),
        log_x,
    );
    let yr = range(
        series.iter().flat_map(|s| s.points.iter().map(|p| p.1)),
        log_y,
    );
    let mut b = ChartBuilder::on(&area);
    b.caption(title, ("sans-serif", 22))
        .margin(14)
        .x_label_area_size(44)
        .y_label_area_size(70);
    // Four coordinate types: the same drawing code for each.
    macro_rules! draw {
        ($chart:expr) => {{
            let mut chart = $chart;
            chart
                .configure_mesh()
                .x_desc(x_desc)
                .y_desc(y_desc)
                .label_style(("sans-serif", 14))
                .draw()?;
            for s in series {
                let pts: Vec<(f64, f64)> = s
                    .points
                    .iter()
                    .copied()
                    .filter(|p| (!log_x || p.0 > 0.0) && (!log_y || p.1 > 0.0))
                    .collect();
                let color = s.color;
                chart
                    .draw_series(LineSeries::new(pts.clone(), color.stroke_width(3)))?
                    .label(s.name.as_str())
                    .legend(move |(x, y)| {
                        PathElement::new(vec![(x, y), (x + 24, y)], color.stroke_width(3))
                    });
                if pts.len() <= 40 {
                    chart.draw_series(pts.iter().map(|&p| Circle::new(p, 4, color.filled())))?;
                }
            }
            chart
                .configure_series_labels()
                .background_style(WHITE.mix(0.85))
                .border_style(BLACK)
                .label_font(("sans-serif", 14))
                .position(SeriesLabelPosition::UpperLeft)
                .draw()?;
        }};
    }
    match (log_x, log_y) {
        (false, false) => draw!(b.build_cartesian_2d(xr.0..xr.1, yr.0..yr.1)?),
        (true, false) => draw!(b.build_cartesian_2d((xr.0..xr.1).log_scale(), yr.0..yr.1)?),
        (false, true) => draw!(b.build_cartesian_2d(xr.0..xr.1, (yr.0..yr.1).log_scale())?),
        (true, true) => {
            draw!(b.build_cartesian_2d((xr.0..xr.1).log_scale(), (yr.0..yr.1).log_scale())?)
        }
    }
    area.present()?;
    Ok(())
}

/// One bar.
pub struct Bar {
    pub label: String,
    pub color: RGBColor,
    pub value: f64,
}

/// Bars side by side, labelled underneath; a log value axis where asked.
pub fn bars(
    path: &Path,
    title: &str,
    y_desc: &str,
    bars: &[Bar],
    log_y: bool,
) -> Result<(), Error> {
    setup_font()?;
    let area = root(path);
    let n = bars.len().max(1);
    let yr = range(bars.iter().map(|b| b.value), log_y);
    let mut b = ChartBuilder::on(&area);
    b.caption(title, ("sans-serif", 22))
        .margin(14)
        .x_label_area_size(44)
        .y_label_area_size(70);
    macro_rules! draw {
        ($chart:expr, $base:expr, $label_y:expr) => {{
            let mut chart = $chart;
            chart
                .configure_mesh()
                .disable_x_mesh()
                .x_label_formatter(&|_| String::new())
                .y_desc(y_desc)
                .label_style(("sans-serif", 14))
                .draw()?;
            chart.draw_series(bars.iter().enumerate().map(|(i, bar)| {
                let i = i as f64;
                Rectangle::new(
                    [(i + 0.15, $base), (i + 0.85, bar.value.max($base))],
                    bar.color.filled(),
                )
            }))?;
            // Each bar's name under it, inside the plot, above the axis.
            chart.draw_series(bars.iter().enumerate().map(|(i, bar)| {
                Text::new(
                    bar.label.clone(),
                    (i as f64 + 0.17, $label_y),
                    ("sans-serif", 14).into_font().color(&BLACK),
                )
            }))?;
        }};
    }
    if log_y {
        draw!(
            b.build_cartesian_2d(0f64..n as f64, (yr.0..yr.1 * 4.0).log_scale())?,
            yr.0,
            yr.1 * 3.5
        );
    } else {
        draw!(
            b.build_cartesian_2d(0f64..n as f64, 0f64..yr.1 * 1.15)?,
            0.0,
            yr.1 * 1.12
        );
    }
    area.present()?;
    Ok(())
}
