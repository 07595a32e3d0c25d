//! An opened VM: both regions mapped read-only, validated, and read with ring readers.

use std::io;
use std::path::PathBuf;

use mirrorball_profiler_abi::{
    validate_guest_region, validate_host_region, AbiError, GuestRegionView, GuestSample,
    HostRegionView, HostSample, Poll, ReadError, RingReader, RingView, SeqRecord, TaskInfo,
    VcpuState, TASK_FREE,
};

use crate::mapping::Mapping;
use crate::rundir::{pid_alive, VmHandle, VmId, VmMeta};

/// Why a VM could not be opened or read.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// A file could not be opened, inspected or mapped.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// What failed.
        source: io::Error,
    },
    /// A file is not a valid region of its kind.
    #[error("{}: not a valid {kind} region: {error}", path.display())]
    Invalid {
        /// The file.
        path: PathBuf,
        /// `"guest"` or `"host"`.
        kind: &'static str,
        /// What validation rejected.
        error: AbiError,
    },
}

/// Which ring.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Ring {
    /// The guest sample ring.
    Guest,
    /// The host sample ring.
    Host,
}

impl Ring {
    /// `"guest"` or `"host"`.
    pub fn as_str(&self) -> &'static str {
        match self {
            Ring::Guest => "guest",
            Ring::Host => "host",
        }
    }
}

/// Records a reader had to skip.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Loss {
    /// The ring.
    pub ring: Ring,
    /// First lost sequence number.
    pub first: u64,
    /// Records lost.
    pub count: u64,
}

/// What one [`OpenVm::poll`] read.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Batch {
    /// New guest samples, in sequence order (values are guest claims).
    pub guest: Vec<SeqRecord<GuestSample>>,
    /// New host samples, in sequence order.
    pub host: Vec<SeqRecord<HostSample>>,
    /// Guest records lost since the previous poll.
    pub lost_guest: u64,
    /// Host records lost since the previous poll.
    pub lost_host: u64,
    /// Each gap, in order.
    pub losses: Vec<Loss>,
    /// Times a ring's head went backwards (reformatted or misbehaving writer).
    pub regressed: u64,
    /// Host `CLOCK_MONOTONIC` when the poll started, ns.
    pub read_ns: u64,
    /// True if a ring had more records than the poll's limit (poll again soon).
    pub truncated: bool,
}

/// Limits of one poll.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PollLimits {
    /// Most ring steps (records or gaps) taken on the guest ring.
    pub guest_steps: usize,
    /// Most ring steps taken on the host ring.
    pub host_steps: usize,
}

impl Default for PollLimits {
    fn default() -> Self {
        Self {
            guest_steps: 1 << 16,
            host_steps: 1 << 16,
        }
    }
}

/// Whether the VM behind an [`OpenVm`] is still there.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VmStatus {
    /// Files present, process alive.
    Running,
    /// The VM ended (its files were removed or its process is gone), or a file shrank. The
    /// mappings stay readable (except after a shrink): drain with a last poll.
    Ended(String),
}

/// One vCPU slot as read now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VcpuRow {
    /// vCPU index.
    pub index: u32,
    /// The slot (guest claim), or why it could not be read consistently.
    pub state: Result<VcpuState, ReadError>,
}

/// Host `CLOCK_MONOTONIC`, ns (the host samples' clock).
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: writes one timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    u64::try_from(ts.tv_sec)
        .unwrap_or(0)
        .saturating_mul(1_000_000_000)
        .saturating_add(u64::try_from(ts.tv_nsec).unwrap_or(0))
}

/// The validated guest region and its ring reader.
struct GuestSide {
    view: GuestRegionView<'static>,
    reader: RingReader<'static, GuestSample>,
}

/// A running VM's two regions, mapped read-only and validated.
///
/// Every value read from the guest region is a guest claim: consistent (seqlock and sequence
/// checked by the ABI crate) but not trustworthy. Reads are bounds-checked and bounded in time.
/// A guest region that does not validate (the guest broke its own header) does not hide the VM:
/// it opens with the host side only, and [`OpenVm::guest_error`] says why.
pub struct OpenVm {
    handle: VmHandle,
    // The views and readers point into the mappings below. They are private, only lent out with
    // the lifetime of `&self`, and the mappings are dropped after them (field order).
    guest: Option<GuestSide>,
    guest_error: Option<String>,
    host_view: HostRegionView<'static>,
    host_reader: RingReader<'static, HostSample>,
    guest_header_changes: u64,
    host_header_changes: u64,
    last_header_error: Option<String>,
    regressed: u64,
    guest_map: Mapping,
    host_map: Mapping,
}

impl std::fmt::Debug for OpenVm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpenVm")
            .field("id", &self.handle.id)
            .field("guest_bytes", &self.guest_map.len())
            .field("host_bytes", &self.host_map.len())
            .finish_non_exhaustive()
    }
}

