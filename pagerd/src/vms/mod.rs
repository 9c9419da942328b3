//! Launched VMs: hypervisor processes pagerd starts from a snapshot, wired to its memory, and
//! supervises.
//!
//! ```text
//! vm.start:  snapshot has vmstate ─▶ STATE/vms/<id>/ + vm.json (starting)
//!            ─▶ uffd: fork <id> (handoff socket) | file: the FUSE memory file
//!            ─▶ spawn the hypervisor (setsid; stdout+stderr ─▶ console.log; pidfd)
//!            ─▶ vm.json gets pid + start time ─▶ API up ─▶ PUT /snapshot/load
//!            ─▶ running (a supervisor thread waits on the pidfd)
//!            | failed (reason; exit status and last console lines if it ended by itself)
//! exit:      pidfd readable ─▶ exited (status when pagerd is the parent) ─▶ fork closed
//!            ─▶ deferred delete of the snapshot finished if it waited for this VM
//! vm.stop:   SIGTERM ─▶ (timeout) SIGKILL, through the pidfd
//! vm.delete: exited | failed ─▶ record and directory removed, id free (also past retention)
//! snapshot:  PATCH /vm Paused ─▶ PUT /snapshot/create (Full) into VMDIR/.snapshot-<new>/
//!            ─▶ registered (copied) as snapshot <new> with its vmstate ─▶ [resumed]
//! restart:   vm.json running + same pid and start time ─▶ adopted (pidfd), still running;
//!            gone ─▶ exited (no status); starting ─▶ killed, failed
//! ```
//!
//! The lifecycle stays the one place that decides what exists: this module reaches it only
//! through [`VmHost`]. A live VM record (`starting`, `running`) is itself a reference on its
//! snapshot, read by the lifecycle from the store (`store::vms`). What differs between
//! Firecracker and QEMU is `vmm_glue`'s [`Hypervisor`], picked once per VM from the snapshot's
//! [`VmmKind`]. `request.rs` checks a start request against it; `failure.rs` says why a start
//! failed (the hypervisor's exit and last output) and whose fault it was; `reconcile.rs`
//! adopts VMs after a restart and runs the janitor; `snapshot.rs` is `vm.snapshot`;
//! `delete.rs` is `vm.delete`, which `retention.rs` also applies to records past
//! `--vm-retention`.

mod console;
mod delete;
mod error;
mod failure;
mod host;
mod jail;
mod process;
mod reconcile;
mod request;
mod retention;
mod snapshot;
#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::os::fd::OwnedFd;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use proto::model::{JailInfo, VmBackend, VmCounts, VmInfo, VmState, VmmKind};
use proto::{ForkId, VmId};
use rustix::process::Signal;
use vmm_glue::hypervisor::{Launch, Restore};
use vmm_glue::Hypervisor;

pub(crate) use error::VmError;
pub(crate) use host::VmHost;
pub(crate) use jail::JailOptions;
pub(crate) use request::StartRequest;
pub(crate) use retention::{parse_retention, DEFAULT_RETENTION};

use crate::lifecycle::LifecycleError;
use crate::registry::unix_ms;
use crate::store::vms::VmRecord;
use crate::store::Store;
use failure::{EarlyExit, StartFailure};
use process::HalfStarted;

/// The hypervisor's stdout and stderr, in the VM's directory.
const CONSOLE_LOG: &str = "console.log";
/// How long a hypervisor's API socket may take to come up.
const API_READY_TIMEOUT: Duration = Duration::from_secs(10);
/// How long `vm.stop` waits after SIGTERM before SIGKILL, unless told.
pub(crate) const DEFAULT_STOP_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a SIGKILLed hypervisor may take to be gone.
const KILL_TIMEOUT: Duration = Duration::from_secs(10);
/// How often the janitor caps console logs and looks for records past their retention.
const JANITOR_PERIOD: Duration = Duration::from_secs(1);

/// How VMs are launched.
#[derive(Debug, Clone)]
pub(crate) struct VmOptions {
    /// The Firecracker binary, if given (else `$FIRECRACKER`, else `PATH`).
    pub firecracker: Option<PathBuf>,
    /// The QEMU binary, if given (else `$QEMU`, else `qemu-system-x86_64` on `PATH`).
    pub qemu: Option<PathBuf>,
    /// The most bytes a console log grows to before it is rotated.
    pub console_cap: u64,
    /// Firecracker runs through its jailer when set.
    pub jail: Option<JailOptions>,
    /// How long ended VMs' records are kept (`--vm-retention`; `None`: for ever).
    pub retention: Option<Duration>,
}

