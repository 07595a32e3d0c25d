//! The embedded OS-less workload guest: parsing `work` specs, laying out its memory, loading the
//! image, and following its tasks through the doorbell.
use std::fmt;
use std::io::Cursor;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use linux_loader::loader::{elf::Elf, KernelLoader};
use mirrorball_devices::TaskSwitchSink;
use mirrorball_workload::{
    doorbell_task, Event, PageTracker, Params, Pattern, TaskParams, DEFAULT_ITERATIONS,
    IMAGE_END_GPA, IMAGE_GPA, MAX_TASKS, MAX_TASKS_PER_VCPU, PAGE_BYTES, PARAMS_GPA, STACKS_GPA,
    STACK_BYTES, TASK_READ_ONLY, TASK_REGION_BASE_GPA,
};
use vm_memory::{ByteValued, Bytes, GuestAddress, GuestMemoryMmap};

use crate::arch::x86_64::layout::MMIO_GAP_START;
use crate::exit::VmEnd;
use crate::vstate::vcpu::{ExitHandler, VcpuAction};

/// The guest image, built from `guest/workload-image` by this crate's build script.
pub static IMAGE: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/workload-image.elf"));

/// Largest region one task may ask for.
pub const MAX_TASK_MIB: u64 = 16 * 1024;
const REGION_ALIGN: u64 = 2 << 20;

/// Errors in a workload spec or while loading the guest.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum WorkloadError {
    /// The spec does not parse.
    #[error(
        "bad workload spec {spec:?}: {why} (expected \"work|read|update <MiB> <R|L> <accesses> [iterations]\")"
    )]
    Spec {
        /// The offending text.
        spec: String,
        /// What is wrong.
        why: String,
    },
    /// Too many tasks.
    #[error("{0} workload tasks requested; at most {MAX_TASKS} (one per vCPU)")]
    TooManyTasks(usize),
    /// Tasks and vCPUs do not fit together.
    #[error("{tasks} workload task(s) cannot run on {vcpus} vCPU(s): every vCPU needs a task and at most {MAX_TASKS_PER_VCPU} fit on one")]
    Assignment {
        /// Tasks.
        tasks: usize,
        /// vCPUs.
        vcpus: usize,
    },
    /// The image could not be loaded.
    #[error("cannot load the workload image: {0}")]
    Load(String),
    /// The tasks' regions do not fit in guest RAM below the 32-bit device hole.
    #[error("the workload needs {needed_mib} MiB of guest memory; the OS-less guest has at most {limit_mib} MiB (RAM below the device hole at 3 GiB)")]
    TooMuchMemory {
        /// What the tasks' regions and bitmaps need, MiB (rounded up).
        needed_mib: u64,
        /// What fits, MiB.
        limit_mib: u64,
    },
}

/// What a task does with its region.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum TaskMode {
    /// `work`: the classic read-modify-write, over memory that starts zeroed.
    #[default]
    Work,
    /// `read`: reads only, over a data set the VMM prepared in the region (in a template,
    /// shared by all clones).
    Read,
    /// `update`: read-modify-write over the prepared data set (every page it writes is copied).
    Update,
}

impl TaskMode {
    /// The spec verb.
    pub fn verb(self) -> &'static str {
        match self {
            Self::Work => "work",
            Self::Read => "read",
            Self::Update => "update",
        }
    }

    /// Whether the region holds a prepared data set.
    pub fn has_data_set(self) -> bool {
        self != Self::Work
    }
}

/// One task of the OS-less guest (the MP3 `work` program and its variants).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TaskSpec {
    /// What it does with its region.
    pub mode: TaskMode,
    /// MiB of memory the task works over.
    pub mib: u64,
    /// Access pattern.
    pub pattern: Pattern,
    /// Accesses per iteration.
    pub accesses: u64,
    /// Iterations (20 in the classic program).
    pub iterations: u32,
}

impl fmt::Display for TaskSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let p = if self.pattern == Pattern::Random {
            'R'
        } else {
            'L'
        };
        write!(
            f,
            "{} {} {} {}",
            self.mode.verb(),
            self.mib,
            p,
            self.accesses
        )?;
        if self.iterations != DEFAULT_ITERATIONS {
            write!(f, " {}", self.iterations)?;
        }
        Ok(())
    }
}

