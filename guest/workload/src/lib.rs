//! The OS-less workload guest: its contract with the VMM and the `work` program's logic.
//!
//! The guest has no operating system. The VMM loads the image, writes a [`Params`] block at
//! [`PARAMS_GPA`], identity-maps guest memory and starts every vCPU directly in user mode (CPL3)
//! at the image's entry point with `rdi` = vCPU index and `rsi` = [`PARAMS_GPA`]. Each task is
//! the classic MP3 `work` program over its own memory region, and names the vCPU it runs on; a
//! vCPU with several tasks runs them in turns, one iteration each (a context switch the profiler
//! sees). Progress goes to the VMM through an MMIO doorbell: a 32-bit store encoded by [`Event`]
//! to [`doorbell_gpa`] of the task, an address with no memory behind it, so every store exits to
//! the VMM; the VMM timestamps every event, so the guest needs no clock. (MMIO rather than port I/O: a user-mode `out` needs RFLAGS.IOPL = 3,
//! which not every hypervisor preserves for user mode — PVM does not.)
//!
//! This crate is `no_std` so the guest image and the host share one definition, and the access
//! patterns can be unit-tested on the host.
#![no_std]

mod pages;

pub use pages::{run_iteration_tracked, BitmapTooSmall, PageTracker, PAGE_BYTES};

/// Guest-physical (= virtual) address of task 0's doorbell, where the guest stores 32-bit
/// [`Event`]s. It lies in the device hole below 4 GiB: mapped by the guest's page tables, backed
/// by no memory. Task `i` uses [`doorbell_gpa`]`(i)`.
pub const DOORBELL_GPA: u64 = 0xc000_0000;
/// Bytes between two tasks' doorbells.
pub const DOORBELL_STRIDE: u64 = 8;

/// The doorbell address of task `task`.
pub const fn doorbell_gpa(task: usize) -> u64 {
    DOORBELL_GPA + task as u64 * DOORBELL_STRIDE
}

/// The task whose doorbell `addr` is, if it is one.
pub fn doorbell_task(addr: u64) -> Option<usize> {
    let offset = addr.checked_sub(DOORBELL_GPA)?;
    let task = offset / DOORBELL_STRIDE;
    (offset % DOORBELL_STRIDE == 0 && task < MAX_TASKS as u64).then_some(task as usize)
}
/// Guest-physical address of the [`Params`] block.
pub const PARAMS_GPA: u64 = 0x0001_0000;
/// Guest-physical base of the per-vCPU stacks; stack `i` ends at `STACKS_GPA + (i + 1) * STACK_BYTES`.
pub const STACKS_GPA: u64 = 0x0010_0000;
/// Bytes of stack per vCPU.
pub const STACK_BYTES: u64 = 0x4000;
/// Guest-physical address the image is linked at (see the image's linker script).
pub const IMAGE_GPA: u64 = 0x0020_0000;
/// End of the area reserved for the image.
pub const IMAGE_END_GPA: u64 = 0x0040_0000;
/// First guest-physical address available for task memory regions.
pub const TASK_REGION_BASE_GPA: u64 = 0x0100_0000;
/// Most tasks one guest runs.
pub const MAX_TASKS: usize = 64;
/// Most tasks one vCPU runs.
pub const MAX_TASKS_PER_VCPU: usize = 16;
/// `Params::magic`: "MBWL".
pub const PARAMS_MAGIC: u32 = 0x4c57_424d;
/// `Params::version` of this layout.
pub const PARAMS_VERSION: u32 = 5;
/// [`TaskParams::flags`]: the task only reads its region (a data set the VMM prepared, e.g. in a
/// template shared by many VMs) instead of the classic read-modify-write.
pub const TASK_READ_ONLY: u32 = 1;
/// Guest-physical address where the VMM maps the profiler's guest region (in the device hole).
pub const PROFILER_REGION_GPA: u64 = 0xe000_0000;
/// Iterations of the classic `work` program.
pub const DEFAULT_ITERATIONS: u32 = 20;

/// How a task picks its next byte.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pattern {
    /// Uniformly random over the region (`R`).
    Random = 0,
    /// Next = previous + 1 or previous + rand() % 300, wrapping (`L`).
    Locality = 1,
}

impl Pattern {
    /// Decodes a pattern stored in [`TaskParams::pattern`].
    pub fn from_raw(raw: u32) -> Option<Self> {
        match raw {
            0 => Some(Self::Random),
            1 => Some(Self::Locality),
            _ => None,
        }
    }
}