impl OpenVm {
    /// Maps and validates both regions of `handle`. Readers start at the oldest record each ring
    /// still holds, but no further back than three quarters of its capacity: the quarter left
    /// is slack for the writer while the first poll catches up, so a full ring does not start
    /// with losses.
    pub fn open(handle: VmHandle) -> Result<Self, OpenError> {
        let io = |path: PathBuf| move |source| OpenError::Io { path, source };
        let guest_path = handle.guest_path();
        let host_path = handle.host_path();
        let guest_map = Mapping::open_read(&guest_path).map_err(io(guest_path.clone()))?;
        let host_map = Mapping::open_read(&host_path).map_err(io(host_path.clone()))?;
        // SAFETY: the regions (and the views and readers made from them) are stored next to
        // their mappings in `Self`, never handed out with a lifetime longer than `&self`, and
        // the mappings are dropped last.
        let guest_region = unsafe { guest_map.region_static() }.map_err(io(guest_path.clone()))?;
        // SAFETY: as above.
        let host_region = unsafe { host_map.region_static() }.map_err(io(host_path.clone()))?;
        let (guest, guest_error) = match validate_guest_region(guest_region) {
            Ok(view) => (
                Some(GuestSide {
                    view,
                    reader: start_reader(view.ring()),
                }),
                None,
            ),
            Err(error) => (
                None,
                Some(
                    OpenError::Invalid {
                        path: guest_path,
                        kind: "guest",
                        error,
                    }
                    .to_string(),
                ),
            ),
        };
        let host_view = validate_host_region(host_region).map_err(|error| OpenError::Invalid {
            path: host_path,
            kind: "host",
            error,
        })?;
        Ok(Self {
            handle,
            guest,
            guest_error,
            host_reader: start_reader(host_view.ring()),
            host_view,
            guest_header_changes: 0,
            host_header_changes: 0,
            last_header_error: None,
            regressed: 0,
            guest_map,
            host_map,
        })
    }

    /// The VM's id.
    pub fn id(&self) -> VmId {
        self.handle.id
    }

    /// The handle it was opened from.
    pub fn handle(&self) -> &VmHandle {
        &self.handle
    }

    /// The metadata, if present.
    pub fn meta(&self) -> Option<&VmMeta> {
        self.handle.meta.as_ref()
    }

