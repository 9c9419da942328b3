//! Answers control requests: one `match` from [`Request`] to the lifecycle, and the stable
//! error code of every way a request can fail.

use std::sync::Arc;
use std::time::Duration;

use proto::control::{ControlError, ErrorCode, Request};
use serde_json::Value;

use super::registration::{self, RegisterRequest};
use super::{Handler, RequestContext};
use crate::errors::error_chain;
use crate::lifecycle::{Lifecycle, LifecycleError};
use crate::registry::RegistryError;
use crate::serve::ServeError;
use crate::upgrade::{Upgrade, UpgradeError};
use crate::vms::{StartRequest, VmError, Vms, DEFAULT_STOP_TIMEOUT};

/// The longest `fork.wait` allowed.
const MAX_WAIT: Duration = Duration::from_secs(600);
/// The most forks one `snapshot.record` may record.
const MAX_RECORD_FORKS: u32 = 16;
/// A `fork.wait` without a timeout waits this long.
const DEFAULT_WAIT: Duration = Duration::from_secs(10);

impl From<LifecycleError> for ControlError {
    fn from(e: LifecycleError) -> Self {
        let code = match &e {
            LifecycleError::NotFound { .. } => ErrorCode::NotFound,
            LifecycleError::Exists { .. }
            | LifecycleError::InUse { .. }
            | LifecycleError::DeletePending(_) => ErrorCode::Conflict,
            LifecycleError::BadPath { .. } | LifecycleError::Snapshot(_) => {
                ErrorCode::InvalidArgument
            }
            LifecycleError::Registry(RegistryError::NoFork(_) | RegistryError::NoSnapshot(_)) => {
                ErrorCode::NotFound
            }
            LifecycleError::Registry(RegistryError::Exists { .. }) => ErrorCode::Conflict,
            LifecycleError::Registry(RegistryError::WaitTimedOut { .. })
            | LifecycleError::TooLarge { .. }
            | LifecycleError::Quota { .. } => ErrorCode::Unavailable,
            LifecycleError::Serve(ServeError::SocketPathTooLong(_)) => ErrorCode::InvalidArgument,
            LifecycleError::Serve(ServeError::Stopped | ServeError::TooManyForks(_)) => {
                ErrorCode::Unavailable
            }
            LifecycleError::Store(s) if s.source.kind() == std::io::ErrorKind::StorageFull => {
                ErrorCode::Unavailable
            }
            LifecycleError::CountsUnknown { .. }
            | LifecycleError::Broken { .. }
            | LifecycleError::Store(_)
            | LifecycleError::Serve(_) => ErrorCode::Internal,
        };
        ControlError::new(code, error_chain(&e))
    }
}

impl From<VmError> for ControlError {
    fn from(e: VmError) -> Self {
        let code = match &e {
            VmError::NotFound(_) => ErrorCode::NotFound,
            VmError::Exists(_) | VmError::WrongState { .. } => ErrorCode::Conflict,
            VmError::NoVmState(_) | VmError::Unsupported { .. } => ErrorCode::InvalidArgument,
            VmError::NoFuse
            | VmError::NoBinary(_)
            | VmError::NoJailUid
            | VmError::WaitTimedOut { .. } => ErrorCode::Unavailable,
            VmError::Lifecycle(_) => {
                let VmError::Lifecycle(inner) = e else {
                    unreachable!()
                };
                return inner.into();
            }
            VmError::StartFailed { .. }
            | VmError::Api { .. }
            | VmError::Qmp { .. }
            | VmError::Io { .. }
            | VmError::Store(_) => ErrorCode::Internal,
        };
        ControlError::new(code, error_chain(&e))
    }
}

fn to_value<T: serde::Serialize>(v: T) -> Result<Value, ControlError> {
    serde_json::to_value(v).map_err(|e| ControlError::new(ErrorCode::Internal, e.to_string()))
}

/// Answers requests from the lifecycle and the launched VMs.
#[derive(Debug)]
pub(crate) struct Dispatcher {
    lifecycle: Arc<Lifecycle>,
    vms: Arc<Vms>,
    upgrade: Arc<Upgrade>,
}