impl std::str::FromStr for TaskSpec {
    type Err = WorkloadError;

    /// Parses `work|read|update <MiB> <R|L> <accesses> [iterations]` (a missing verb means
    /// `work`).
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let bad = |why: &str| WorkloadError::Spec {
            spec: text.to_string(),
            why: why.to_string(),
        };
        let mut words: Vec<&str> = text.split_whitespace().collect();
        let mode = match words.first() {
            Some(&"read") => TaskMode::Read,
            Some(&"update") => TaskMode::Update,
            _ => TaskMode::Work,
        };
        if matches!(words.first(), Some(&"work" | &"read" | &"update")) {
            words.remove(0);
        }
        if !(3..=4).contains(&words.len()) {
            return Err(bad("wrong number of fields"));
        }
        let mib: u64 = words[0].parse().map_err(|_| bad("MiB is not a number"))?;
        if mib == 0 || mib > MAX_TASK_MIB {
            return Err(bad(&format!("MiB must be 1..={MAX_TASK_MIB}")));
        }
        let pattern = match words[1] {
            "R" | "r" => Pattern::Random,
            "L" | "l" => Pattern::Locality,
            _ => return Err(bad("pattern must be R or L")),
        };
        let accesses: u64 = words[2]
            .parse()
            .map_err(|_| bad("accesses is not a number"))?;
        let iterations = match words.get(3) {
            Some(w) => w.parse().map_err(|_| bad("iterations is not a number"))?,
            None => DEFAULT_ITERATIONS,
        };
        if iterations == 0 || iterations > 0xff_ffff {
            return Err(bad("iterations must be 1..=16777215"));
        }
        Ok(Self {
            mode,
            mib,
            pattern,
            accesses,
            iterations,
        })
    }
}

/// Where each task's region lives and how much RAM the guest needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WorkloadLayout {
    /// Per-task parameters, as written to the guest.
    pub tasks: Vec<TaskParams>,
    /// Per task: whether its region holds a prepared data set.
    pub data_sets: Vec<bool>,
    /// Bytes of guest RAM that hold everything.
    pub ram_bytes: u64,
}

/// The vCPU of task `task` when `tasks` tasks share `vcpus` vCPUs round robin.
pub fn task_vcpu(task: usize, vcpus: usize) -> usize {
    task % vcpus.max(1)
}

/// Lays out `specs` in guest memory, task `i` on vCPU `i % vcpus`: the task regions (2 MiB
/// aligned) from [`TASK_REGION_BASE_GPA`] up, then each task's page bitmap (the guest's
/// minor-fault bookkeeping, one bit per page of its region) in whole pages of its own.
pub fn layout(specs: &[TaskSpec], vcpus: usize) -> Result<WorkloadLayout, WorkloadError> {
    if specs.len() > MAX_TASKS {
        return Err(WorkloadError::TooManyTasks(specs.len()));
    }
    if vcpus == 0 || vcpus > specs.len() || specs.len() > vcpus * MAX_TASKS_PER_VCPU {
        return Err(WorkloadError::Assignment {
            tasks: specs.len(),
            vcpus,
        });
    }
    let mut next = TASK_REGION_BASE_GPA;
    let mut tasks = Vec::with_capacity(specs.len());
    for (i, spec) in specs.iter().enumerate() {
        let bytes = spec.mib << 20;
        tasks.push(TaskParams {
            region_gpa: next,
            region_bytes: bytes,
            accesses_per_iteration: spec.accesses,
            seed: 0x5eed_0000 + i as u64 * 0x9e37_79b9,
            iterations: spec.iterations,
            pattern: spec.pattern as u32,
            // Below the vCPU count, itself below `MAX_TASKS`.
            #[allow(clippy::cast_possible_truncation)]
            vcpu: task_vcpu(i, vcpus) as u32,
            flags: if spec.mode == TaskMode::Read {
                TASK_READ_ONLY
            } else {
                0
            },
            bitmap_gpa: 0,
            bitmap_bytes: 0,
        });
        next += bytes.div_ceil(REGION_ALIGN) * REGION_ALIGN;
    }
    for task in &mut tasks {
        let bytes = PageTracker::bitmap_bytes(task.region_bytes);
        task.bitmap_gpa = next;
        task.bitmap_bytes = bytes;
        next += bytes.div_ceil(PAGE_BYTES) * PAGE_BYTES;
    }
    // Regions are identity-mapped guest-physical ranges: they must stay below the device hole,
    // where the doorbells and the profiler region live.
    if next > MMIO_GAP_START {
        return Err(WorkloadError::TooMuchMemory {
            needed_mib: next.div_ceil(1 << 20),
            limit_mib: MMIO_GAP_START >> 20,
        });
    }
    Ok(WorkloadLayout {
        tasks,
        data_sets: specs.iter().map(|s| s.mode.has_data_set()).collect(),
        ram_bytes: next,
    })
}

