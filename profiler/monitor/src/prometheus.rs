//! `vmm prometheus`: per VM / vCPU / task counters in the Prometheus text exposition format
//! (version 0.0.4), written once or served on a loopback address at `/metrics`.
//!
//! Guest counters (`mirrorball_guest_task_*`) are the guest's absolute per-task counters as
//! last sampled: guest claims. Host counters (`mirrorball_vcpu_*`, `mirrorball_task_*`) are sums
//! of the host sampler's deltas since the exporter attached to the VM (for a one-shot export:
//! over the history the host ring still holds); those charged to a task follow the guest's
//! claim of which task ran. Label values are sanitised and escaped; the number of tasks per VM
//! is bounded by the model ([`crate::ModelConfig::max_tasks`]). Scrapes are served
//! concurrently by a bounded pool ([`http`]); a VM whose guest region is invalid is exported from
//! its host region, with `mirrorball_vm_guest_region_valid 0` and a warning on stderr.

use std::fmt::Write as _;
use std::io::{self, Write};
use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::fleet::Fleet;
use crate::model::{HostTotals, ModelConfig};
use crate::Error;

pub mod http;

/// Escapes a label value.
pub fn escape_label(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

struct Family<'a> {
    out: &'a mut String,
}

impl Family<'_> {
    fn begin<'a>(out: &'a mut String, name: &str, kind: &str, help: &str) -> Family<'a> {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} {kind}");
        Family { out }
    }

    fn sample(&mut self, name: &str, labels: &[(&str, String)], value: f64) {
        self.out.push_str(name);
        if !labels.is_empty() {
            self.out.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.out.push(',');
                }
                let _ = write!(self.out, "{k}=\"{}\"", escape_label(v));
            }
            self.out.push('}');
        }
        let v = if value.is_finite() { value } else { 0.0 };
        let _ = writeln!(self.out, " {v}");
    }
}

