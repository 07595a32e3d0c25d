//! The copy-on-write virtio-blk device as a hostile guest drives it: a `VirtioBlkDevice`
//! (virtio-mmio transport, virtqueue, request parsing, copy-on-write disk with an in-memory
//! overlay) over 64 KiB of guest memory whose every byte the input may write: descriptor tables,
//! rings, indirect tables, headers and buffers anywhere, queue registers set to anything, and
//! notifications at any time.
//!
//! Input: a sequence of operations, each starting with an opcode byte (`op % 6`):
//! * 0: guest memory write — offset (u16), length byte, that many bytes
//! * 1: register write — register selector byte (one of the 0x000..0x100 offsets), u32 value
//! * 2: driver bring-up — reset, features, queue size `1 << (b % 9)`, three ring addresses (u16
//!   each, so mostly inside memory, sometimes misaligned), ready, DRIVER_OK
//! * 3: `QueueNotify` — a byte: mostly queue 0, else any u32
//! * 4: read — any offset in the window, size 0..=8
//! * 5: a request header in memory — offset (u16, 16-aligned), type (a known one or any u32),
//!   sector (a small one or any u64)
//!
//! An input whose first byte has its top bit set runs the device with `map=on` (reads of whole
//! base pages mapped into guest memory, at most 16 mappings, then copies): the guest chooses
//! which pages of its memory get replaced.
//!
//! Checked: nothing panics; the base image file is never written; counters never go down; the
//! overlay never holds more blocks than the disk has; the interrupt eventfd was signalled
//! exactly `used_interrupts` times.
#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use mirrorball_devices::bus::BusDevice;
use mirrorball_devices::virtio_blk::disk::{BaseImage, CowDisk, OverlaySpec, BLOCK_SIZE};
use mirrorball_devices::virtio_blk::map::{BaseMapper, MappedPages};
use mirrorball_devices::virtio_blk::{VirtioBlk, VirtioBlkDevice};
use mirrorball_devices::virtio_mmio::{regs, status as st, VIRTIO_MMIO_WINDOW};
use mirrorball_devices::EventFdTrigger;
use mirrorball_fuzz::Bytes;
use vm_memory::{Bytes as _, GuestAddress, GuestMemoryMmap};

const MEM: usize = 64 << 10;
const BASE_LEN: usize = 40 << 10;

/// Registers an op-1 write may target.
const REGS: &[u64] = &[
    regs::STATUS,
    regs::QUEUE_SEL,
    regs::QUEUE_NUM,
    regs::QUEUE_READY,
    regs::QUEUE_NOTIFY,
    regs::QUEUE_DESC_LOW,
    regs::QUEUE_DESC_HIGH,
    regs::QUEUE_DRIVER_LOW,
    regs::QUEUE_DRIVER_HIGH,
    regs::QUEUE_DEVICE_LOW,
    regs::QUEUE_DEVICE_HIGH,
    regs::DRIVER_FEATURES,
    regs::DRIVER_FEATURES_SEL,
    regs::INTERRUPT_ACK,
    regs::QUEUE_RESET,
];

fn base_image() -> &'static (PathBuf, Vec<u8>) {
    static BASE: OnceLock<(PathBuf, Vec<u8>)> = OnceLock::new();
    BASE.get_or_init(|| {
        let path =
            std::env::temp_dir().join(format!("mb-fuzz-virtio-blk-{}.img", std::process::id()));
        let data: Vec<u8> = (0..BASE_LEN).map(|i| (i % 241) as u8).collect();
        std::fs::write(&path, &data).expect("base image");
        (path, data)
    })
}

fn write32(dev: &mut VirtioBlkDevice, reg: u64, value: u32) {
    dev.write(reg, &value.to_le_bytes());
}