    /// The validated guest region (guest-writable), `None` if it did not validate.
    pub fn guest_view(&self) -> Option<GuestRegionView<'_>> {
        self.guest.as_ref().map(|g| g.view)
    }

    /// Why the guest region did not validate at open (the VM is then read from its host region
    /// only), or `None` when it did.
    pub fn guest_error(&self) -> Option<&str> {
        self.guest_error.as_deref()
    }

    /// The validated host region.
    pub fn host_view(&self) -> HostRegionView<'_> {
        self.host_view
    }

    /// vCPUs according to the host region (the trusted one).
    pub fn vcpu_count(&self) -> u32 {
        self.host_view.vcpu_count()
    }

    /// The guest sampler's period as the guest publishes it, ns (0 = unknown).
    pub fn guest_period_ns(&self) -> u64 {
        self.guest.as_ref().map_or(0, |g| g.view.sample_period_ns())
    }

    /// The host sampler's period, ns (0 = unknown).
    pub fn host_period_ns(&self) -> u64 {
        self.host_view.sample_period_ns()
    }

    /// Every vCPU slot of the guest region, read now.
    pub fn vcpus(&self) -> Vec<VcpuRow> {
        let Some(g) = &self.guest else {
            return Vec::new();
        };
        (0..g.view.vcpu_count())
            .map(|index| VcpuRow {
                index,
                state: g.view.vcpu(index),
            })
            .collect()
    }

    /// Task-table entry `task_id`, read now (bounds-checked).
    pub fn task(&self, task_id: u32) -> Result<TaskInfo, ReadError> {
        match &self.guest {
            Some(g) => g.view.task(task_id),
            None => Err(ReadError::OutOfRange),
        }
    }

    /// Every task-table entry that is in use and was read consistently, in task-id order.
    pub fn tasks(&self) -> Vec<(u32, TaskInfo)> {
        let Some(g) = &self.guest else {
            return Vec::new();
        };
        g.view
            .tasks()
            .filter_map(|(id, t)| t.ok().filter(|t| t.state != TASK_FREE).map(|t| (id, t)))
            .collect()
    }

    /// Records read from each ring so far: (guest, host).
    pub fn read_counts(&self) -> (u64, u64) {
        (
            self.guest.as_ref().map_or(0, |g| g.reader.read_count()),
            self.host_reader.read_count(),
        )
    }

    /// Records lost on each ring so far: (guest, host).
    pub fn lost_counts(&self) -> (u64, u64) {
        (
            self.guest.as_ref().map_or(0, |g| g.reader.lost_count()),
            self.host_reader.lost_count(),
        )
    }

    /// Times a header no longer matched what was validated at open: (guest, host). The reader
    /// keeps using the validated layout.
    pub fn header_changes(&self) -> (u64, u64) {
        (self.guest_header_changes, self.host_header_changes)
    }

    /// The last header revalidation error, if any.
    pub fn last_header_error(&self) -> Option<&str> {
        self.last_header_error.as_deref()
    }

    /// Times a ring head went backwards.
    pub fn regressions(&self) -> u64 {
        self.regressed
    }

    /// Whether the VM is still running. Checks that neither file shrank, whether they were
    /// removed, and whether the VMM process is alive.
    pub fn status(&self) -> VmStatus {
        let mut removed = false;
        for (map, path) in [
            (&self.guest_map, self.handle.guest_path()),
            (&self.host_map, self.handle.host_path()),
        ] {
            match map.check() {
                Ok(0) => removed = true,
                Ok(_) => {}
                Err(e) => return VmStatus::Ended(format!("{}: {e}", path.display())),
            }
        }
        if removed {
            return VmStatus::Ended("its region files were removed".into());
        }
        if !pid_alive(self.handle.id.pid) {
            return VmStatus::Ended(format!("process {} exited", self.handle.id.pid));
        }
        if !crate::rundir::lock_held(self.host_map.file()) {
            return VmStatus::Ended("no VMM holds its host region any more".into());
        }
        VmStatus::Running
    }

    /// Reads every new record of both rings (up to the default [`PollLimits`]).
    pub fn poll(&mut self) -> Result<Batch, OpenError> {
        self.poll_with(PollLimits::default())
    }

    /// Reads new records of both rings, taking at most `limits` steps on each. Fails only if a
    /// file shrank under its mapping (reading on could fault); the readers then stop.
    pub fn poll_with(&mut self, limits: PollLimits) -> Result<Batch, OpenError> {
        for (map, path) in [
            (&self.guest_map, self.handle.guest_path()),
            (&self.host_map, self.handle.host_path()),
        ] {
            map.check()
                .map_err(|source| OpenError::Io { path, source })?;
        }
        if let Some(Err(e)) = self.guest.as_ref().map(|g| g.view.revalidate()) {
            self.guest_header_changes += 1;
            self.last_header_error = Some(format!("guest header: {e}"));
        }
        if let Err(e) = self.host_view.revalidate() {
            self.host_header_changes += 1;
            self.last_header_error = Some(format!("host header: {e}"));
        }
        let mut batch = Batch {
            read_ns: monotonic_ns(),
            ..Batch::default()
        };
        if let Some(g) = self.guest.as_mut() {
            let (guest, lost, truncated) = drain(
                &mut g.reader,
                limits.guest_steps,
                Ring::Guest,
                &mut batch.losses,
                &mut batch.regressed,
            );
            batch.guest = guest;
            batch.lost_guest = lost;
            batch.truncated |= truncated;
        }
        let (host, lost, truncated) = drain(
            &mut self.host_reader,
            limits.host_steps,
            Ring::Host,
            &mut batch.losses,
            &mut batch.regressed,
        );
        batch.host = host;
        batch.lost_host = lost;
        batch.truncated |= truncated;
        self.regressed = self.regressed.saturating_add(batch.regressed);
        Ok(batch)
    }
}

fn start_reader<R: mirrorball_profiler_abi::SampleRecord>(
    ring: RingView<'_, R>,
) -> RingReader<'_, R> {
    let head = ring.head();
    let cap = u64::from(ring.capacity());
    let start = ring.oldest(head).max(head.saturating_sub(cap - cap / 4));
    RingReader::starting_at(ring, start)
}

/// Takes at most `steps` polls of `reader`: (records, records lost, hit the limit).
fn drain<R: mirrorball_profiler_abi::SampleRecord>(
    reader: &mut RingReader<'_, R>,
    steps: usize,
    ring: Ring,
    losses: &mut Vec<Loss>,
    regressed: &mut u64,
) -> (Vec<SeqRecord<R>>, u64, bool) {
    let mut records = Vec::new();
    let mut lost = 0u64;
    for _ in 0..steps {
        match reader.poll() {
            Poll::Record(r) => records.push(r),
            Poll::Empty => return (records, lost, false),
            Poll::Lost { first, count } => {
                lost = lost.saturating_add(count);
                losses.push(Loss { ring, first, count });
            }
            Poll::Regressed { .. } => {
                *regressed = regressed.saturating_add(1);
            }
        }
    }
    (records, lost, true)
}
