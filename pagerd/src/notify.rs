//! Telling a service manager what the daemon is doing (systemd's `sd_notify` protocol, through
//! the `sd-notify` crate): `READY=1` once every socket serves, `STATUS=` lines while it runs,
//! `STOPPING=1` when it shuts down. Without `$NOTIFY_SOCKET` every call does nothing.

use std::sync::Mutex;

use sd_notify::NotifyState;

/// The last status sent, so that an unchanged one is not sent again.
static LAST_STATUS: Mutex<String> = Mutex::new(String::new());

fn send(states: &[NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(states) {
        tracing::warn!(error = %e, "cannot notify the service manager");
    }
}

/// Reports what the daemon is doing, if it changed.
pub(crate) fn status(text: &str) {
    let mut last = LAST_STATUS.lock().unwrap_or_else(|p| p.into_inner());
    if *last != text {
        text.clone_into(&mut last);
        send(&[NotifyState::Status(text)]);
        tracing::debug!(status = text, "status");
    }
}

/// A step of the start that may take long: says what it is and asks the service manager
/// for `extend` more time before it counts the start as failed (`EXTEND_TIMEOUT_USEC=`).
pub(crate) fn starting(text: &str, extend: std::time::Duration) {
    text.clone_into(&mut LAST_STATUS.lock().unwrap_or_else(|p| p.into_inner()));
    send(&[
        NotifyState::Status(text),
        NotifyState::ExtendTimeoutUsec(extend_usec(extend)),
    ]);
}

fn extend_usec(extend: std::time::Duration) -> u32 {
    u32::try_from(extend.as_micros()).unwrap_or(u32::MAX)
}

/// The daemon serves: every socket listens and the state directory is reconciled.
pub(crate) fn ready(text: &str) {
    text.clone_into(&mut LAST_STATUS.lock().unwrap_or_else(|p| p.into_inner()));
    send(&[NotifyState::Ready, NotifyState::Status(text)]);
}

/// The daemon is shutting down.
pub(crate) fn stopping() {
    send(&[NotifyState::Stopping, NotifyState::Status("stopping")]);
}
