//! The guest region's seqlocked tables: per-vCPU current-task slots and the task table.
//!
//! # Seqlock
//! Writer (one per entry): `seq += 1` (now odd, relaxed), release fence, store the fields
//! (relaxed), `seq += 1` (now even, release). Reader: load `seq` (acquire); if odd, retry; load
//! the fields (relaxed); acquire fence; load `seq` again; accept if unchanged. Readers retry at
//! most [`SEQLOCK_RETRIES`] times and then report [`ReadError::Busy`], so a guest that keeps an
//! entry odd cannot stall the host.

use core::sync::atomic::{fence, AtomicU64, Ordering};

use crate::abi::*;
use crate::error::{AbiError, ReadError};
use crate::layout::TableLayout;
use crate::region::Region;

/// Attempts a reader makes on a seqlocked entry before giving up with [`ReadError::Busy`].
pub const SEQLOCK_RETRIES: u32 = 16;

/// Reads a seqlocked entry with bounded retries.
pub(crate) fn seqlock_read<T>(seq: &AtomicU64, load: impl Fn() -> T) -> Result<T, ReadError> {
    for _ in 0..SEQLOCK_RETRIES {
        let before = seq.load(Ordering::Relaxed);
        fence(Ordering::Acquire);
        if before & 1 == 0 {
            let value = load();
            fence(Ordering::Acquire);
            if seq.load(Ordering::Relaxed) == before {
                return Ok(value);
            }
        }
        core::hint::spin_loop();
    }
    Err(ReadError::Busy)
}

/// Rewrites a seqlocked entry (single writer per entry).
pub(crate) fn seqlock_write(seq: &AtomicU64, store: impl FnOnce()) {
    // `| 1` also recovers an entry left odd by a writer that died mid-update.
    let odd = seq.load(Ordering::Relaxed) | 1;
    seq.store(odd, Ordering::Relaxed);
    fence(Ordering::Release);
    store();
    seq.store(odd.wrapping_add(1), Ordering::Release);
}

/// A command name: [`COMM_LEN`] bytes, NUL-padded (Linux `task->comm`).
pub type Comm = [u8; COMM_LEN as usize];

/// A [`Comm`] from a name, truncated to 15 bytes and NUL-terminated like Linux does.
pub fn comm_from(name: &[u8]) -> Comm {
    let mut comm = [0u8; COMM_LEN as usize];
    let n = name.len().min(comm.len() - 1);
    comm[..n].copy_from_slice(&name[..n]);
    comm
}

/// The bytes of a [`Comm`] before its first NUL (all 16 if unterminated).
pub fn comm_bytes(comm: &Comm) -> &[u8] {
    let end = comm.iter().position(|&b| b == 0).unwrap_or(comm.len());
    &comm[..end]
}

fn store_comm(words: &[AtomicU64; 2], comm: &Comm) {
    let (lo, hi) = comm.split_at(8);
    let mut w = [0u8; 8];
    w.copy_from_slice(lo);
    words[0].store(u64::from_le_bytes(w), Ordering::Relaxed);
    w.copy_from_slice(hi);
    words[1].store(u64::from_le_bytes(w), Ordering::Relaxed);
}

fn load_comm(words: &[AtomicU64; 2]) -> Comm {
    let mut comm = [0u8; COMM_LEN as usize];
    comm[..8].copy_from_slice(&words[0].load(Ordering::Relaxed).to_le_bytes());
    comm[8..].copy_from_slice(&words[1].load(Ordering::Relaxed).to_le_bytes());
    comm
}

/// The task a vCPU runs, as the guest announces it at a context switch.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct CurrentTask {
    /// Task-table index, or [`TASK_NONE`] if the task is not registered.
    pub task_id: u32,
    /// Guest thread id.
    pub pid: u32,
    /// Guest process id.
    pub tgid: u32,
    /// [`VCPU_IDLE`], [`VCPU_KTHREAD`].
    pub flags: u32,
    /// Command name.
    pub comm: Comm,
}

impl Default for CurrentTask {
    fn default() -> Self {
        Self {
            task_id: TASK_NONE,
            pid: 0,
            tgid: 0,
            flags: 0,
            comm: [0; COMM_LEN as usize],
        }
    }
}

