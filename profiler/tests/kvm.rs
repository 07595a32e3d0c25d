//! Tests against the real `/dev/kvm`: stats fds of a VM and a vCPU, and accounting of a tiny
//! real-mode guest. Each test prints a reason and returns early if `/dev/kvm` cannot be opened.

use std::collections::BTreeMap;

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};
use mirrorball_profiler::testing::kvm_or_skip;
use mirrorball_profiler::{ExitCounters, ExitKind, StatKind, StatsFd, VcpuAccounting};

const MEM_SIZE: usize = 0x8000; // GPA 0..32 KiB; anything above is MMIO.
const CODE_GPA: u64 = 0x100;
const OUT_PORT: u16 = 0x10;
const IN_PORT: u16 = 0x11;
const MMIO_WRITE_GPA: u64 = 0x9000;
const MMIO_READ_GPA: u64 = 0xa000;
/// Pages the guest writes to that the host has never touched (GPA 0x1000..=0x7000).
const FRESH_PAGES: u64 = 7;

/// The guest, 16-bit real mode, CS = DS = 0.
fn guest_code() -> Vec<u8> {
    let mut code = vec![
        0xb0, 0x41, // mov al, 0x41
        0xe6, 0x10, // out 0x10, al
        0xe6, 0x10, // out 0x10, al
        0xe6, 0x10, // out 0x10, al
        0xe4, 0x11, // in al, 0x11
    ];
    for page in 1..=u8::try_from(FRESH_PAGES).expect("fits") {
        code.extend_from_slice(&[0xa2, 0x00, page << 4]); // mov [page * 0x1000], al
    }
    code.extend_from_slice(&[0xa2, 0x00, 0x90]); // mov [0x9000], al   (MMIO write)
    code.extend_from_slice(&[0xa0, 0x00, 0xa0]); // mov al, [0xa000]   (MMIO read)
    code.push(0xf4); // hlt
    code
}

struct GuestMem {
    ptr: *mut u8,
}

impl GuestMem {
    fn new() -> GuestMem {
        // SAFETY: anonymous private mapping with no address hint; the result is checked.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                MEM_SIZE,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        assert_ne!(ptr, libc::MAP_FAILED);
        // SAFETY: the range is the mapping just created; failure only leaves THP as it was.
        unsafe { libc::madvise(ptr, MEM_SIZE, libc::MADV_NOHUGEPAGE) };
        GuestMem { ptr: ptr.cast() }
    }
}

impl Drop for GuestMem {
    fn drop(&mut self) {
        // SAFETY: unmaps the mapping made in `new`; the VM using it is dropped first (declared
        // later in every test, so dropped earlier).
        unsafe { libc::munmap(self.ptr.cast(), MEM_SIZE) };
    }
}

/// A VM with guest memory at GPA 0 holding the guest code, and vCPU 0 set up to run it.
fn real_mode_vm(kvm: &Kvm, mem: &GuestMem) -> (VmFd, VcpuFd) {
    let code = guest_code();
    // SAFETY: `code` fits well inside the mapping (CODE_GPA + len < MEM_SIZE) and nothing else
    // accesses the mapping yet.
    unsafe {
        std::ptr::copy_nonoverlapping(
            code.as_ptr(),
            mem.ptr.add(usize::try_from(CODE_GPA).expect("fits")),
            code.len(),
        )
    };
    let vm = kvm.create_vm().expect("create VM");
    let region = kvm_userspace_memory_region {
        slot: 0,
        guest_phys_addr: 0,
        memory_size: MEM_SIZE as u64,
        userspace_addr: mem.ptr as u64,
        flags: 0,
    };
    // SAFETY: the region describes a live mapping of MEM_SIZE bytes that outlives the VM.
    unsafe { vm.set_user_memory_region(region) }.expect("set memory region");
    let vcpu = vm.create_vcpu(0).expect("create vCPU");
    let mut sregs = vcpu.get_sregs().expect("get sregs");
    for seg in [&mut sregs.cs, &mut sregs.ds, &mut sregs.es, &mut sregs.ss] {
        seg.base = 0;
        seg.selector = 0;
    }
    vcpu.set_sregs(&sregs).expect("set sregs");
    let mut regs = vcpu.get_regs().expect("get regs");
    regs.rip = CODE_GPA;
    regs.rflags = 2;
    vcpu.set_regs(&regs).expect("set regs");
    (vm, vcpu)
}

fn names(stats: &StatsFd) -> Vec<&str> {
    stats
        .descriptors()
        .iter()
        .map(|d| d.name.as_str())
        .collect()
}