// SAFETY: `Params` is `repr(C)` plain data (integers only) with no padding-dependent invariants.
#[derive(Clone, Copy, Default)]
#[repr(transparent)]
struct ParamsBytes(Params);
// SAFETY: see above; every bit pattern is a valid `Params`.
unsafe impl ByteValued for ParamsBytes {}

/// Where the guest finds the profiler's guest region, and how to turn its TSC into time.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProfilerParams {
    /// Guest-physical address of the guest region (0: no profiler).
    pub gpa: u64,
    /// Its length.
    pub len: u64,
    /// TSC frequency in kHz (0 if unknown).
    pub tsc_khz: u64,
}

/// Loads the image; returns the entry point.
pub fn load_image(mem: &GuestMemoryMmap) -> Result<u64, WorkloadError> {
    let loaded = Elf::load(mem, None, &mut Cursor::new(IMAGE), None)
        .map_err(|e| WorkloadError::Load(e.to_string()))?;
    if loaded.kernel_load.0 < IMAGE_GPA || loaded.kernel_end > IMAGE_END_GPA {
        return Err(WorkloadError::Load(format!(
            "image spans {:#x}..{:#x}, outside {IMAGE_GPA:#x}..{IMAGE_END_GPA:#x}",
            loaded.kernel_load.0, loaded.kernel_end
        )));
    }
    Ok(loaded.kernel_load.0)
}

/// Writes the parameter block of `layout`.
pub fn write_params(
    mem: &GuestMemoryMmap,
    layout: &WorkloadLayout,
    profiler: ProfilerParams,
) -> Result<(), WorkloadError> {
    let mut params = Params {
        // At most `MAX_TASKS` (checked by `layout`).
        #[allow(clippy::cast_possible_truncation)]
        task_count: layout.tasks.len() as u32,
        profiler_gpa: profiler.gpa,
        profiler_len: profiler.len,
        tsc_khz: profiler.tsc_khz,
        ..Default::default()
    };
    params.tasks[..layout.tasks.len()].copy_from_slice(&layout.tasks);
    mem.write_obj(ParamsBytes(params), GuestAddress(PARAMS_GPA))
        .map_err(|e| WorkloadError::Load(e.to_string()))
}

/// Loads the image and writes the parameter block; returns the entry point.
pub fn load(
    mem: &GuestMemoryMmap,
    layout: &WorkloadLayout,
    profiler: ProfilerParams,
) -> Result<u64, WorkloadError> {
    let entry = load_image(mem)?;
    write_params(mem, layout, profiler)?;
    Ok(entry)
}

/// The byte at `offset` of the data set of a `read` task with `seed`: what the VMM prepares and
/// what a host-side replay of the task's reads expects.
pub fn data_set_byte(seed: u64, offset: u64) -> u8 {
    data_set_word(seed, offset / 8).to_le_bytes()[(offset % 8) as usize]
}

/// Eight bytes of a data set: word `index` (bytes `8 * index ..`), a hash of seed and index.
fn data_set_word(seed: u64, index: u64) -> u64 {
    let mut x = seed ^ index.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    x ^= x >> 33;
    x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
    x ^= x >> 33;
    x
}