impl VmOptions {
    /// The binary given for hypervisor `kind`, if any.
    fn binary(&self, kind: VmmKind) -> Option<&Path> {
        match kind {
            VmmKind::Firecracker => self.firecracker.as_deref(),
            VmmKind::Qemu => self.qemu.as_deref(),
        }
    }
}

#[derive(Debug)]
struct Slot {
    record: VmRecord,
    pidfd: Option<Arc<OwnedFd>>,
}

/// Every launched VM.
#[derive(Debug)]
pub(crate) struct Vms {
    host: Arc<dyn VmHost>,
    store: Store,
    options: VmOptions,
    table: Mutex<BTreeMap<VmId, Slot>>,
    changed: Condvar,
    next: AtomicU64,
}

/// What reconciliation found.
#[derive(Debug, Default, serde::Serialize)]
pub(crate) struct VmReconcileReport {
    /// Still running: adopted.
    pub running: Vec<VmId>,
    /// Gone while pagerd was away.
    pub exited: Vec<VmId>,
    /// Caught half-started: killed.
    pub failed: Vec<VmId>,
}

fn rank(state: VmState) -> u8 {
    match state {
        VmState::Starting => 0,
        VmState::Running => 1,
        VmState::Exited => 2,
        VmState::Failed => 3,
    }
}

fn io(action: impl Into<String>) -> impl FnOnce(std::io::Error) -> VmError {
    let action = action.into();
    move |source| VmError::Io { action, source }
}

impl Vms {
    /// VM supervision over `host`, keeping records in `store`.
    pub fn new(host: Arc<dyn VmHost>, store: Store, options: VmOptions) -> Arc<Self> {
        Arc::new(Self {
            host,
            store,
            options,
            table: Mutex::new(BTreeMap::new()),
            changed: Condvar::new(),
            next: AtomicU64::new(1),
        })
    }

    fn lock(&self) -> MutexGuard<'_, BTreeMap<VmId, Slot>> {
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Changes a VM's record, writes it, and wakes waiters. Returns the new record.
    fn update(&self, id: &VmId, change: impl FnOnce(&mut Slot)) -> Result<VmInfo, VmError> {
        let mut table = self.lock();
        let slot = table
            .get_mut(id)
            .ok_or_else(|| VmError::NotFound(id.clone()))?;
        change(slot);
        let result = self.store.write_vm(&slot.record);
        let info = slot.record.info.clone();
        drop(table);
        self.changed.notify_all();
        result?;
        Ok(info)
    }

    /// Every VM.
    pub fn list(&self) -> Vec<VmInfo> {
        self.lock()
            .values()
            .map(|s| s.record.info.clone())
            .collect()
    }

    /// The live VM whose memory fork `fork` serves, if any.
    pub fn vm_of_fork(&self, fork: &ForkId) -> Option<VmId> {
        self.lock()
            .values()
            .find(|s| s.record.info.fork.as_ref() == Some(fork) && s.record.info.state.is_live())
            .map(|s| s.record.info.id.clone())
    }

    /// VMs by state.
    pub fn counts(&self) -> VmCounts {
        let mut counts = VmCounts::default();
        for slot in self.lock().values() {
            match slot.record.info.state {
                VmState::Starting => counts.starting += 1,
                VmState::Running => counts.running += 1,
                VmState::Exited => counts.exited += 1,
                VmState::Failed => counts.failed += 1,
            }
        }
        counts
    }

    /// One VM.
    pub fn get(&self, id: &VmId) -> Result<VmInfo, VmError> {
        self.lock()
            .get(id)
            .map(|s| s.record.info.clone())
            .ok_or_else(|| VmError::NotFound(id.clone()))
    }

    fn generated_id(&self, table: &BTreeMap<VmId, Slot>) -> VmId {
        loop {
            let n = self.next.fetch_add(1, Ordering::Relaxed);
            let id: VmId = format!("vm-{n}").parse().expect("generated ids are valid");
            if !table.contains_key(&id) && !self.store.vm_dir(&id).exists() {
                return id;
            }
        }
    }

