//! A control request line: `proto::control::parse_line`.
//!
//! Invariants: it never panics; a refusal is always `invalid_argument`; an accepted request
//! written back with `request_line` parses to the same request and id; the response the
//! daemon builds for it decodes as a client's `Response` with the same id.

#![no_main]

use libfuzzer_sys::fuzz_target;
use proto::control::{self, ControlError, ErrorCode, Response};

fuzz_target!(|data: &[u8]| {
    let parsed = control::parse_line(data);
    let outcome = match parsed.request {
        Ok(request) => {
            let line = control::request_line(&parsed.id, &request);
            let again = control::parse_line(line.as_bytes());
            assert_eq!(again.id, parsed.id, "{line}");
            assert_eq!(again.request.as_ref().ok(), Some(&request), "{line}");
            Ok(serde_json::Value::Null)
        }
        Err(error) => {
            assert_eq!(error.code, ErrorCode::InvalidArgument, "{error:?}");
            Err(ControlError::new(error.code, error.message))
        }
    };
    let answer = control::response(parsed.id.clone(), outcome).to_string();
    let decoded: Response = serde_json::from_str(&answer).expect("a response decodes");
    assert_eq!(decoded.id, parsed.id, "{answer}");
});