/// Fills the regions of the `read` and `update` tasks of `layout` with their data sets.
pub fn write_data_sets(
    mem: &GuestMemoryMmap,
    layout: &WorkloadLayout,
) -> Result<(), WorkloadError> {
    const CHUNK: u64 = 1 << 20;
    // `CHUNK` is 1 MiB.
    #[allow(clippy::cast_possible_truncation)]
    let mut buf = vec![0u8; CHUNK as usize];
    let data_sets = layout.tasks.iter().zip(&layout.data_sets);
    for t in data_sets.filter_map(|(t, &data)| data.then_some(t)) {
        let mut done = 0;
        while done < t.region_bytes {
            let n = (t.region_bytes - done).min(CHUNK);
            for (i, word) in buf[..n as usize].chunks_exact_mut(8).enumerate() {
                word.copy_from_slice(&data_set_word(t.seed, done / 8 + i as u64).to_le_bytes());
            }
            mem.write_slice(&buf[..n as usize], GuestAddress(t.region_gpa + done))
                .map_err(|e| WorkloadError::Load(e.to_string()))?;
            done += n;
        }
    }
    Ok(())
}

/// Initial stack pointer of task `index` (SysV: `rsp + 8` 16-byte aligned at entry).
pub fn stack_top(index: usize) -> u64 {
    STACKS_GPA + (index as u64 + 1) * STACK_BYTES - 8
}

/// What the VMM saw of one task.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TaskProgress {
    /// Iterations reported done.
    pub iterations: u32,
    /// From `Started` to `Finished` (or to the VM's end), nanoseconds.
    pub elapsed_ns: u64,
    /// Whether the task finished.
    pub finished: bool,
    /// Low 24 bits of the task's checksum.
    pub checksum: u32,
    /// Doorbell writes that did not decode.
    pub bad_events: u64,
    #[serde(skip)]
    started: Option<Instant>,
}

/// Follows every task through its doorbell; passes other exits on to `inner`.
pub struct WorkloadMonitor {
    tasks: Mutex<Vec<TaskProgress>>,
    task_vcpus: Vec<usize>,
    inner: Arc<dyn ExitHandler>,
    /// Told of every doorbell: each one ends a task's turn on its vCPU (a task switch).
    switches: std::sync::OnceLock<Arc<dyn TaskSwitchSink>>,
}

impl WorkloadMonitor {
    /// A monitor for `count` tasks, task `i` on vCPU `i`, in front of the VM's device handler.
    pub fn new(count: usize, inner: Arc<dyn ExitHandler>) -> Self {
        Self::with_vcpus((0..count).collect(), inner)
    }

    /// A monitor for tasks whose vCPUs are `task_vcpus`.
    pub fn with_vcpus(task_vcpus: Vec<usize>, inner: Arc<dyn ExitHandler>) -> Self {
        Self {
            tasks: Mutex::new(vec![TaskProgress::default(); task_vcpus.len()]),
            task_vcpus,
            inner,
            switches: std::sync::OnceLock::new(),
        }
    }

    /// Announces every doorbell of a task, on its own vCPU, to `sink` as a task switch (set
    /// once). The guest rings after each turn of a task and before the next task names itself
    /// in the vCPU's profiler slot, so the doorbell is exactly where one task's interval ends.
    pub fn set_switch_sink(&self, sink: Arc<dyn TaskSwitchSink>) {
        let _ = self.switches.set(sink);
    }

    /// A snapshot of every task's progress; unfinished tasks get their elapsed time so far.
    pub fn progress(&self) -> Vec<TaskProgress> {
        let mut tasks = self.tasks.lock().unwrap_or_else(|p| p.into_inner()).clone();
        for t in tasks.iter_mut().filter(|t| !t.finished) {
            if let Some(start) = t.started {
                t.elapsed_ns = u64::try_from(start.elapsed().as_nanos()).unwrap_or(u64::MAX);
            }
        }
        tasks
    }

    /// Carries `saved` progress (a snapshot's) over: the unfinished tasks' clocks go on from
    /// their elapsed time. Extra or missing entries are ignored.
    pub fn restore_progress(&self, saved: &[TaskProgress]) {
        let mut tasks = self.tasks.lock().unwrap_or_else(|p| p.into_inner());
        for (task, saved) in tasks.iter_mut().zip(saved) {
            *task = saved.clone();
            task.started = (saved.elapsed_ns > 0 || saved.iterations > 0).then(|| {
                Instant::now()
                    .checked_sub(Duration::from_nanos(saved.elapsed_ns))
                    .unwrap_or_else(Instant::now)
            });
        }
    }

