//! MP (Intel MultiProcessor Specification 1.4) table that announces vCPUs, buses and the IOAPIC.
//!
//! This module owns the guest-physical window [`MPTABLE_START`]..[`MPTABLE_END`] (the last
//! kilobyte of conventional memory, which the VMM's e820 map reports as reserved). It writes
//! there an MP floating pointer structure followed directly by an MP configuration table, so that
//! a Linux guest built with `CONFIG_X86_MPPARSE` and booted without ACPI finds every vCPU and the
//! IOAPIC. Linux scans the last KiB below 640 KiB for the `_MP_` signature, so the floating
//! pointer sits at the start of that window.
//!
//! The table describes:
//! - one processor entry per vCPU: local APIC id = vCPU index, vCPU 0 is the bootstrap processor;
//! - one ISA bus (bus id 0);
//! - one IOAPIC with id = number of vCPUs (so it never collides with a local APIC id), version
//!   0x11, at [`IOAPIC_ADDR`];
//! - I/O interrupt entries for ISA IRQs 0–15, each routed to the IOAPIC pin with the same
//!   number. This is deliberately *not* the PC convention of "IRQ0 on pin 2": with
//!   `KVM_CREATE_IRQCHIP`, KVM installs a default GSI routing in which GSI *n* (n < 16) drives
//!   both the PIC input *n* and IOAPIC pin *n*, and the in-kernel PIT raises GSI 0. So the timer
//!   arrives on IOAPIC pin 0 unless the VMM installs its own routing (QEMU does, with
//!   GSI 0 → pin 2). A VMM that changes the routing must change this table too;
//! - local interrupt entries: ExtINT on LINT0 and NMI on LINT1 of every local APIC (virtual-wire
//!   mode, matching [`super::lapic::setup_lint`]).
//!
//! The local APIC address in the header is [`LAPIC_ADDR`]. Both checksums are filled in.

use thiserror::Error;
use vm_memory::{Bytes, GuestAddress, GuestMemoryError, GuestMemoryMmap};

/// First guest-physical byte of the MP table window (639 KiB, start of the last KiB below 640 KiB).
pub const MPTABLE_START: u64 = 0x9_fc00;
/// End (exclusive) of the MP table window. Everything written by [`setup_mptable`] lies in
/// `MPTABLE_START..MPTABLE_END`; the VMM must keep that range out of usable RAM in its e820 map.
pub const MPTABLE_END: u64 = 0xa_0000;
/// Guest-physical address of the IOAPIC announced in the table.
pub const IOAPIC_ADDR: u32 = 0xfec0_0000;
/// Guest-physical address of the local APICs announced in the table header.
pub const LAPIC_ADDR: u32 = 0xfee0_0000;
/// IOAPIC version announced in the table (that of the 82093AA, which KVM emulates).
pub const IOAPIC_VERSION: u8 = 0x11;
/// Local APIC version announced in processor entries (KVM's in-kernel local APIC reports 0x14).
pub const LAPIC_VERSION: u8 = 0x14;
/// Number of ISA IRQs routed to the IOAPIC (0–15).
pub const NUM_ISA_IRQS: u8 = 16;

/// MP specification revision written into both structures (0x04 = version 1.4).
const SPEC_REV: u8 = 4;
const FLOATING_POINTER_LEN: usize = 16;
const HEADER_LEN: usize = 44;
const PROCESSOR_ENTRY_LEN: usize = 20;
/// Bus, IOAPIC, I/O interrupt and local interrupt entries are all 8 bytes long.
const SHORT_ENTRY_LEN: usize = 8;
const NUM_LOCAL_INT_ENTRIES: usize = 2;
/// Bytes of the window used by everything except processor entries.
const FIXED_LEN: usize = FLOATING_POINTER_LEN
    + HEADER_LEN
    + SHORT_ENTRY_LEN // ISA bus
    + SHORT_ENTRY_LEN // IOAPIC
    + NUM_ISA_IRQS as usize * SHORT_ENTRY_LEN
    + NUM_LOCAL_INT_ENTRIES * SHORT_ENTRY_LEN;
// The MP table window is a few KiB below 1 MiB.
#[allow(clippy::cast_possible_truncation)]
const WINDOW_LEN: usize = (MPTABLE_END - MPTABLE_START) as usize;

