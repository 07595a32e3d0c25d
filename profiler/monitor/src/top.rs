//! `vmm top`: every running VM of the run directory, refreshed at an interval.
//!
//! One table: per VM a summary row, then its vCPUs (host figures: KVM `pf_taken` = EPT/MMU
//! faults, host faults and CPU of the vCPU thread, the task it runs), then its guest tasks
//! (guest minor and major faults from the guest's absolute counters, guest CPU, and the host
//! costs charged to the task). The last column is a sparkline of the sort column's history.
//! Below, sparklines of the selected VM. Keys: `q`/Esc/Ctrl-C quit, `s` next sort column,
//! `r` reverse, `/` filter tasks by name (Enter applies, Esc clears), ↑/↓/PgUp/PgDn/Home/End
//! move. The screen is redrawn once per interval (default 500 ms) and on a key.
//! [`run_headless`] runs the same refresh loop without a terminal (benchmarks, tests).

use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ratatui::crossterm::event::{self, Event, KeyCode, KeyEvent, KeyEventKind, KeyModifiers};
use ratatui::layout::Rect;
use ratatui::widgets::TableState;

use crate::fleet::Fleet;
use crate::model::{History, ModelConfig, TaskStats, VcpuStats, VmModel};
use crate::rundir::VmId;

mod render;
pub use render::sparkline_text;

/// What the table is sorted by.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SortKey {
    /// vCPU index / task id.
    Id,
    /// Guest minor faults/s.
    MinFlt,
    /// Guest major faults/s.
    MajFlt,
    /// KVM `pf_taken`/s.
    Ept,
    /// Host faults/s.
    HostFlt,
    /// CPU.
    Cpu,
}

impl SortKey {
    /// Every key, in the order `s` cycles through them.
    pub const ALL: [SortKey; 6] = [
        SortKey::Id,
        SortKey::MinFlt,
        SortKey::MajFlt,
        SortKey::Ept,
        SortKey::HostFlt,
        SortKey::Cpu,
    ];

    /// Column title.
    pub fn title(self) -> &'static str {
        match self {
            SortKey::Id => "ID",
            SortKey::MinFlt => "MINFLT/s",
            SortKey::MajFlt => "MAJFLT/s",
            SortKey::Ept => "EPT/s",
            SortKey::HostFlt => "HOSTFLT/s",
            SortKey::Cpu => "CPU%",
        }
    }

    fn next(self) -> Self {
        let i = Self::ALL.iter().position(|k| *k == self).unwrap_or(0);
        Self::ALL[(i + 1) % Self::ALL.len()]
    }

    fn task_value(self, t: &TaskStats) -> f64 {
        match self {
            SortKey::Id => f64::from(t.key.task_id),
            SortKey::MinFlt => t.rates.min_flt,
            SortKey::MajFlt => t.rates.maj_flt,
            SortKey::Ept => t.rates.ept,
            SortKey::HostFlt => t.rates.host_flt,
            SortKey::Cpu => t.rates.cpu,
        }
    }

    fn vcpu_value(self, v: &VcpuStats) -> f64 {
        match self {
            SortKey::Ept => v.rates.ept,
            SortKey::HostFlt => v.rates.host_flt,
            SortKey::Cpu => v.rates.util,
            _ => f64::from(v.index),
        }
    }

    fn task_history(self, t: &TaskStats) -> &History {
        match self {
            SortKey::MinFlt => &t.history.min_flt,
            SortKey::MajFlt => &t.history.maj_flt,
            SortKey::HostFlt => &t.history.host_flt,
            SortKey::Cpu => &t.history.cpu,
            SortKey::Id | SortKey::Ept => &t.history.ept,
        }
    }

    fn vcpu_history(self, v: &VcpuStats) -> &History {
        match self {
            SortKey::HostFlt => &v.history.host_flt,
            SortKey::Cpu => &v.history.util,
            _ => &v.history.ept,
        }
    }

    fn vm_history(self, vm: &VmModel) -> &History {
        match self {
            SortKey::MinFlt | SortKey::MajFlt => &vm.history.guest_flt,
            SortKey::HostFlt => &vm.history.host_flt,
            SortKey::Cpu => &vm.history.vcpu_util,
            SortKey::Id | SortKey::Ept => &vm.history.ept,
        }
    }
}

/// What a row of the table shows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RowRef {
    /// A VM's summary.
    Vm(VmId),
    /// A vCPU.
    Vcpu(VmId, u32),
    /// A guest task.
    Task(VmId, crate::model::TaskKey),
}

/// What a key did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// Nothing to redraw.
    None,
    /// Redraw.
    Redraw,
    /// Leave.
    Quit,
}

/// The state of `vmm top`.
pub struct App {
    /// The VMs.
    pub fleet: Fleet,
    /// Sort column.
    pub sort: SortKey,
    /// Largest first (default) or smallest first.
    pub descending: bool,
    /// Task-name filter (case-insensitive substring).
    pub filter: String,
    /// Some while the filter is being typed.
    pub editing: Option<String>,
    /// Refresh interval.
    pub interval: Duration,
    /// Selected row.
    pub table: TableState,
}