/// The exposition of everything `fleet` holds.
pub fn render(fleet: &Fleet) -> String {
    let mut out = String::new();
    let vms = &fleet.model.vms;
    let vm_label = |id: &crate::VmId| ("vm", id.to_string());

    {
        let name = "mirrorball_vm_info";
        let mut f = Family::begin(&mut out, name, "gauge", "A monitored VM (always 1).");
        for id in vms.keys() {
            let info = fleet.info.get(id);
            f.sample(
                name,
                &[
                    vm_label(id),
                    ("name", info.map(|i| i.name.clone()).unwrap_or_default()),
                    ("guest", info.map(|i| i.guest.clone()).unwrap_or_default()),
                    ("vcpus", info.map_or(0, |i| i.vcpus).to_string()),
                ],
                1.0,
            );
        }
    }
    {
        let name = "mirrorball_vm_guest_region_valid";
        let mut f = Family::begin(
            &mut out,
            name,
            "gauge",
            "1 if the VM's guest region validated, 0 if the guest broke it (host figures are \
             exported either way).",
        );
        for id in vms.keys() {
            let valid = fleet.info.get(id).is_none_or(|i| i.guest_error.is_none());
            f.sample(name, &[vm_label(id)], if valid { 1.0 } else { 0.0 });
        }
    }
    {
        let name = "mirrorball_stale_vms";
        let mut f = Family::begin(
            &mut out,
            name,
            "gauge",
            "File sets in the run directory whose VMM process is gone (ignored).",
        );
        f.sample(name, &[], fleet.stale.len() as f64);
    }
    {
        let name = "mirrorball_vm_memory_pages";
        let mut f = Family::begin(
            &mut out,
            name,
            "gauge",
            "Guest RAM pages by state: shared with the VM's template, private (copied, fresh, or \
             memory of its own), merged by KSM; as of the VMM's last sharing scan.",
        );
        for (id, vm) in vms {
            if let Some(m) = &vm.mem {
                for (state, pages) in [
                    ("shared", m.shared_pages),
                    ("private", m.private_pages),
                    ("merged", m.merged_pages),
                ] {
                    f.sample(name, &[vm_label(id), ("state", state.into())], pages as f64);
                }
            }
        }
    }
    {
        let name = "mirrorball_vm_cow_breaks_total";
        let mut f = Family::begin(
            &mut out,
            name,
            "counter",
            "Copy-on-write breaks of the VM's template pages (private pages gained) since it \
             started.",
        );
        for (id, vm) in vms {
            if let Some(m) = &vm.mem {
                f.sample(name, &[vm_label(id)], m.cow_breaks as f64);
            }
        }
    }
    {
        let name = "mirrorball_vm_samples_total";
        let mut f = Family::begin(&mut out, name, "counter", "Ring records read, by ring.");
        for (id, vm) in vms {
            f.sample(
                name,
                &[vm_label(id), ("ring", "guest".into())],
                vm.guest_samples as f64,
            );
            f.sample(
                name,
                &[vm_label(id), ("ring", "host".into())],
                vm.host_samples as f64,
            );
        }
    }
    {
        let name = "mirrorball_vm_records_lost_total";
        let mut f = Family::begin(
            &mut out,
            name,
            "counter",
            "Ring records overwritten before the exporter read them, by ring.",
        );
        for (id, vm) in vms {
            f.sample(
                name,
                &[vm_label(id), ("ring", "guest".into())],
                vm.lost_guest as f64,
            );
            f.sample(
                name,
                &[vm_label(id), ("ring", "host".into())],
                vm.lost_host as f64,
            );
        }
    }

    // Guest task counters (absolute, guest claims).
    type TaskPick = fn(&crate::model::TaskStats) -> f64;
    let guest_families: [(&str, &str, TaskPick); 2] = [
        (
            "mirrorball_guest_task_minor_faults_total",
            "Minor page faults of a guest task since it started (guest counter, last sample).",
            |t| t.min_flt as f64,
        ),
        (
            "mirrorball_guest_task_major_faults_total",
            "Major page faults of a guest task since it started (guest counter, last sample).",
            |t| t.maj_flt as f64,
        ),
    ];
    let task_labels = |id: &crate::VmId, t: &crate::model::TaskStats| {
        if t.key.is_unattributed() {
            vec![
                vm_label(id),
                ("task_id", "none".into()),
                ("pid", "0".into()),
                ("comm", String::new()),
            ]
        } else {
            vec![
                vm_label(id),
                ("task_id", t.key.task_id.to_string()),
                ("pid", t.key.pid.to_string()),
                ("comm", t.comm.clone().unwrap_or_default()),
            ]
        }
    };
    for (name, help, pick) in guest_families {
        let mut f = Family::begin(&mut out, name, "counter", help);
        for (id, vm) in vms {
            for t in vm.tasks.values().filter(|t| t.guest_samples > 0) {
                f.sample(name, &task_labels(id, t), pick(t));
            }
        }
    }
    {
        let name = "mirrorball_guest_task_cpu_seconds_total";
        let mut f = Family::begin(
            &mut out,
            name,
            "counter",
            "CPU time of a guest task since it started, by mode (guest counter, last sample).",
        );
        for (id, vm) in vms {
            for t in vm.tasks.values().filter(|t| t.guest_samples > 0) {
                for (mode, ns) in [("user", t.utime_ns), ("system", t.stime_ns)] {
                    let mut l = task_labels(id, t);
                    l.push(("mode", mode.into()));
                    f.sample(name, &l, ns as f64 / 1e9);
                }
            }
        }
    }

    // Host figures charged to tasks.
    type HostPick = fn(&HostTotals) -> f64;
    let host_task: [(&str, &str, HostPick); 5] = [
        (
            "mirrorball_task_kvm_pf_taken_total",
            "KVM pf_taken (EPT/MMU faults) of the vCPUs while the guest said this task ran.",
            |h| h.pf_taken as f64,
        ),
        (
            "mirrorball_task_host_faults_total",
            "Host page faults (minor + major) of vCPU threads while the guest said this task ran.",
            |h| h.host_flt() as f64,
        ),
        (
            "mirrorball_task_vcpu_cpu_seconds_total",
            "Host CPU time of vCPU threads while the guest said this task ran.",
            |h| h.cpu_ns() as f64 / 1e9,
        ),
        (
            "mirrorball_task_vcpu_wait_seconds_total",
            "Time vCPU threads waited on a host run queue (steal) while the guest said this task \
             ran.",
            |h| h.wait_ns as f64 / 1e9,
        ),
        (
            "mirrorball_task_cow_breaks_total",
            "Copy-on-write breaks in the task's own memory (pages it made private), found by the \
             VMM's sharing scan (tasks whose memory the VMM knows: the OS-less guest's).",
            |h| h.cow_breaks as f64,
        ),
    ];
    for (name, help, pick) in host_task {
        let mut f = Family::begin(&mut out, name, "counter", help);
        for (id, vm) in vms {
            for t in vm
                .tasks
                .values()
                .filter(|t| t.host.samples > 0 || t.host.cow_breaks > 0)
            {
                f.sample(name, &task_labels(id, t), pick(&t.host));
            }
        }
    }
    {
        let name = "mirrorball_task_host_samples_total";
        let mut f = Family::begin(
            &mut out,
            name,
            "counter",
            "Host samples charged to a task, by how: exact (only this task ran in them: the guest \
             announced its switches) or sampled (charged to the task running when they closed).",
        );
        for (id, vm) in vms {
            for t in vm.tasks.values().filter(|t| t.host.samples > 0) {
                let sampled = t.host.samples.saturating_sub(t.host.exact_samples);
                for (how, n) in [("exact", t.host.exact_samples), ("sampled", sampled)] {
                    let mut l = task_labels(id, t);
                    l.push(("attribution", how.into()));
                    f.sample(name, &l, n as f64);
                }
            }
        }
    }

    // Per-vCPU host counters.
    let vcpu_families: [(&str, &str, HostPick); 3] = [
        (
            "mirrorball_vcpu_kvm_pf_taken_total",
            "KVM pf_taken (all KVM MMU faults: EPT violations, shadow faults) of a vCPU.",
            |h| h.pf_taken as f64,
        ),
        (
            "mirrorball_vcpu_kvm_pf_fixed_total",
            "KVM pf_fixed (mappings installed) of a vCPU.",
            |h| h.pf_fixed as f64,
        ),
        (
            "mirrorball_vcpu_kvm_exits_total",
            "KVM exits of a vCPU.",
            |h| h.exits as f64,
        ),
    ];
    for (name, help, pick) in vcpu_families {
        let mut f = Family::begin(&mut out, name, "counter", help);
        for (id, vm) in vms {
            for v in vm.vcpus.values() {
                f.sample(
                    name,
                    &[vm_label(id), ("vcpu", v.index.to_string())],
                    pick(&v.totals),
                );
            }
        }
    }
    {
        let name = "mirrorball_vcpu_host_faults_total";
        let mut f = Family::begin(
            &mut out,
            name,
            "counter",
            "Host page faults of a vCPU thread, by kind.",
        );
        for (id, vm) in vms {
            for v in vm.vcpus.values() {
                for (kind, n) in [
                    ("minor", v.totals.host_min_flt),
                    ("major", v.totals.host_maj_flt),
                ] {
                    f.sample(
                        name,
                        &[
                            vm_label(id),
                            ("vcpu", v.index.to_string()),
                            ("kind", kind.into()),
                        ],
                        n as f64,
                    );
                }
            }
        }
    }
    {
        let name = "mirrorball_vcpu_cpu_seconds_total";
        let mut f = Family::begin(
            &mut out,
            name,
            "counter",
            "CPU time of a vCPU thread on the host, by mode.",
        );
        for (id, vm) in vms {
            for v in vm.vcpus.values() {
                for (mode, ns) in [("user", v.totals.utime_ns), ("system", v.totals.stime_ns)] {
                    f.sample(
                        name,
                        &[
                            vm_label(id),
                            ("vcpu", v.index.to_string()),
                            ("mode", mode.into()),
                        ],
                        ns as f64 / 1e9,
                    );
                }
            }
        }
    }
    out
}