/// Largest number of vCPUs whose table fits in the window (40).
// Asserted below 255.
#[allow(clippy::cast_possible_truncation)]
pub const MAX_CPUS: u8 = {
    let n = (WINDOW_LEN - FIXED_LEN) / PROCESSOR_ENTRY_LEN;
    assert!(n >= 8 && n < 255);
    n as u8
};

// Entry types (MP spec table 4-3).
const ENTRY_PROCESSOR: u8 = 0;
const ENTRY_BUS: u8 = 1;
const ENTRY_IOAPIC: u8 = 2;
const ENTRY_IO_INTERRUPT: u8 = 3;
const ENTRY_LOCAL_INTERRUPT: u8 = 4;

// Processor entry CPU flags.
const CPU_FLAG_ENABLED: u8 = 1 << 0;
const CPU_FLAG_BSP: u8 = 1 << 1;
/// CPU signature in processor entries: family 6, model 0, stepping 0. Linux only prints it; the
/// real identity comes from CPUID.
const CPU_SIGNATURE: u32 = 6 << 8;
/// Feature flags in processor entries (same layout as CPUID.1:EDX): FPU and on-chip APIC.
const CPU_FEATURES: u32 = (1 << 0) | (1 << 9);

const IOAPIC_FLAG_ENABLED: u8 = 1 << 0;

// Interrupt types (MP spec table 4-9).
const INT_TYPE_INT: u8 = 0;
const INT_TYPE_NMI: u8 = 1;
const INT_TYPE_EXTINT: u8 = 3;
/// Polarity and trigger mode "conform to the bus" (ISA: active high, edge triggered).
const INT_FLAGS_CONFORMING: u16 = 0;
/// Destination local APIC id meaning "all local APICs".
const ALL_LOCAL_APICS: u8 = 0xff;

const ISA_BUS_ID: u8 = 0;
const ISA_BUS_TYPE: &[u8; 6] = b"ISA   ";
const OEM_ID: &[u8; 8] = b"MIRRORBL";
const PRODUCT_ID: &[u8; 12] = b"MIRRORBALL  ";

/// Errors from building or writing the MP table.
#[derive(Debug, Error)]
pub enum MptableError {
    /// The table must announce at least the bootstrap processor.
    #[error("the MP table needs at least one vCPU")]
    NoCpus,
    /// The processor entries would not fit in the reserved window.
    #[error("{requested} vCPUs do not fit in the MP table window (at most {max})")]
    TooManyCpus {
        /// Number of vCPUs asked for.
        requested: u8,
        /// Largest supported number of vCPUs ([`MAX_CPUS`]).
        max: u8,
    },
    /// Guest memory does not cover the MP table window.
    #[error("cannot write the MP table at guest address {addr:#x}: {source}")]
    Write {
        /// Guest-physical address of the write.
        addr: u64,
        /// Error from vm-memory.
        #[source]
        source: GuestMemoryError,
    },
}

/// Writes the MP floating pointer structure and configuration table for `num_cpus` vCPUs into
/// `mem`, filling the whole window `MPTABLE_START..MPTABLE_END` (unused bytes are zeroed).
///
/// Errors if `num_cpus` is 0 or larger than [`MAX_CPUS`], or if guest memory does not cover the
/// window; nothing is written in the first two cases.
pub fn setup_mptable(mem: &GuestMemoryMmap, num_cpus: u8) -> Result<(), MptableError> {
    let image = build_image(num_cpus)?;
    mem.write_slice(&image, GuestAddress(MPTABLE_START))
        .map_err(|source| MptableError::Write {
            addr: MPTABLE_START,
            source,
        })
}

/// Builds the byte image of the whole window (floating pointer, then configuration table, then
/// zero padding), laid out for placement at [`MPTABLE_START`].
fn build_image(num_cpus: u8) -> Result<Vec<u8>, MptableError> {
    if num_cpus == 0 {
        return Err(MptableError::NoCpus);
    }
    if num_cpus > MAX_CPUS {
        return Err(MptableError::TooManyCpus {
            requested: num_cpus,
            max: MAX_CPUS,
        });
    }
    let table = build_config_table(num_cpus);
    let table_addr = MPTABLE_START + FLOATING_POINTER_LEN as u64;

    let mut image = Vec::with_capacity(WINDOW_LEN);
    image.extend_from_slice(&build_floating_pointer(
        u32::try_from(table_addr).unwrap_or(u32::MAX),
    ));
    image.extend_from_slice(&table);
    // Checked by MAX_CPUS; kept as a guard so a layout change cannot silently overflow.
    if image.len() > WINDOW_LEN {
        return Err(MptableError::TooManyCpus {
            requested: num_cpus,
            max: MAX_CPUS,
        });
    }
    image.resize(WINDOW_LEN, 0);
    Ok(image)
}