    /// Starts a VM from a snapshot and returns it running, or the reason it failed (it is
    /// then recorded as `failed`).
    pub fn start(self: &Arc<Self>, request: StartRequest) -> Result<VmInfo, VmError> {
        let snapshot = self.host.snapshot(&request.call.snapshot)?;
        let vmstate = snapshot
            .vmstate
            .clone()
            .ok_or_else(|| VmError::NoVmState(request.call.snapshot.clone()))?;
        let hypervisor = vmm_glue::hypervisor::for_kind(vmstate.vmm);
        request.check_supported(hypervisor)?;
        let binary = vmm_glue::find_binary(hypervisor.binary(), self.options.binary(vmstate.vmm))
            .map_err(|e| {
                tracing::warn!(vmm = %vmstate.vmm, error = %e, "cannot start a VM: no hypervisor binary");
                VmError::NoBinary(e.to_string())
            })?;
        let memory_size = snapshot.size.unwrap_or(0);
        let jail_options = self
            .options
            .jail
            .as_ref()
            .filter(|_| hypervisor.capabilities().jailer);
        let memory_file =
            request::memory_file(request.call.backend, jail_options.is_some(), &snapshot)?;
        let (id, dir, jail) = {
            let table = self.lock();
            let id = match &request.call.vm {
                Some(id) if table.contains_key(id) => return Err(VmError::Exists(id.clone())),
                Some(id) => id.clone(),
                None => self.generated_id(&table),
            };
            let jail = match jail_options {
                Some(options) => {
                    let in_use = table
                        .values()
                        .filter(|s| s.record.info.state.is_live())
                        .filter_map(|s| s.record.info.jail.as_ref().map(|j| j.uid))
                        .collect();
                    Some(
                        options
                            .jail(&binary, &id, &in_use)
                            .ok_or(VmError::NoJailUid)?,
                    )
                }
                None => None,
            };
            let dir = self.store.create_vm_dir(&id).map_err(|e| {
                if e.source.kind() == std::io::ErrorKind::AlreadyExists {
                    VmError::Exists(id.clone())
                } else {
                    e.into()
                }
            })?;
            (id, dir, jail)
        };
        let record = VmRecord {
            info: VmInfo {
                id: id.clone(),
                snapshot: request.call.snapshot.clone(),
                owner: request.owner,
                vmm: vmstate.vmm,
                backend: request.call.backend,
                state: VmState::Starting,
                pid: None,
                fork: None,
                memory_file: memory_file.clone(),
                api_socket: control_socket(hypervisor, &dir, jail.as_ref()),
                console_log: dir.join(CONSOLE_LOG),
                network_overrides: request.call.network_overrides.clone(),
                vsock: request.call.vsock.clone(),
                exit_code: None,
                exit_signal: None,
                reason: None,
                last_output: None,
                created_unix_ms: unix_ms(SystemTime::now()),
                ended_unix_ms: None,
                jail: jail.clone(),
            },
            start_time: None,
        };
        self.store.write_vm(&record)?;
        self.lock().insert(
            id.clone(),
            Slot {
                record,
                pidfd: None,
            },
        );
        let target = Target {
            hypervisor,
            binary,
            vmstate: vmstate.path.clone(),
            memory_size,
            jail,
        };
        match self.launch(&id, &dir, &target, memory_file, &request) {
            Ok(started) => {
                let process = started.running();
                let pidfd = Arc::new(process.pidfd);
                let info = self.update(&id, |slot| {
                    slot.record.info.state = VmState::Running;
                    slot.pidfd = Some(pidfd.clone());
                })?;
                self.supervise(id.clone(), pidfd, process.child);
                tracing::info!(vm = %id, snapshot = %info.snapshot, backend = %info.backend, pid = info.pid, "VM running");
                Ok(info)
            }
            // A hypervisor it started is killed by now: its guard was dropped on the way out.
            Err(failure) => {
                let reason = failure.reason();
                let info = self.update(&id, |slot| {
                    let info = &mut slot.record.info;
                    info.state = VmState::Failed;
                    info.reason = Some(reason.clone());
                    info.ended_unix_ms = Some(unix_ms(SystemTime::now()));
                    if let Some(exit) = &failure.exit {
                        info.exit_code = exit.code;
                        info.exit_signal = exit.signal;
                        info.last_output = Some(exit.output.clone()).filter(|o| !o.is_empty());
                    }
                })?;
                self.release(&info);
                tracing::warn!(vm = %id, %reason, "VM failed to start");
                Err(failure.into_error(id))
            }
        }
    }

