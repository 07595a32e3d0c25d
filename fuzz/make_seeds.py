#!/usr/bin/env python3
"""Writes the committed seed corpus (fuzz/corpus/<target>/seed-*). Re-run after changing a
target's input format; the files are small and deterministic."""
import os
import struct

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "corpus")


def put(target, name, data):
    d = os.path.join(ROOT, target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "seed-" + name), "wb") as f:
        f.write(bytes(data))


# ---- bus_devices: op (0 read, 1|3 write, 2 input), address selector, size, data ----
COM1 = lambda reg: [0, 4 + reg]          # selector 0: 0x3f8 - 4 + n
I8042 = lambda off: [3, 4 + off]         # selector 3: 0x60 - 4 + n
wr = lambda sel, data: [1] + sel + [len(data)] + list(data)
rd = lambda sel, size: [0] + sel + [size]
inp = lambda data: [2, len(data)] + list(data)

put("bus_devices", "thr-write", wr(COM1(0), b"A") + wr(COM1(0), b"\n"))
put("bus_devices", "i8042-reset", wr(I8042(4), [0xfe]) + rd(I8042(4), 1) + rd(I8042(0), 1))
put("bus_devices", "input-then-rbr",
    wr(COM1(1), [0x0f]) + inp(b"hello") + rd(COM1(5), 1) + rd(COM1(2), 1)
    + rd(COM1(0), 1) * 6)
put("bus_devices", "loopback",
    wr(COM1(4), [0x10]) + wr(COM1(0), b"x") + rd(COM1(0), 1) + inp(b"dropped")
    + wr(COM1(4), [0x00]))
put("bus_devices", "dlab",
    wr(COM1(3), [0x80]) + wr(COM1(0), [0x01]) + wr(COM1(1), [0x00]) + rd(COM1(0), 1)
    + wr(COM1(3), [0x03]) + rd(COM1(3), 1))
put("bus_devices", "wide-and-unmapped",
    wr(COM1(0), b"ab") + rd(COM1(6), 4) + wr(I8042(3), [0xfe, 0]) + [1, 6, 3, 8] + [0] * 8
    + [0, 7] + [0xf8, 3, 0, 0, 0, 0, 0, 0] + [4] + rd([5, 0x80, 0], 1) + inp(b"z" * 63))


# ---- workload_doorbell: count, then ops (op % 8) ----
def event(kind, arg=0):
    return list(struct.pack("<I", (kind << 24) | (arg & 0xFFFFFF)))


bell = lambda vcpu, kind, arg=0: [0, vcpu] + event(kind, arg)
progress = [4]

put("workload_doorbell", "two-tasks-finish",
    [2] + bell(0, 1) + bell(1, 1) + bell(0, 2, 1) + bell(1, 2, 1) + progress
    + bell(0, 3, 0xabcdef) + progress + bell(1, 3, 7) + progress)
put("workload_doorbell", "bad-params", [1] + bell(0, 4, 2) + bell(0, 0x77) + progress)
put("workload_doorbell", "out-of-range-and-odd-writes",
    [3] + bell(9, 1) + [0, 0xff] + [0xff] * 8 + event(3)
    + [3, 1, 0, 3, 1, 2, 3] + [3, 1, 1, 128, 4] + event(1) + [3, 2, 2] + [0] * 8 + [0]
    + [5, 0, 2, 0x80, 0, 0xf8, 0x03] + [6] + event(2, 5) + progress)


def task(gpa, size, accesses, seed, iters, pattern, bitmap=None, flags=0):
    """A task's fields as the harness reads them (vCPU 0), its flags selector (0 none, 1
    TASK_READ_ONLY, 2 followed by any u32), then its page-bitmap selector: 0 none, 1 right after
    the region, 2 followed by (gpa, bytes)."""
    fields = list(struct.pack("<QQQQIII", gpa, size, accesses, seed, iters, pattern, 0))
    fields += {0: [0], 1: [1]}.get(flags, [2] + list(struct.pack("<I", flags)))
    if bitmap is None:
        return fields + [0]
    if bitmap == "after":
        return fields + [1]
    return fields + [2] + list(struct.pack("<QQ", *bitmap))


