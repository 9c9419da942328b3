//! Answers control requests: one `match` from [`Request`] to the lifecycle, and the stable
//! error code of every way a request can fail.

use std::sync::Arc;
use std::time::Duration;

use proto::control::{
    Call, ControlError, DaemonUpgrade, ErrorCode, ForkClose, ForkCreate, ForkGet, ForkList,
    ForkWait, Request, SnapshotClearWorkingSet, SnapshotDelete, SnapshotExport, SnapshotGet,
    SnapshotImport, SnapshotList, SnapshotRecord, SnapshotRegister, Stats, Status, VmDelete, VmGet,
    VmList, VmSnapshot, VmStart, VmStop, VmWait,
};
use serde_json::Value;

use super::registration;
use super::{Handler, RequestContext};
use crate::errors::error_chain;
use crate::lifecycle::{Lifecycle, LifecycleError};
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
            LifecycleError::BadPath { .. }
            | LifecycleError::NotLinkable { .. }
            | LifecycleError::ChangedWhileImporting { .. }
            | LifecycleError::Snapshot(_) => ErrorCode::InvalidArgument,
            LifecycleError::WaitTimedOut(_)
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
            | LifecycleError::BrokenNeedsForce { .. }
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
            VmError::Exists(_) | VmError::WrongState { .. } | VmError::Live { .. } => {
                ErrorCode::Conflict
            }
            VmError::NoVmState(_) | VmError::Unsupported { .. } | VmError::StartRejected { .. } => {
                ErrorCode::InvalidArgument
            }
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
    id: &impl std::fmt::Display,
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
        let changes = request.changes();
        if !changes && !tracing::enabled!(tracing::Level::DEBUG) {
            return self.dispatch(request, context);
        }
        let op = request.op();
        let named = Named::of(&request);
        let started = std::time::Instant::now();
        let outcome = self.dispatch(request, context);
        // An object made with a generated id is named by the answer.
        let made = outcome
            .as_ref()
            .ok()
            .and_then(|answer| answer.get("id"))
            .and_then(Value::as_str);
        let micros = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
        let peer_uid = context.peer().map(|p| p.uid);
        let error = outcome.as_ref().err().map(|e| e.code.as_str());
        let (snapshot, fork, vm) = (
            named.snapshot.as_deref(),
            named.fork.as_deref(),
            named.vm.as_deref(),
        );
        if changes {
            tracing::info!(
                op,
                snapshot,
                fork,
                vm,
                id = made,
                peer_uid,
                micros,
                error,
                "control request"
            );
        } else {
            tracing::debug!(
                op,
                snapshot,
                fork,
                vm,
                peer_uid,
                micros,
                error,
                "control request"
            );
        }
        outcome
    }
}

impl Dispatcher {
    /// The one `match` from a request to its handler. Each handler returns its request's own
    /// answer type ([`Call::Answer`]), checked here by the compiler; only then is it encoded.
    fn dispatch(
        &self,
        request: Request,
        context: &mut RequestContext,
    ) -> Result<Value, ControlError> {
        refuse_unprivileged(&request, context)?;
        let cx = context;
        match request {
            Request::Status(c) => encode::<Status>(self.status(c)),
            Request::Stats(c) => encode::<Stats>(self.stats(c)),
            Request::SnapshotRegister(c) => {
                encode::<SnapshotRegister>(registration::register(&self.lifecycle, c, cx))
            }
            Request::SnapshotDelete(c) => encode::<SnapshotDelete>(self.snapshot_delete(c, cx)),
            Request::SnapshotList(c) => encode::<SnapshotList>(self.snapshot_list(c)),
            Request::SnapshotGet(c) => encode::<SnapshotGet>(self.snapshot_get(c)),
            Request::SnapshotRecord(c) => encode::<SnapshotRecord>(self.snapshot_record(c, cx)),
            Request::SnapshotClearWorkingSet(c) => {
                encode::<SnapshotClearWorkingSet>(self.snapshot_clear_working_set(c, cx))
            }
            Request::SnapshotExport(c) => encode::<SnapshotExport>(self.snapshot_export(c)),
            Request::SnapshotImport(c) => encode::<SnapshotImport>(self.snapshot_import(c, cx)),
            Request::ForkCreate(c) => encode::<ForkCreate>(self.fork_create(c, cx)),
            Request::ForkList(c) => encode::<ForkList>(self.fork_list(c)),
            Request::ForkGet(c) => encode::<ForkGet>(self.fork_get(c)),
            Request::ForkWait(c) => encode::<ForkWait>(self.fork_wait(c)),
            Request::ForkClose(c) => encode::<ForkClose>(self.fork_close(c, cx)),
            Request::VmStart(c) => encode::<VmStart>(self.vm_start(c, cx)),
            Request::VmList(c) => encode::<VmList>(self.vm_list(c)),
            Request::VmGet(c) => encode::<VmGet>(self.vm_get(c)),
            Request::VmStop(c) => encode::<VmStop>(self.vm_stop(c)),
            Request::VmWait(c) => encode::<VmWait>(self.vm_wait(c)),
            Request::VmDelete(c) => encode::<VmDelete>(self.vm_delete(c, cx)),
            Request::VmSnapshot(c) => encode::<VmSnapshot>(self.vm_snapshot(c)),
            Request::DaemonUpgrade(c) => encode::<DaemonUpgrade>(self.daemon_upgrade(c, cx)),
        }
    }

