//! How each answer reads for a person: tables of forks and snapshots, and short summaries.

use proto::model::{
    DeleteOutcome, ForkInfo, ForkListEntry, SnapshotInfo, StatsReport, StatusReport, VmInfo,
};

use std::time::SystemTime;

use crate::table;
use crate::units;

fn or_dash<T: ToString>(value: Option<T>) -> String {
    value.map_or_else(|| "-".into(), |v| v.to_string())
}

/// Health, version and counts.
pub fn status(s: &StatusReport) -> String {
    let health = if s.healthy {
        "healthy".to_owned()
    } else {
        format!(
            "UNHEALTHY: damaged snapshots [{}], unreadable fork records [{}]",
            s.damaged_snapshots
                .iter()
                .map(|id| id.as_str())
                .collect::<Vec<_>>()
                .join(", "),
            s.unreadable_fork_records
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        )
    };
    let fuse = s.fuse.as_ref().map_or_else(
        || "not mounted".to_owned(),
        |f| {
            format!(
                "{} ({}, {} file users)",
                f.mountpoint.display(),
                format!("{:?}", f.read_path).to_lowercase(),
                f.file_users
            )
        },
    );
    format!(
        "pagerd {} (pid {}), up {}, {}\nstate dir: {}\nworkers: {} (sessions {:?})\nsnapshots: {}\nforks: {} waiting, {} serving, {} detached, {} ended\nvms: {} starting, {} running, {} exited, {} failed\nfuse: {fuse}\n",
        s.version,
        s.pid,
        units::uptime(s.uptime_ms),
        health,
        s.state_dir.display(),
        s.workers,
        s.worker_sessions,
        s.snapshots,
        s.forks.waiting,
        s.forks.serving,
        s.forks.detached,
        s.forks.ended,
        s.vms.starting,
        s.vms.running,
        s.vms.exited,
        s.vms.failed,
    )
}

/// Summed counters.
pub fn stats(r: &StatsReport) -> String {
    let t = &r.totals;
    format!(
        "forks: {}\nfaults: {}\npages copied: {} ({})\nzero pages: {}\nremoves: {}\npoisoned pages: {}\nerrors: {}\nprefetched: {} pages replayed, {} graduated, {} left alone\nrecorded: {} pages\nlatency: {} faults, max {}\n",
        r.forks,
        t.faults,
        t.pages_copied,
        units::bytes(t.bytes_copied),
        t.zero_pages,
        t.removes,
        t.poisoned_pages,
        t.errors,
        t.replayed_pages,
        t.graduated_pages,
        t.prefetch_skipped,
        t.recorded_pages,
        t.latency_ns.count,
        units::nanos(t.latency_ns.max),
    )
}

/// Forks and file users as one table.
pub fn fork_table(entries: &[ForkListEntry]) -> String {
    let rows: Vec<Vec<String>> = entries
        .iter()
        .map(|entry| match entry {
            ForkListEntry::Uffd(f) => vec![
                f.id.to_string(),
                "uffd".into(),
                f.snapshot.to_string(),
                f.state.to_string(),
                or_dash(f.vmm_pid),
                f.stats.faults.to_string(),
                units::bytes(f.stats.bytes_copied),
                f.stats.zero_pages.to_string(),
                units::nanos(f.stats.latency_ns.p99),
                or_dash(f.end_reason),
            ],
            ForkListEntry::File(u) => vec![
                u.id.clone(),
                "file".into(),
                u.snapshot.to_string(),
                format!("{:?}", u.state).to_lowercase(),
                u.pid.to_string(),
                "-".into(),
                "-".into(),
                "-".into(),
                "-".into(),
                "-".into(),
            ],
        })
        .collect();
    table::render(
        &[
            "ID",
            "KIND",
            "SNAPSHOT",
            "STATE",
            "PID",
            "FAULTS",
            "COPIED",
            "ZERO PAGES",
            "P99",
            "ENDED",
        ],
        &rows,
    )
}

/// One fork in full, with its age at `now` and a `note` from pagerctl, if any.
pub fn fork(f: &ForkInfo, note: Option<&str>, now: SystemTime) -> String {
    let s = &f.stats;
    let handoff_error = f.last_handoff_error.as_ref().map(|e| {
        format!(
            "{} ({})",
            e.message,
            serde_json::to_value(e.reason)
                .ok()
                .and_then(|v| v.as_str().map(str::to_owned))
                .unwrap_or_default()
        )
    });
    let mut out = format!(
        "fork {}\n  snapshot: {}\n  owner: uid {}\n  created: {}\n  state: {}\n  end reason: {}\n  detached reason: {}\n  recovered after restarts: {}\n  handoff socket: {}\n  vmm pid: {}\n  worker: {}\n  last handoff error: {}\n  faults: {} ({} already present, {} outside regions, {} retried)\n  copied: {} pages ({})\n  zero pages: {}\n  removes: {}\n  poisoned pages: {}\n  errors: {}\n  prefetch: {}{}\n  prefetched: {} pages replayed, {} graduated, {} left alone\n  recorded: {} pages\n  latency: p50 {}, p99 {}, max {} over {} faults\n",
        f.id,
        f.snapshot,
        f.owner,
        units::when(f.created_unix_ms, now),
        f.state,
        or_dash(f.end_reason),
        or_dash(f.detached_reason),
        f.recovered,
        f.handoff_socket.display(),
        or_dash(f.vmm_pid),
        or_dash(f.worker),
        handoff_error.unwrap_or_else(|| "-".into()),
        s.faults,
        s.already_present,
        s.outside_faults,
        s.deferred_retries,
        s.pages_copied,
        units::bytes(s.bytes_copied),
        s.zero_pages,
        s.removes,
        s.poisoned_pages,
        s.errors,
        f.prefetch.as_str(),
        if f.recording { " (recording)" } else { "" },
        s.replayed_pages,
        s.graduated_pages,
        s.prefetch_skipped,
        s.recorded_pages,
        units::nanos(s.latency_ns.p50),
        units::nanos(s.latency_ns.p99),
        units::nanos(s.latency_ns.max),
        s.latency_ns.count,
    );
    if let Some(note) = note {
        out += &format!("  note: {note}\n");
    }
    out
}

