//! NDJSON framing: `proto::framing::LineBuffer` fed arbitrary bytes in arbitrary pieces.
//!
//! The first byte picks the limits (small ones, to reach them, or the protocol's own), the
//! second seeds the piece sizes; the rest is the stream.
//!
//! Invariants: any chunking gives the same frames as one push; no line is longer than the
//! limit or holds a newline before its end; lines nest no deeper than the limit; at most one
//! error, last; without an error the lines concatenated are the input, with one they are a
//! prefix of it and the line that follows really breaks the limit reported.

#![no_main]

use libfuzzer_sys::fuzz_target;
use proto::framing::{Frame, FrameError, LineBuffer};
use proto::json::nesting_exceeds;

fuzz_target!(|data: &[u8]| {
    let [limits, seed, input @ ..] = data else {
        return;
    };
    let (max_line, max_depth) = if limits & 0x80 != 0 {
        (proto::control::MAX_REQUEST_BYTES, proto::json::MAX_DEPTH)
    } else {
        (1 + usize::from(limits & 0x3f), usize::from(limits >> 6) * 3)
    };
    let whole = frames(LineBuffer::new(max_line, max_depth), &[input]);
    let mut pieces = Vec::new();
    let (mut rest, mut x) = (input, u32::from(*seed) | 1);
    while !rest.is_empty() {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        let len = (1 + (x % 23) as usize).min(rest.len());
        pieces.push(&rest[..len]);
        rest = &rest[len..];
    }
    let chunked = frames(LineBuffer::new(max_line, max_depth), &pieces);
    assert_eq!(
        whole, chunked,
        "the frames depend on how the stream was cut"
    );

    let mut consumed = 0;
    for (i, frame) in whole.iter().enumerate() {
        let last = i + 1 == whole.len();
        match frame {
            Frame::Line(line) => {
                let content = line.strip_suffix(b"\n").unwrap_or(line);
                assert!(
                    line.ends_with(b"\n") || last,
                    "only the last line may lack its newline"
                );
                assert!(!content.contains(&b'\n'));
                assert!(content.len() <= max_line, "a line over the limit");
                assert!(
                    !nesting_exceeds(content, max_depth),
                    "a line over the depth"
                );
                assert_eq!(&input[consumed..consumed + line.len()], &line[..]);
                consumed += line.len();
            }
            Frame::Error(error) => {
                assert!(last, "an error is the last frame");
                let rest = &input[consumed..];
                let line = rest.split(|&b| b == b'\n').next().unwrap_or_default();
                let within = &line[..line.len().min(max_line)];
                match *error {
                    FrameError::TooLong { limit } => {
                        assert_eq!(limit, max_line);
                        assert!(line.len() > max_line);
                        assert!(!nesting_exceeds(within, max_depth));
                    }
                    FrameError::TooDeep { limit } => {
                        assert_eq!(limit, max_depth);
                        assert!(nesting_exceeds(within, max_depth));
                    }
                }
                return;
            }
        }
    }
    assert_eq!(consumed, input.len(), "bytes went missing");
});

/// Every frame of a stream pushed in `pieces`, then ended.
fn frames(mut buffer: LineBuffer, pieces: &[&[u8]]) -> Vec<Frame> {
    let mut out: Vec<Frame> = pieces.iter().flat_map(|p| buffer.push(p)).collect();
    out.extend(buffer.finish());
    out
}