    fn on_event(&self, vcpu: usize, index: usize, value: u32) -> VcpuAction {
        let mut tasks = self.tasks.lock().unwrap_or_else(|p| p.into_inner());
        // A task's doorbell only counts from the vCPU the task runs on.
        if self.task_vcpus.get(index) != Some(&vcpu) {
            return VcpuAction::Continue;
        }
        if let Some(sink) = self.switches.get() {
            sink.task_switch(vcpu);
        }
        let Some(task) = tasks.get_mut(index) else {
            return VcpuAction::Continue;
        };
        match Event::decode(value) {
            Some(Event::Started) => task.started = Some(Instant::now()),
            Some(Event::IterationDone(n)) => task.iterations = n,
            Some(Event::Finished(sum)) => {
                task.finished = true;
                task.checksum = sum;
                task.elapsed_ns = task.started.map_or(0, |s| {
                    u64::try_from(s.elapsed().as_nanos()).unwrap_or(u64::MAX)
                });
                if tasks.iter().all(|t| t.finished) {
                    return VcpuAction::StopVm(VmEnd::WorkloadFinished);
                }
                let vcpu_done = tasks
                    .iter()
                    .zip(&self.task_vcpus)
                    .all(|(t, &v)| v != vcpu || t.finished);
                return if vcpu_done {
                    VcpuAction::StopVcpu
                } else {
                    VcpuAction::Continue
                };
            }
            Some(Event::BadParams(code)) => {
                return VcpuAction::StopVm(VmEnd::WorkloadBadParams { vcpu, code })
            }
            None => task.bad_events += 1,
        }
        VcpuAction::Continue
    }
}

impl ExitHandler for WorkloadMonitor {
    fn io_in(&self, vcpu: usize, port: u16, data: &mut [u8]) -> VcpuAction {
        self.inner.io_in(vcpu, port, data)
    }

    fn io_out(&self, vcpu: usize, port: u16, data: &[u8]) -> VcpuAction {
        self.inner.io_out(vcpu, port, data)
    }

    fn mmio_read(&self, vcpu: usize, addr: u64, data: &mut [u8]) -> VcpuAction {
        self.inner.mmio_read(vcpu, addr, data)
    }

    fn mmio_write(&self, vcpu: usize, addr: u64, data: &[u8]) -> VcpuAction {
        if let (Some(task), [a, b, c, d]) = (doorbell_task(addr), data) {
            return self.on_event(vcpu, task, u32::from_le_bytes([*a, *b, *c, *d]));
        }
        self.inner.mmio_write(vcpu, addr, data)
    }
}

/// Time as seconds with millisecond precision, for summaries.
pub fn seconds(ns: u64) -> f64 {
    Duration::from_nanos(ns).as_secs_f64()
}

#[cfg(test)]
mod tests {
    use super::*;
    use mirrorball_workload::doorbell_gpa;

    struct Sink;
    impl ExitHandler for Sink {
        fn io_in(&self, _: usize, _: u16, _: &mut [u8]) -> VcpuAction {
            VcpuAction::Continue
        }
        fn io_out(&self, _: usize, _: u16, _: &[u8]) -> VcpuAction {
            VcpuAction::StopVcpu
        }
        fn mmio_read(&self, _: usize, _: u64, _: &mut [u8]) -> VcpuAction {
            VcpuAction::Continue
        }
        fn mmio_write(&self, _: usize, _: u64, _: &[u8]) -> VcpuAction {
            VcpuAction::Continue
        }
    }