put("workload_doorbell", "validate",
    [1]
    + [7, 0, 1, 1, 0] + task(0x100_0000, 1 << 20, 100, 0x5EED, 20, 1, "after") + [0]
    + [7, 0, 2, 2, 0] + task(0x100_0000, 4096, 1, 1, 1, 0)
    + [1] + task(0x100_0000, 4096, 1, 1, 1, 0, flags=1) + [0]
    + [1] + task(0x100_0000, 4096, 1, 1, 1, 0, flags=6) + [0]
    + [1] + task(0x200_0000, 0, 1, 1, 1, 9) + [1]
    + [7, 0, 1, 1, 0] + task(0xFFFF_FFFF_FFFF_F000, 1 << 20, 1, 1, 1, 0) + [0]
    + [7, 0, 1, 1, 0] + task(0x100_0000, 1 << 20, 1, 1, 1, 0, (0x100_8000, 32)) + [0]
    + [7, 1] + list(struct.pack("<I", 0x4C57424D)) + [1, 0, 0]
    + [7, 4] + list(struct.pack("<I", 0xFFFFFFFF)) + [0, 0xff] + [0xff] * 8)


# ---- kvm_stats_parse: a well-formed stats file ----
def stats_file(name_size, ident, descs, data):
    desc_offset = 24 + name_size
    data_offset = desc_offset + len(descs) * (16 + name_size)
    out = struct.pack("<6I", 0, name_size, len(descs), 24, desc_offset, data_offset)
    out += ident.encode().ljust(name_size, b"\0")
    for flags, exponent, size, offset, bucket, name in descs:
        out += struct.pack("<IhHII", flags, exponent, size, offset, bucket)
        out += name.encode().ljust(name_size, b"\0")
    out += b"".join(struct.pack("<Q", v) for v in data)
    return out


CUMULATIVE, INSTANT, PEAK, LINEAR_HIST, LOG_HIST = 0, 1, 2, 3, 4
UNIT_NONE, UNIT_BYTES, UNIT_SECONDS, UNIT_CYCLES, UNIT_BOOLEAN = 0, 0x10, 0x20, 0x30, 0x40
POW2 = 0x100
put("kvm_stats_parse", "vcpu", stats_file(48, "kvm-1234/vcpu-0", [
    (CUMULATIVE, 0, 1, 0, 0, "exits"),
    (CUMULATIVE, 0, 1, 8, 0, "pf_taken"),
    (INSTANT | UNIT_BOOLEAN, 0, 1, 16, 0, "guest_mode"),
    (PEAK | UNIT_BYTES | POW2, 0, 1, 24, 0, "max_mmu_page_hash_collisions"),
    (CUMULATIVE | UNIT_SECONDS, -9, 1, 32, 0, "halt_wait_ns"),
    (LOG_HIST | UNIT_SECONDS, -9, 8, 40, 0, "halt_poll_success_hist"),
    (LINEAR_HIST, 0, 4, 104, 16, "lin_hist"),
], list(range(1, 18))))
put("kvm_stats_parse", "vm-small-names", stats_file(8, "kvm-1", [
    (INSTANT | UNIT_BYTES, 0, 1, 8, 0, "pages_4k"),
    (CUMULATIVE, 0, 1, 0, 0, "pages_4k"),
    (0xF | UNIT_CYCLES, 0, 2, 16, 0, "future"),
], [5, 6, 7, 8]))
put("kvm_stats_parse", "empty", stats_file(16, "kvm-2", [], []))


# ---- kernel_loader: a minimal ELF vmlinux and a minimal bzImage ----
def elf(entry=0x100000, paddr=0x100000, with_note=True):
    phnum = 2 if with_note else 1
    ehdr = b"\x7fELF" + bytes([2, 1, 1, 0]) + bytes(8)
    ehdr += struct.pack("<HHIQQQIHHHHHH", 2, 0x3E, 1, entry, 64, 0, 0, 64, 56, phnum, 64, 0, 0)
    payload_off = 64 + 56 * phnum
    code = b"\xf4" * 16  # hlt
    note = struct.pack("<III", 4, 4, 18) + b"Xen\0" + struct.pack("<I", 0x100000)
    phdrs = struct.pack("<IIQQQQQQ", 1, 5, payload_off, paddr, paddr, len(code), 0x1000, 0x1000)
    if with_note:
        phdrs += struct.pack("<IIQQQQQQ", 4, 4, payload_off + len(code), 0, 0, len(note),
                             len(note), 4)
    return ehdr + phdrs + code + (note if with_note else b"")