    fn status(&self, _: Status) -> Answer<Status> {
        let mut status = self.lifecycle.reports().status()?;
        status.vms = self.vms.counts();
        Ok(status)
    }

    fn stats(&self, _: Stats) -> Answer<Stats> {
        Ok(self.lifecycle.reports().stats())
    }

    fn snapshot_delete(&self, c: SnapshotDelete, cx: &RequestContext) -> Answer<SnapshotDelete> {
        self.may_change_snapshot(cx, &c.snapshot)?;
        Ok(self
            .lifecycle
            .delete_snapshot(&c.snapshot, c.defer, c.force)?)
    }

    /// Refuses a change of snapshot `id` by anyone but its owner and the operators.
    fn may_change_snapshot(
        &self,
        cx: &RequestContext,
        id: &proto::SnapshotId,
    ) -> Result<(), ControlError> {
        let owner = self.lifecycle.snapshot_owner(id)?;
        may_change(caller(cx), "snapshot", id, owner)
    }

    fn snapshot_list(&self, _: SnapshotList) -> Answer<SnapshotList> {
        Ok(self.lifecycle.snapshots()?)
    }

    fn snapshot_get(&self, c: SnapshotGet) -> Answer<SnapshotGet> {
        Ok(self.lifecycle.snapshot(&c.snapshot)?)
    }

    fn snapshot_record(&self, c: SnapshotRecord, cx: &RequestContext) -> Answer<SnapshotRecord> {
        self.may_change_snapshot(cx, &c.snapshot)?;
        let forks = c.forks.unwrap_or(1);
        if !(1..=MAX_RECORD_FORKS).contains(&forks) {
            return Err(ControlError::new(
                ErrorCode::InvalidArgument,
                format!("`forks` must be 1 to {MAX_RECORD_FORKS}, not {forks}"),
            ));
        }
        Ok(self.lifecycle.working_sets().record(&c.snapshot, forks)?)
    }

    fn snapshot_clear_working_set(
        &self,
        c: SnapshotClearWorkingSet,
        cx: &RequestContext,
    ) -> Answer<SnapshotClearWorkingSet> {
        self.may_change_snapshot(cx, &c.snapshot)?;
        Ok(self.lifecycle.working_sets().clear(&c.snapshot)?)
    }

    fn snapshot_export(&self, c: SnapshotExport) -> Answer<SnapshotExport> {
        Ok(self.lifecycle.export_snapshot(&c.snapshot, &c.dir)?)
    }

    fn snapshot_import(&self, c: SnapshotImport, cx: &RequestContext) -> Answer<SnapshotImport> {
        let owner = registration::owner_of(cx.peer());
        Ok(self.lifecycle.import_snapshot(&c.dir, c.snapshot, owner)?)
    }

    fn fork_create(&self, c: ForkCreate, cx: &RequestContext) -> Answer<ForkCreate> {
        let owner = registration::owner_of(cx.peer());
        Ok(self
            .lifecycle
            .create_fork(c.fork, &c.snapshot, c.prefetch, owner)?)
    }

    fn fork_list(&self, _: ForkList) -> Answer<ForkList> {
        Ok(self.lifecycle.reports().fork_list())
    }

    fn fork_get(&self, c: ForkGet) -> Answer<ForkGet> {
        Ok(self.lifecycle.reports().fork(&c.fork)?)
    }

    fn fork_wait(&self, c: ForkWait) -> Answer<ForkWait> {
        Ok(self
            .lifecycle
            .wait_fork(&c.fork, c.state, wait_timeout(c.timeout_ms))?)
    }

    fn fork_close(&self, c: ForkClose, cx: &RequestContext) -> Answer<ForkClose> {
        let lc = &self.lifecycle;
        let fork = c.fork;
        may_change(caller(cx), "fork", &fork, lc.fork_owner(&fork)?)?;
        if let Some(vm) = self.vms.vm_of_fork(&fork) {
            // Closing it would freeze the guest while the VM still reads `running`.
            return Err(ControlError::new(
                ErrorCode::Conflict,
                format!("fork `{fork}` serves VM `{vm}`; stop the VM instead (vm.stop)"),
            ));
        }
        Ok(lc.close_fork(&fork)?)
    }