impl Dispatcher {
    /// A dispatcher over `lifecycle` and `vms`; `daemon.upgrade` goes to `upgrade`.
    pub fn new(lifecycle: Arc<Lifecycle>, vms: Arc<Vms>, upgrade: Arc<Upgrade>) -> Self {
        Self {
            lifecycle,
            vms,
            upgrade,
        }
    }
}

impl From<UpgradeError> for ControlError {
    fn from(e: UpgradeError) -> Self {
        let code = match &e {
            UpgradeError::NotAbsolute(_)
            | UpgradeError::Untrusted(_)
            | UpgradeError::NotExecutable(_)
            | UpgradeError::NotPagerd { .. } => ErrorCode::InvalidArgument,
            UpgradeError::InProgress => ErrorCode::Unavailable,
        };
        ControlError::new(code, error_chain(&e))
    }
}

/// Refuses a change to `kind` `id` (owned by uid `owner`) unless `caller` may make it.
fn may_change(
    caller: Option<u32>,
    kind: &str,
    id: &proto::Id,
    owner: u32,
) -> Result<(), ControlError> {
    if crate::owners::may_change(caller, owner) {
        return Ok(());
    }
    Err(ControlError::new(
        ErrorCode::PermissionDenied,
        format!(
            "{kind} `{id}` belongs to uid {owner}; only its owner, root and pagerd's own user may \
             change it"
        ),
    ))
}

fn wait_timeout(timeout_ms: Option<u64>) -> Duration {
    timeout_ms
        .map_or(DEFAULT_WAIT, Duration::from_millis)
        .min(MAX_WAIT)
}

impl Handler for Dispatcher {
    /// Without a context the peer is unknown: registration by path is refused.
    fn handle(&self, request: Request) -> Result<Value, ControlError> {
        let mut context = RequestContext::default();
        let answer = self.handle_with(request, &mut context);
        if let Some(then) = context.take_after_reply() {
            then();
        }
        answer
    }

    fn handle_with(
        &self,
        request: Request,
        context: &mut RequestContext,
    ) -> Result<Value, ControlError> {
        if !tracing::enabled!(tracing::Level::DEBUG) {
            return self.dispatch(request, context);
        }
        let op = serde_json::to_value(&request)
            .ok()
            .and_then(|v| v.get("op").and_then(Value::as_str).map(str::to_owned))
            .unwrap_or_default();
        let started = std::time::Instant::now();
        let outcome = self.dispatch(request, context);
        tracing::debug!(
            op,
            peer_uid = context.peer().map(|p| p.uid),
            micros = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX),
            error = outcome.as_ref().err().map(|e| e.code.as_str()),
            "control request"
        );
        outcome
    }
}

