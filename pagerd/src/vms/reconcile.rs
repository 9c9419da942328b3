//! Launched VMs after a daemon start: records read back, live hypervisors adopted, the
//! others marked exited; and the janitor that caps their console logs and deletes the records
//! past `--vm-retention`.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::SystemTime;

use proto::model::VmState;

use crate::registry::unix_ms;
use crate::store::VmmIdentity;

use super::snapshot::remove_snapshot_leftovers;
use super::{
    console, process, Slot, VmError, VmReconcileReport, Vms, JANITOR_PERIOD, KILL_TIMEOUT,
};

impl Vms {
    /// Takes up the VMs of the state directory after a start: live ones are adopted, gone ones
    /// marked exited, half-started ones killed and failed. Starts the console-log janitor.
    pub fn reconcile(self: &Arc<Self>) -> Result<VmReconcileReport, VmError> {
        for path in self.store.remove_vm_leftovers()? {
            tracing::info!(dir = %path.display(), "removed a VM directory a deletion left behind");
        }
        let scan = self.store.scan_vms()?;
        for (path, error) in &scan.unreadable {
            tracing::error!(record = %path.display(), %error, "unreadable VM record; it is not listed");
        }
        let mut report = VmReconcileReport::default();
        for mut record in scan.records {
            let id = record.info.id.clone();
            remove_snapshot_leftovers(&self.store.vm_dir(&id));
            let process = record
                .info
                .pid
                .zip(record.start_time)
                .map(|(pid, start_time)| VmmIdentity { pid, start_time })
                .and_then(process::adopt);
            let mut ended = false;
            match (record.info.state, process) {
                (VmState::Running, Some(process)) => {
                    let pidfd = Arc::new(process.pidfd);
                    self.lock().insert(
                        id.clone(),
                        Slot {
                            record,
                            pidfd: Some(pidfd.clone()),
                        },
                    );
                    self.supervise(id.clone(), pidfd, None);
                    report.running.push(id);
                    continue;
                }
                (VmState::Starting, Some(process)) => {
                    process.kill(KILL_TIMEOUT);
                    record.info.state = VmState::Failed;
                    record.info.reason = Some("pagerd restarted while it was starting".into());
                    report.failed.push(id.clone());
                    ended = true;
                }
                (VmState::Starting, None) => {
                    record.info.state = VmState::Failed;
                    record.info.reason = Some("pagerd restarted while it was starting".into());
                    report.failed.push(id.clone());
                    ended = true;
                }
                (VmState::Running, None) => {
                    record.info.state = VmState::Exited;
                    report.exited.push(id.clone());
                    ended = true;
                }
                (VmState::Exited | VmState::Failed, _) => {}
            }
            if ended {
                record.info.ended_unix_ms = Some(unix_ms(SystemTime::now()));
                self.store.write_vm(&record)?;
            }
            let info = record.info.clone();
            self.lock().insert(
                id,
                Slot {
                    record,
                    pidfd: None,
                },
            );
            if ended {
                self.release(&info);
            }
        }
        tracing::info!(report = %serde_json::to_string(&report).unwrap_or_default(), "reconciled the VMs");
        self.start_janitor();
        Ok(report)
    }

    fn start_janitor(self: &Arc<Self>) {
        let weak = Arc::downgrade(self);
        let spawned = std::thread::Builder::new()
            .name("pagerd-vms".into())
            .spawn(move || {
                let mut reported = BTreeSet::new();
                loop {
                    std::thread::sleep(JANITOR_PERIOD);
                    let Some(vms) = weak.upgrade() else { return };
                    vms.remove_expired(unix_ms(SystemTime::now()), &mut reported);
                    vms.cap_consoles();
                }
            });
        if let Err(e) = spawned {
            tracing::error!(error = %e, "cannot start the VM janitor; console logs are not capped and VM records are kept");
        }
    }

    /// Rotates the console logs of live VMs past their cap.
    fn cap_consoles(&self) {
        let logs: Vec<PathBuf> = self
            .lock()
            .values()
            .filter(|s| s.record.info.state.is_live())
            .map(|s| s.record.info.console_log.clone())
            .collect();
        for log in logs {
            if let Err(e) = console::cap(&log, self.options.console_cap) {
                if e.kind() != std::io::ErrorKind::NotFound {
                    tracing::warn!(log = %log.display(), error = %e, "cannot cap a console log");
                }
            }
        }
    }
}
