//! Launched VMs after a daemon start: records read back, live hypervisors adopted, the
//! others marked exited; and the janitor that watches them.

use std::path::PathBuf;
use std::sync::Arc;

use proto::model::VmState;

use crate::store::VmmIdentity;

use super::snapshot::remove_snapshot_leftovers;
use super::{
    console, process, Slot, VmError, VmReconcileReport, Vms, CONSOLE_CHECK_PERIOD, KILL_TIMEOUT,
};

impl Vms {
    /// Takes up the VMs of the state directory after a start: live ones are adopted, gone ones
    /// marked exited, half-started ones killed and failed. Starts the console-log janitor.
    pub fn reconcile(self: &Arc<Self>) -> Result<VmReconcileReport, VmError> {
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
            .name("pagerd-consoles".into())
            .spawn(move || loop {
                std::thread::sleep(CONSOLE_CHECK_PERIOD);
                let Some(vms) = weak.upgrade() else { return };
                let logs: Vec<PathBuf> = vms
                    .lock()
                    .values()
                    .filter(|s| s.record.info.state.is_live())
                    .map(|s| s.record.info.console_log.clone())
                    .collect();
                for log in logs {
                    if let Err(e) = console::cap(&log, vms.options.console_cap) {
                        if e.kind() != std::io::ErrorKind::NotFound {
                            tracing::warn!(log = %log.display(), error = %e, "cannot cap a console log");
                        }
                    }
                }
            });
        if let Err(e) = spawned {
            tracing::error!(error = %e, "cannot start the console-log janitor; console logs are not capped");
        }
    }
}
