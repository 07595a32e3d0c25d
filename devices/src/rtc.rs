//! The CMOS real-time clock (a Motorola MC146818 as on every PC) at ports 0x70-0x71, showing
//! the host's current UTC time.
//!
//! This module owns [`Rtc`]. Linux reads the clock at boot (`rtc_cmos`, and `mc146818_get_time`
//! for the persistent clock) and waits while register A says "update in progress". A port that
//! reads as all ones says exactly that forever, so every read waited for its timeout; here the
//! clock is never mid-update and answers at once.
//!
//! - Port 0x70 selects a register (bits 0-6; bit 7 is the NMI mask, kept and ignored); port
//!   0x71 reads or writes it. Other offsets and wider accesses read as all ones.
//! - Registers 0x00-0x09 and 0x32 (century) give the host's time when read, in BCD or binary
//!   and 24- or 12-hour form as register B asks. Writes to them are ignored: the guest cannot
//!   set the host's clock, and it has kvmclock for its own.
//! - Register A: divider bits as written (default 0x26), UIP always 0. Register B: as written
//!   (default 0x02: 24 hours, BCD, no interrupts). Register C (interrupt flags) reads 0: there
//!   are no RTC interrupts. Register D: valid RAM and time (0x80).
//! - Alarm registers and the CMOS RAM (0x0E-0x7F) hold what the guest writes.
use std::time::{SystemTime, UNIX_EPOCH};

use crate::bus::BusDevice;

/// First I/O port of the RTC window.
pub const RTC_PORT_BASE: u64 = 0x70;
/// Number of I/O ports in the window (0x70-0x71).
pub const RTC_PORT_LEN: u64 = 2;

const REG_SECONDS: u8 = 0x00;
const REG_MINUTES: u8 = 0x02;
const REG_HOURS: u8 = 0x04;
const REG_WEEKDAY: u8 = 0x06;
const REG_DAY: u8 = 0x07;
const REG_MONTH: u8 = 0x08;
const REG_YEAR: u8 = 0x09;
const REG_A: u8 = 0x0a;
const REG_B: u8 = 0x0b;
const REG_C: u8 = 0x0c;
const REG_D: u8 = 0x0d;
const REG_CENTURY: u8 = 0x32;

const A_UIP: u8 = 0x80;
const A_DEFAULT: u8 = 0x26;
const B_BINARY: u8 = 0x04;
const B_24H: u8 = 0x02;
const B_DEFAULT: u8 = B_24H;
const D_VALID: u8 = 0x80;

/// A broken-down UTC time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DateTime {
    /// Full year, e.g. 2026.
    pub year: u32,
    /// 1-12.
    pub month: u32,
    /// 1-31.
    pub day: u32,
    /// 0-23.
    pub hour: u32,
    /// 0-59.
    pub minute: u32,
    /// 0-59.
    pub second: u32,
    /// 1 (Sunday) - 7, as the RTC counts.
    pub weekday: u32,
}

impl DateTime {
    /// The UTC date and time `secs` seconds after 1970-01-01 00:00:00.
    pub fn from_unix(secs: u64) -> Self {
        let days = secs / 86_400;
        let rest = secs % 86_400;
        // 1970-01-01 was a Thursday (RTC weekday 5).
        let weekday = ((days + 4) % 7) as u32 + 1;
        let (mut year, mut left) = (1970u32, days);
        loop {
            let len = if is_leap(year) { 366 } else { 365 };
            if left < len {
                break;
            }
            left -= len;
            year += 1;
        }
        let mut month = 1u32;
        loop {
            let len = u64::from(month_days(year, month));
            if left < len {
                break;
            }
            left -= len;
            month += 1;
        }
        Self {
            year,
            month,
            // `left` is below the month's length (at most 31 days): it cannot truncate.
            #[allow(clippy::cast_possible_truncation)]
            day: left as u32 + 1,
            hour: (rest / 3600) as u32,
            minute: (rest % 3600 / 60) as u32,
            second: (rest % 60) as u32,
            weekday,
        }
    }
}

