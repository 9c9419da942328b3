//! Splitting a control connection's byte stream into request lines, without any I/O, so that
//! the daemon, the tests and the fuzzers all frame the same way.
//!
//! ```text
//!   recv ─▶ LineBuffer::push(bytes) ─▶ [Line("{…}\n"), Line("{…}\n"), …, (Error)]
//!   EOF  ─▶ LineBuffer::finish()     ─▶ Line("{…}")   (a last line without its newline)
//! ```
//!
//! A line is everything up to and including a `\n`; its bytes before the newline may be at
//! most `max_line` long. Two things end the stream early, as soon as the bytes show them and
//! not when the line ends (which a hostile client may never send):
//!
//! - [`FrameError::TooLong`]: a line grew past `max_line` bytes.
//! - [`FrameError::TooDeep`]: a line's bytes so far open arrays and objects deeper than
//!   `max_depth` (counted by [`crate::json::NestingScanner`]: brackets in strings do not
//!   count). Such a line can never parse, so there is no point in waiting for the rest of it.
//!
//! After an error the buffer yields nothing more: the connection is to be closed. Until then
//! the lines yielded, concatenated, are exactly the bytes pushed.

use crate::json::NestingScanner;

/// Why a stream of request lines was cut short.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// A line grew past the longest line accepted.
    #[error("request line longer than {limit} bytes")]
    TooLong {
        /// The longest line accepted, in bytes (without its newline).
        limit: usize,
    },
    /// A line nests arrays and objects deeper than allowed.
    #[error("request line nests arrays and objects deeper than {limit} levels")]
    TooDeep {
        /// The deepest nesting accepted.
        limit: usize,
    },
}

/// What [`LineBuffer::push`] and [`LineBuffer::finish`] yield, in stream order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// One complete line, with its newline (the last line of a stream, from
    /// [`LineBuffer::finish`], may lack it).
    Line(Vec<u8>),
    /// The stream is refused from here on.
    Error(FrameError),
}

/// Splits a byte stream into request lines (see the module docs).
#[derive(Debug, Clone)]
pub struct LineBuffer {
    max_line: usize,
    max_depth: usize,
    /// The line still arriving.
    partial: Vec<u8>,
    /// Its nesting so far.
    nesting: NestingScanner,
    failed: Option<FrameError>,
}

impl LineBuffer {
    /// A buffer for lines of at most `max_line` bytes (without the newline) nesting at most
    /// `max_depth` levels.
    pub fn new(max_line: usize, max_depth: usize) -> Self {
        Self {
            max_line,
            max_depth,
            partial: Vec::new(),
            nesting: NestingScanner::new(),
            failed: None,
        }
    }

    /// A buffer with the control protocol's limits: [`crate::control::MAX_REQUEST_BYTES`] and
    /// [`crate::json::MAX_DEPTH`].
    pub fn for_requests() -> Self {
        Self::new(crate::control::MAX_REQUEST_BYTES, crate::json::MAX_DEPTH)
    }

    /// Bytes of the line still arriving.
    pub fn pending(&self) -> usize {
        self.partial.len()
    }

    /// The error that ended the stream, if one did.
    pub fn failed(&self) -> Option<FrameError> {
        self.failed
    }

    /// Takes more bytes of the stream and returns the frames they complete: lines, and at
    /// most one error, last. Nothing after an error.
    pub fn push(&mut self, mut bytes: &[u8]) -> Vec<Frame> {
        let mut frames = Vec::new();
        if self.failed.is_some() {
            return frames;
        }
        while !bytes.is_empty() {
            let (piece, complete) = match bytes.iter().position(|&b| b == b'\n') {
                Some(at) => (&bytes[..=at], true),
                None => (bytes, false),
            };
            bytes = &bytes[piece.len()..];
            let content = if complete {
                &piece[..piece.len() - 1]
            } else {
                piece
            };
            if let Some(error) = self.check(content) {
                self.failed = Some(error);
                self.partial = Vec::new();
                frames.push(Frame::Error(error));
                return frames;
            }
            self.partial.extend_from_slice(piece);
            if complete {
                self.nesting = NestingScanner::new();
                frames.push(Frame::Line(std::mem::take(&mut self.partial)));
            }
        }
        frames
    }

    /// The stream ended: the last line if it had no newline (and the stream was not refused).
    pub fn finish(&mut self) -> Option<Frame> {
        if self.failed.is_some() || self.partial.is_empty() {
            return None;
        }
        self.nesting = NestingScanner::new();
        Some(Frame::Line(std::mem::take(&mut self.partial)))
    }

