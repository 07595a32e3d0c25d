//! The studies' plots (thrash; share: host memory vs N per mode), PNG and SVG: host major faults per second vs time, one line per VM
//! and one panel per N; and total work per second vs N with the thrashing knee marked.
use std::path::{Path, PathBuf};

use anyhow::{anyhow, Result};
use plotters::coord::Shift;
use plotters::prelude::*;

use super::RunSummary;

fn err<E: std::fmt::Debug>(e: E) -> anyhow::Error {
    anyhow!("cannot draw the plot: {e:?}")
}

fn rates(series: &[(f64, u64)]) -> Vec<(f64, f64)> {
    series
        .windows(2)
        .map(|w| {
            let dt = (w[1].0 - w[0].0).max(1e-3);
            (w[1].0, w[1].1.saturating_sub(w[0].1) as f64 / dt)
        })
        .collect()
}

fn faults<DB: DrawingBackend>(root: &DrawingArea<DB, Shift>, runs: &[RunSummary]) -> Result<()> {
    root.fill(&WHITE).map_err(err)?;
    let panels = root.split_evenly((runs.len().max(1), 1));
    for (panel, run) in panels.iter().zip(runs) {
        let lines: Vec<Vec<(f64, f64)>> = run.series.iter().map(|s| rates(s)).collect();
        let x_max = run.seconds.max(0.1);
        let y_max = lines.iter().flatten().map(|p| p.1).fold(1.0f64, f64::max) * 1.1;
        let mut chart = ChartBuilder::on(panel)
            .caption(
                format!("{} VM(s): host major faults/s per VM", run.vms),
                ("sans-serif", 16),
            )
            .margin(8)
            .x_label_area_size(28)
            .y_label_area_size(60)
            .build_cartesian_2d(0.0..x_max, 0.0..y_max)
            .map_err(err)?;
        chart
            .configure_mesh()
            .x_desc("time (s)")
            .label_style(("sans-serif", 12))
            .draw()
            .map_err(err)?;
        for (k, line) in lines.into_iter().enumerate() {
            let color = Palette99::pick(k).to_rgba();
            chart
                .draw_series(LineSeries::new(line, color.stroke_width(2)))
                .map_err(err)?
                .label(format!("vm{k}"))
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], color));
        }
        chart
            .configure_series_labels()
            .label_font(("sans-serif", 12))
            .border_style(BLACK)
            .background_style(WHITE.mix(0.8))
            .draw()
            .map_err(err)?;
    }
    root.present().map_err(err)
}

fn work<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    runs: &[RunSummary],
    knee: Option<usize>,
) -> Result<()> {
    root.fill(&WHITE).map_err(err)?;
    let x_max = runs.iter().map(|r| r.vms).max().unwrap_or(1) as f64 + 0.5;
    let y_max = runs.iter().map(|r| r.work_per_s).fold(0.1, f64::max) * 1.2;
    let mut chart = ChartBuilder::on(root)
        .caption(
            "Total work per second vs number of VMs (one budget)",
            ("sans-serif", 20),
        )
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(60)
        .build_cartesian_2d(0.5..x_max, 0.0..y_max)
        .map_err(err)?;
    chart
        .configure_mesh()
        .x_desc("VMs")
        .y_desc("workload iterations / s")
        .label_style(("sans-serif", 13))
        .draw()
        .map_err(err)?;
    let points: Vec<(f64, f64)> = runs.iter().map(|r| (r.vms as f64, r.work_per_s)).collect();
    chart
        .draw_series(LineSeries::new(points.clone(), BLUE.stroke_width(2)))
        .map_err(err)?;
    chart
        .draw_series(points.iter().map(|p| Circle::new(*p, 4, BLUE.filled())))
        .map_err(err)?;
    if let Some(r) = runs.iter().find(|r| Some(r.vms) == knee) {
        let p = (r.vms as f64, r.work_per_s);
        chart
            .draw_series([Circle::new(p, 9, RED.stroke_width(3))])
            .map_err(err)?;
        chart
            .draw_series([Text::new(
                format!("knee: N={}", r.vms),
                (p.0 + 0.1, p.1 * 1.05),
                ("sans-serif", 14).into_font().color(&RED),
            )])
            .map_err(err)?;
    }
    root.present().map_err(err)
}

/// Draws both plots as PNG and SVG into `out`; returns the paths.
pub fn plots(out: &Path, runs: &[RunSummary], knee: Option<usize>) -> Result<Vec<PathBuf>> {
    let _ = mirrorball_monitor::plot::load_font(&mirrorball_monitor::plot::FontChoice::Auto);
    let height = 220 * u32::try_from(runs.len().max(1)).unwrap_or(8);
    let faults_png = out.join("thrash-faults.png");
    let faults_svg = out.join("thrash-faults.svg");
    let work_png = out.join("thrash-work.png");
    let work_svg = out.join("thrash-work.svg");
    faults(
        &BitMapBackend::new(&faults_png, (900, height)).into_drawing_area(),
        runs,
    )?;
    faults(
        &SVGBackend::new(&faults_svg, (900, height)).into_drawing_area(),
        runs,
    )?;
    work(
        &BitMapBackend::new(&work_png, (800, 500)).into_drawing_area(),
        runs,
        knee,
    )?;
    work(
        &SVGBackend::new(&work_svg, (800, 500)).into_drawing_area(),
        runs,
        knee,
    )?;
    Ok(vec![faults_png, faults_svg, work_png, work_svg])
}

fn share<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    runs: &[super::share::ShareRun],
    modes: &[&str],
) -> Result<()> {
    root.fill(&WHITE).map_err(err)?;
    let mib = |b: u64| b as f64 / 1048576.0;
    let x_max = runs.iter().map(|r| r.vms).max().unwrap_or(1) as f64 + 0.5;
    let y_max = runs.iter().map(|r| mib(r.bytes)).fold(1.0, f64::max) * 1.15;
    let mut chart = ChartBuilder::on(root)
        .caption("Host memory vs number of VMs", ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(60)
        .build_cartesian_2d(0.5..x_max, 0.0..y_max)
        .map_err(err)?;
    chart
        .configure_mesh()
        .x_desc("VMs")
        .y_desc("host memory, Pss (MiB)")
        .label_style(("sans-serif", 13))
        .draw()
        .map_err(err)?;
    for (k, mode) in modes.iter().enumerate() {
        let color = Palette99::pick(k).to_rgba();
        let points: Vec<(f64, f64)> = runs
            .iter()
            .filter(|r| r.mode == *mode)
            .map(|r| (r.vms as f64, mib(r.bytes)))
            .collect();
        chart
            .draw_series(LineSeries::new(points, color.stroke_width(2)))
            .map_err(err)?
            .label(mode.to_string())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], color));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .label_font(("sans-serif", 13))
        .border_style(BLACK)
        .background_style(WHITE.mix(0.8))
        .draw()
        .map_err(err)?;
    root.present().map_err(err)
}

/// Draws the share plot as PNG and SVG into `out`; returns the paths.
pub fn share_plots(
    out: &Path,
    runs: &[super::share::ShareRun],
    modes: &[&str],
) -> Result<Vec<PathBuf>> {
    let _ = mirrorball_monitor::plot::load_font(&mirrorball_monitor::plot::FontChoice::Auto);
    let png = out.join("share-memory.png");
    let svg = out.join("share-memory.svg");
    share(
        &BitMapBackend::new(&png, (800, 500)).into_drawing_area(),
        runs,
        modes,
    )?;
    share(
        &SVGBackend::new(&svg, (800, 500)).into_drawing_area(),
        runs,
        modes,
    )?;
    Ok(vec![png, svg])
}
