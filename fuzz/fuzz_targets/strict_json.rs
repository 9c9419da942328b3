//! Strict JSON: `proto::json::parse_strict` and the nesting scanner.
//!
//! Invariants: `parse_strict` accepts exactly what `serde_json` accepts, minus objects with a
//! duplicate key, and gives the same value; input that `nesting_exceeds` the limit never
//! parses; the scanner fed in two pieces agrees with one scan.

#![no_main]

use libfuzzer_sys::fuzz_target;
use proto::json::{self, NestingScanner, MAX_DEPTH};
use serde_json::Value;

fuzz_target!(|data: &[u8]| {
    let strict = json::parse_strict(data);
    let loose = serde_json::from_slice::<Value>(data);
    match (&strict, &loose) {
        (Ok(s), Ok(l)) => assert_eq!(s, l),
        (Ok(s), Err(e)) => panic!("strict parsing accepted {s} where serde_json says {e}"),
        (Err(e), Ok(_)) => assert!(e.to_string().contains("duplicate key"), "{e}"),
        (Err(_), Err(_)) => {}
    }
    if json::nesting_exceeds(data, MAX_DEPTH) {
        assert!(strict.is_err(), "nesting over the limit parsed");
    }
    let mut whole = NestingScanner::new();
    whole.feed(data);
    let split = data.first().map_or(0, |&b| usize::from(b)).min(data.len());
    let mut pieces = NestingScanner::new();
    pieces.feed(&data[..split]);
    pieces.feed(&data[split..]);
    assert_eq!(pieces, whole);
});