/// One task's parameters, written by the VMM.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TaskParams {
    /// Guest-physical (= guest-virtual) start of the task's region.
    pub region_gpa: u64,
    /// Length of the region in bytes.
    pub region_bytes: u64,
    /// Accesses per iteration.
    pub accesses_per_iteration: u64,
    /// Seed of the task's random generator (non-zero).
    pub seed: u64,
    /// Number of iterations.
    pub iterations: u32,
    /// A [`Pattern`] as `u32`.
    pub pattern: u32,
    /// vCPU the task runs on.
    pub vcpu: u32,
    /// [`TASK_READ_ONLY`] or 0; other bits must be zero.
    pub flags: u32,
    /// Guest-physical (= guest-virtual) start of the task's page bitmap, where the guest keeps
    /// one bit per page of the region to count its guest minor faults ([`PageTracker`]); 0 if
    /// there is none (the guest then reports no faults). Outside every task's region.
    pub bitmap_gpa: u64,
    /// Length of the bitmap in bytes, at least [`PageTracker::bitmap_bytes`]`(region_bytes)`.
    pub bitmap_bytes: u64,
}

/// The block at [`PARAMS_GPA`].
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct Params {
    /// [`PARAMS_MAGIC`].
    pub magic: u32,
    /// [`PARAMS_VERSION`].
    pub version: u32,
    /// Tasks in use (`tasks[..task_count]`).
    pub task_count: u32,
    /// Reserved, zero.
    pub reserved: u32,
    /// Guest-physical address of the profiler's guest region, 0 if there is none.
    pub profiler_gpa: u64,
    /// Length of the profiler's guest region in bytes.
    pub profiler_len: u64,
    /// TSC frequency in kHz (0 if unknown): guest timestamps are TSC-derived.
    pub tsc_khz: u64,
    /// Per-task parameters.
    pub tasks: [TaskParams; MAX_TASKS],
}

impl Default for Params {
    fn default() -> Self {
        Self {
            magic: PARAMS_MAGIC,
            version: PARAMS_VERSION,
            task_count: 0,
            reserved: 0,
            profiler_gpa: 0,
            profiler_len: 0,
            tsc_khz: 0,
            tasks: [TaskParams::default(); MAX_TASKS],
        }
    }
}

/// What a task reports through the doorbell. Encoded as `kind << 24 | argument` (24-bit argument).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Event {
    /// The task starts its first iteration.
    Started,
    /// The task finished iteration `n` (1-based).
    IterationDone(u32),
    /// The task finished; the argument is the low 24 bits of its checksum.
    Finished(u32),
    /// The task found its parameters unusable; the argument is a [`BadParams`] code.
    BadParams(u32),
}

/// Codes carried by [`Event::BadParams`].
pub mod bad_params {
    /// The magic or version of [`super::Params`] is wrong.
    pub const HEADER: u32 = 1;
    /// The task index is not below `task_count`, or a vCPU has no task.
    pub const TASK_INDEX: u32 = 2;
    /// The region is empty or wraps, the pattern is unknown, or the page bitmap is too small,
    /// wraps or overlaps the region.
    pub const TASK: u32 = 3;
}

const ARG_MASK: u32 = 0x00ff_ffff;

impl Event {
    /// Encodes the event as the 32-bit doorbell value.
    pub fn encode(self) -> u32 {
        let (kind, arg) = match self {
            Self::Started => (1, 0),
            Self::IterationDone(n) => (2, n),
            Self::Finished(sum) => (3, sum),
            Self::BadParams(code) => (4, code),
        };
        (kind << 24) | (arg & ARG_MASK)
    }

    /// Decodes a doorbell value; `None` for an unknown kind.
    pub fn decode(value: u32) -> Option<Self> {
        let arg = value & ARG_MASK;
        match value >> 24 {
            1 => Some(Self::Started),
            2 => Some(Self::IterationDone(arg)),
            3 => Some(Self::Finished(arg)),
            4 => Some(Self::BadParams(arg)),
            _ => None,
        }
    }
}

/// The xorshift64* generator the tasks use (deterministic per seed).
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    /// A generator from `seed` (zero is replaced by a fixed non-zero value).
    pub fn new(seed: u64) -> Self {
        Self(if seed == 0 {
            0x9e37_79b9_7f4a_7c15
        } else {
            seed
        })
    }

    /// Next 64-bit value.
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// A value in `0..bound` (`bound` > 0).
    pub fn below(&mut self, bound: u64) -> u64 {
        self.next_u64() % bound
    }
}

/// The sequence of byte offsets one task touches.
#[derive(Clone, Debug)]
pub struct AccessStream {
    rng: Rng,
    pattern: Pattern,
    len: u64,
    previous: u64,
    writes: bool,
}

impl AccessStream {
    /// A stream over a region of `len` bytes (`len` > 0).
    pub fn new(pattern: Pattern, len: u64, seed: u64) -> Self {
        Self {
            rng: Rng::new(seed),
            pattern,
            len: len.max(1),
            previous: 0,
            writes: true,
        }
    }