/// MP floating pointer structure (MP spec table 4-1) pointing at `table_addr`.
fn build_floating_pointer(table_addr: u32) -> [u8; FLOATING_POINTER_LEN] {
    let mut fp = [0u8; FLOATING_POINTER_LEN];
    fp[0..4].copy_from_slice(b"_MP_");
    fp[4..8].copy_from_slice(&table_addr.to_le_bytes());
    fp[8] = 1; // Length in 16-byte paragraphs.
    fp[9] = SPEC_REV;
    // fp[10]: checksum, below. fp[11]: feature byte 1 = 0, a configuration table is present.
    // fp[12]: feature byte 2 = 0, IMCR absent: virtual-wire mode. fp[13..16]: reserved, zero.
    fp[10] = checksum(&fp);
    fp
}

/// Little-endian byte sink for table entries.
struct Writer(Vec<u8>);

impl Writer {
    fn u8(&mut self, v: u8) {
        self.0.push(v);
    }
    fn u16(&mut self, v: u16) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn bytes(&mut self, v: &[u8]) {
        self.0.extend_from_slice(v);
    }
}

/// MP configuration table: header (MP spec table 4-2) followed by the base table entries.
fn build_config_table(num_cpus: u8) -> Vec<u8> {
    let ioapic_id = num_cpus;
    let mut entries = Writer(Vec::new());
    let mut count: u16 = 0;

    for cpu in 0..num_cpus {
        // Processor entry (table 4-4).
        entries.u8(ENTRY_PROCESSOR);
        entries.u8(cpu); // Local APIC id.
        entries.u8(LAPIC_VERSION);
        let bsp = if cpu == 0 { CPU_FLAG_BSP } else { 0 };
        entries.u8(CPU_FLAG_ENABLED | bsp);
        entries.u32(CPU_SIGNATURE);
        entries.u32(CPU_FEATURES);
        entries.bytes(&[0; 8]); // Reserved.
        count += 1;
    }

    // Bus entry (table 4-5).
    entries.u8(ENTRY_BUS);
    entries.u8(ISA_BUS_ID);
    entries.bytes(ISA_BUS_TYPE);
    count += 1;

    // IOAPIC entry (table 4-7).
    entries.u8(ENTRY_IOAPIC);
    entries.u8(ioapic_id);
    entries.u8(IOAPIC_VERSION);
    entries.u8(IOAPIC_FLAG_ENABLED);
    entries.u32(IOAPIC_ADDR);
    count += 1;

    // I/O interrupt assignment entries (table 4-8): ISA IRQ n -> IOAPIC pin n (see module docs).
    for irq in 0..NUM_ISA_IRQS {
        entries.u8(ENTRY_IO_INTERRUPT);
        entries.u8(INT_TYPE_INT);
        entries.u16(INT_FLAGS_CONFORMING);
        entries.u8(ISA_BUS_ID);
        entries.u8(irq);
        entries.u8(ioapic_id);
        entries.u8(irq);
        count += 1;
    }

    // Local interrupt assignment entries (table 4-10): ExtINT on LINT0, NMI on LINT1.
    for (int_type, lint) in [(INT_TYPE_EXTINT, 0u8), (INT_TYPE_NMI, 1u8)] {
        entries.u8(ENTRY_LOCAL_INTERRUPT);
        entries.u8(int_type);
        entries.u16(INT_FLAGS_CONFORMING);
        entries.u8(ISA_BUS_ID);
        entries.u8(0); // Source bus IRQ: unused for these types.
        entries.u8(ALL_LOCAL_APICS);
        entries.u8(lint);
        count += 1;
    }

    let entries = entries.0;
    // At most MAX_CPUS * 20 + fixed entries, well below u16::MAX.
    #[allow(clippy::cast_possible_truncation)]
    let base_len = (HEADER_LEN + entries.len()) as u16;
    let mut table = Writer(Vec::with_capacity(usize::from(base_len)));
    table.bytes(b"PCMP");
    table.u16(base_len);
    table.u8(SPEC_REV);
    table.u8(0); // Checksum, patched below.
    table.bytes(OEM_ID);
    table.bytes(PRODUCT_ID);
    table.u32(0); // OEM table pointer: none.
    table.u16(0); // OEM table size.
    table.u16(count);
    table.u32(LAPIC_ADDR);
    table.u16(0); // Extended table length: none.
    table.u8(0); // Extended table checksum.
    table.u8(0); // Reserved.
    table.bytes(&entries);

    let mut table = table.0;
    table[7] = checksum(&table);
    table
}

