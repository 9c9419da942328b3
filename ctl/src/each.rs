//! Commands that take several ids (`fork close`, `vm rm`): one call per id, each tried.
//!
//! One id answers as any command does. With several, refusals are reported as they come, the
//! exit status is the first refusal's, and `--json` prints one array with, per id, the answer
//! or `{"error": …}`. A daemon that cannot be reached ends it: the next ids would fail alike.

use proto::client::ClientError;
use serde::Serialize;
use serde_json::Value;

use crate::failure::{self, Report};
use crate::{done, Outcome};

/// Calls `call` for each of `ids`; `text` is how one answer reads.
pub fn id<I: AsRef<str>, T: Serialize>(
    ids: &[I],
    call: impl Fn(&str) -> Result<T, ClientError>,
    text: impl Fn(&T) -> String,
    report: &Report,
) -> Result<Outcome, ClientError> {
    if let [id] = ids {
        let answer = call(id.as_ref())?;
        return Ok(done(&answer, text(&answer)));
    }
    let mut answers = Vec::new();
    let mut out = String::new();
    let mut exit = 0;
    for id in ids {
        match call(id.as_ref()) {
            Ok(answer) => {
                out += &text(&answer);
                answers.push(serde_json::to_value(&answer).unwrap_or(Value::Null));
            }
            Err(e @ ClientError::Refused(_)) => {
                if !report.json {
                    report.print(&e);
                }
                answers.push(serde_json::json!({ "error": report.json_of(&e) }));
                if exit == 0 {
                    exit = failure::exit_code(&e);
                }
            }
            Err(e) => return Err(e),
        }
    }
    let mut outcome = done(&answers, out);
    outcome.exit = exit;
    Ok(outcome)
}