fn is_leap(y: u32) -> bool {
    (y.is_multiple_of(4) && !y.is_multiple_of(100)) || y.is_multiple_of(400)
}

fn month_days(y: u32, m: u32) -> u32 {
    match m {
        2 if is_leap(y) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Where the clock's time comes from (the host's, or a fixed one in tests).
pub type Clock = fn() -> DateTime;

fn host_clock() -> DateTime {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    DateTime::from_unix(secs)
}

/// The RTC as a bus device; see the module docs.
#[derive(Debug)]
pub struct Rtc {
    index: u8,
    ram: [u8; 128],
    clock: Clock,
}

impl Default for Rtc {
    fn default() -> Self {
        Self::new()
    }
}

impl Rtc {
    /// An RTC showing the host's time.
    pub fn new() -> Self {
        Self::with_clock(host_clock)
    }

    /// An RTC showing the time `clock` gives.
    pub fn with_clock(clock: Clock) -> Self {
        let mut ram = [0u8; 128];
        ram[usize::from(REG_A)] = A_DEFAULT;
        ram[usize::from(REG_B)] = B_DEFAULT;
        Self {
            index: 0,
            ram,
            clock,
        }
    }

    /// The index register and CMOS RAM, for a snapshot.
    pub fn state(&self) -> crate::state::RtcState {
        crate::state::RtcState {
            index: self.index,
            ram: self.ram.to_vec(),
        }
    }

    /// Loads a saved state (the clock stays this RTC's own).
    pub fn restore(
        &mut self,
        state: &crate::state::RtcState,
    ) -> Result<(), crate::state::StateError> {
        let err = |why: &str| crate::state::StateError::new("rtc", why);
        let ram: [u8; 128] = state
            .ram
            .as_slice()
            .try_into()
            .map_err(|_| err("CMOS RAM is not 128 bytes"))?;
        if state.index > 0x7f {
            return Err(err("index register out of range"));
        }
        self.index = state.index;
        self.ram = ram;
        Ok(())
    }

    fn encode(&self, v: u32) -> u8 {
        let v = (v % 100) as u8;
        if self.ram[usize::from(REG_B)] & B_BINARY != 0 {
            v
        } else {
            ((v / 10) << 4) | (v % 10)
        }
    }

    fn read_register(&self, reg: u8) -> u8 {
        let time = || (self.clock)();
        match reg {
            REG_SECONDS => self.encode(time().second),
            REG_MINUTES => self.encode(time().minute),
            REG_HOURS => {
                let h = time().hour;
                if self.ram[usize::from(REG_B)] & B_24H != 0 {
                    self.encode(h)
                } else {
                    let h12 = if h % 12 == 0 { 12 } else { h % 12 };
                    self.encode(h12) | if h >= 12 { 0x80 } else { 0 }
                }
            }
            REG_WEEKDAY => self.encode(time().weekday),
            REG_DAY => self.encode(time().day),
            REG_MONTH => self.encode(time().month),
            REG_YEAR => self.encode(time().year % 100),
            REG_CENTURY => self.encode(time().year / 100),
            REG_A => self.ram[usize::from(REG_A)] & !A_UIP,
            REG_C => 0,
            REG_D => D_VALID,
            r => self.ram[usize::from(r & 0x7f)],
        }
    }

    fn write_register(&mut self, reg: u8, value: u8) {
        match reg {
            REG_SECONDS | REG_MINUTES | REG_HOURS | REG_WEEKDAY | REG_DAY | REG_MONTH
            | REG_YEAR | REG_CENTURY | REG_C | REG_D => {}
            REG_A => self.ram[usize::from(REG_A)] = value & !A_UIP,
            r => self.ram[usize::from(r & 0x7f)] = value,
        }
    }
}

impl BusDevice for Rtc {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match (offset, data.len()) {
            (0, 1) => data[0] = self.index,
            (1, 1) => data[0] = self.read_register(self.index),
            _ => data.fill(0xff),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        match (offset, data) {
            (0, [v]) => self.index = v & 0x7f,
            (1, [v]) => self.write_register(self.index, *v),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::Bus;
    use std::sync::{Arc, Mutex};

    /// 2026-12-02 05:04:09 UTC, a Wednesday.
    fn fixed() -> DateTime {
        DateTime::from_unix(1_796_187_849)
    }

    fn bus() -> Bus {
        let mut bus = Bus::new();
        bus.insert(
            RTC_PORT_BASE,
            RTC_PORT_LEN,
            Arc::new(Mutex::new(Rtc::with_clock(fixed))),
        )
        .unwrap();
        bus
    }

    fn cmos(bus: &Bus, reg: u8) -> u8 {
        bus.write(0x70, &[reg | 0x80]); // with the NMI mask bit, as Linux writes it
        let mut b = [0xaa];
        assert!(bus.read(0x71, &mut b));
        b[0]
    }

    #[test]
    fn unix_time_breaks_down_to_calendar_dates() {
        let t = fixed();
        assert_eq!(
            (t.year, t.month, t.day, t.hour, t.minute, t.second, t.weekday),
            (2026, 12, 2, 5, 4, 9, 4)
        );
        let epoch = DateTime::from_unix(0);
        assert_eq!(
            (epoch.year, epoch.month, epoch.day, epoch.weekday),
            (1970, 1, 1, 5)
        );
        // 2024-02-29 12:00:00 (leap day), a Thursday.
        let leap = DateTime::from_unix(1_709_208_000);
        assert_eq!(
            (leap.year, leap.month, leap.day, leap.hour, leap.weekday),
            (2024, 2, 29, 12, 5)
        );
        // 2000-12-31 23:59:59 (leap century year, last second).
        let end = DateTime::from_unix(978_307_199);
        assert_eq!(
            (end.year, end.month, end.day, end.hour, end.second),
            (2000, 12, 31, 23, 59)
        );
    }

    #[test]
    fn time_registers_read_in_bcd_24_hours() {
        let bus = bus();
        let regs = [0x00, 0x02, 0x04, 0x06, 0x07, 0x08, 0x09, 0x32];
        let got: Vec<u8> = regs.iter().map(|&r| cmos(&bus, r)).collect();
        assert_eq!(got, [0x09, 0x04, 0x05, 0x04, 0x02, 0x12, 0x26, 0x20]);
    }

    #[test]
    fn never_updating_and_valid() {
        let bus = bus();
        for _ in 0..1000 {
            assert_eq!(cmos(&bus, 0x0a) & 0x80, 0, "update in progress");
        }
        assert_eq!(cmos(&bus, 0x0a), 0x26);
        assert_eq!(cmos(&bus, 0x0d), 0x80);
        assert_eq!(cmos(&bus, 0x0c), 0);
    }

    #[test]
    fn binary_and_12_hour_modes_follow_register_b() {
        let bus = bus();
        bus.write(0x70, &[0x0b]);
        bus.write(0x71, &[B_BINARY]); // binary, 12 hours
        assert_eq!(cmos(&bus, 0x0b), B_BINARY);
        assert_eq!(cmos(&bus, 0x00), 9);
        assert_eq!(cmos(&bus, 0x08), 12);
        assert_eq!(cmos(&bus, 0x04), 5, "5 AM");
        assert_eq!(cmos(&bus, 0x09), 26);
    }

    #[test]
    fn ram_keeps_writes_and_time_ignores_them() {
        let bus = bus();
        bus.write(0x70, &[0x40]);
        bus.write(0x71, &[0x5a]);
        assert_eq!(cmos(&bus, 0x40), 0x5a);
        bus.write(0x70, &[0x00]);
        bus.write(0x71, &[0x59]);
        assert_eq!(cmos(&bus, 0x00), 0x09);
        bus.write(0x70, &[0x0a]);
        bus.write(0x71, &[0xff]);
        assert_eq!(cmos(&bus, 0x0a), 0x7f, "UIP cannot be set");
        let mut wide = [0u8; 2];
        assert!(bus.read(0x70, &mut wide));
        assert_eq!(wide, [0xff; 2]);
    }
}