    #[test]
    fn parses_classic_specs() {
        let t: TaskSpec = "work 64 R 100000".parse().expect("spec");
        assert_eq!(
            (t.mib, t.pattern, t.accesses, t.iterations),
            (64, Pattern::Random, 100_000, 20)
        );
        let t: TaskSpec = "8 L 10 3".parse().expect("spec");
        assert_eq!((t.mib, t.pattern, t.iterations), (8, Pattern::Locality, 3));
        assert_eq!(t.to_string(), "work 8 L 10 3");
        for bad in [
            "",
            "work",
            "work 0 R 1",
            "work 1 X 1",
            "work 1 R",
            "work x R 1",
            "work 1 R 1 0",
            "work 99999999 R 1",
        ] {
            assert!(bad.parse::<TaskSpec>().is_err(), "{bad:?} should not parse");
        }
    }

    #[test]
    fn layout_stays_below_the_device_hole() {
        let big: TaskSpec = "work 2048 R 1".parse().expect("spec");
        // 2 GiB fits; 2 x 2 GiB would run into the hole at 3 GiB.
        let one = layout(&[big], 1).expect("2 GiB fits");
        assert!(one.ram_bytes <= MMIO_GAP_START);
        match layout(&[big, big], 2) {
            Err(WorkloadError::TooMuchMemory {
                needed_mib,
                limit_mib,
            }) => {
                assert!(needed_mib > 4096, "{needed_mib}");
                assert_eq!(limit_mib, 3072);
            }
            other => panic!("expected TooMuchMemory, got {other:?}"),
        }
    }

    #[test]
    fn layout_gives_disjoint_aligned_regions() {
        let specs: Vec<TaskSpec> = ["work 3 R 1", "work 4 L 1"]
            .iter()
            .map(|s| s.parse().expect("spec"))
            .collect();
        let l = layout(&specs, 2).expect("layout");
        assert_eq!(l.tasks[0].region_gpa, TASK_REGION_BASE_GPA);
        assert_eq!((l.tasks[0].vcpu, l.tasks[1].vcpu), (0, 1));
        let shared = layout(&specs, 1).expect("layout");
        assert_eq!((shared.tasks[0].vcpu, shared.tasks[1].vcpu), (0, 0));
        assert!(matches!(
            layout(&specs, 3),
            Err(WorkloadError::Assignment { .. })
        ));
        assert!(matches!(
            layout(&specs, 0),
            Err(WorkloadError::Assignment { .. })
        ));
        let crowded = vec![specs[0]; MAX_TASKS_PER_VCPU + 1];
        assert!(matches!(
            layout(&crowded, 1),
            Err(WorkloadError::Assignment { .. })
        ));
        assert_eq!(l.tasks[1].region_gpa, TASK_REGION_BASE_GPA + (4 << 20));
        // Then a page of bitmap per task (3 MiB: 768 pages, 96 bytes; 4 MiB: 128 bytes).
        let bitmaps = TASK_REGION_BASE_GPA + (8 << 20);
        assert_eq!(
            (l.tasks[0].bitmap_gpa, l.tasks[0].bitmap_bytes),
            (bitmaps, 96)
        );
        assert_eq!(
            (l.tasks[1].bitmap_gpa, l.tasks[1].bitmap_bytes),
            (bitmaps + PAGE_BYTES, 128)
        );
        assert_eq!(l.ram_bytes, bitmaps + 2 * PAGE_BYTES);
        let params = Params {
            task_count: 2,
            tasks: {
                let mut t = [TaskParams::default(); MAX_TASKS];
                t[..2].copy_from_slice(&l.tasks);
                t
            },
            ..Default::default()
        };
        for i in 0..2 {
            assert_eq!(mirrorball_workload::validate(&params, i), Ok(l.tasks[i]));
        }
        assert_ne!(l.tasks[0].seed, l.tasks[1].seed);
        let many = vec![specs[0]; MAX_TASKS + 1];
        assert_eq!(
            layout(&many, MAX_TASKS + 1),
            Err(WorkloadError::TooManyTasks(MAX_TASKS + 1))
        );
    }

    #[test]
    fn image_loads_inside_its_window() {
        let specs = vec!["work 1 R 1".parse().expect("spec")];
        let l = layout(&specs, 1).expect("layout");
        let mem = GuestMemoryMmap::from_ranges(&[(
            GuestAddress(0),
            usize::try_from(l.ram_bytes).expect("fits"),
        )])
        .expect("mem");
        let entry = load(&mem, &l, ProfilerParams::default()).expect("load");
        assert_eq!(entry, IMAGE_GPA);
        let magic: u32 = mem.read_obj(GuestAddress(PARAMS_GPA)).expect("read");
        assert_eq!(magic, mirrorball_workload::PARAMS_MAGIC);
    }

