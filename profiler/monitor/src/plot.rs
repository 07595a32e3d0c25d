//! `vmm plot`: the MP3 case-study plots from records ([`crate::record`]), as PNG and/or SVG.
//!
//! - **Faults vs time** (case study 1), one image per record: the accumulated guest page faults
//!   (minor + major) of each task over the guest clock, and below it the accumulated KVM
//!   `pf_taken` (EPT/MMU faults) the host charged to each task over the host clock. The guest
//!   samples are put on the host clock too and both axes start at the record's first moment, so
//!   the panels line up ([`timeline`]).
//! - **Utilisation vs number of tasks** (case study 2), from several records: for each record,
//!   the number of guest tasks it saw, the guest CPU of all tasks (`utime + stime` over guest
//!   wall time) and the CPU of all vCPU threads (`user + sys` over host wall time), in percent of
//!   one CPU.
//!
//! Text (titles, ticks, legends) is drawn with `plotters`' `ab_glyph` renderer and a TrueType
//! font found at run time ([`FONT_CANDIDATES`], or `$MIRRORBALL_PLOT_FONT`): no fontconfig and
//! no embedded font. Without a font the plots are drawn without text.
//!
//! Outputs, for `--output PREFIX` (default: the input without its extension for one input;
//! `mirrorball` next to the first input for several): `PREFIX-faults.{png,svg}` for one input;
//! `PREFIX-utilization.{png,svg}` and `PREFIX-faults-<input stem>.{png,svg}` for several.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::{Mutex, OnceLock};

use mirrorball_profiler_abi::TASK_NONE;
use plotters::coord::Shift;
use plotters::prelude::*;

use crate::record::{read_record, Recording};
use crate::Error;

pub mod timeline;
use timeline::Timeline;

/// Fonts tried, in order, after `$MIRRORBALL_PLOT_FONT` (Debian: `fonts-dejavu-core`,
/// `fonts-liberation2`, `fonts-liberation`, `fonts-freefont-ttf`).
pub const FONT_CANDIDATES: [&str; 5] = [
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation2/LiberationSans-Regular.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
    "/usr/share/fonts/truetype/freefont/FreeSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
];

/// Environment variable naming a TTF font for the plots.
pub const FONT_ENV: &str = "MIRRORBALL_PLOT_FONT";

/// Which font to draw text with.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum FontChoice {
    /// `$MIRRORBALL_PLOT_FONT`, else the first of [`FONT_CANDIDATES`] that loads, else no text.
    #[default]
    Auto,
    /// This file.
    File(PathBuf),
    /// No text at all.
    NoText,
}

/// Which image formats to write.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ImageFormat {
    /// PNG only.
    #[default]
    Png,
    /// SVG only.
    Svg,
    /// Both.
    Both,
}

impl FromStr for ImageFormat {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "png" => Ok(Self::Png),
            "svg" => Ok(Self::Svg),
            "both" => Ok(Self::Both),
            _ => Err(format!("{s:?} is not an image format (png, svg or both)")),
        }
    }
}

impl ImageFormat {
    fn extensions(self) -> &'static [&'static str] {
        match self {
            Self::Png => &["png"],
            Self::Svg => &["svg"],
            Self::Both => &["png", "svg"],
        }
    }
}

/// What `vmm plot` does.
#[derive(Clone, Debug, Default)]
pub struct PlotOptions {
    /// Records.
    pub inputs: Vec<PathBuf>,
    /// Output prefix (see the module documentation for the default).
    pub output: Option<PathBuf>,
    /// Formats.
    pub format: ImageFormat,
    /// Font.
    pub font: FontChoice,
}

/// A named line: (x, y) points in x order.
#[derive(Clone, Debug, PartialEq)]
pub struct Series {
    /// Legend text.
    pub label: String,
    /// Points.
    pub points: Vec<(f64, f64)>,
}

impl Series {
    fn last_y(&self) -> f64 {
        self.points.last().map_or(0.0, |p| p.1)
    }
}

/// The series of the faults-vs-time plot.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct FaultSeries {
    /// Accumulated guest faults (minor + major) per task, x = seconds since the record's start
    /// on the host clock (on the guest clock since its first sample when `shared_clock` is
    /// false).
    pub guest: Vec<Series>,
    /// Accumulated KVM `pf_taken` charged to each task, x = seconds of host clock since the
    /// record's start.
    pub host: Vec<Series>,
    /// Whether both panels share the host clock and origin ([`Timeline::shared`]).
    pub shared_clock: bool,
}

/// Most points kept per series (the rest are thinned out evenly; the last point is kept).
pub const MAX_POINTS: usize = 4000;