/// A consistent snapshot of a [`VcpuSlot`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct VcpuState {
    /// The current task.
    pub task: CurrentTask,
    /// Context switches so far.
    pub switch_count: u64,
    /// Guest clock at the last switch, ns.
    pub switch_time_ns: u64,
}

pub(crate) fn read_vcpu(slot: &VcpuSlot) -> Result<VcpuState, ReadError> {
    seqlock_read(&slot.seq, || {
        let r = Ordering::Relaxed;
        VcpuState {
            task: CurrentTask {
                task_id: slot.task_id.load(r),
                pid: slot.pid.load(r),
                tgid: slot.tgid.load(r),
                flags: slot.flags.load(r),
                comm: load_comm(&slot.comm),
            },
            switch_count: slot.switch_count.load(r),
            switch_time_ns: slot.switch_time_ns.load(r),
        }
    })
}

/// Writes one vCPU's slot; used by the guest on that vCPU (one writer per slot).
#[derive(Debug)]
pub struct VcpuSlotWriter<'a> {
    slot: &'a VcpuSlot,
}

impl<'a> VcpuSlotWriter<'a> {
    pub(crate) fn new(slot: &'a VcpuSlot) -> Self {
        Self { slot }
    }

    /// Announces a context switch to `task` at guest time `now_ns`; counts it.
    pub fn switch_to(&mut self, task: &CurrentTask, now_ns: u64) {
        let s = self.slot;
        let count = s.switch_count.load(Ordering::Relaxed).wrapping_add(1);
        seqlock_write(&s.seq, || {
            let r = Ordering::Relaxed;
            s.switch_count.store(count, r);
            s.switch_time_ns.store(now_ns, r);
            s.task_id.store(task.task_id, r);
            s.pid.store(task.pid, r);
            s.tgid.store(task.tgid, r);
            s.flags.store(task.flags, r);
            store_comm(&s.comm, &task.comm);
        });
    }

    /// Resets the slot to "no task, no switches" (e.g. when the guest driver attaches).
    pub fn clear(&mut self) {
        let s = self.slot;
        seqlock_write(&s.seq, || {
            let r = Ordering::Relaxed;
            s.switch_count.store(0, r);
            s.switch_time_ns.store(0, r);
            s.task_id.store(TASK_NONE, r);
            s.pid.store(0, r);
            s.tgid.store(0, r);
            s.flags.store(0, r);
            store_comm(&s.comm, &[0; COMM_LEN as usize]);
        });
    }

    /// The slot as last written.
    pub fn state(&self) -> Result<VcpuState, ReadError> {
        read_vcpu(self.slot)
    }
}

/// A consistent snapshot of a [`TaskEntry`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct TaskInfo {
    /// Guest thread id.
    pub pid: u32,
    /// Guest process id.
    pub tgid: u32,
    /// [`TASK_FREE`], [`TASK_REGISTERED`] or [`TASK_UNREGISTERED`] (any other value: garbage).
    pub state: u32,
    /// Reserved flags.
    pub flags: u32,
    /// Command name at registration.
    pub comm: Comm,
    /// Guest clock at registration, ns.
    pub registered_ns: u64,
    /// Guest clock at unregistration, ns (0 while registered).
    pub unregistered_ns: u64,
}

impl TaskInfo {
    /// True if the entry holds a registered task.
    pub fn is_registered(&self) -> bool {
        self.state == TASK_REGISTERED
    }
}

pub(crate) fn read_task(entry: &TaskEntry) -> Result<TaskInfo, ReadError> {
    seqlock_read(&entry.seq, || load_task(entry))
}

fn load_task(e: &TaskEntry) -> TaskInfo {
    let r = Ordering::Relaxed;
    TaskInfo {
        pid: e.pid.load(r),
        tgid: e.tgid.load(r),
        state: e.state.load(r),
        flags: e.flags.load(r),
        comm: load_comm(&e.comm),
        registered_ns: e.registered_ns.load(r),
        unregistered_ns: e.unregistered_ns.load(r),
    }
}