impl App {
    /// Watches `run_dir`, refreshing every `interval`.
    pub fn new(run_dir: &Path, interval: Duration) -> Self {
        let cfg = ModelConfig {
            history: 120,
            ..ModelConfig::default()
        };
        let mut table = TableState::default();
        table.select(Some(0));
        Self {
            fleet: Fleet::new(run_dir, cfg),
            sort: SortKey::Ept,
            descending: true,
            filter: String::new(),
            editing: None,
            interval,
            table,
        }
    }

    fn matches(&self, t: &TaskStats) -> bool {
        self.filter.is_empty()
            || t.label()
                .to_lowercase()
                .contains(&self.filter.to_lowercase())
    }

    fn order(&self, a: f64, b: f64) -> std::cmp::Ordering {
        if self.descending && self.sort != SortKey::Id {
            b.total_cmp(&a)
        } else {
            a.total_cmp(&b)
        }
    }

    /// The table's rows, in display order.
    pub fn rows(&self) -> Vec<RowRef> {
        let mut rows = Vec::new();
        for (id, vm) in &self.fleet.model.vms {
            rows.push(RowRef::Vm(*id));
            let mut vcpus: Vec<&VcpuStats> = vm.vcpus.values().collect();
            vcpus.sort_by(|a, b| {
                self.order(self.sort.vcpu_value(a), self.sort.vcpu_value(b))
                    .then(a.index.cmp(&b.index))
            });
            rows.extend(vcpus.iter().map(|v| RowRef::Vcpu(*id, v.index)));
            let mut tasks: Vec<&TaskStats> =
                vm.tasks.values().filter(|t| self.matches(t)).collect();
            tasks.sort_by(|a, b| {
                self.order(self.sort.task_value(a), self.sort.task_value(b))
                    .then(a.key.cmp(&b.key))
            });
            rows.extend(tasks.iter().map(|t| RowRef::Task(*id, t.key)));
        }
        rows
    }

    /// Handles one key.
    pub fn on_key(&mut self, key: KeyEvent) -> Action {
        if key.kind != KeyEventKind::Press {
            return Action::None;
        }
        if let Some(text) = &mut self.editing {
            match key.code {
                KeyCode::Enter => {
                    self.filter = self.editing.take().unwrap_or_default();
                }
                KeyCode::Esc => {
                    self.editing = None;
                    self.filter.clear();
                }
                KeyCode::Backspace => {
                    text.pop();
                }
                KeyCode::Char('c') if key.modifiers.contains(KeyModifiers::CONTROL) => {
                    return Action::Quit
                }
                KeyCode::Char(c) if !c.is_control() && text.chars().count() < 32 => text.push(c),
                _ => return Action::None,
            }
            self.table.select(Some(0));
            return Action::Redraw;
        }
        let rows = self.rows().len();
        let sel = self.table.selected().unwrap_or(0);
        match key.code {
            KeyCode::Char('q') | KeyCode::Esc => return Action::Quit,
            KeyCode::Char('c') if key.modifiers.contains(KeyModifiers::CONTROL) => {
                return Action::Quit
            }
            KeyCode::Char('s') => self.sort = self.sort.next(),
            KeyCode::Char('r') => self.descending = !self.descending,
            KeyCode::Char('/') => self.editing = Some(self.filter.clone()),
            KeyCode::Down | KeyCode::Char('j') => self
                .table
                .select(Some((sel + 1).min(rows.saturating_sub(1)))),
            KeyCode::Up | KeyCode::Char('k') => self.table.select(Some(sel.saturating_sub(1))),
            KeyCode::PageDown => self
                .table
                .select(Some((sel + 10).min(rows.saturating_sub(1)))),
            KeyCode::PageUp => self.table.select(Some(sel.saturating_sub(10))),
            KeyCode::Home => self.table.select(Some(0)),
            KeyCode::End => self.table.select(Some(rows.saturating_sub(1))),
            _ => return Action::None,
        }
        Action::Redraw
    }

    fn selected_vm(&self, rows: &[RowRef]) -> Option<VmId> {
        let sel = self
            .table
            .selected()
            .unwrap_or(0)
            .min(rows.len().saturating_sub(1));
        rows.get(sel).map(|r| match r {
            RowRef::Vm(id) | RowRef::Vcpu(id, _) | RowRef::Task(id, _) => *id,
        })
    }
}

/// Options of `vmm top`.
#[derive(Clone, Debug)]
pub struct TopOptions {
    /// Run directory.
    pub run_dir: PathBuf,
    /// Refresh interval.
    pub interval: Duration,
}

/// Shortest refresh interval `vmm top` accepts.
pub const MIN_INTERVAL: Duration = Duration::from_millis(50);

/// When the refresh after the one due at `due` is due, at `now`: one interval later, but at
/// least half an interval from now (a late refresh does not trigger a burst of catch-ups).
fn next_refresh(due: Instant, now: Instant, interval: Duration) -> Instant {
    (due + interval).max(now + interval / 2)
}