#[test]
fn vm_and_vcpu_stats_fds_have_the_expected_stats() {
    let Some(kvm) = kvm_or_skip("vm_and_vcpu_stats_fds_have_the_expected_stats") else {
        return;
    };
    let mem = GuestMem::new();
    let (vm, vcpu) = real_mode_vm(&kvm, &mem);

    let vcpu_stats = StatsFd::for_vcpu(&vcpu).expect("vCPU stats fd");
    let vm_stats = StatsFd::for_vm(&vm).expect("VM stats fd");
    eprintln!("vCPU stats ({}): {:?}", vcpu_stats.id(), names(&vcpu_stats));
    eprintln!("VM stats ({}): {:?}", vm_stats.id(), names(&vm_stats));
    assert!(vcpu_stats.id().ends_with("vcpu-0"), "{}", vcpu_stats.id());
    assert!(!vm_stats.id().contains("vcpu"), "{}", vm_stats.id());

    for name in ["exits", "pf_taken"] {
        let i = vcpu_stats
            .index_of(name)
            .unwrap_or_else(|| panic!("no vCPU stat {name}"));
        assert_eq!(vcpu_stats.descriptors()[i].kind, StatKind::Cumulative);
    }
    let pages = vm_stats.index_of("pages_4k").expect("no VM stat pages_4k");
    assert_eq!(vm_stats.descriptors()[pages].kind, StatKind::Instant);

    // Every descriptor reads back, and the hot path agrees with read().
    let sample = vcpu_stats.read().expect("read vCPU stats");
    let mut buf = Vec::new();
    vcpu_stats.read_into(&mut buf).expect("read_into");
    assert_eq!(buf.len(), vcpu_stats.data_words());
    for (i, d) in vcpu_stats.descriptors().iter().enumerate() {
        assert!(sample.values(i).is_some(), "{}", d.name);
        assert!(d.first(&buf).is_some(), "{}", d.name);
    }
    // A vCPU that never ran has exited zero times.
    assert_eq!(sample.get_by_name("exits"), Some(0));
    assert!(vm_stats.read().expect("read VM stats").get(pages).is_some());
}

#[test]
fn accounting_sees_the_exits_of_a_real_mode_guest() {
    let Some(kvm) = kvm_or_skip("accounting_sees_the_exits_of_a_real_mode_guest") else {
        return;
    };
    let mem = GuestMem::new();
    let (vm, mut vcpu) = real_mode_vm(&kvm, &mem);
    let vm_stats = StatsFd::for_vm(&vm).expect("VM stats fd");
    let stats = StatsFd::for_vcpu(&vcpu).expect("vCPU stats fd");

    let mut acct = VcpuAccounting::new(0, Some(stats)).expect("accounting");
    let mut seen = ExitCounters::new();
    let mut outs = Vec::new();
    let mut mmio_writes = Vec::new();
    let mut halted = false;
    for _ in 0..64 {
        acct.enter_run();
        let exit = vcpu.run();
        let kind = match &exit {
            Ok(e) => ExitKind::from_exit(e),
            Err(e) => ExitKind::from_run_error(e),
        };
        acct.exit_run(kind);
        seen.record(kind);
        match exit {
            Ok(VcpuExit::IoOut(port, data)) => outs.push((port, data.to_vec())),
            Ok(VcpuExit::IoIn(port, data)) => {
                assert_eq!(port, IN_PORT);
                data.fill(0x42);
            }
            Ok(VcpuExit::MmioWrite(addr, data)) => mmio_writes.push((addr, data.to_vec())),
            Ok(VcpuExit::MmioRead(addr, data)) => {
                assert_eq!(addr, MMIO_READ_GPA);
                data.fill(0x43);
            }
            Ok(VcpuExit::Hlt) => {
                halted = true;
                break;
            }
            Ok(other) => panic!("unexpected exit {other:?}"),
            Err(e) => panic!("KVM_RUN failed: {e}"),
        }
    }
    assert!(halted, "guest did not reach hlt");
    let mut mid = Vec::new();
    acct.stats()
        .expect("stats kept")
        .read_into(&mut mid)
        .expect("mid-run read");
    let report = acct.finish();
    eprintln!("{}", serde_json::to_string_pretty(&report).unwrap());

    // The guest really ran: its outputs and the value it read back from port I/O.
    assert_eq!(outs, vec![(OUT_PORT, vec![0x41]); 3]);
    assert_eq!(mmio_writes, vec![(MMIO_WRITE_GPA, vec![0x42])]);

    // Accounting saw exactly the exits the loop counted.
    assert_eq!(report.exits, seen);
    let expected = [
        (ExitKind::IoOut, 3),
        (ExitKind::IoIn, 1),
        (ExitKind::MmioWrite, 1),
        (ExitKind::MmioRead, 1),
        (ExitKind::Hlt, 1),
    ];
    for (kind, n) in expected {
        assert_eq!(report.exits.get(kind), n, "{}", kind.name());
    }
    assert_eq!(report.total_exits, 7);
    assert!(report.kvm_run_ns > 0 && report.vmm_ns > 0, "{report:?}");
    assert!(report.errors.is_empty(), "{:?}", report.errors);

    // KVM's own counter grew by at least the exits userspace handled.
    let kvm_exits = report.kvm_stats.get("exits").copied().unwrap_or(0);
    assert!(kvm_exits >= report.total_exits, "KVM exits {kvm_exits}");
    assert!(report.kvm_stats.contains_key("pf_taken"));
    // The guest's first writes to host-unpopulated pages fault on the vCPU thread.
    assert!(
        report.host_minor_faults >= FRESH_PAGES,
        "{} minor faults",
        report.host_minor_faults
    );

    let vm_map: BTreeMap<String, u64> = vm_stats.read().expect("VM stats").to_map();
    eprintln!("VM stats after run: {vm_map:?}");
    assert!(vm_map.contains_key("pages_4k"));
}