impl Dispatcher {
    /// The one `match` from a request to the lifecycle.
    fn dispatch(
        &self,
        request: Request,
        context: &mut RequestContext,
    ) -> Result<Value, ControlError> {
        let lc = &self.lifecycle;
        let launches = matches!(
            request,
            Request::VmStart { .. } | Request::VmStop { .. } | Request::VmSnapshot { .. }
        );
        let privileged = registration::may_register_by_path(context.peer());
        if launches && !privileged {
            // The hypervisor runs as the daemon's user and opens the paths it is given.
            return Err(ControlError::new(
                ErrorCode::PermissionDenied,
                "only root and pagerd's own user may start, stop or snapshot VMs",
            ));
        }
        if matches!(request, Request::DaemonUpgrade { .. }) && !privileged {
            // The daemon executes the program it is given, as its own user.
            return Err(ControlError::new(
                ErrorCode::PermissionDenied,
                "only root and pagerd's own user may upgrade the daemon",
            ));
        }
        let caller = context.peer().map(|p| p.uid);
        let owner = registration::owner_of(context.peer());
        match request {
            Request::Status {} => {
                let mut status = lc.status()?;
                status.vms = self.vms.counts();
                to_value(status)
            }
            Request::Stats {} => to_value(lc.stats()),
            Request::SnapshotRegister {
                snapshot,
                path,
                fd,
                link,
                vmstate,
                vmm,
            } => {
                let request = RegisterRequest {
                    snapshot,
                    path,
                    fd,
                    link,
                    vmstate,
                    vmm,
                };
                to_value(registration::register(lc, request, context)?)
            }
            Request::SnapshotDelete {
                snapshot,
                defer,
                force,
            } => {
                may_change(caller, "snapshot", &snapshot, lc.snapshot_owner(&snapshot)?)?;
                to_value(lc.delete_snapshot(&snapshot, defer, force)?)
            }
            Request::SnapshotList {} => to_value(lc.snapshots()?),
            Request::SnapshotGet { snapshot } => to_value(lc.snapshot(&snapshot)?),
            Request::SnapshotRecord { snapshot, forks } => {
                may_change(caller, "snapshot", &snapshot, lc.snapshot_owner(&snapshot)?)?;
                let forks = forks.unwrap_or(1);
                if !(1..=MAX_RECORD_FORKS).contains(&forks) {
                    return Err(ControlError::new(
                        ErrorCode::InvalidArgument,
                        format!("`forks` must be 1 to {MAX_RECORD_FORKS}, not {forks}"),
                    ));
                }
                to_value(lc.record_working_set(&snapshot, forks)?)
            }
            Request::SnapshotClearWorkingSet { snapshot } => {
                may_change(caller, "snapshot", &snapshot, lc.snapshot_owner(&snapshot)?)?;
                to_value(lc.clear_working_set(&snapshot)?)
            }
            Request::ForkCreate {
                snapshot,
                fork,
                prefetch,
            } => to_value(lc.create_fork(fork, &snapshot, prefetch, owner)?),
            Request::ForkList {} => to_value(lc.fork_list()),
            Request::ForkGet { fork } => to_value(lc.fork(&fork)?),
            Request::ForkWait {
                fork,
                state,
                timeout_ms,
            } => to_value(lc.wait_fork(&fork, state, wait_timeout(timeout_ms))?),
            Request::ForkClose { fork } => {
                may_change(caller, "fork", &fork, lc.fork_owner(&fork)?)?;
                if let Some(vm) = self.vms.vm_of_fork(&fork) {
                    // Closing it would freeze the guest while the VM still reads `running`.
                    return Err(ControlError::new(
                        ErrorCode::Conflict,
                        format!("fork `{fork}` serves VM `{vm}`; stop the VM instead (vm.stop)"),
                    ));
                }
                to_value(lc.close_fork(&fork)?)
            }
            Request::VmStart {
                snapshot,
                vm,
                backend,
                network_overrides,
                vsock,
                prefetch,
            } => to_value(
                self.vms
                    .start(StartRequest {
                        snapshot,
                        vm,
                        backend,
                        network_overrides,
                        vsock,
                        prefetch,
                        owner,
                    })
                    .inspect_err(crate::metrics::vm_start_failed)?,
            ),
            Request::VmList {} => to_value(self.vms.list()),
            Request::VmGet { vm } => to_value(self.vms.get(&vm)?),
            Request::VmStop { vm, timeout_ms } => {
                let timeout = timeout_ms
                    .map_or(DEFAULT_STOP_TIMEOUT, Duration::from_millis)
                    .min(MAX_WAIT);
                to_value(self.vms.stop(&vm, timeout)?)
            }
            Request::VmWait {
                vm,
                state,
                timeout_ms,
            } => to_value(self.vms.wait(&vm, state, wait_timeout(timeout_ms))?),
            Request::VmSnapshot {
                vm,
                snapshot,
                resume,
            } => to_value(self.vms.snapshot(&vm, snapshot, resume)?),
            Request::DaemonUpgrade { binary } => {
                let binary = self.upgrade.request(binary)?;
                // The caller hears "ok" before the control socket goes away.
                let upgrade = self.upgrade.clone();
                context.after_reply(move || upgrade.start());
                to_value(proto::model::UpgradeStarted {
                    pid: std::process::id(),
                    binary,
                    version: env!("CARGO_PKG_VERSION").to_owned(),
                })
            }
        }
    }
}