/// What [`run_headless`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HeadlessReport {
    /// Refreshes done, each followed by a redraw.
    pub frames: u64,
    /// Bytes of terminal output (escape sequences and text) the redraws produced.
    pub bytes: u64,
    /// VMs attached at the end.
    pub vms: usize,
    /// Guest and host samples the model ingested from the VMs attached at the end.
    pub samples: u64,
}

/// Counts what goes through it.
struct Counting<W> {
    inner: W,
    bytes: std::rc::Rc<std::cell::Cell<u64>>,
}

impl<W: io::Write> io::Write for Counting<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.bytes.set(self.bytes.get() + n as u64);
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Runs `vmm top`'s refresh loop without a terminal, for `duration`: the same [`App`], refresh
/// ([`Fleet::tick`]) and drawing ([`App::render`] through ratatui's crossterm backend) every
/// `opts.interval`, with the terminal output going to `out` (e.g. [`io::sink`]) for a screen of
/// `width` × `height` cells. No keys are read. For benchmarks and tests: what the dashboard costs
/// is the CPU time of the calling thread.
pub fn run_headless(
    opts: &TopOptions,
    width: u16,
    height: u16,
    duration: Duration,
    out: impl io::Write,
) -> io::Result<HeadlessReport> {
    use ratatui::backend::CrosstermBackend;
    use ratatui::{Terminal, TerminalOptions, Viewport};
    let interval = opts.interval.max(MIN_INTERVAL);
    let mut app = App::new(&opts.run_dir, interval);
    let bytes = std::rc::Rc::new(std::cell::Cell::new(0));
    let mut terminal = Terminal::with_options(
        CrosstermBackend::new(Counting {
            inner: out,
            bytes: bytes.clone(),
        }),
        TerminalOptions {
            viewport: Viewport::Fixed(Rect::new(0, 0, width, height)),
        },
    )?;
    let end = Instant::now() + duration;
    let mut frames = 0;
    let mut next = Instant::now();
    loop {
        let now = Instant::now();
        if now >= end {
            break;
        }
        if now >= next {
            app.fleet.tick();
            terminal.draw(|f| app.render(f))?;
            frames += 1;
            next = next_refresh(next, now, interval);
            continue;
        }
        std::thread::sleep(next.min(end) - now);
    }
    // Dropping the terminal shows the cursor again: count that output too.
    drop(terminal);
    Ok(HeadlessReport {
        frames,
        bytes: bytes.get(),
        vms: app.fleet.ids().count(),
        samples: app
            .fleet
            .model
            .vms
            .values()
            .map(|vm| vm.guest_samples + vm.host_samples)
            .sum(),
    })
}

/// Set by SIGTERM, SIGHUP and SIGINT while [`run`] owns the terminal.
static TERMINATED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

extern "C" fn on_terminate(_: libc::c_int) {
    TERMINATED.store(true, std::sync::atomic::Ordering::SeqCst);
}

/// Makes SIGTERM, SIGHUP and SIGINT end the loop (so the terminal is restored) instead of
/// killing the process with the terminal left raw.
fn catch_termination() {
    for signal in [libc::SIGTERM, libc::SIGHUP, libc::SIGINT] {
        // SAFETY: installs a handler that only stores to an atomic.
        unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = on_terminate as *const () as usize;
            libc::sigemptyset(&mut action.sa_mask);
            libc::sigaction(signal, &action, std::ptr::null_mut());
        }
    }
}

/// Longest wait for a key before the termination flag is looked at again.
const SIGNAL_CHECK: Duration = Duration::from_millis(100);

/// Runs `vmm top` on the terminal until the user quits, or SIGTERM/SIGHUP/SIGINT arrives (the
/// terminal is restored either way).
pub fn run(opts: &TopOptions) -> io::Result<()> {
    use std::io::IsTerminal;
    use std::sync::atomic::Ordering;
    if !io::stdout().is_terminal() || !io::stdin().is_terminal() {
        return Err(io::Error::other(
            "needs a terminal (standard input and output must be a TTY); for scripts use \
             `vmm record` or `vmm prometheus`",
        ));
    }
    let interval = opts.interval.max(MIN_INTERVAL);
    let mut app = App::new(&opts.run_dir, interval);
    catch_termination();
    let mut terminal = ratatui::try_init()?;
    let result = (|| -> io::Result<()> {
        app.fleet.tick();
        let mut next = Instant::now() + interval;
        let mut dirty = true;
        loop {
            if TERMINATED.load(Ordering::SeqCst) {
                return Ok(());
            }
            if dirty {
                terminal.draw(|f| app.render(f))?;
                dirty = false;
            }
            let now = Instant::now();
            if now >= next {
                app.fleet.tick();
                next = next_refresh(next, now, interval);
                dirty = true;
                continue;
            }
            if event::poll((next - now).min(SIGNAL_CHECK))? {
                match event::read()? {
                    Event::Key(k) => match app.on_key(k) {
                        Action::Quit => return Ok(()),
                        Action::Redraw => dirty = true,
                        Action::None => {}
                    },
                    Event::Resize(..) => dirty = true,
                    _ => {}
                }
            }
        }
    })();
    ratatui::restore();
    result
}