fn thin(points: Vec<(f64, f64)>) -> Vec<(f64, f64)> {
    if points.len() <= MAX_POINTS {
        return points;
    }
    let step = points.len().div_ceil(MAX_POINTS);
    let last = *points.last().expect("non-empty");
    let mut out: Vec<(f64, f64)> = points.into_iter().step_by(step).collect();
    if out.last() != Some(&last) {
        out.push(last);
    }
    out
}

fn task_label(comm: &str, task_id: u32, pid: u32) -> String {
    if task_id == TASK_NONE {
        "(no task)".into()
    } else if comm.is_empty() {
        format!("task {task_id} [{pid}]")
    } else {
        format!("{comm} [{pid}]")
    }
}

/// One task's running total while a series is built.
#[derive(Default)]
struct Acc {
    comm: String,
    prev: Option<u64>,
    total: f64,
    points: Vec<(f64, f64)>,
}

/// Series by task key (task id, pid).
#[derive(Default)]
struct Accs {
    order: Vec<(u32, u32)>,
    map: HashMap<(u32, u32), Acc>,
}

impl Accs {
    fn get(&mut self, key: (u32, u32), comm: &str) -> &mut Acc {
        let order = &mut self.order;
        let acc = self.map.entry(key).or_insert_with(|| {
            order.push(key);
            Acc::default()
        });
        if acc.comm.is_empty() && !comm.is_empty() {
            acc.comm = comm.to_string();
        }
        acc
    }

    fn into_series(mut self) -> Vec<Series> {
        self.order.sort_unstable();
        self.order
            .iter()
            .filter_map(|k| {
                let acc = self.map.remove(k)?;
                Some(Series {
                    label: task_label(&acc.comm, k.0, k.1),
                    points: thin(acc.points),
                })
            })
            .collect()
    }
}

/// Accumulated faults per task (positive deltas only, so a counter reset does not go down).
pub fn accumulated_faults(rec: &Recording) -> FaultSeries {
    let timeline = Timeline::of(rec);
    let mut guest = Accs::default();
    for g in rec.guest() {
        let e = guest.get((g.task_id, g.pid), &g.comm);
        let v = g.min_flt.saturating_add(g.maj_flt);
        if let Some(prev) = e.prev {
            e.total += v.saturating_sub(prev) as f64;
        }
        e.prev = Some(v);
        e.points.push((timeline.guest_x(g.timestamp_ns), e.total));
    }
    let mut host = Accs::default();
    for h in rec.host() {
        let key = if h.task_id == TASK_NONE {
            (TASK_NONE, 0)
        } else {
            (h.task_id, h.pid)
        };
        let e = host.get(key, &h.comm);
        e.total += h.pf_taken as f64;
        e.points.push((timeline.host_x(h.timestamp_ns), e.total));
    }
    FaultSeries {
        guest: guest.into_series(),
        host: host.into_series(),
        shared_clock: timeline.shared(),
    }
}

/// One record's point of the utilisation plot.
#[derive(Clone, Debug, PartialEq)]
pub struct UtilPoint {
    /// The record's file stem.
    pub label: String,
    /// Distinct guest tasks (task id, pid) in the record.
    pub tasks: usize,
    /// Guest CPU of all tasks, fraction of one CPU.
    pub guest_cpu: f64,
    /// vCPU-thread CPU of all vCPUs, fraction of one CPU.
    pub vcpu_cpu: f64,
    /// Guest faults per second, all tasks.
    pub guest_faults_per_s: f64,
}

/// The utilisation of one record.
pub fn utilization(rec: &Recording) -> UtilPoint {
    let mut per_task: BTreeMap<(u32, u32), (u64, u64, u64, u64)> = BTreeMap::new();
    let (mut t_min, mut t_max) = (u64::MAX, 0u64);
    for g in rec.guest() {
        t_min = t_min.min(g.timestamp_ns);
        t_max = t_max.max(g.timestamp_ns);
        let cpu = g.utime_ns.saturating_add(g.stime_ns);
        let flt = g.min_flt.saturating_add(g.maj_flt);
        let e = per_task
            .entry((g.task_id, g.pid))
            .or_insert((cpu, 0, flt, 0));
        // (last cpu, accumulated cpu, last faults, accumulated faults)
        e.1 += cpu.saturating_sub(e.0);
        e.0 = cpu;
        e.3 += flt.saturating_sub(e.2);
        e.2 = flt;
    }
    let guest_wall = t_max.saturating_sub(t_min);
    let guest_cpu_ns: u64 = per_task.values().map(|e| e.1).sum();
    let guest_faults: u64 = per_task.values().map(|e| e.3).sum();
    let mut per_vcpu: BTreeMap<u32, u64> = BTreeMap::new();
    let mut vcpu_cpu_ns = 0u64;
    for h in rec.host() {
        let iv = per_vcpu.entry(h.vcpu).or_default();
        *iv = iv.saturating_add(h.interval_ns);
        vcpu_cpu_ns = vcpu_cpu_ns
            .saturating_add(h.vcpu_utime_ns)
            .saturating_add(h.vcpu_stime_ns);
    }
    let host_wall = per_vcpu.values().copied().max().unwrap_or(0);
    let ratio = |a: u64, b: u64| if b == 0 { 0.0 } else { a as f64 / b as f64 };
    UtilPoint {
        label: rec
            .path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default(),
        tasks: per_task.len(),
        guest_cpu: ratio(guest_cpu_ns, guest_wall),
        vcpu_cpu: ratio(vcpu_cpu_ns, host_wall),
        guest_faults_per_s: ratio(guest_faults, guest_wall) * 1e9,
    }
}