/// Byte that makes the 8-bit sum of `bytes` plus itself zero (assuming its own slot is zero).
fn checksum(bytes: &[u8]) -> u8 {
    let sum = bytes.iter().fold(0u8, |acc, b| acc.wrapping_add(*b));
    0u8.wrapping_sub(sum)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What a guest OS would read back from the window.
    #[derive(Debug, Default)]
    struct Parsed {
        /// (APIC id, flags) per processor entry, in table order.
        cpus: Vec<(u8, u8)>,
        buses: Vec<(u8, [u8; 6])>,
        /// (id, version, flags, address).
        ioapics: Vec<(u8, u8, u8, u32)>,
        /// (type, source bus irq, dest IOAPIC id, dest pin).
        io_ints: Vec<(u8, u8, u8, u8)>,
        /// (type, dest APIC id, LINT#).
        local_ints: Vec<(u8, u8, u8)>,
        lapic_addr: u32,
    }

    fn sum(bytes: &[u8]) -> u8 {
        bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b))
    }

    fn u16_at(b: &[u8], off: usize) -> u16 {
        u16::from_le_bytes([b[off], b[off + 1]])
    }

    fn u32_at(b: &[u8], off: usize) -> u32 {
        u32::from_le_bytes([b[off], b[off + 1], b[off + 2], b[off + 3]])
    }

    fn memory() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap()
    }

    /// Scans the Linux search window for the floating pointer the way a guest does, then parses
    /// the configuration table it points to, checking signatures, lengths and checksums.
    fn parse(mem: &GuestMemoryMmap) -> Parsed {
        let mut window = vec![0u8; WINDOW_LEN];
        mem.read_slice(&mut window, GuestAddress(MPTABLE_START))
            .unwrap();
        let fp_off = (0..WINDOW_LEN)
            .step_by(16)
            .find(|&o| &window[o..o + 4] == b"_MP_")
            .expect("no _MP_ signature on a paragraph boundary");
        let fp = &window[fp_off..fp_off + 16];
        assert_eq!(fp[8], 1, "floating pointer length");
        assert_eq!(fp[9], 4, "floating pointer spec revision");
        assert_eq!(sum(fp), 0, "floating pointer checksum");
        assert_eq!(fp[11], 0, "feature byte 1 must say: table present");

        let table_addr = u64::from(u32_at(fp, 4));
        let mut header = [0u8; HEADER_LEN];
        mem.read_slice(&mut header, GuestAddress(table_addr))
            .unwrap();
        assert_eq!(&header[0..4], b"PCMP");
        assert_eq!(header[6], 4, "table spec revision");
        let base_len = usize::from(u16_at(&header, 4));
        assert!(
            table_addr + base_len as u64 <= MPTABLE_END,
            "table ends below 0xa0000"
        );
        let mut table = vec![0u8; base_len];
        mem.read_slice(&mut table, GuestAddress(table_addr))
            .unwrap();
        assert_eq!(sum(&table), 0, "configuration table checksum");
        assert_eq!(u16_at(&table, 0x2a), 0, "no extended table");

        let mut p = Parsed {
            lapic_addr: u32_at(&table, 0x24),
            ..Default::default()
        };
        let count = u16_at(&table, 0x22);
        let mut off = HEADER_LEN;
        for _ in 0..count {
            let e = &table[off..];
            let len = match e[0] {
                ENTRY_PROCESSOR => {
                    p.cpus.push((e[1], e[3]));
                    20
                }
                ENTRY_BUS => {
                    p.buses.push((e[1], e[2..8].try_into().unwrap()));
                    8
                }
                ENTRY_IOAPIC => {
                    p.ioapics.push((e[1], e[2], e[3], u32_at(e, 4)));
                    8
                }
                ENTRY_IO_INTERRUPT => {
                    p.io_ints.push((e[1], e[5], e[6], e[7]));
                    8
                }
                ENTRY_LOCAL_INTERRUPT => {
                    p.local_ints.push((e[1], e[6], e[7]));
                    8
                }
                t => panic!("unknown entry type {t}"),
            };
            off += len;
        }
        assert_eq!(off, base_len, "entry count matches base table length");
        p
    }

    fn check(num_cpus: u8) {
        let mem = memory();
        setup_mptable(&mem, num_cpus).unwrap();
        let p = parse(&mem);

        assert_eq!(p.cpus.len(), usize::from(num_cpus));
        for (i, &(apic_id, flags)) in p.cpus.iter().enumerate() {
            assert_eq!(usize::from(apic_id), i);
            assert_ne!(flags & CPU_FLAG_ENABLED, 0, "cpu {i} enabled");
            assert_eq!(flags & CPU_FLAG_BSP != 0, i == 0, "only cpu 0 is the BSP");
        }
        assert_eq!(p.buses, vec![(0, *b"ISA   ")]);
        assert_eq!(p.ioapics, vec![(num_cpus, 0x11, 1, 0xfec0_0000)]);
        assert_eq!(p.io_ints.len(), 16);
        for (irq, &(ty, src, dst_id, pin)) in p.io_ints.iter().enumerate() {
            assert_eq!(ty, INT_TYPE_INT);
            assert_eq!(usize::from(src), irq);
            assert_eq!(dst_id, num_cpus, "routed to the IOAPIC");
            assert_eq!(
                usize::from(pin),
                irq,
                "identity routing, as KVM's default GSI map"
            );
        }
        assert_eq!(
            p.local_ints,
            vec![(INT_TYPE_EXTINT, 0xff, 0), (INT_TYPE_NMI, 0xff, 1)]
        );
        assert_eq!(p.lapic_addr, 0xfee0_0000);
    }

    #[test]
    fn one_cpu() {
        check(1);
    }

    #[test]
    fn two_cpus() {
        check(2);
    }

    #[test]
    fn eight_cpus() {
        check(8);
    }

    #[test]
    fn max_cpus_fits_the_window() {
        check(MAX_CPUS);
    }

    #[test]
    fn zero_cpus_is_rejected() {
        let mem = memory();
        assert!(matches!(setup_mptable(&mem, 0), Err(MptableError::NoCpus)));
    }

    #[test]
    fn too_many_cpus_is_rejected_and_writes_nothing() {
        let mem = memory();
        let err = setup_mptable(&mem, MAX_CPUS + 1).unwrap_err();
        assert!(matches!(
            err,
            MptableError::TooManyCpus { requested, max } if requested == MAX_CPUS + 1 && max == MAX_CPUS
        ));
        assert!(setup_mptable(&mem, 255).is_err());
        let mut window = vec![0u8; WINDOW_LEN];
        mem.read_slice(&mut window, GuestAddress(MPTABLE_START))
            .unwrap();
        assert!(window.iter().all(|&b| b == 0));
    }

    #[test]
    fn memory_not_covering_the_window_is_an_error() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x9_f000)]).unwrap();
        assert!(matches!(
            setup_mptable(&mem, 1),
            Err(MptableError::Write {
                addr: MPTABLE_START,
                ..
            })
        ));
    }

    #[test]
    fn rewriting_with_fewer_cpus_leaves_no_stale_entries() {
        let mem = memory();
        setup_mptable(&mem, 8).unwrap();
        setup_mptable(&mem, 2).unwrap();
        assert_eq!(parse(&mem).cpus.len(), 2);
        let mut window = vec![0u8; WINDOW_LEN];
        mem.read_slice(&mut window, GuestAddress(MPTABLE_START))
            .unwrap();
        let used = FIXED_LEN + 2 * PROCESSOR_ENTRY_LEN;
        assert!(window[used..].iter().all(|&b| b == 0));
    }
}