fuzz_target!(|data: &[u8]| {
    let (path, original) = base_image();
    let base = BaseImage::open(path).expect("open base");
    let disk = CowDisk::new(base.clone(), &OverlaySpec::Memory).expect("disk");
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM)]).expect("memory");
    let mut blk = VirtioBlk::new(disk, mem.clone(), "fuzz");
    if data.first().is_some_and(|b| b & 0x80 != 0) {
        let pages = std::sync::Arc::new(MappedPages::new(MEM as u64));
        blk = blk.with_mapper(BaseMapper::new(mem.clone(), base, 16, pages));
    }
    let disk_metrics = blk.metrics();
    let irq = EventFdTrigger::new().expect("eventfd");
    let irq_watch = irq.try_clone_event_fd().expect("eventfd clone");
    let mut dev = VirtioBlkDevice::new(blk, irq);
    let transport = dev.metrics();

    let mut input = Bytes::new(data);
    let mut counters = [0u64; 9];
    let mut ops = 0;
    while !input.is_empty() && ops < 2048 {
        ops += 1;
        match input.u8() % 6 {
            0 => {
                let at = u64::from(input.u16());
                let len = usize::from(input.u8());
                let bytes = input.take(len);
                // Writes that run past the end are cut by vm-memory (or refused).
                let _ = mem.write_slice(bytes, GuestAddress(at));
            }
            1 => {
                let reg = REGS[usize::from(input.u8()) % REGS.len()];
                let value = input.u32();
                write32(&mut dev, reg, value);
            }
            2 => {
                let size = 1u32 << (input.u8() % 9);
                let (desc, avail, used) = (input.u16(), input.u16(), input.u16());
                write32(&mut dev, regs::STATUS, 0);
                write32(&mut dev, regs::STATUS, u32::from(st::ACKNOWLEDGE | st::DRIVER));
                write32(&mut dev, regs::DRIVER_FEATURES_SEL, 1);
                write32(&mut dev, regs::DRIVER_FEATURES, 1);
                write32(&mut dev, regs::DRIVER_FEATURES_SEL, 0);
                write32(&mut dev, regs::DRIVER_FEATURES, 0);
                let ok = st::ACKNOWLEDGE | st::DRIVER | st::FEATURES_OK;
                write32(&mut dev, regs::STATUS, u32::from(ok));
                write32(&mut dev, regs::QUEUE_SEL, 0);
                write32(&mut dev, regs::QUEUE_NUM, size);
                write32(&mut dev, regs::QUEUE_DESC_LOW, u32::from(desc));
                write32(&mut dev, regs::QUEUE_DRIVER_LOW, u32::from(avail));
                write32(&mut dev, regs::QUEUE_DEVICE_LOW, u32::from(used));
                write32(&mut dev, regs::QUEUE_READY, 1);
                write32(&mut dev, regs::STATUS, u32::from(ok | st::DRIVER_OK));
            }
            3 => {
                let b = input.u8();
                let queue = if b < 0xf0 { 0 } else { input.u32() };
                write32(&mut dev, regs::QUEUE_NOTIFY, queue);
            }
            4 => {
                let offset = u64::from(input.u16()) % (VIRTIO_MMIO_WINDOW + 16);
                let size = usize::from(input.below(9));
                let mut buf = [0u8; 8];
                dev.read(offset, &mut buf[..size]);
            }
            _ => {
                let at = u64::from(input.u16()) & !0xf;
                let kind = match input.u8() % 6 {
                    0 => 0,
                    1 => 1,
                    2 => 4,
                    3 => 8,
                    _ => input.u32(),
                };
                let sector = match input.u8() % 4 {
                    0 => u64::from(input.u8()),
                    _ => input.u64(),
                };
                let mut header = [0u8; 16];
                header[..4].copy_from_slice(&kind.to_le_bytes());
                header[8..].copy_from_slice(&sector.to_le_bytes());
                let _ = mem.write_slice(&header, GuestAddress(at));
            }
        }
        let now = [
            disk_metrics.reads(),
            disk_metrics.writes(),
            disk_metrics.read_bytes(),
            disk_metrics.written_bytes(),
            disk_metrics.io_errors(),
            disk_metrics.malformed(),
            disk_metrics.unsupported(),
            transport.queue_notifies(),
            transport.used_interrupts(),
        ];
        assert!(
            now.iter().zip(counters.iter()).all(|(n, c)| n >= c),
            "counters went down: {counters:?} -> {now:?}"
        );
        counters = now;
        assert!(disk_metrics.overlay_blocks() <= (BASE_LEN as u64).div_ceil(BLOCK_SIZE));
    }
    assert_eq!(transport.irq_errors(), 0);
    assert_eq!(irq_watch.read().unwrap_or(0), transport.used_interrupts());
    assert_eq!(&std::fs::read(path).expect("read base"), original);
});
