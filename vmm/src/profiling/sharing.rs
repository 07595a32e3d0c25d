//! Exact accounting of a VM's RAM against its template: how many guest pages still map the
//! template's (shared), how many are the VM's own (private: copied on a write, or fresh), how
//! many KSM merged, and how many copy-on-write breaks happened — per VM, and per guest range (the
//! OS-less guest's task regions, so per task and so per vCPU).
//!
//! How: `/proc/self/pagemap` for the VM's own mappings only, through `PAGEMAP_SCAN` where the
//! kernel has it (it walks only the page tables that exist: a clone that touched little is
//! scanned in microseconds) and by reading 8 bytes per guest page otherwise or under KSM
//! ([`super::pagemap`]). Each mapping is walked once per scan; the accounted ranges are counted
//! from the same runs. For a private (copy-on-write) mapping of a template, a present page that
//! is still a file page is the template's; an anonymous one is the VM's copy; an anonymous page
//! not exclusively mapped was merged by KSM. For a VM with memory of its own (a shared mapping
//! of its own memfd) every present page is private. Alternatives considered: `smaps` gives the same counts per mapping
//! but makes the kernel walk every mapping of the process and format text; userfaultfd
//! write-protection would name the faulting thread of every break but costs a round trip per
//! write fault (about 80–100 µs here, against 5 µs for the break itself). The scan's cost is
//! measured by the `sharing` bench group (per sample per GiB).
use std::sync::Arc;

use serde::Serialize;

use super::cow_charges::{CowCharges, RangeOwner};
use super::pagemap::{PageRun, PageState, Pagemap};
use crate::vstate::memory::GuestRam;

const PAGE: usize = 4096;

/// Page counts of one range of guest memory.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct PageCounts {
    /// Pages that map the template's page (read, never written).
    pub shared: u64,
    /// Pages of the VM's own: copies made by a write, fresh pages, or all pages of a VM with
    /// memory of its own.
    pub private: u64,
    /// Private pages KSM merged with identical pages elsewhere (also counted in `private`).
    pub merged: u64,
    /// Pages swapped out.
    pub swapped: u64,
    /// Pages that map the disk's base image (a read mapped them, `--disk …,map=on`, and the
    /// guest has not written them): machine pages shared with every VM that read the same
    /// blocks. Counted neither as shared nor as private.
    pub disk_shared: u64,
}

impl PageCounts {
    fn add(&mut self, other: &PageCounts) {
        self.shared += other.shared;
        self.private += other.private;
        self.merged += other.merged;
        self.swapped += other.swapped;
        self.disk_shared += other.disk_shared;
    }
}

/// One guest range to account for on its own (e.g. a task's region).
#[derive(Clone, Debug)]
pub struct AccountedRange {
    /// A label (the task index).
    pub index: usize,
    /// The task whose writes break the range's sharing, if one owns it: its breaks are charged
    /// to it in the host ring ([`CowCharges`]).
    pub owner: Option<RangeOwner>,
    /// Guest-physical start.
    pub gpa: u64,
    /// Bytes.
    pub len: u64,
}

/// The latest figures of a VM, for the report, the regions and the dashboard.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct SharingReport {
    /// Whether the VM's RAM is a copy-on-write clone of a template.
    pub cloned: bool,
    /// Guest pages of RAM.
    pub ram_pages: u64,
    /// The whole RAM.
    pub total: PageCounts,
    /// Copy-on-write breaks and fresh private pages since the VM started (private pages gained).
    pub cow_breaks: u64,
    /// Per accounted range (task), in the order given.
    pub ranges: Vec<RangeReport>,
    /// Scans made.
    pub scans: u64,
    /// A lazily restored VM's pages loaded so far (`snapshot::lazy`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lazy: Option<crate::snapshot::lazy::LazyFigures>,
}

/// Figures of one accounted range.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct RangeReport {
    /// Its label.
    pub index: usize,
    /// Its pages now.
    pub pages: PageCounts,
    /// Private pages gained since the start.
    pub cow_breaks: u64,
}

/// How often a running VM's sharing is scanned by default (at its start and end too).
pub const DEFAULT_SCAN_PERIOD: std::time::Duration = std::time::Duration::from_millis(50);
/// A running VM is scanned at most this often relative to how long its last scan took: the
/// scans of a large VM (pagemap costs tens of ms per GiB here) then stay under 2 % of a core.
pub const SCAN_DUTY_FACTOR: u32 = 50;