/// Snapshots as a table.
pub fn snapshot_table(snapshots: &[SnapshotInfo]) -> String {
    let rows: Vec<Vec<String>> = snapshots
        .iter()
        .map(|s| {
            let note = if let Some(error) = &s.error {
                format!("DAMAGED: {error}")
            } else if s.delete_pending {
                "delete pending".into()
            } else if let Some(p) = s.importing {
                format!(
                    "importing {} of {}",
                    units::bytes(p.done_bytes),
                    units::bytes(p.total_bytes)
                )
            } else {
                "-".into()
            };
            vec![
                s.id.to_string(),
                or_dash(s.size.map(units::bytes)),
                or_dash(s.zero_pages.map(|z| units::bytes(z * 4096))),
                or_dash(s.ref_count),
                or_dash(s.import.map(|i| format!("{i:?}").to_lowercase())),
                note,
                s.path.display().to_string(),
            ]
        })
        .collect();
    table::render(
        &["ID", "SIZE", "ZEROS", "REFS", "IMPORT", "NOTE", "PATH"],
        &rows,
    )
}

/// One snapshot: its row, then its working set and any recording.
pub fn snapshot(s: &SnapshotInfo) -> String {
    let mut out = snapshot_table(std::slice::from_ref(s));
    out.push_str(&format!("owner: uid {}\n", or_dash(s.owner)));
    match &s.working_set {
        Some(w) => out.push_str(&format!(
            "working set: {} pages ({} zero) in {} runs, {} stored, from {} fork(s), format v{}\n",
            w.pages,
            w.zero_pages,
            w.runs,
            units::bytes(w.file_bytes),
            w.forks_recorded,
            w.version
        )),
        None => out.push_str("working set: none (forks are served on demand)\n"),
    }
    if let Some(r) = &s.recording {
        out.push_str(&format!(
            "recording{}: {} fork(s) to come, {} recording, {} done\n",
            if r.automatic { " (automatic)" } else { "" },
            r.forks_wanted,
            r.forks_recording,
            r.forks_done
        ));
    }
    if let Some(e) = &s.working_set_error {
        out.push_str(&format!("working set unusable: {e}\n"));
    }
    out
}

/// What a delete did.
pub fn deleted(d: &DeleteOutcome) -> String {
    if d.deleted {
        return format!("deleted {}\n", d.id);
    }
    let forks: Vec<&str> = d.forks.iter().map(|f| f.as_str()).collect();
    let users: Vec<String> = d.file_users.iter().map(ToString::to_string).collect();
    format!(
        "{} will be deleted when nothing references it: forks [{}], processes holding its memory file [{}]\n",
        d.id,
        forks.join(", "),
        users.join(", ")
    )
}

/// VMs, one per row.
pub fn vm_table(vms: &[VmInfo]) -> String {
    let rows: Vec<Vec<String>> = vms
        .iter()
        .map(|v| {
            vec![
                v.id.to_string(),
                v.snapshot.to_string(),
                v.vmm.to_string(),
                v.backend.to_string(),
                v.state.to_string(),
                or_dash(v.pid),
                or_dash(v.fork.as_ref()),
            ]
        })
        .collect();
    table::render(
        &["ID", "SNAPSHOT", "VMM", "BACKEND", "STATE", "PID", "FORK"],
        &rows,
    )
}

/// One VM, a field per line.
pub fn vm(v: &VmInfo) -> String {
    let mut out = format!(
        "id: {}\nsnapshot: {}\nowner: uid {}\nvmm: {}\nbackend: {}\nstate: {}\npid: {}\nfork: {}\n",
        v.id,
        v.snapshot,
        v.owner,
        v.vmm,
        v.backend,
        v.state,
        or_dash(v.pid),
        or_dash(v.fork.as_ref()),
    );
    if let Some(file) = &v.memory_file {
        out += &format!("memory file: {}\n", file.display());
    }
    out += &format!(
        "api socket: {}\nconsole log: {}\n",
        v.api_socket.display(),
        v.console_log.display()
    );
    for tap in &v.network_overrides {
        out += &format!("tap: {}={}\n", tap.iface_id, tap.host_dev_name);
    }
    if let Some(vsock) = &v.vsock {
        out += &format!("vsock: {}\n", vsock.display());
    }
    if v.exit_code.is_some() || v.exit_signal.is_some() {
        out += &format!(
            "exit: code {}, signal {}\n",
            or_dash(v.exit_code),
            or_dash(v.exit_signal)
        );
    }
    if let Some(reason) = &v.reason {
        out += &format!("reason: {reason}\n");
    }
    out
}
