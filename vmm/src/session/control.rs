//! What a running VM does with its control requests: the session drains the VM's inbox after
//! each turn of the event loop and answers every request with one line. Pausing waits at most
//! [`PAUSE_WAIT`] for the vCPUs to park (a vCPU busy in a long exit parks at its next one: the
//! VM reports `pausing` until then).
use std::time::Duration;

use std::sync::Arc;

use mirrorball_devices::serial::watch::{SerialWatch, MAX_WATCH_TEXT};

use crate::builder::Guest;
use crate::control::protocol::{Command, Reply, Request, RunState};
use crate::exit::VmEnd;

use super::RunningVm;

/// When a VM takes a snapshot on its own.
#[derive(Clone, Debug, PartialEq)]
pub enum SnapshotWhen {
    /// Once it has run this long (`--snapshot-after`).
    After(Duration),
    /// When its console prints a line containing this text (`--snapshot-on`).
    OnSerial(String),
}

/// An armed snapshot trigger.
pub(super) enum Trigger {
    /// At this uptime.
    After(Duration),
    /// When this watch fires.
    OnSerial(Arc<SerialWatch>),
}

/// Longest the event loop waits for the vCPUs of a VM to park.
pub const PAUSE_WAIT: Duration = Duration::from_millis(100);

impl RunningVm {
    /// Handles the requests that arrived on the VM's control socket, and publishes the VM's
    /// paused flag when it changed.
    pub(super) fn serve_control(&mut self) {
        let pending = match &self.control_inbox {
            Some(inbox) => std::mem::take(&mut *inbox.lock().unwrap_or_else(|p| p.into_inner())),
            None => Vec::new(),
        };
        for p in pending {
            let reply = match &p.request {
                Ok(request) => self.handle(request),
                Err(e) => Reply::error(None, e.clone()),
            };
            p.reply(&reply);
        }
        self.snapshot_if_due();
        self.publish_paused();
    }

    /// Takes a snapshot into `dir` when `when` says (`--snapshot-after`, `--snapshot-on`).
    /// Err: the trigger does not fit this VM (one line).
    pub fn snapshot_when(
        &mut self,
        when: SnapshotWhen,
        dir: std::path::PathBuf,
    ) -> Result<(), String> {
        let trigger = match when {
            SnapshotWhen::After(after) => Trigger::After(after),
            SnapshotWhen::OnSerial(text) => {
                let Guest::Linux { devices, .. } = &self.guest else {
                    return Err(
                        "--snapshot-on needs a Linux guest (it watches the serial console)".into(),
                    );
                };
                let control = self.control.clone();
                // On the vCPU thread that wrote the line: the vCPU parks at once, before the
                // guest runs on, and the event loop takes the snapshot.
                let armed = devices
                    .serial_watch
                    .arm(&text, Box::new(move || control.request_pause()));
                if !armed {
                    return Err(format!(
                        "--snapshot-on: the text must be 1 to {MAX_WATCH_TEXT} bytes on one line"
                    ));
                }
                Trigger::OnSerial(devices.serial_watch.clone())
            }
        };
        self.snapshot_trigger = Some((trigger, dir));
        Ok(())
    }

    fn snapshot_if_due(&mut self) {
        let due = match &self.snapshot_trigger {
            Some((Trigger::After(after), _)) => self.uptime() >= *after,
            Some((Trigger::OnSerial(watch), _)) => watch.fired(),
            None => false,
        };
        if !due || self.is_ending() {
            return;
        }
        let Some((trigger, dir)) = self.snapshot_trigger.take() else {
            return;
        };
        let dir = std::path::absolute(&dir).unwrap_or(dir);
        let result = self.snapshot_to(&dir);
        if matches!(trigger, Trigger::OnSerial(_)) {
            // The watch paused the VM; it runs on after the snapshot.
            self.resume();
        }
        match result {
            Ok(detail) => {
                let disk = detail["disk"]["overlay_blocks"]
                    .as_u64()
                    .map(|blocks| format!(", disk overlay: {blocks} blocks"))
                    .unwrap_or_default();
                eprintln!(
                    "vmm: {}: snapshot in {} ({:.1} ms paused{disk})",
                    self.name,
                    dir.display(),
                    detail["pause_ms"].as_f64().unwrap_or(0.0)
                );
            }
            Err(e) => eprintln!("vmm: {}: snapshot failed: {e}", self.name),
        }
    }

    /// The VM's state as the protocol names it.
    pub fn run_state(&self) -> RunState {
        if self.is_ending() {
            RunState::Ending
        } else if self.control.all_parked() {
            RunState::Paused
        } else if self.control.pause_requested() {
            RunState::Pausing
        } else {
            RunState::Running
        }
    }

    fn handle(&mut self, request: &Request) -> Reply {
        let id = request.id;
        if self.is_ending() && request.command != Command::Status {
            return Reply::error(id, "the VM is ending");
        }
        let detail = match &request.command {
            Command::Status => None,
            Command::Pause => {
                self.pause();
                None
            }
            Command::Resume => {
                self.resume();
                None
            }
            Command::Stop => {
                self.stop(VmEnd::Stopped);
                None
            }
            Command::Snapshot { dir } => match self.snapshot_to(std::path::Path::new(dir)) {
                Ok(detail) => Some(detail),
                Err(e) => return Reply::error(id, e),
            },
        };
        self.publish_paused();
        Reply {
            ok: true,
            id,
            name: Some(self.name.clone()),
            state: Some(self.run_state()),
            uptime_s: Some(self.uptime().as_secs_f64()),
            vcpus_running: Some(self.control.running_vcpus()),
            detail,
            ..Reply::default()
        }
    }

    /// Parks every vCPU (waiting at most [`PAUSE_WAIT`]); true once fully paused.
    pub fn pause(&mut self) -> bool {
        let paused = self.running.as_ref().is_some_and(|r| r.pause(PAUSE_WAIT));
        self.publish_paused();
        paused
    }

    /// Lets the vCPUs run again.
    pub fn resume(&mut self) {
        if let Some(r) = &self.running {
            r.resume();
        }
        self.publish_paused();
    }

    pub(super) fn publish_paused(&mut self) {
        let paused = self.run_state() == RunState::Paused;
        if paused == self.published_paused {
            return;
        }
        if let Some((_, regions)) = &self.sampler {
            if let Ok(region) = regions.host.region_mut() {
                if let Ok(host) = mirrorball_profiler_abi::HostRegion::attach(region) {
                    host.set_paused(paused);
                }
            }
        }
        self.published_paused = paused;
    }
}