    /// Whether the line still arriving, grown by `content` (no newline in it), breaks a limit.
    /// Whichever limit an earlier byte breaks is the one reported, so that the answer does not
    /// depend on how the stream was cut into pieces.
    fn check(&mut self, content: &[u8]) -> Option<FrameError> {
        // The newline itself does not count against the length.
        let room = self.max_line.saturating_sub(self.partial.len());
        let within = &content[..content.len().min(room)];
        self.nesting.feed(within);
        if self.nesting.max_depth() > self.max_depth {
            return Some(FrameError::TooDeep {
                limit: self.max_depth,
            });
        }
        (content.len() > room).then_some(FrameError::TooLong {
            limit: self.max_line,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(frames: &[Frame]) -> Vec<&[u8]> {
        frames
            .iter()
            .filter_map(|f| match f {
                Frame::Line(l) => Some(l.as_slice()),
                Frame::Error(_) => None,
            })
            .collect()
    }

    #[test]
    fn splits_lines_across_pushes_and_keeps_every_byte() {
        let mut buf = LineBuffer::new(64, 8);
        assert!(buf.push(b"{\"v\":1,").is_empty());
        assert_eq!(buf.pending(), 7);
        let frames = buf.push(b"\"op\":\"status\"}\n\n{\"v\":1}\n{\"x\"");
        assert_eq!(
            lines(&frames),
            vec![&b"{\"v\":1,\"op\":\"status\"}\n"[..], b"\n", b"{\"v\":1}\n"]
        );
        assert_eq!(buf.finish(), Some(Frame::Line(b"{\"x\"".to_vec())));
        assert_eq!(buf.finish(), None);
    }

    #[test]
    fn a_line_of_exactly_the_limit_passes_and_one_more_byte_does_not() {
        let mut buf = LineBuffer::new(4, 8);
        assert_eq!(lines(&buf.push(b"abcd\n")), vec![b"abcd\n"]);
        assert!(buf.push(b"abcd").is_empty());
        assert_eq!(
            buf.push(b"e"),
            vec![Frame::Error(FrameError::TooLong { limit: 4 })]
        );
        assert!(buf.push(b"\nok\n").is_empty(), "nothing after an error");
        assert_eq!(buf.finish(), None);
        assert_eq!(buf.failed(), Some(FrameError::TooLong { limit: 4 }));
    }

    #[test]
    fn lines_before_an_error_come_first() {
        let mut buf = LineBuffer::new(8, 8);
        let frames = buf.push(b"a\nb\ncccccccccccccc\nd\n");
        assert_eq!(
            frames,
            vec![
                Frame::Line(b"a\n".to_vec()),
                Frame::Line(b"b\n".to_vec()),
                Frame::Error(FrameError::TooLong { limit: 8 }),
            ]
        );
    }

    #[test]
    fn deep_nesting_is_refused_before_the_line_ends() {
        let mut buf = LineBuffer::for_requests();
        let deep = vec![b'['; 100_000];
        let frames = buf.push(&deep[..1000]);
        assert_eq!(
            frames,
            vec![Frame::Error(FrameError::TooDeep {
                limit: crate::json::MAX_DEPTH
            })]
        );
        // Exactly the limit is still framed (and then refused by the parser).
        let mut buf = LineBuffer::new(1024, 3);
        assert!(buf.push(b"[[[").is_empty());
        assert_eq!(lines(&buf.push(b"]]]\n[[[[\"]]]\"]]]]\n")).len(), 1);
        assert_eq!(buf.failed(), Some(FrameError::TooDeep { limit: 3 }));
    }

    #[test]
    fn nesting_starts_afresh_on_each_line_and_strings_do_not_count() {
        let mut buf = LineBuffer::new(1024, 2);
        let frames = buf.push(b"[[]]\n[[]]\n{\"s\":\"[[[[{{{{\"}\n");
        assert_eq!(lines(&frames).len(), 3);
        assert_eq!(buf.failed(), None);
    }

    #[test]
    fn any_chunking_gives_the_same_frames() {
        let input = b"{\"v\":1,\"op\":\"status\"}\n{\"a\":\"\\\"[[[\"}\nxyz\n[[[[[[]]]]]]\n";
        let mut whole = LineBuffer::new(32, 4);
        let mut expected = whole.push(input);
        expected.extend(whole.finish());
        for size in 1..input.len() {
            let mut buf = LineBuffer::new(32, 4);
            let mut frames: Vec<Frame> = input.chunks(size).flat_map(|c| buf.push(c)).collect();
            frames.extend(buf.finish());
            assert_eq!(frames, expected, "chunks of {size}");
        }
        assert_eq!(lines(&expected).len(), 3);
        assert_eq!(
            expected.last(),
            Some(&Frame::Error(FrameError::TooDeep { limit: 4 }))
        );
    }

    #[test]
    fn the_first_limit_broken_is_the_one_reported() {
        // Deep within the length limit: too deep, in one piece or byte by byte.
        let deep_then_long = b"[[[[[xxxxxxxxxxxxxxxxxxxxxxx";
        // Long before it is deep: too long.
        let long_then_deep = b"xxxxxxxxxxxx[[[[[[[[[[[[[[[[";
        for (input, expected) in [
            (&deep_then_long[..], FrameError::TooDeep { limit: 4 }),
            (&long_then_deep[..], FrameError::TooLong { limit: 10 }),
        ] {
            let mut whole = LineBuffer::new(10, 4);
            assert_eq!(whole.push(input), vec![Frame::Error(expected)]);
            let mut bytewise = LineBuffer::new(10, 4);
            let frames: Vec<Frame> = input.chunks(1).flat_map(|c| bytewise.push(c)).collect();
            assert_eq!(frames, vec![Frame::Error(expected)]);
        }
    }
}
