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

/// The longest `fork.wait` allowed.
const MAX_WAIT: Duration = Duration::from_secs(600);
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
            LifecycleError::Registry(RegistryError::WaitTimedOut { .. }) => ErrorCode::Unavailable,
            LifecycleError::Serve(ServeError::SocketPathTooLong(_)) => ErrorCode::InvalidArgument,
            LifecycleError::Serve(ServeError::Stopped | ServeError::TooManyForks { .. }) => {
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

fn to_value<T: serde::Serialize>(v: T) -> Result<Value, ControlError> {
    serde_json::to_value(v).map_err(|e| ControlError::new(ErrorCode::Internal, e.to_string()))
}

/// Answers requests from the lifecycle.
#[derive(Debug)]
pub(crate) struct Dispatcher {
    lifecycle: Arc<Lifecycle>,
    upgrade: Arc<Upgrade>,
}

impl Dispatcher {
    /// A dispatcher over `lifecycle`; `daemon.upgrade` goes to `upgrade`.
    pub fn new(lifecycle: Arc<Lifecycle>, upgrade: Arc<Upgrade>) -> Self {
        Self { lifecycle, upgrade }
    }
}

impl From<UpgradeError> for ControlError {
    fn from(e: UpgradeError) -> Self {
        let code = match &e {
            UpgradeError::NotAbsolute(_)
            | UpgradeError::NotExecutable(_)
            | UpgradeError::NotPagerd { .. } => ErrorCode::InvalidArgument,
            UpgradeError::InProgress => ErrorCode::Unavailable,
        };
        ControlError::new(code, error_chain(&e))
    }
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
        let lc = &self.lifecycle;
        match request {
            Request::Status {} => to_value(lc.status()?),
            Request::Stats {} => to_value(lc.stats()),
            Request::SnapshotRegister {
                snapshot,
                path,
                fd,
                link,
            } => {
                let request = RegisterRequest {
                    snapshot,
                    path,
                    fd,
                    link,
                };
                to_value(registration::register(lc, request, context)?)
            }
            Request::SnapshotDelete {
                snapshot,
                defer,
                force,
            } => to_value(lc.delete_snapshot(&snapshot, defer, force)?),
            Request::SnapshotList {} => to_value(lc.snapshots()?),
            Request::SnapshotGet { snapshot } => to_value(lc.snapshot(&snapshot)?),
            Request::ForkCreate { snapshot, fork } => to_value(lc.create_fork(fork, &snapshot)?),
            Request::ForkList {} => to_value(lc.fork_list()),
            Request::ForkGet { fork } => to_value(lc.fork(&fork)?),
            Request::ForkWait {
                fork,
                state,
                timeout_ms,
            } => {
                let timeout = timeout_ms
                    .map_or(DEFAULT_WAIT, Duration::from_millis)
                    .min(MAX_WAIT);
                to_value(lc.wait_fork(&fork, state, timeout)?)
            }
            Request::ForkClose { fork } => to_value(lc.close_fork(&fork)?),
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