def bzimage(version=0x020F, xloadflags=1, syssize=0x10, length=2048, pref=0x1000000):
    img = bytearray(length)
    struct.pack_into("<B", img, 0x1F1, 1)           # setup_sects
    struct.pack_into("<I", img, 0x1F4, syssize)     # syssize
    struct.pack_into("<H", img, 0x1FE, 0xAA55)      # boot_flag
    struct.pack_into("<I", img, 0x202, 0x53726448)  # "HdrS"
    struct.pack_into("<H", img, 0x206, version)
    struct.pack_into("<B", img, 0x211, 1)           # loadflags: LOADED_HIGH
    struct.pack_into("<I", img, 0x214, 0x100000)    # code32_start
    struct.pack_into("<I", img, 0x22C, 0x37FFFFFF)  # initrd_addr_max
    struct.pack_into("<I", img, 0x230, 0x200000)    # kernel_alignment
    struct.pack_into("<H", img, 0x236, xloadflags)
    struct.pack_into("<I", img, 0x238, 2047)        # cmdline_size
    struct.pack_into("<Q", img, 0x258, pref)        # pref_address
    struct.pack_into("<I", img, 0x260, 0x100000)    # init_size
    img[0x400:0x410] = b"\xf4" * 16
    return bytes(img)


put("kernel_loader", "elf", elf())
put("kernel_loader", "elf-no-note", elf(with_note=False))
put("kernel_loader", "elf-low-entry", elf(entry=0x1000, paddr=0x1000))
put("kernel_loader", "bzimage", bzimage())
put("kernel_loader", "bzimage-old", bzimage(version=0x0206, xloadflags=0))
put("kernel_loader", "bzimage-truncated", bzimage(syssize=0x1000))