/// What `vmm prometheus` does.
#[derive(Clone, Debug)]
pub struct PromOptions {
    /// Run directory.
    pub run_dir: PathBuf,
    /// Write once to this file (`None` or `-`: standard output) ...
    pub output: Option<PathBuf>,
    /// ... or serve `/metrics` on this loopback address.
    pub listen: Option<SocketAddr>,
    /// How often the VMs are polled while serving.
    pub interval: Duration,
}

/// Content type of the exposition.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Writes the exposition once, or serves it until `stop` is set.
pub fn run(opts: &PromOptions, stop: &AtomicBool) -> Result<(), Error> {
    let mut fleet = Fleet::new(&opts.run_dir, ModelConfig::default());
    match opts.listen {
        None => {
            fleet.refresh();
            fleet.poll();
            print_warnings(&mut fleet);
            let text = render(&fleet);
            match &opts.output {
                Some(p) if p.as_os_str() != "-" => crate::userfile::create_output(p)
                    .and_then(|mut f| f.write_all(text.as_bytes()))?,
                _ => {
                    let mut out = io::stdout().lock();
                    match out.write_all(text.as_bytes()).and_then(|_| out.flush()) {
                        Err(e) if e.kind() != io::ErrorKind::BrokenPipe => return Err(e.into()),
                        _ => {}
                    }
                }
            }
            Ok(())
        }
        Some(addr) => serve(&mut fleet, addr, opts.interval, stop),
    }
}