    /// The same stream, with accesses that only read (`writes` false) or read-modify-write.
    pub fn with_writes(mut self, writes: bool) -> Self {
        self.writes = writes;
        self
    }

    /// The next offset into the region.
    pub fn next_offset(&mut self) -> u64 {
        let next = match self.pattern {
            Pattern::Random => self.rng.below(self.len),
            Pattern::Locality => {
                let step = if self.rng.next_u64() & 1 == 0 {
                    1
                } else {
                    self.rng.below(300)
                };
                (self.previous + step) % self.len
            }
        };
        self.previous = next;
        next
    }
}

/// Runs one iteration of `work` over `region`: `accesses` read-modify-writes of single bytes
/// (reads only, for a read-only stream).
/// Returns a checksum of the bytes read, so the accesses cannot be optimised away.
///
/// # Safety
/// `region` must be valid for reads and writes of `len` bytes for the whole call, and no other
/// reference may alias it.
pub unsafe fn run_iteration(
    region: *mut u8,
    len: u64,
    stream: &mut AccessStream,
    accesses: u64,
) -> u64 {
    // SAFETY: the caller's guarantees are this function's.
    unsafe { run_iteration_with(region, len, stream, accesses, |_| {}) }
}

/// [`run_iteration`] calling `before_access` with each offset just before it is accessed.
///
/// # Safety
/// As for [`run_iteration`].
pub(crate) unsafe fn run_iteration_with(
    region: *mut u8,
    len: u64,
    stream: &mut AccessStream,
    accesses: u64,
    mut before_access: impl FnMut(u64),
) -> u64 {
    let mut sum = 0u64;
    for _ in 0..accesses {
        let offset = stream.next_offset() % len.max(1);
        before_access(offset);
        // SAFETY: offset < len and the caller guarantees `region` is valid for `len` bytes.
        unsafe {
            // `offset < len`, and `region` spans `len` bytes of memory: it fits a `usize`.
            #[allow(clippy::cast_possible_truncation)]
            let byte = region.add(offset as usize);
            let value = core::ptr::read_volatile(byte);
            if stream.writes {
                core::ptr::write_volatile(byte, value.wrapping_add(1));
            }
            sum = sum.wrapping_add(u64::from(value));
        }
    }
    sum
}

