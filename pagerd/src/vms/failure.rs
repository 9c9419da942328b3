//! Why a start failed, in words an operator can act on: the error of the step that failed
//! and, when the hypervisor ended by itself, its exit status and the last lines of its console
//! log (its stdout and stderr); and whose fault it was, which picks the error answered.
//!
//! ```text
//! step failed ─▶ hypervisor spawned? ─ no ──────────────────────────▶ the step's error
//!                                    └ yes: ended within the grace? ─▶ + "exited with code 3;
//!                                                                        its last output: …"
//! answered:  the hypervisor refused the snapshot (Firecracker's 400 to the load) ─▶ rejected
//!            (invalid_argument); anything else ─▶ failed (internal)
//! ```

use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::ExitStatus;
use std::time::Duration;

use proto::VmId;

use super::{console, VmError};

/// The most lines of a hypervisor's console log kept with a failed start.
pub(crate) const TAIL_LINES: usize = 20;
/// The most bytes of a hypervisor's console log kept with a failed start.
pub(crate) const TAIL_BYTES: u64 = 4096;
/// How long a hypervisor whose start failed after it was spawned is given to end by itself
/// (Firecracker exits right after refusing a snapshot load) before it is killed, so that its
/// exit status and last words are kept.
pub(crate) const EXIT_GRACE: Duration = Duration::from_secs(1);

/// A hypervisor that ended by itself while it was being started.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct EarlyExit {
    /// Its exit code, if it exited.
    pub code: Option<i32>,
    /// The signal that ended it, if one did.
    pub signal: Option<i32>,
    /// The last lines of its console log (empty if it wrote nothing).
    pub output: String,
}

impl EarlyExit {
    /// The exit `status` of a hypervisor, with the end of its console log at `console`.
    pub(crate) fn new(status: ExitStatus, console: &Path) -> Self {
        let output = console::tail(console, TAIL_LINES, TAIL_BYTES).unwrap_or_else(|e| {
            tracing::warn!(log = %console.display(), error = %e, "cannot read a console log");
            String::new()
        });
        Self {
            code: status.code(),
            signal: status.signal(),
            output,
        }
    }
}

impl std::fmt::Display for EarlyExit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (self.code, self.signal) {
            (Some(code), _) => write!(f, "the hypervisor exited with code {code}")?,
            (None, Some(signal)) => write!(f, "the hypervisor was killed by signal {signal}")?,
            (None, None) => f.write_str("the hypervisor ended")?,
        }
        if self.output.is_empty() {
            f.write_str("; it wrote nothing on its console")
        } else {
            write!(f, "; its last output:\n{}", self.output)
        }
    }
}

/// A failed start: the error of the step that failed, and the hypervisor's own end if it
/// came by itself.
#[derive(Debug)]
pub(crate) struct StartFailure {
    /// What failed.
    pub error: VmError,
    /// How the hypervisor ended, if it did by itself.
    pub exit: Option<Box<EarlyExit>>,
}

impl From<VmError> for StartFailure {
    fn from(error: VmError) -> Self {
        Self { error, exit: None }
    }
}

impl StartFailure {
    /// The reason recorded with the VM and answered: the error chain, then the exit.
    pub(crate) fn reason(&self) -> String {
        let error = crate::errors::error_chain(&self.error);
        match &self.exit {
            Some(exit) => format!("{error}; {exit}"),
            None => error,
        }
    }

    /// The error answered for VM `vm`: the hypervisor's refusal of the snapshot is the
    /// caller's bad input; anything else is a failure.
    pub(crate) fn into_error(self, vm: VmId) -> VmError {
        let reason = self.reason();
        let rejected = match &self.error {
            VmError::Api { source, .. } => source.rejected_snapshot(),
            VmError::Qmp { source, .. } => source.rejected_snapshot(),
            _ => false,
        };
        if rejected {
            VmError::StartRejected { vm, reason }
        } else {
            VmError::StartFailed { vm, reason }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::process::ExitStatusExt;

    use vmm_glue::firecracker::FirecrackerError;
    use vmm_glue::qemu::QemuError;

    use super::*;

    fn vm() -> VmId {
        "a".parse().unwrap()
    }

    fn refused_load(status: u16) -> VmError {
        VmError::hypervisor(
            vm(),
            FirecrackerError::Refused {
                method: "PUT",
                path: "/snapshot/load",
                status,
                body: r#"{"fault_message":"bad vmstate"}"#.into(),
            }
            .into(),
        )
    }

    #[test]
    fn an_exit_says_how_and_quotes_the_console() {
        let dir = tempfile::tempdir().unwrap();
        let console = dir.path().join("console.log");
        std::fs::write(&console, "starting\nError: no such option --bad\n").unwrap();
        let exit = EarlyExit::new(ExitStatus::from_raw(3 << 8), &console);
        assert_eq!((exit.code, exit.signal), (Some(3), None));
        assert_eq!(
            exit.to_string(),
            "the hypervisor exited with code 3; its last output:\nstarting\nError: no such option --bad"
        );
        let killed = EarlyExit::new(ExitStatus::from_raw(11), &dir.path().join("none"));
        assert_eq!((killed.code, killed.signal), (None, Some(11)));
        assert_eq!(
            killed.to_string(),
            "the hypervisor was killed by signal 11; it wrote nothing on its console"
        );
    }

    #[test]
    fn a_refused_snapshot_load_is_the_callers_bad_input() {
        let failure = StartFailure {
            error: refused_load(400),
            exit: Some(Box::new(EarlyExit {
                code: Some(1),
                signal: None,
                output: "Error: RunWithApi".into(),
            })),
        };
        let reason = failure.reason();
        assert_eq!(
            reason,
            "VM `a`: PUT /snapshot/load answered 400: {\"fault_message\":\"bad vmstate\"}; \
             the hypervisor exited with code 1; its last output:\nError: RunWithApi"
        );
        match failure.into_error(vm()) {
            VmError::StartRejected { vm, reason: r } => {
                assert_eq!((vm.as_str(), r), ("a", reason));
            }
            other => panic!("{other:?}"),
        }
        let qemu = StartFailure::from(VmError::hypervisor(
            vm(),
            QemuError::Migration("failed".into()).into(),
        ));
        assert!(matches!(
            qemu.into_error(vm()),
            VmError::StartRejected { .. }
        ));
    }

    #[test]
    fn anything_else_is_a_failure() {
        for error in [
            refused_load(500),
            VmError::hypervisor(
                vm(),
                FirecrackerError::Ended {
                    socket: "/v/api.sock".into(),
                }
                .into(),
            ),
            VmError::Io {
                action: "start /x".into(),
                source: std::io::Error::other("x"),
            },
        ] {
            let failure = StartFailure::from(error);
            assert!(matches!(
                failure.into_error(vm()),
                VmError::StartFailed { .. }
            ));
        }
    }
}