/// Scans one VM's RAM mappings through `/proc/self/pagemap`, and publishes each scan's VM-wide
/// figures in the VM's host region (if it has one) for `vmm top`, `record` and `prometheus`.
pub struct SharingScanner {
    publish_to: Option<Arc<super::regions::ProfilerRegions>>,
    period: Option<std::time::Duration>,
    last_scan: Option<std::time::Instant>,
    last_cost: std::time::Duration,
    pagemap: Option<Pagemap>,
    /// (guest start, host start, length) of each RAM mapping.
    mappings: Vec<(u64, usize, usize)>,
    private_mapping: bool,
    /// KSM may merge the RAM's pages: scans must tell merged ones.
    mergeable: bool,
    ranges: Vec<AccountedRange>,
    /// The latest scan's runs, per mapping.
    runs: Vec<Vec<PageRun>>,
    latest: SharingReport,
    /// Per range, in the same order.
    charges: Arc<CowCharges>,
    /// The guest pages the VM's disk mapped from its base image, if it maps.
    disk_pages: Option<Arc<mirrorball_devices::virtio_blk::map::MappedPages>>,
    /// A lazily restored VM's load counts.
    lazy: Option<Arc<crate::snapshot::lazy::LazyCounts>>,
}

impl SharingScanner {
    /// A scanner for `ram`, accounting `ranges` separately as well.
    pub fn new(ram: &GuestRam, ranges: Vec<AccountedRange>) -> Self {
        let mappings = ram
            .ranges()
            .iter()
            .zip(ram.host_ranges())
            .map(|(&(gpa, _), (host, len))| (gpa, host, len))
            .collect();
        let latest = SharingReport {
            cloned: ram.template().is_some(),
            ram_pages: ram.size() / PAGE as u64,
            ranges: ranges
                .iter()
                .map(|r| RangeReport {
                    index: r.index,
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        };
        Self {
            charges: Arc::new(CowCharges::new(ranges.iter().map(|r| r.owner).collect())),
            publish_to: None,
            period: Some(DEFAULT_SCAN_PERIOD),
            last_scan: None,
            last_cost: std::time::Duration::ZERO,
            pagemap: Pagemap::open().ok(),
            mappings,
            private_mapping: ram.is_private(),
            mergeable: ram.is_mergeable(),
            ranges,
            runs: Vec::new(),
            latest,
            disk_pages: None,
            lazy: ram.lazy().map(|l| l.counts()),
        }
    }

    /// Tells present file pages at the guest pages in `pages` apart as the disk base's
    /// (`disk_shared`), not the template's.
    pub fn set_disk_pages(&mut self, pages: Arc<mirrorball_devices::virtio_blk::map::MappedPages>) {
        self.disk_pages = Some(pages);
    }

    /// The copy-on-write breaks of owned ranges, for the sampler to write to the host ring.
    pub fn cow_charges(&self) -> Arc<CowCharges> {
        self.charges.clone()
    }

    /// Publishes every scan's figures in the host region of `regions`.
    pub fn publish_to(&mut self, regions: Arc<super::regions::ProfilerRegions>) {
        self.publish_to = Some(regions);
    }

    fn publish(&self, report: &SharingReport) {
        let Some(regions) = &self.publish_to else {
            return;
        };
        let Ok(region) = regions.host.region_mut() else {
            return;
        };
        if let Ok(host) = mirrorball_profiler_abi::HostRegion::attach(region) {
            host.set_mem_sharing(&mirrorball_profiler_abi::MemSharingFigures {
                ram_pages: report.ram_pages,
                shared_pages: report.total.shared,
                private_pages: report.total.private,
                merged_pages: report.total.merged,
                cow_breaks: report.cow_breaks,
                cloned: report.cloned,
                scanned_ns: super::sampler::monotonic_ns(),
            });
        }
    }

    /// Scans while the VM runs every `period` (`None`: only at its start and end).
    pub fn set_period(&mut self, period: Option<std::time::Duration>) {
        self.period = period;
    }

    /// Scans if the period has passed since the last scan, and at least [`SCAN_DUTY_FACTOR`]
    /// times as long as that scan took.
    pub fn scan_if_due(&mut self) {
        let due = match (self.period, self.last_scan) {
            (None, _) => false,
            (Some(_), None) => true,
            (Some(p), Some(last)) => last.elapsed() >= p.max(self.last_cost * SCAN_DUTY_FACTOR),
        };
        if due {
            let _ = self.scan();
        }
    }

    /// A copy of the latest report (with the lazy loads as of now).
    pub fn report(&self) -> SharingReport {
        SharingReport {
            lazy: self.lazy.as_ref().map(|c| c.figures()),
            ..self.latest.clone()
        }
    }

    /// The mapping holding `len` bytes at `gpa`, and the range's first and end page in it.
    fn pages_of(&self, gpa: u64, len: u64) -> Option<(usize, usize, usize)> {
        self.mappings
            .iter()
            .enumerate()
            .find_map(|(m, &(start, _, mlen))| {
                let off = gpa.checked_sub(start)?;
                let end = off.checked_add(len)?;
                let (off, end) = (usize::try_from(off).ok()?, usize::try_from(end).ok()?);
                (end <= mlen).then_some((m, off / PAGE, end / PAGE))
            })
    }

    /// Adds `pages` pages in `state` from `gpa` on to `counts`.
    fn classify(&self, state: PageState, gpa: u64, pages: usize, counts: &mut PageCounts) {
        let n = pages as u64;
        match state {
            PageState::Swapped => {
                counts.swapped += n;
                counts.private += n;
            }
            PageState::File => {
                let disk = self.disk_pages.as_ref().map_or(0, |p| {
                    (0..pages)
                        .filter(|i| p.contains(gpa + (i * PAGE) as u64))
                        .count() as u64
                });
                counts.disk_shared += disk;
                if self.private_mapping {
                    counts.shared += n - disk;
                } else {
                    counts.private += n - disk;
                }
            }
            PageState::Anon { exclusive } => {
                counts.private += n;
                if self.private_mapping && !exclusive {
                    counts.merged += n;
                }
            }
        }
    }

    /// The counts of pages `from..to` of mapping `m` in the latest runs.
    fn count(&self, m: usize, from: usize, to: usize) -> PageCounts {
        let mut counts = PageCounts::default();
        let (Some(runs), Some(&(gpa, _, _))) = (self.runs.get(m), self.mappings.get(m)) else {
            return counts;
        };
        let first = runs.partition_point(|r| r.page + r.pages <= from);
        for r in runs[first..].iter().take_while(|r| r.page < to) {
            let (a, b) = (r.page.max(from), (r.page + r.pages).min(to));
            self.classify(r.state, gpa + (a * PAGE) as u64, b - a, &mut counts);
        }
        counts
    }

    /// Walks every RAM mapping once into `self.runs`.
    fn walk(&mut self) -> std::io::Result<()> {
        let Some(pagemap) = self.pagemap.as_mut() else {
            return Err(std::io::Error::from(std::io::ErrorKind::NotFound));
        };
        self.runs.resize_with(self.mappings.len(), Vec::new);
        for (&(_, host, len), runs) in self.mappings.iter().zip(&mut self.runs) {
            pagemap.runs(host, len, self.mergeable, runs)?;
        }
        Ok(())
    }

    /// Scans the RAM now and updates the latest report; returns it.
    pub fn scan(&mut self) -> std::io::Result<SharingReport> {
        let started = std::time::Instant::now();
        self.last_scan = Some(started);
        self.walk()?;
        let mut total = PageCounts::default();
        for (m, &(_, _, len)) in self.mappings.iter().enumerate() {
            total.add(&self.count(m, 0, len / PAGE));
        }
        let per_range: Vec<PageCounts> = self
            .ranges
            .iter()
            .map(|r| match self.pages_of(r.gpa, r.len) {
                Some((m, from, to)) => self.count(m, from, to),
                None => PageCounts::default(),
            })
            .collect();
        let latest = &mut self.latest;
        latest.cow_breaks += total.private.saturating_sub(latest.total.private);
        latest.total = total;
        for (i, (report, counts)) in latest.ranges.iter_mut().zip(per_range).enumerate() {
            let breaks = counts.private.saturating_sub(report.pages.private);
            report.cow_breaks += breaks;
            report.pages = counts;
            self.charges.charge(i, breaks);
        }
        latest.scans += 1;
        latest.lazy = self.lazy.as_ref().map(|c| c.figures());
        let report = latest.clone();
        self.publish(&report);
        self.last_cost = started.elapsed();
        Ok(report)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vstate::memory::TemplateBuilder;
    use vm_memory::{Bytes, GuestAddress};

    fn touch(ram: &GuestRam, gpa: u64, write: bool) {
        if write {
            ram.memory()
                .write_obj(1u8, GuestAddress(gpa))
                .expect("write");
        } else {
            let _: u8 = ram.memory().read_obj(GuestAddress(gpa)).expect("read");
        }
    }

    #[test]
    fn counts_shared_and_private_pages_of_a_clone_exactly() {
        let builder = TemplateBuilder::new(8 << 20).expect("template");
        for page in 0..100u64 {
            builder
                .memory()
                .write_obj(7u8, GuestAddress(page * 4096))
                .expect("fill");
        }
        let template = Arc::new(builder.seal().expect("seal"));
        let ram = GuestRam::clone_of(&template).expect("clone");
        let ranges = vec![AccountedRange {
            index: 0,
            owner: None,
            gpa: 0,
            len: 64 * 4096,
        }];
        let mut scanner = SharingScanner::new(&ram, ranges);
        let start = scanner.scan().expect("scan");
        assert_eq!(start.total, PageCounts::default(), "nothing mapped yet");
        for page in 0..100u64 {
            touch(&ram, page * 4096, false);
        }
        for page in 0..30u64 {
            touch(&ram, page * 4096, true);
        }
        for page in 200..210u64 {
            touch(&ram, page * 4096, true);
        }
        let r = scanner.scan().expect("scan");
        // Reading every page's entry gives the same figures as `PAGEMAP_SCAN`.
        let mut reader = SharingScanner::new(&ram, scanner.ranges.clone());
        reader.pagemap = Pagemap::open().ok().map(Pagemap::without_scan);
        let read = reader.scan().expect("scan");
        assert_eq!((read.total, &read.ranges), (r.total, &r.ranges));
        assert!(r.cloned);
        assert_eq!(r.total.shared, 70, "read template pages stay shared");
        assert_eq!(r.total.private, 40, "30 broken + 10 fresh");
        assert_eq!(r.cow_breaks, 40);
        assert_eq!(r.ranges[0].pages.shared, 34);
        assert_eq!(r.ranges[0].pages.private, 30);
        assert_eq!(r.ranges[0].cow_breaks, 30);
        // Another clone is unaffected.
        let other = GuestRam::clone_of(&template).expect("clone");
        let mut s2 = SharingScanner::new(&other, Vec::new());
        touch(&other, 0, false);
        let r2 = s2.scan().expect("scan");
        // The read maps its page, and fault-around may map up to 15 cached neighbours.
        assert_eq!(r2.total.private, 0);
        assert!((1..=16).contains(&r2.total.shared), "{r2:?}");
    }

    #[test]
    fn memory_of_its_own_is_all_private() {
        let ram = GuestRam::new(4 << 20).expect("ram");
        let mut scanner = SharingScanner::new(&ram, Vec::new());
        for page in 0..50u64 {
            touch(&ram, page * 4096, page % 2 == 0);
        }
        let r = scanner.scan().expect("scan");
        assert!(!r.cloned);
        assert_eq!(r.total.shared, 0);
        assert_eq!(r.total.private, 50);
    }

    #[test]
    fn pages_mapped_from_a_disk_base_are_counted_as_the_disk_s() {
        use mirrorball_devices::virtio_blk::disk::BaseImage;
        use mirrorball_devices::virtio_blk::map::{BaseMapper, MapCounters, MappedPages};
        let dir = std::env::temp_dir().join(format!("mb-sharing-disk-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("base.img");
        std::fs::write(&path, vec![9u8; 64 << 10]).expect("base");
        let base = BaseImage::open(&path).expect("open");
        let builder = TemplateBuilder::new(4 << 20).expect("template");
        let template = Arc::new(builder.seal().expect("seal"));
        // A VM with memory of its own (shared memfd) and a template clone (private mapping).
        for ram in [
            GuestRam::new(4 << 20).expect("ram"),
            GuestRam::clone_of(&template).expect("clone"),
        ] {
            let pages = Arc::new(MappedPages::new(4 << 20));
            let mut mapper = BaseMapper::new(ram.memory().clone(), base.clone(), 10, pages.clone());
            let mut scanner = SharingScanner::new(&ram, Vec::new());
            scanner.set_disk_pages(pages);
            touch(&ram, 0x1000, true);
            assert!(mapper.map(
                GuestAddress(0x10000),
                0x4000,
                0x3000,
                &MapCounters::default()
            ));
            for page in 0..3u64 {
                touch(&ram, 0x10000 + page * 4096, false);
            }
            let r = scanner.scan().expect("scan");
            assert_eq!(r.total.disk_shared, 3, "{r:?}");
            assert_eq!((r.total.shared, r.total.private), (0, 1), "{r:?}");
            // A write breaks one: the VM's own page from then on.
            touch(&ram, 0x11000, true);
            let r = scanner.scan().expect("scan");
            assert_eq!(r.total.disk_shared, 2, "{r:?}");
            assert_eq!(r.total.private, 2, "{r:?}");
            let byte: u8 = ram.memory().read_obj(GuestAddress(0x12000)).expect("read");
            assert_eq!(byte, 9, "the guest sees the base's bytes");
        }
        assert_eq!(std::fs::read(&path).expect("base"), vec![9u8; 64 << 10]);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