# ---- profiler_device: op (0|1 read, 2|3 write, 4 status, 5 features, 6 period, 7 host) ----
REG = lambda off: [0, off // 4]             # selector 0: BASE + 4 * n
CFG = lambda off: [4, off]                  # selector 4: BASE + 0x100 + n
prd = lambda sel, size: [0] + sel + [size]
pwr = lambda sel, data: [2] + sel + [len(data)] + list(data)
le32 = lambda v: list(struct.pack("<I", v))
le64 = lambda v: list(struct.pack("<Q", v))
step = lambda n: [4, n]                     # 0 reset, 1 ACK, 2 +DRIVER, 3 +FEATURES_OK, 4 +DRIVER_OK
feat = lambda sel, v: [5, sel] + le32(v)
period = lambda ns, split: [6] + le64(ns) + [split]

put("profiler_device", "bring-up",
    prd(REG(0x000), 4) + prd(REG(0x004), 4) + prd(REG(0x008), 4) + prd(REG(0x00c), 4)
    + step(0) + step(1) + step(2) + pwr(REG(0x014), le32(1)) + prd(REG(0x010), 4)
    + feat(0, 1) + feat(1, 1) + step(3) + prd(REG(0x070), 4)
    + period(1_000_000, 1) + step(4) + [7, 0] + le64(20_000_000) + prd(REG(0x060), 4)
    + [7, 3] + le32(2) + prd(REG(0x0fc), 4) + prd(CFG(0x10), 8))
put("profiler_device", "features-refused",
    step(1) + step(2) + feat(0, 1) + feat(1, 0) + step(3) + step(4) + prd(REG(0x070), 4)
    + period(5_000_000, 0) + feat(2, 1) + feat(1, 1) + step(3) + [4, 0x8f])
put("profiler_device", "shm-and-config",
    pwr(REG(0x0ac), le32(0)) + prd(REG(0x0b0), 4) + prd(REG(0x0b4), 4) + prd(REG(0x0b8), 4)
    + prd(REG(0x0bc), 4) + pwr(REG(0x0ac), le32(5)) + prd(REG(0x0b0), 4) + prd(REG(0x0b8), 4)
    + prd(CFG(0x00), 2) + prd(CFG(0x04), 4) + prd(CFG(0x08), 8) + prd(CFG(0x37), 1)
    + prd(CFG(0x34), 8) + prd(CFG(0x20), 4))
put("profiler_device", "malformed",
    prd(REG(0x000), 1) + prd(REG(0x000), 2) + prd(REG(0x000), 8) + prd([6, 17, 0], 4)
    + pwr(REG(0x000), le32(0)) + pwr(REG(0x018), le32(1)) + prd(REG(0x014), 4)
    + prd([6, 0xfe, 0x0f], 4) + prd([7] + le64(0xffff_ffff_ffff_fffc), 8)
    + pwr(CFG(0x10), [1, 2, 3]) + step(1) + [4, 0x90] + [7, 2] + [7, 1, 1] + step(0))


# ---- record_parse: what `vmm record` writes (CSV with its header; JSON lines) ----
CSV_COLUMNS = "kind,vm,seq,read_ns,timestamp_ns,task_id,pid,comm,cpu,flags,min_flt,maj_flt,utime_ns,stime_ns,interval_ns,pf_taken,pf_fixed,exits,host_min_flt,host_maj_flt,vcpu_utime_ns,vcpu_stime_ns,guest_switch_count,count,ring".split(",")


def csv_row(**fields):
    return ",".join(str(fields.get(c, "")) for c in CSV_COLUMNS).encode() + b"\n"


put("record_parse", "csv",
    ",".join(CSV_COLUMNS).encode() + b"\n"
    + csv_row(kind="guest", vm="1-0", seq=0, read_ns=10, timestamp_ns=5, task_id=1, pid=2,
              comm="work", min_flt=100, maj_flt=0, utime_ns=10, stime_ns=10)
    + csv_row(kind="host", vm="1-0", seq=0, read_ns=10, timestamp_ns=6, task_id=1, pid=2,
              comm="work", cpu=0, interval_ns=1000, pf_taken=7, pf_fixed=7, exits=9,
              host_min_flt=3, vcpu_utime_ns=500)
    + csv_row(kind="lost", vm="1-0", seq=5, read_ns=10, count=3, ring="guest")
    + b'garbage,"quoted,comma",x\n')
put("record_parse", "jsonl",
    b'{"kind":"meta","vm":"1-0","name":"vm","guest":"workload","vcpus":1}\n'
    b'{"kind":"guest","vm":"1-0","seq":0,"timestamp_ns":5,"task_id":1,"pid":2,"min_flt":9}\n'
    b'{"kind":"lost","vm":"1-0","ring":"host","seq":3,"count":2}\n'
    b'{"kind":"nope"}\n{not json\n')


# ---- virtio_blk: ops (op % 6): 0 memory write, 2 bring-up, 3 notify, 5 header ----
def blk_mem(at, data):
    data = bytes(data)
    return [0] + list(struct.pack("<H", at)) + [len(data)] + list(data)


def blk_desc(addr, length, flags, nxt):
    return struct.pack("<QIHH", addr, length, flags, nxt)


def blk_header(at, kind, sector):
    # type selector 4 = any u32 follows; sector selector 1 = any u64 follows
    return [5] + list(struct.pack("<H", at)) + [4] + list(struct.pack("<I", kind)) \
        + [1] + list(struct.pack("<Q", sector))


BLK_UP = [2, 4] + list(struct.pack("<HHH", 0x1000, 0x2000, 0x3000))  # queue of 16


def blk_request(kind, sector, data_flags, length, avail_idx):
    descs = (blk_desc(0x4000, 16, 1, 1) + blk_desc(0x5000, length, 1 | data_flags, 2)
             + blk_desc(0x6000, 1, 2, 0))
    ring = struct.pack("<HHH", 0, avail_idx, 0) if avail_idx == 1 else \
        struct.pack("<H", avail_idx)
    at = 0x2000 if avail_idx == 1 else 0x2002
    seq = blk_header(0x4000, kind, sector) + blk_mem(0x1000, descs)
    if avail_idx != 1:
        seq += blk_mem(0x2004 + 2 * (avail_idx - 1), struct.pack("<H", 0))
    return seq + blk_mem(at, ring) + [3, 0]


put("virtio_blk", "read", BLK_UP + blk_request(0, 1, 2, 512, 1))
put("virtio_blk", "write-then-read",
    BLK_UP + blk_mem(0x5000, b"\xab" * 200) + blk_request(1, 3, 0, 512, 1)
    + blk_request(0, 0, 2, 4096, 2))
put("virtio_blk", "flush-getid-unsupp",
    BLK_UP + blk_request(4, 0, 2, 16, 1) + blk_request(8, 0, 2, 20, 2)
    + blk_request(77, 0, 2, 16, 3))
put("virtio_blk", "bad-sector", BLK_UP + blk_request(0, 2**64 - 1, 2, 512, 1))
# ---- control_protocol: chunk size, then what a client sends ----
put("control_protocol", "status", b"\x40" + b'{"cmd":"status"}\n{"cmd":"pause","id":3}\n')
put("control_protocol", "snapshot-split",
    b"\x03" + b'{"cmd":"snapshot","dir":"/tmp/s"}\r\ngarbage\n{"cmd":"stop","x":1}\n')
put("control_protocol", "long", b"\xff" + b"x" * 5000 + b'\n{"cmd":"resume"}\n')
# snapshot_state's seeds are real state files (a workload snapshot; flag byte 0 or 0xff),
# committed as they are: a new one comes from `vmm ctl NAME snapshot DIR`.