/// Binds `addr`, which must be a loopback address.
pub fn bind_loopback(addr: SocketAddr) -> Result<TcpListener, Error> {
    if !addr.ip().is_loopback() {
        return Err(Error::new(format!(
            "{addr} is not a loopback address: the exporter only listens on 127.0.0.0/8 or [::1]"
        )));
    }
    TcpListener::bind(addr).map_err(|e| Error::new(format!("cannot listen on {addr}: {e}")))
}

/// Serves `/metrics` on an already-bound listener until `stop` is set: the fleet is ticked every
/// `interval` and polled about ten times a second, and each time the exposition is rendered
/// for the HTTP workers ([`http`]), which answer scrapes concurrently.
pub fn serve_on(
    fleet: &mut Fleet,
    listener: TcpListener,
    interval: Duration,
    stop: &AtomicBool,
) -> Result<(), Error> {
    let interval = interval.max(Duration::from_millis(50));
    let exposition = http::Exposition::default();
    fleet.tick();
    print_warnings(fleet);
    exposition.set(render(fleet));
    let server = http::Server::start(listener, exposition.clone())?;
    let mut next = Instant::now() + interval;
    while !stop.load(Ordering::Relaxed) {
        let now = Instant::now();
        if now >= next {
            fleet.tick();
            next = (next + interval).max(now + interval / 2);
        } else {
            std::thread::sleep((next - now).min(POLL_EVERY));
            fleet.poll();
        }
        print_warnings(fleet);
        exposition.set(render(fleet));
    }
    server.shutdown();
    Ok(())
}

/// How often a serving exporter polls the VMs between ticks (what a scrape can lag behind).
const POLL_EVERY: Duration = Duration::from_millis(100);

fn print_warnings(fleet: &mut Fleet) {
    for w in fleet.take_warnings() {
        eprintln!("vmm: warning: {w}");
    }
}

fn serve(
    fleet: &mut Fleet,
    addr: SocketAddr,
    interval: Duration,
    stop: &AtomicBool,
) -> Result<(), Error> {
    let listener = bind_loopback(addr)?;
    let local = listener.local_addr().unwrap_or(addr);
    eprintln!("vmm: serving http://{local}/metrics");
    serve_on(fleet, listener, interval, stop)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_are_escaped() {
        assert_eq!(escape_label("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }

    #[test]
    fn only_loopback() {
        assert!(bind_loopback("0.0.0.0:0".parse().unwrap()).is_err());
        assert!(bind_loopback("192.0.2.1:0".parse().unwrap()).is_err());
        let l = bind_loopback("127.0.0.1:0".parse().unwrap()).expect("loopback");
        assert!(l.local_addr().unwrap().ip().is_loopback());
    }
}