/// Checks a task's parameters; `Err` carries a [`bad_params`] code.
pub fn validate(params: &Params, task: usize) -> Result<TaskParams, u32> {
    if params.magic != PARAMS_MAGIC || params.version != PARAMS_VERSION {
        return Err(bad_params::HEADER);
    }
    if task >= params.task_count as usize || task >= MAX_TASKS {
        return Err(bad_params::TASK_INDEX);
    }
    let t = params.tasks[task];
    let Some(region_end) = t.region_gpa.checked_add(t.region_bytes) else {
        return Err(bad_params::TASK);
    };
    if t.region_bytes == 0
        || Pattern::from_raw(t.pattern).is_none()
        || t.flags & !TASK_READ_ONLY != 0
    {
        return Err(bad_params::TASK);
    }
    if t.bitmap_gpa != 0 {
        let Some(bitmap_end) = t.bitmap_gpa.checked_add(t.bitmap_bytes) else {
            return Err(bad_params::TASK);
        };
        let overlaps = t.bitmap_gpa < region_end && t.region_gpa < bitmap_end;
        if t.bitmap_bytes < PageTracker::bitmap_bytes(t.region_bytes)
            || overlaps
            || usize::try_from(t.bitmap_bytes).is_err()
        {
            return Err(bad_params::TASK);
        }
    }
    Ok(t)
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use std::vec;

    #[test]
    fn event_encoding_round_trips() {
        for e in [
            Event::Started,
            Event::IterationDone(20),
            Event::Finished(0xab_cdef),
            Event::BadParams(bad_params::TASK),
        ] {
            assert_eq!(Event::decode(e.encode()), Some(e));
        }
        assert_eq!(Event::decode(0x7700_0000), None);
        assert_eq!(
            Event::IterationDone(0x1ff_ffff).encode() & ARG_MASK,
            0xff_ffff
        );
    }

    #[test]
    fn doorbells_name_their_task() {
        assert_eq!(doorbell_task(DOORBELL_GPA), Some(0));
        assert_eq!(doorbell_task(doorbell_gpa(5)), Some(5));
        assert_eq!(doorbell_task(doorbell_gpa(5) + 4), None);
        assert_eq!(doorbell_task(doorbell_gpa(MAX_TASKS)), None);
        assert_eq!(doorbell_task(DOORBELL_GPA - 8), None);
    }

    #[test]
    fn random_stream_stays_in_bounds_and_spreads() {
        let len = 1 << 20;
        let mut s = AccessStream::new(Pattern::Random, len, 7);
        let mut pages = std::collections::BTreeSet::new();
        for _ in 0..10_000 {
            let o = s.next_offset();
            assert!(o < len);
            pages.insert(o / 4096);
        }
        // 10k uniform draws over 256 pages touch all of them.
        assert_eq!(pages.len(), 256);
    }

    #[test]
    fn locality_stream_moves_by_small_steps() {
        let len = 1 << 20;
        let mut s = AccessStream::new(Pattern::Locality, len, 3);
        let mut prev = 0;
        let mut ones = 0;
        for _ in 0..10_000 {
            let o = s.next_offset();
            let step = (o + len - prev) % len;
            assert!(step < 300, "step {step}");
            if step == 1 {
                ones += 1;
            }
            prev = o;
        }
        assert!(ones > 4_000, "about half the steps are +1, got {ones}");
    }

    #[test]
    fn iteration_touches_region_and_is_deterministic() {
        let mut a = vec![0u8; 8192];
        let mut b = vec![0u8; 8192];
        let mut sa = AccessStream::new(Pattern::Random, 8192, 11);
        let mut sb = AccessStream::new(Pattern::Random, 8192, 11);
        // SAFETY: the vectors are valid for their lengths and not aliased.
        let (x, y) = unsafe {
            (
                run_iteration(a.as_mut_ptr(), 8192, &mut sa, 5000),
                run_iteration(b.as_mut_ptr(), 8192, &mut sb, 5000),
            )
        };
        assert_eq!(x, y);
        assert_eq!(a, b);
        let total: u64 = a.iter().map(|&v| u64::from(v)).sum();
        assert_eq!(total, 5000);
    }

    #[test]
    fn validation_rejects_bad_blocks() {
        let mut p = Params::default();
        assert_eq!(validate(&p, 0), Err(bad_params::TASK_INDEX));
        p.task_count = 1;
        assert_eq!(validate(&p, 0), Err(bad_params::TASK));
        p.tasks[0] = TaskParams {
            region_gpa: TASK_REGION_BASE_GPA,
            region_bytes: 4096,
            accesses_per_iteration: 1,
            seed: 1,
            iterations: 1,
            pattern: 1,
            vcpu: 0,
            flags: 0,
            bitmap_gpa: 0,
            bitmap_bytes: 0,
        };
        assert!(validate(&p, 0).is_ok(), "no bitmap: no fault counting");
        p.tasks[0].flags = TASK_READ_ONLY;
        assert!(validate(&p, 0).is_ok(), "read-only");
        p.tasks[0].flags = 2;
        assert_eq!(validate(&p, 0), Err(bad_params::TASK), "unknown flag");
        p.tasks[0].flags = 0;
        p.tasks[0].bitmap_gpa = TASK_REGION_BASE_GPA + 4096;
        p.tasks[0].bitmap_bytes = 1;
        assert!(validate(&p, 0).is_ok());
        p.tasks[0].bitmap_bytes = 0;
        assert_eq!(validate(&p, 0), Err(bad_params::TASK), "bitmap too small");
        p.tasks[0].bitmap_bytes = 1;
        p.tasks[0].region_bytes = 4097;
        assert_eq!(
            validate(&p, 0),
            Err(bad_params::TASK),
            "bitmap in the region"
        );
        p.tasks[0].bitmap_gpa = TASK_REGION_BASE_GPA - 1;
        p.tasks[0].bitmap_bytes = 2;
        p.tasks[0].region_bytes = 4096;
        assert_eq!(
            validate(&p, 0),
            Err(bad_params::TASK),
            "bitmap overlaps its start"
        );
        p.tasks[0].bitmap_bytes = 1;
        assert!(
            validate(&p, 0).is_ok(),
            "bitmap ends where the region starts"
        );
        p.tasks[0].bitmap_gpa = u64::MAX;
        assert_eq!(validate(&p, 0), Err(bad_params::TASK), "bitmap wraps");
        p.tasks[0].bitmap_gpa = TASK_REGION_BASE_GPA - 2;
        assert!(validate(&p, 0).is_ok(), "bitmap just below the region");
        p.tasks[0].region_gpa = u64::MAX - 100;
        assert_eq!(validate(&p, 0), Err(bad_params::TASK), "region wraps");
        p.tasks[0].region_gpa = TASK_REGION_BASE_GPA;
        p.tasks[0].pattern = 9;
        assert_eq!(validate(&p, 0), Err(bad_params::TASK));
        p.magic = 0;
        assert_eq!(validate(&p, 0), Err(bad_params::HEADER));
    }
}