    fn vm_start(&self, c: VmStart, cx: &RequestContext) -> Answer<VmStart> {
        let owner = registration::owner_of(cx.peer());
        Ok(self
            .vms
            .start(StartRequest { call: c, owner })
            .inspect_err(crate::metrics::vm_start_failed)?)
    }

    fn vm_list(&self, _: VmList) -> Answer<VmList> {
        Ok(self.vms.list())
    }

    fn vm_get(&self, c: VmGet) -> Answer<VmGet> {
        Ok(self.vms.get(&c.vm)?)
    }

    fn vm_stop(&self, c: VmStop) -> Answer<VmStop> {
        let timeout = c
            .timeout_ms
            .map_or(DEFAULT_STOP_TIMEOUT, Duration::from_millis)
            .min(MAX_WAIT);
        Ok(self.vms.stop(&c.vm, timeout)?)
    }

    fn vm_wait(&self, c: VmWait) -> Answer<VmWait> {
        Ok(self.vms.wait(&c.vm, c.state, wait_timeout(c.timeout_ms))?)
    }

    fn vm_delete(&self, c: VmDelete, cx: &RequestContext) -> Answer<VmDelete> {
        may_change(caller(cx), "VM", &c.vm, self.vms.get(&c.vm)?.owner)?;
        Ok(self.vms.delete(&c.vm)?)
    }

    fn vm_snapshot(&self, c: VmSnapshot) -> Answer<VmSnapshot> {
        Ok(self.vms.snapshot(&c.vm, c.snapshot, c.resume)?)
    }

    fn daemon_upgrade(&self, c: DaemonUpgrade, cx: &mut RequestContext) -> Answer<DaemonUpgrade> {
        let binary = self.upgrade.request(c.binary)?;
        // The caller hears "ok" before the control socket goes away.
        let upgrade = self.upgrade.clone();
        cx.after_reply(move || upgrade.start());
        Ok(proto::model::UpgradeStarted {
            pid: std::process::id(),
            binary,
            version: env!("CARGO_PKG_VERSION").to_owned(),
        })
    }
}

/// The objects a request names, for its log line.
#[derive(Debug, Default)]
struct Named {
    snapshot: Option<String>,
    fork: Option<String>,
    vm: Option<String>,
}

impl Named {
    fn of(request: &Request) -> Self {
        let fields = serde_json::to_value(request).unwrap_or_default();
        let text = |name: &str| fields.get(name).and_then(Value::as_str).map(str::to_owned);
        Self {
            snapshot: text("snapshot"),
            fork: text("fork"),
            vm: text("vm"),
        }
    }
}

/// What a handler of `C` answers.
type Answer<C> = Result<<C as Call>::Answer, ControlError>;

/// A handler's answer on the wire; `C` names the request, so an answer of another type does
/// not compile.
fn encode<C: Call>(answer: Answer<C>) -> Result<Value, ControlError> {
    serde_json::to_value(answer?).map_err(|e| ControlError::new(ErrorCode::Internal, e.to_string()))
}

/// The uid asking, if known.
fn caller(cx: &RequestContext) -> Option<u32> {
    cx.peer().map(|p| p.uid)
}