fn store_task(e: &TaskEntry, t: &TaskInfo) {
    seqlock_write(&e.seq, || {
        let r = Ordering::Relaxed;
        e.pid.store(t.pid, r);
        e.tgid.store(t.tgid, r);
        e.state.store(t.state, r);
        e.flags.store(t.flags, r);
        store_comm(&e.comm, &t.comm);
        e.registered_ns.store(t.registered_ns, r);
        e.unregistered_ns.store(t.unregistered_ns, r);
    });
}

/// Writes the task table; the guest driver's registration path (one writer, e.g. under the
/// driver's registration mutex).
#[derive(Debug)]
pub struct TaskTableWriter<'a> {
    region: Region<'a>,
    layout: TableLayout,
}

impl<'a> TaskTableWriter<'a> {
    pub(crate) fn new(region: Region<'a>, layout: TableLayout) -> Self {
        Self { region, layout }
    }

    fn entry(&self, task_id: u32) -> Option<&'a TaskEntry> {
        if task_id >= self.layout.capacity {
            return None;
        }
        self.region
            .entry(self.layout.offset, self.layout.stride, task_id as usize)
    }

    /// Entries in the table.
    pub fn capacity(&self) -> u32 {
        self.layout.capacity
    }

    /// The task id under which `pid` is registered, if it is.
    pub fn find(&self, pid: u32) -> Option<u32> {
        (0..self.layout.capacity).find(|&id| {
            self.entry(id).is_some_and(|e| {
                // The writer reads its own writes: no seqlock needed.
                e.state.load(Ordering::Relaxed) == TASK_REGISTERED
                    && e.pid.load(Ordering::Relaxed) == pid
            })
        })
    }

    /// Registers a task at guest time `now_ns`; returns its task id. Uses a free entry, else
    /// the entry unregistered longest ago.
    pub fn register(
        &mut self,
        pid: u32,
        tgid: u32,
        comm: &Comm,
        now_ns: u64,
    ) -> Result<u32, AbiError> {
        if let Some(id) = self.find(pid) {
            return Err(AbiError::AlreadyRegistered(id));
        }
        let mut reuse: Option<(u32, u64)> = None;
        let mut chosen = None;
        for id in 0..self.layout.capacity {
            let Some(e) = self.entry(id) else { break };
            match e.state.load(Ordering::Relaxed) {
                TASK_REGISTERED => {}
                TASK_UNREGISTERED => {
                    let at = e.unregistered_ns.load(Ordering::Relaxed);
                    if reuse.is_none_or(|(_, best)| at < best) {
                        reuse = Some((id, at));
                    }
                }
                // Free (or garbage, which is as good as free).
                _ => {
                    chosen = Some(id);
                    break;
                }
            }
        }
        let id = chosen
            .or(reuse.map(|(id, _)| id))
            .ok_or(AbiError::TableFull)?;
        let entry = self.entry(id).ok_or(AbiError::TableFull)?;
        store_task(
            entry,
            &TaskInfo {
                pid,
                tgid,
                state: TASK_REGISTERED,
                flags: 0,
                comm: *comm,
                registered_ns: now_ns,
                unregistered_ns: 0,
            },
        );
        Ok(id)
    }

    /// Marks a registered task unregistered at guest time `now_ns`. The entry keeps its pid and
    /// name so samples and host records that name it still resolve, until it is reused.
    pub fn unregister(&mut self, task_id: u32, now_ns: u64) -> Result<(), AbiError> {
        let entry = self.entry(task_id).ok_or(AbiError::IndexOutOfRange {
            index: task_id,
            capacity: self.layout.capacity,
        })?;
        let mut info = load_task(entry);
        if !info.is_registered() {
            return Err(AbiError::NotRegistered(task_id));
        }
        info.state = TASK_UNREGISTERED;
        info.unregistered_ns = now_ns;
        store_task(entry, &info);
        Ok(())
    }

    /// Frees every entry (e.g. when the guest driver attaches after a guest reboot).
    pub fn clear(&mut self) {
        for id in 0..self.layout.capacity {
            if let Some(e) = self.entry(id) {
                store_task(e, &TaskInfo::default());
            }
        }
    }

    /// The entry `task_id` as last written.
    pub fn get(&self, task_id: u32) -> Result<TaskInfo, ReadError> {
        read_task(self.entry(task_id).ok_or(ReadError::OutOfRange)?)
    }
}