    /// The steps of a start that can fail. The hypervisor, once spawned, is returned in its
    /// guard for the caller to keep; on an error it is given [`failure::EXIT_GRACE`] to end
    /// by itself (its status and last output then go with the error), then the guard is
    /// dropped, which kills it.
    fn launch(
        &self,
        id: &VmId,
        dir: &Path,
        target: &Target,
        memory_file: Option<PathBuf>,
        request: &StartRequest,
    ) -> Result<HalfStarted, StartFailure> {
        let (mut started, memory) = self.spawn(id, dir, target, memory_file, request)?;
        match self.restore(id, dir, target, request, &started, memory) {
            Ok(()) => Ok(started),
            Err(error) => {
                let exit = started
                    .ended(failure::EXIT_GRACE)
                    .map(|status| Box::new(EarlyExit::new(status, &dir.join(CONSOLE_LOG))));
                Err(StartFailure { error, exit })
            }
        }
    }

    /// Spawns the hypervisor (after the VM's fork, when it has one) and records its pid.
    /// Returns it in its guard, with the memory it is to be given.
    fn spawn(
        &self,
        id: &VmId,
        dir: &Path,
        target: &Target,
        memory_file: Option<PathBuf>,
        request: &StartRequest,
    ) -> Result<(HalfStarted, PathBuf), VmError> {
        let hypervisor = target.hypervisor;
        let binary = &target.binary;
        let memory = match memory_file {
            Some(file) => file,
            None => {
                let fork = self.host.create_fork(
                    id.to_kind(),
                    &request.call.snapshot,
                    request.call.prefetch,
                    request.owner,
                )?;
                self.update(id, |slot| slot.record.info.fork = Some(fork.id.clone()))?;
                fork.handoff_socket
            }
        };
        let api_socket = control_socket(hypervisor, dir, target.jail.as_ref());
        let console_path = dir.join(CONSOLE_LOG);
        let console =
            console::open(&console_path).map_err(io(format!("open {}", console_path.display())))?;
        match std::fs::remove_file(&api_socket) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(io(format!("remove {}", api_socket.display()))(e))
            }
            _ => {}
        }
        let command = match (&target.jail, &self.options.jail) {
            (Some(jail), Some(options)) => {
                jail::remove(jail);
                if request.call.backend == VmBackend::File {
                    jail::mount_memory(jail, &memory)
                        .map_err(io(format!("mount {} into the jail", memory.display())))?;
                }
                options.command(binary, id, jail)
            }
            _ => {
                if let Some(name) = hypervisor.log_file_name() {
                    let log_path = dir.join(name);
                    console::open(&log_path)
                        .map_err(io(format!("create {}", log_path.display())))?;
                }
                hypervisor.command(&Launch {
                    binary,
                    id: id.as_str(),
                    dir,
                    control_socket: &api_socket,
                    memory: &memory,
                    memory_size: target.memory_size,
                })
            }
        };
        let process =
            process::spawn(command, &console).map_err(io(format!("start {}", binary.display())))?;
        let started = HalfStarted::new(process, KILL_TIMEOUT);
        let identity = started.process().identity;
        self.update(id, |slot| {
            slot.record.info.pid = Some(identity.pid);
            slot.record.start_time = Some(identity.start_time);
        })?;
        Ok((started, memory))
    }

    /// Waits for the spawned hypervisor's control socket and restores the snapshot into it.
    fn restore(
        &self,
        id: &VmId,
        dir: &Path,
        target: &Target,
        request: &StartRequest,
        started: &HalfStarted,
        memory: PathBuf,
    ) -> Result<(), VmError> {
        let hypervisor = target.hypervisor;
        let api_socket = control_socket(hypervisor, dir, target.jail.as_ref());
        let pidfd = &started.process().pidfd;
        let hypervisor_error = |source| VmError::hypervisor(id.clone(), source);
        let mut alive = || !process::wait_exit(pidfd, Some(Duration::ZERO));
        hypervisor
            .wait_ready(&api_socket, API_READY_TIMEOUT, &mut alive)
            .map_err(hypervisor_error)?;
        // Jailed: what it loads, hard-linked into its chroot, under the names it sees.
        let (vmstate, memory) = match &target.jail {
            Some(jail) => {
                let linked = |file: &Path, name: &str| {
                    jail::link_into(jail, file, name)
                        .map_err(io(format!("link {} into the jail", file.display())))
                };
                let memory = match request.call.backend {
                    VmBackend::Uffd => linked(&memory, "handoff.sock")?,
                    // Mounted before the jailer ran.
                    VmBackend::File => PathBuf::from("/memory"),
                };
                (linked(&target.vmstate, "vmstate")?, memory)
            }
            None => (target.vmstate.clone(), memory),
        };
        let restore = Restore {
            vmstate: &vmstate,
            backend: request.call.backend,
            memory: &memory,
            network_overrides: &request.call.network_overrides,
            vsock: request.call.vsock.as_deref(),
        };
        hypervisor
            .restore(&api_socket, &restore)
            .map_err(hypervisor_error)
    }

    /// Follows a VM's hypervisor until it exits, on a thread of its own.
    fn supervise(
        self: &Arc<Self>,
        id: VmId,
        pidfd: Arc<OwnedFd>,
        child: Option<std::process::Child>,
    ) {
        let vms = self.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("vm-{id}"))
            .spawn(move || {
                process::wait_exit(&pidfd, None);
                let status = child.and_then(|mut c| c.wait().ok());
                vms.exited(&id, status);
            });
        if let Err(e) = spawned {
            tracing::error!(error = %e, "cannot start a thread to follow a VM; its exit will be seen at the next start");
        }
    }

    fn exited(&self, id: &VmId, status: Option<ExitStatus>) {
        let updated = self.update(id, |slot| {
            slot.pidfd = None;
            if slot.record.info.state.is_live() {
                slot.record.info.state = VmState::Exited;
                slot.record.info.ended_unix_ms = Some(unix_ms(SystemTime::now()));
            }
            slot.record.info.exit_code = status.and_then(|s| s.code());
            slot.record.info.exit_signal = status.and_then(|s| s.signal());
        });
        match updated {
            Ok(info) => {
                tracing::info!(vm = %id, code = info.exit_code, signal = info.exit_signal, "VM exited");
                self.release(&info);
            }
            Err(e) => {
                tracing::error!(vm = %id, error = %crate::errors::error_chain(&e), "cannot record a VM's exit")
            }
        }
    }

    /// A VM is gone: its fork ends, its jail is removed, and its snapshot may go.
    fn release(&self, info: &VmInfo) {
        if let Some(jail) = &info.jail {
            jail::remove(jail);
        }
        let snapshot = &info.snapshot;
        if let Some(fork) = info.fork.as_ref() {
            match self.host.close_fork(fork) {
                Ok(_) | Err(LifecycleError::NotFound { .. }) => {}
                Err(e) => {
                    tracing::error!(fork = %fork, error = %crate::errors::error_chain(&e), "cannot close a VM's fork")
                }
            }
        }
        self.host.released(snapshot);
    }

    /// Stops a VM: SIGTERM, then SIGKILL once `timeout` passes. Returns it exited.
    pub fn stop(&self, id: &VmId, timeout: Duration) -> Result<VmInfo, VmError> {
        let (pidfd, state) = {
            let table = self.lock();
            let slot = table.get(id).ok_or_else(|| VmError::NotFound(id.clone()))?;
            (slot.pidfd.clone(), slot.record.info.state)
        };
        let Some(pidfd) = pidfd else {
            if state == VmState::Starting {
                return Err(VmError::WrongState {
                    vm: id.clone(),
                    state,
                });
            }
            return self.get(id);
        };
        if process::signal(&pidfd, Signal::TERM).is_ok()
            && !process::wait_exit(&pidfd, Some(timeout))
        {
            tracing::info!(vm = %id, "VM ignored SIGTERM; killing it");
            let _ = process::signal(&pidfd, Signal::KILL);
            process::wait_exit(&pidfd, Some(KILL_TIMEOUT));
        }
        self.wait(id, VmState::Exited, KILL_TIMEOUT)
    }

    /// Waits until a VM reaches `state` or a later one.
    pub fn wait(&self, id: &VmId, state: VmState, timeout: Duration) -> Result<VmInfo, VmError> {
        let end = Instant::now() + timeout;
        let mut table = self.lock();
        loop {
            let slot = table.get(id).ok_or_else(|| VmError::NotFound(id.clone()))?;
            let now = slot.record.info.state;
            if now == state || rank(now) > rank(state) {
                return Ok(slot.record.info.clone());
            }
            let left = end.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(VmError::WaitTimedOut {
                    vm: id.clone(),
                    state,
                    timeout_ms: u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX),
                });
            }
            table = self
                .changed
                .wait_timeout(table, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }
}

/// What a VM is started from.
#[derive(Debug)]
struct Target {
    hypervisor: &'static dyn Hypervisor,
    binary: PathBuf,
    vmstate: PathBuf,
    memory_size: u64,
    /// Firecracker through its jailer.
    jail: Option<JailInfo>,
}

/// The hypervisor's control socket, seen from outside: in the VM's directory, or in its jail.
fn control_socket(hypervisor: &dyn Hypervisor, dir: &Path, jail: Option<&JailInfo>) -> PathBuf {
    match jail {
        Some(jail) => jail::api_socket(jail),
        None => dir.join(hypervisor.control_socket_name()),
    }
}
