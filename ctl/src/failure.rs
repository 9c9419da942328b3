//! How a failed call reads: one line on stderr, `pagerctl: MESSAGE (CODE)` with its causes
//! joined by `: `, or with `--json` an `{"error": {"code": …, "message": …}}` object on
//! stdout; and the exit status that goes with it.

use std::time::Duration;

use proto::client::ClientError;
use proto::control::ErrorCode;
use serde_json::Value;

/// Exit status when the daemon cannot be reached or answers nonsense.
pub(crate) const EXIT_UNREACHABLE: u8 = 8;

/// How this invocation reports failures.
pub struct Report {
    /// `--json`: errors as JSON on stdout.
    pub json: bool,
    /// `--timeout`, named when a call ran out of it.
    pub timeout: Duration,
}

impl Report {
    /// Prints a failed call.
    pub fn print(&self, e: &ClientError) {
        if self.json {
            crate::emit(&format!(
                "{}\n",
                serde_json::json!({ "error": self.json_of(e) })
            ));
        } else {
            eprintln!("pagerctl: {}", self.one_line(e));
        }
    }

    /// `MESSAGE (CODE)`.
    pub fn one_line(&self, e: &ClientError) -> String {
        format!("{} ({})", self.message(e), code_name(e))
    }

    /// A failed call as `--json` shows it: the daemon's error, or one made alike.
    pub fn json_of(&self, e: &ClientError) -> Value {
        match e {
            ClientError::Refused(refusal) => serde_json::to_value(refusal).unwrap_or(Value::Null),
            other => serde_json::json!({
                "code": code_name(other),
                "message": self.message(other),
            }),
        }
    }

    /// What went wrong, causes joined by `: `; a call that ran out of time says which limit.
    fn message(&self, e: &ClientError) -> String {
        match e {
            ClientError::Refused(refusal) => refusal.message.clone(),
            ClientError::Io(io)
                if matches!(
                    io.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                format!(
                    "pagerd did not answer within {} (--timeout, ${})",
                    humantime::format_duration(self.timeout),
                    crate::TIMEOUT_ENV
                )
            }
            other => chain(other).join(": "),
        }
    }
}

/// The error code a failed call stands for: the daemon's, `invalid_argument` for a file that
/// cannot be opened here, or none when the daemon could not be reached.
fn error_code(e: &ClientError) -> Option<ErrorCode> {
    match e {
        ClientError::Open { .. } => Some(ErrorCode::InvalidArgument),
        other => other.code(),
    }
}

/// The code's name, `unreachable` when there was no answer.
fn code_name(e: &ClientError) -> &'static str {
    error_code(e).map_or("unreachable", ErrorCode::as_str)
}

/// The exit status for a failed call.
pub fn exit_code(e: &ClientError) -> u8 {
    error_code(e).map_or(EXIT_UNREACHABLE, ErrorCode::exit_code)
}

/// An error and its sources, outermost first.
fn chain(e: &dyn std::error::Error) -> Vec<String> {
    let mut out = Vec::new();
    let mut source = Some(e);
    while let Some(cause) = source {
        out.push(cause.to_string());
        source = cause.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::control::ControlError;

    fn report() -> Report {
        Report {
            json: false,
            timeout: Duration::from_millis(1500),
        }
    }

    #[test]
    fn a_refusal_reads_as_the_daemons_message_and_code() {
        let e = ClientError::Refused(ControlError::new(ErrorCode::NotFound, "no fork `f`"));
        assert_eq!(report().message(&e), "no fork `f`");
        assert_eq!(code_name(&e), "not_found");
        assert_eq!(exit_code(&e), 3);
    }

    #[test]
    fn causes_are_joined_on_one_line() {
        let e = ClientError::Connect {
            path: "/run/x.sock".into(),
            source: std::io::Error::from(std::io::ErrorKind::NotFound),
        };
        let message = report().message(&e);
        assert!(
            message.starts_with("cannot connect to pagerd at /run/x.sock: "),
            "{message}"
        );
        assert!(!message.contains('\n'), "{message}");
        assert_eq!(code_name(&e), "unreachable");
        assert_eq!(exit_code(&e), EXIT_UNREACHABLE);
    }

    #[test]
    fn a_call_out_of_time_names_the_limit() {
        let e = ClientError::Io(std::io::Error::from(std::io::ErrorKind::WouldBlock));
        assert_eq!(
            report().message(&e),
            "pagerd did not answer within 1s 500ms (--timeout, $PAGERD_TIMEOUT)"
        );
    }
}