/// Registers a font for `plotters`; returns whether text can be drawn.
pub fn load_font(choice: &FontChoice) -> Result<bool, Error> {
    static LOADED: OnceLock<Mutex<HashMap<PathBuf, bool>>> = OnceLock::new();
    let try_path = |path: &Path| -> bool {
        let mut loaded = LOADED
            .get_or_init(|| Mutex::new(HashMap::new()))
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if loaded.get(path) == Some(&false) {
            return false;
        }
        // A font that loaded before is registered again (another call may have registered a
        // different one since); its bytes were leaked once and come from the cache.
        static BYTES: OnceLock<Mutex<HashMap<PathBuf, &'static [u8]>>> = OnceLock::new();
        let mut bytes = BYTES
            .get_or_init(|| Mutex::new(HashMap::new()))
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let data: &'static [u8] = match bytes.get(path) {
            Some(d) => d,
            // A regular file of at most 64 MiB, checked before it is read (not /dev/zero, a FIFO).
            None => match read_font(path) {
                Ok(d) => {
                    let d: &'static [u8] = Box::leak(d.into_boxed_slice());
                    bytes.insert(path.to_path_buf(), d);
                    d
                }
                _ => {
                    loaded.insert(path.to_path_buf(), false);
                    return false;
                }
            },
        };
        let ok = plotters::style::register_font("sans-serif", FontStyle::Normal, data).is_ok();
        loaded.insert(path.to_path_buf(), ok);
        ok
    };
    match choice {
        FontChoice::NoText => Ok(false),
        FontChoice::File(p) => {
            if try_path(p) {
                Ok(true)
            } else {
                Err(Error::new(format!(
                    "{}: not a readable TrueType font",
                    p.display()
                )))
            }
        }
        FontChoice::Auto => {
            if let Some(p) = std::env::var_os(FONT_ENV).filter(|p| !p.is_empty()) {
                return load_font(&FontChoice::File(PathBuf::from(p)));
            }
            Ok(FONT_CANDIDATES.iter().any(|p| try_path(Path::new(p))))
        }
    }
}

type DrawResult = Result<(), String>;

/// Reads a font file the user named: a regular file under 64 MiB, checked before reading.
fn read_font(path: &Path) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    let mut data = Vec::new();
    crate::userfile::open_input(path, 64 << 20)?.read_to_end(&mut data)?;
    Ok(data)
}

fn err<E: std::fmt::Debug>(e: E) -> String {
    format!("{e:?}")
}

fn nice_max(v: f64) -> f64 {
    if v.is_finite() && v > 0.0 {
        v * 1.05
    } else {
        1.0
    }
}

/// Most series with a legend entry (the ones with the largest totals).
const MAX_LEGEND: usize = 12;