    #[test]
    fn monitor_stops_a_vcpu_only_when_all_its_tasks_finished() {
        // Tasks 0 and 2 on vCPU 0, task 1 on vCPU 1.
        let m = WorkloadMonitor::with_vcpus(vec![0, 1, 0], Arc::new(Sink));
        let ring = |vcpu: usize, task: usize, e: Event| {
            m.mmio_write(vcpu, doorbell_gpa(task), &e.encode().to_le_bytes())
        };
        assert_eq!(ring(0, 0, Event::Finished(1)), VcpuAction::Continue);
        // Task 2's doorbell rung from the wrong vCPU is ignored.
        assert_eq!(ring(1, 2, Event::Finished(1)), VcpuAction::Continue);
        assert!(!m.progress()[2].finished);
        assert_eq!(ring(0, 2, Event::Finished(1)), VcpuAction::StopVcpu);
        assert_eq!(
            ring(1, 1, Event::Finished(1)),
            VcpuAction::StopVm(VmEnd::WorkloadFinished)
        );
    }

    #[test]
    fn every_doorbell_of_a_task_on_its_vcpu_announces_a_switch() {
        #[derive(Default)]
        struct Switches(Mutex<Vec<usize>>);
        impl TaskSwitchSink for Switches {
            fn task_switch(&self, vcpu: usize) {
                self.0.lock().expect("lock").push(vcpu);
            }
        }
        // Tasks 0 and 2 on vCPU 0, task 1 on vCPU 1.
        let m = WorkloadMonitor::with_vcpus(vec![0, 1, 0], Arc::new(Sink));
        let sink = Arc::new(Switches::default());
        m.set_switch_sink(sink.clone());
        let ring = |vcpu: usize, task: usize, e: Event| {
            m.mmio_write(vcpu, doorbell_gpa(task), &e.encode().to_le_bytes())
        };
        ring(0, 0, Event::Started);
        ring(0, 0, Event::IterationDone(1));
        ring(1, 1, Event::IterationDone(1));
        ring(0, 2, Event::IterationDone(1));
        // A task's doorbell rung from another vCPU announces nothing.
        ring(1, 2, Event::IterationDone(2));
        assert_eq!(*sink.0.lock().expect("lock"), vec![0, 0, 1, 0]);
    }

    #[test]
    fn monitor_tracks_events_and_ends_when_all_finish() {
        let m = WorkloadMonitor::new(2, Arc::new(Sink));
        let out = |m: &WorkloadMonitor, vcpu: usize, e: Event| {
            m.mmio_write(vcpu, doorbell_gpa(vcpu), &e.encode().to_le_bytes())
        };
        assert_eq!(out(&m, 0, Event::Started), VcpuAction::Continue);
        assert_eq!(out(&m, 0, Event::IterationDone(1)), VcpuAction::Continue);
        assert_eq!(out(&m, 0, Event::Finished(7)), VcpuAction::StopVcpu);
        assert_eq!(
            out(&m, 1, Event::Finished(8)),
            VcpuAction::StopVm(VmEnd::WorkloadFinished)
        );
        let p = m.progress();
        assert_eq!(
            (p[0].iterations, p[0].checksum, p[0].finished),
            (1, 7, true)
        );
        // Unknown events are counted, other ports go to the inner handler, bad vCPU ignored.
        assert_eq!(
            m.mmio_write(1, doorbell_gpa(1), &0xee00_0000u32.to_le_bytes()),
            VcpuAction::Continue
        );
        assert_eq!(m.progress()[1].bad_events, 1);
        assert_eq!(m.io_out(0, 0x80, &[1]), VcpuAction::StopVcpu);
        assert_eq!(out(&m, 9, Event::Started), VcpuAction::Continue);
        assert_eq!(
            out(&m, 1, Event::BadParams(2)),
            VcpuAction::StopVm(VmEnd::WorkloadBadParams { vcpu: 1, code: 2 })
        );
    }
}