/// Refuses what only root and pagerd's own user may ask: launching, stopping or snapshotting
/// VMs (the hypervisor runs as the daemon's user and opens the paths it is given), and
/// upgrading the daemon (it executes the program it is given, as its own user).
fn refuse_unprivileged(request: &Request, cx: &RequestContext) -> Result<(), ControlError> {
    if registration::may_register_by_path(cx.peer()) {
        return Ok(());
    }
    let refused = match request {
        Request::VmStart(_) | Request::VmStop(_) | Request::VmSnapshot(_) => {
            "only root and pagerd's own user may start, stop or snapshot VMs"
        }
        Request::DaemonUpgrade(_) => "only root and pagerd's own user may upgrade the daemon",
        // The daemon reads and writes the directory named, as its own user.
        Request::SnapshotExport(_) | Request::SnapshotImport(_) => {
            "only root and pagerd's own user may export or import snapshots"
        }
        _ => return Ok(()),
    };
    Err(ControlError::new(ErrorCode::PermissionDenied, refused))
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use proto::{ForkId, SnapshotId};

    use super::*;
    use crate::control::Peer;
    use crate::owners::ForkQuotaError;
    use crate::store::StoreError;

    fn code(e: impl Into<ControlError>) -> ErrorCode {
        e.into().code
    }

    fn store_error(kind: std::io::ErrorKind) -> LifecycleError {
        LifecycleError::Store(StoreError {
            action: "write",
            path: PathBuf::from("/state/x"),
            source: kind.into(),
        })
    }

    #[test]
    fn lifecycle_refusals_map_to_their_codes() {
        let s: SnapshotId = "s".parse().unwrap();
        let f: ForkId = "f".parse().unwrap();
        let not_found = LifecycleError::NotFound {
            kind: "fork",
            id: "f".into(),
        };
        let message = ControlError::from(LifecycleError::NotFound {
            kind: "fork",
            id: "f".into(),
        })
        .message;
        assert!(message.contains("`f`"), "{message}");
        let cases = [
            (not_found, ErrorCode::NotFound),
            (
                LifecycleError::Exists {
                    kind: "snapshot",
                    id: "s".into(),
                },
                ErrorCode::Conflict,
            ),
            (
                LifecycleError::InUse {
                    snapshot: s.clone(),
                    forks: vec![f],
                    file_users: Vec::new(),
                    vms: Vec::new(),
                },
                ErrorCode::Conflict,
            ),
            (
                LifecycleError::DeletePending(s.clone()),
                ErrorCode::Conflict,
            ),
            (
                LifecycleError::BadPath {
                    path: "/x".into(),
                    why: "a symlink".into(),
                },
                ErrorCode::InvalidArgument,
            ),
            (
                LifecycleError::TooLarge { size: 2, max: 1 },
                ErrorCode::Unavailable,
            ),
            (
                LifecycleError::Quota {
                    uid: 1000,
                    used: 1,
                    size: 2,
                    quota: 2,
                },
                ErrorCode::Unavailable,
            ),
            (
                LifecycleError::Serve(ServeError::SocketPathTooLong("/long".into())),
                ErrorCode::InvalidArgument,
            ),
            (
                LifecycleError::Serve(ServeError::TooManyForks(ForkQuotaError::Full { max: 1 })),
                ErrorCode::Unavailable,
            ),
            (
                store_error(std::io::ErrorKind::StorageFull),
                ErrorCode::Unavailable,
            ),
            (
                store_error(std::io::ErrorKind::PermissionDenied),
                ErrorCode::Internal,
            ),
            (
                LifecycleError::CountsUnknown {
                    snapshot: s,
                    records: vec!["/state/forks/x.json".into()],
                },
                ErrorCode::Internal,
            ),
        ];
        for (e, want) in cases {
            let shown = e.to_string();
            assert_eq!(code(e), want, "{shown}");
        }
    }

    #[test]
    fn upgrade_refusals_map_to_their_codes() {
        assert_eq!(
            code(UpgradeError::NotAbsolute("bin".into())),
            ErrorCode::InvalidArgument
        );
        assert_eq!(
            code(UpgradeError::NotExecutable("/bin/x".into())),
            ErrorCode::InvalidArgument
        );
        assert_eq!(code(UpgradeError::InProgress), ErrorCode::Unavailable);
    }

    #[test]
    fn only_operators_launch_vms_or_upgrade_and_members_change_only_their_own() {
        let me = nix::unistd::geteuid().as_raw();
        let member = if me == 4242 { 4243 } else { 4242 };
        let cx = |uid| {
            RequestContext::new(
                Some(Peer {
                    uid,
                    gid: uid,
                    pid: 1,
                }),
                Vec::new(),
            )
        };
        let start = Request::from(VmStart {
            snapshot: "s".parse().unwrap(),
            vm: None,
            backend: Default::default(),
            network_overrides: Vec::new(),
            vsock: None,
            prefetch: None,
        });
        let upgrade = Request::from(DaemonUpgrade { binary: None });
        let export = Request::from(SnapshotExport {
            snapshot: "s".parse().unwrap(),
            dir: "/backup".into(),
        });
        let import = Request::from(SnapshotImport {
            dir: "/backup".into(),
            snapshot: None,
        });
        let list = Request::from(ForkList {});
        for request in [&start, &upgrade, &export, &import] {
            let refused = refuse_unprivileged(request, &cx(member)).unwrap_err();
            assert_eq!(
                refused.code,
                ErrorCode::PermissionDenied,
                "{}",
                request.op()
            );
            assert!(refuse_unprivileged(request, &cx(0)).is_ok());
            assert!(refuse_unprivileged(request, &cx(me)).is_ok());
        }
        assert!(refuse_unprivileged(&list, &cx(member)).is_ok());
        let unknown = RequestContext::default();
        assert!(
            refuse_unprivileged(&start, &unknown).is_err(),
            "an unknown peer is nobody"
        );

        let id: ForkId = "f".parse().unwrap();
        assert!(may_change(Some(member), "fork", &id, member).is_ok());
        assert!(may_change(Some(0), "fork", &id, member).is_ok());
        let refused = may_change(Some(member), "fork", &id, member + 1).unwrap_err();
        assert_eq!(refused.code, ErrorCode::PermissionDenied);
        assert!(refused.message.contains(&format!("uid {}", member + 1)));
    }
}