fn draw_panel<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    title: &str,
    x_desc: &str,
    y_desc: &str,
    series: &[Series],
    colors: &HashMap<String, usize>,
    text: bool,
) -> DrawResult {
    let x_max = series
        .iter()
        .flat_map(|s| s.points.iter().map(|p| p.0))
        .fold(0.0f64, f64::max);
    let y_max = series.iter().map(Series::last_y).fold(0.0f64, f64::max);
    let mut builder = ChartBuilder::on(area);
    builder.margin(12);
    if text {
        builder
            .caption(title, ("sans-serif", 22))
            .x_label_area_size(40)
            .y_label_area_size(80);
    } else {
        builder.x_label_area_size(8).y_label_area_size(8);
    }
    let mut chart = builder
        .build_cartesian_2d(0.0..nice_max(x_max), 0.0..nice_max(y_max))
        .map_err(err)?;
    let mut mesh = chart.configure_mesh();
    if text {
        mesh.x_desc(x_desc)
            .y_desc(y_desc)
            .label_style(("sans-serif", 14))
            .axis_desc_style(("sans-serif", 15))
            .y_label_formatter(&|v| short_number(*v));
    } else {
        mesh.x_labels(0).y_labels(0);
    }
    mesh.draw().map_err(err)?;
    let mut by_total: Vec<usize> = (0..series.len()).collect();
    by_total.sort_by(|&a, &b| series[b].last_y().total_cmp(&series[a].last_y()));
    let labelled: Vec<usize> = by_total.into_iter().take(MAX_LEGEND).collect();
    for (i, s) in series.iter().enumerate() {
        let color = Palette99::pick(colors.get(&s.label).copied().unwrap_or(i)).to_rgba();
        let drawn = chart
            .draw_series(LineSeries::new(
                s.points.iter().copied(),
                color.stroke_width(2),
            ))
            .map_err(err)?;
        if text && labelled.contains(&i) {
            drawn.label(s.label.clone()).legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(3))
            });
        }
    }
    if text && !series.is_empty() {
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK.mix(0.4))
            .label_font(("sans-serif", 14))
            .draw()
            .map_err(err)?;
    }
    Ok(())
}

/// A compact number: 12345 → "12k", 1234 → "1.2k", 128.4 → "128", 12.34 → "12.3", 0.5 → "0.50".
pub fn short_number(v: f64) -> String {
    let a = v.abs();
    if a >= 1e9 {
        format!("{:.1}G", v / 1e9)
    } else if a >= 1e6 {
        format!("{:.1}M", v / 1e6)
    } else if a >= 1e4 {
        format!("{:.0}k", v / 1e3)
    } else if a >= 1e3 {
        format!("{:.1}k", v / 1e3)
    } else if a >= 100.0 || a == a.trunc() {
        format!("{v:.0}")
    } else if a >= 1.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

fn draw_faults<DB: DrawingBackend>(
    root: DrawingArea<DB, Shift>,
    title: &str,
    data: &FaultSeries,
    text: bool,
) -> DrawResult {
    root.fill(&WHITE).map_err(err)?;
    let root = if text {
        root.titled(title, ("sans-serif", 26)).map_err(err)?
    } else {
        root
    };
    let (top, bottom) = root.split_vertically(root.relative_to_height(0.5));
    // One colour per task in both panels.
    let mut colors: HashMap<String, usize> = HashMap::new();
    for s in data.guest.iter().chain(&data.host) {
        let next = colors.len();
        colors.entry(s.label.clone()).or_insert(next);
    }
    draw_panel(
        &top,
        "Guest page faults (minor + major), accumulated per task",
        if data.shared_clock {
            "host time since the record's start (s)"
        } else {
            "guest time since the first sample (s)"
        },
        "faults",
        &data.guest,
        &colors,
        text,
    )?;
    draw_panel(
        &bottom,
        "Host KVM pf_taken (EPT/MMU faults) charged to each task, accumulated",
        "host time since the record's start (s)",
        "pf_taken",
        &data.host,
        &colors,
        text,
    )?;
    root.present().map_err(err)
}

fn draw_utilization<DB: DrawingBackend>(
    root: DrawingArea<DB, Shift>,
    points: &[UtilPoint],
    text: bool,
) -> DrawResult {
    root.fill(&WHITE).map_err(err)?;
    let x_max = points.iter().map(|p| p.tasks).max().unwrap_or(1) as f64 + 1.0;
    let y_max = points
        .iter()
        .map(|p| p.guest_cpu.max(p.vcpu_cpu) * 100.0)
        .fold(0.0f64, f64::max);
    let mut builder = ChartBuilder::on(&root);
    builder.margin(16);
    if text {
        builder
            .caption("CPU utilisation vs number of tasks", ("sans-serif", 26))
            .x_label_area_size(45)
            .y_label_area_size(70);
    } else {
        builder.x_label_area_size(8).y_label_area_size(8);
    }
    let mut chart = builder
        .build_cartesian_2d(0.0..x_max, 0.0..nice_max(y_max))
        .map_err(err)?;
    // A count of tasks (whole, non-negative); float-to-integer `as` saturates.
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    let x_labels = (x_max as usize + 1).min(21);
    let mut mesh = chart.configure_mesh();
    if text {
        mesh.x_desc("guest tasks in the record")
            .y_desc("utilisation (% of one CPU)")
            .label_style(("sans-serif", 15))
            .axis_desc_style(("sans-serif", 16))
            .x_labels(x_labels)
            .x_label_formatter(&|v| {
                if (v - v.round()).abs() < 1e-6 {
                    format!("{v:.0}")
                } else {
                    String::new()
                }
            })
            .y_label_formatter(&|v| short_number(*v));
    } else {
        mesh.x_labels(0).y_labels(0);
    }
    mesh.draw().map_err(err)?;
    let mut sorted = points.to_vec();
    sorted.sort_by_key(|p| p.tasks);
    type Pick = fn(&UtilPoint) -> f64;
    let lines: [(&str, Pick, RGBColor); 2] = [
        (
            "guest CPU (utime + stime of all tasks)",
            |p| p.guest_cpu,
            BLUE,
        ),
        ("vCPU threads on the host (user + sys)", |p| p.vcpu_cpu, RED),
    ];
    for (label, pick, color) in lines {
        let pts: Vec<(f64, f64)> = sorted
            .iter()
            .map(|p| (p.tasks as f64, pick(p) * 100.0))
            .collect();
        let drawn = chart
            .draw_series(LineSeries::new(pts.clone(), color.stroke_width(2)))
            .map_err(err)?;
        if text {
            drawn.label(label).legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(3))
            });
        }
        chart
            .draw_series(pts.iter().map(|&p| Circle::new(p, 5, color.filled())))
            .map_err(err)?;
    }
    if text {
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::LowerRight)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK.mix(0.4))
            .label_font(("sans-serif", 15))
            .draw()
            .map_err(err)?;
    }
    root.present().map_err(err)
}

