#!/usr/bin/env python3
"""Run-to-run spread of every gateable figure over several `vmm --stats` files.

Usage: spread.py RUN.json...   (e.g. 20 runs of `vmm --stats run-N.json`)

Prints, per figure of the VM and of each task: min, median, max, and the spread
(max - min) as a percentage of the median, reading the same fields `vmm --expect`
and `vmm diff` read (vmm/src/gates/stats.rs).
"""
import json
import statistics
import sys

EXITS = ["io_in", "io_out", "mmio_read", "mmio_write", "hlt", "shutdown",
         "internal_error", "fail_entry", "system_event", "intr", "other"]


def vm_figures(doc):
    v = doc["vcpus"]
    kvm = lambda s: sum(c.get("kvm_stats", {}).get(s, 0) for c in v)
    tasks = doc.get("tasks", [])
    f = {}
    if tasks and all("guest_min_flt" in t for t in tasks):
        f["guest_minor_faults"] = sum(t["guest_min_flt"] for t in tasks)
        f["guest_major_faults"] = sum(t.get("guest_maj_flt", 0) for t in tasks)
    f["host_minor_faults"] = sum(c["host_minor_faults"] for c in v)
    f["host_major_faults"] = sum(c["host_major_faults"] for c in v)
    f["pf_taken"] = kvm("pf_taken")
    f["pf_fixed"] = kvm("pf_fixed")
    f["exits"] = kvm("exits")
    f["vmm_exits"] = sum(c["total_exits"] for c in v)
    f["cpu_time_s"] = sum(c["user_ns"] + c["system_ns"] for c in v) / 1e9
    f["user_time_s"] = sum(c["user_ns"] for c in v) / 1e9
    f["system_time_s"] = sum(c["system_ns"] for c in v) / 1e9
    f["run_time_s"] = doc["elapsed_ns"] / 1e9
    s = doc.get("sampler") or {}
    if "lost_records" in s:
        f["lost_samples"] = s["lost_records"]
    if "late_ticks" in s:
        f["late_ticks"] = s["late_ticks"]
    for r in EXITS:
        n = sum(c["exits"].get(r, 0) for c in v)
        if n:
            f["exits." + r] = n
    for stat in ("irq_exits", "halt_exits", "io_exits", "mmio_exits", "signal_exits"):
        n = kvm(stat)
        if n:
            f["kvm." + stat] = n
    return f


def task_figures(t):
    f = {}
    if "guest_min_flt" in t:
        f["guest_minor_faults"] = t["guest_min_flt"]
    h = t.get("host")
    if h:
        f["host_minor_faults"] = h["host_min_flt"]
        f["host_major_faults"] = h["host_maj_flt"]
        f["pf_taken"] = h["pf_taken"]
        f["exits"] = h["exits"]
        f["cpu_time_s"] = h["vcpu_cpu_ns"] / 1e9
        f["samples"] = h["samples"]
    f["run_time_s"] = t["elapsed_ns"] / 1e9
    f["iterations"] = t["iterations"]
    return f


def main(paths):
    groups = {}
    for p in paths:
        with open(p) as fh:
            doc = json.load(fh)
        for name, val in vm_figures(doc).items():
            groups.setdefault(("vm", name), []).append(val)
        for t in doc.get("tasks", []):
            key = "task %d: %s" % (t["task"], t["spec"])
            for name, val in task_figures(t).items():
                groups.setdefault((key, name), []).append(val)
    print("%-28s %-20s %12s %12s %12s %9s" % ("scope", "figure", "min", "median", "max", "spread%"))
    for (scope, name), vals in groups.items():
        lo, med, hi = min(vals), statistics.median(vals), max(vals)
        spread = "exact" if hi == lo else ("%.1f" % (100.0 * (hi - lo) / med) if med else "n/a")
        fmt = "%12.3f" if name.endswith("_s") else "%12.0f"
        print(("%-28s %-20s " + fmt + " " + fmt + " " + fmt + " %9s") % (scope, name, lo, med, hi, spread))
    print("(%d runs)" % len(paths))


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    main(sys.argv[1:])