const SIZE: (u32, u32) = (1280, 900);

fn write_both(
    prefix: &Path,
    suffix: &str,
    format: ImageFormat,
    written: &mut Vec<PathBuf>,
    png: impl Fn(DrawingArea<BitMapBackend<'_>, Shift>) -> DrawResult,
    svg: impl Fn(DrawingArea<SVGBackend<'_>, Shift>) -> DrawResult,
) -> Result<(), Error> {
    for ext in format.extensions() {
        let mut name = prefix.as_os_str().to_os_string();
        name.push(format!("-{suffix}.{ext}"));
        let path = PathBuf::from(name);
        let fail = |e: String| Error::new(format!("{}: cannot draw: {e}", path.display()));
        match *ext {
            "png" => png(BitMapBackend::new(&path, SIZE).into_drawing_area()).map_err(fail)?,
            _ => svg(SVGBackend::new(&path, SIZE).into_drawing_area()).map_err(fail)?,
        }
        written.push(path);
    }
    Ok(())
}

fn default_prefix(inputs: &[PathBuf]) -> PathBuf {
    match inputs {
        [one] => one.with_extension(""),
        many => many
            .first()
            .and_then(|p| p.parent())
            .unwrap_or(Path::new(""))
            .join("mirrorball"),
    }
}

/// Draws the plots of `opts`; returns the files written.
pub fn plot(opts: &PlotOptions) -> Result<Vec<PathBuf>, Error> {
    if opts.inputs.is_empty() {
        return Err(Error::new("no input record"));
    }
    let text = load_font(&opts.font)?;
    let prefix = opts
        .output
        .clone()
        .unwrap_or_else(|| default_prefix(&opts.inputs));
    let mut recordings = Vec::new();
    for path in &opts.inputs {
        let rec = read_record(path)?;
        if rec.guest().next().is_none() && rec.host().next().is_none() {
            return Err(Error::new(format!(
                "{}: no samples{}",
                path.display(),
                rec.first_error
                    .as_ref()
                    .map(|e| format!(" (first bad line: {e})"))
                    .unwrap_or_default()
            )));
        }
        recordings.push(rec);
    }
    let mut written = Vec::new();
    let several = recordings.len() > 1;
    for rec in &recordings {
        let data = accumulated_faults(rec);
        let stem = rec
            .path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        let title = match rec.meta() {
            Some(m) if !m.name.is_empty() => format!("{} (VM {}) — {stem}", m.name, m.vm),
            _ => format!("Faults over time — {stem}"),
        };
        let suffix = if several {
            format!("faults-{stem}")
        } else {
            "faults".into()
        };
        write_both(
            &prefix,
            &suffix,
            opts.format,
            &mut written,
            |a| draw_faults(a, &title, &data, text),
            |a| draw_faults(a, &title, &data, text),
        )?;
    }
    if several {
        let points: Vec<UtilPoint> = recordings.iter().map(utilization).collect();
        write_both(
            &prefix,
            "utilization",
            opts.format,
            &mut written,
            |a| draw_utilization(a, &points, text),
            |a| draw_utilization(a, &points, text),
        )?;
    }
    Ok(written)
}
