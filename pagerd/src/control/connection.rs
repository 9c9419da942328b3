//! One control connection: reading request lines with the descriptors that came with them,
//! answering each, closing on idleness or abuse.

use std::collections::VecDeque;
use std::io::{self, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use proto::control::{parse_line, response, ControlError, ErrorCode};
use proto::fdpass::{recv_with_fds, Wait};
use proto::framing::{Frame, FrameError, LineBuffer};
use serde_json::Value;

use super::{Handler, Peer, RequestContext, CHUNK_BYTES, MAX_FDS_PER_CONNECTION};

/// A request line and the descriptors that came with it.
#[derive(Debug, Default)]
struct Line {
    bytes: Vec<u8>,
    fds: Vec<OwnedFd>,
}

/// What the next read of a connection gave.
#[derive(Debug)]
enum Next {
    Line(Line),
    /// The line being received broke a limit ([`LineBuffer`]): answer and close.
    Refused(FrameError),
    TooManyFds,
    Closed,
}

/// Splits what a connection sends into lines ([`LineBuffer`]), each with the descriptors sent
/// with it.
struct LineReader<'a> {
    stream: &'a UnixStream,
    framing: LineBuffer,
    /// The descriptors that came with the bytes of the line still arriving.
    partial_fds: Vec<OwnedFd>,
    /// Complete lines, and at most one refusal last, in the order they arrived.
    ready: VecDeque<Next>,
    chunk: Vec<u8>,
    closed: bool,
}

impl<'a> LineReader<'a> {
    fn new(stream: &'a UnixStream) -> Self {
        Self {
            stream,
            framing: LineBuffer::for_requests(),
            partial_fds: Vec::new(),
            ready: VecDeque::new(),
            chunk: vec![0; CHUNK_BYTES],
            closed: false,
        }
    }

    fn held_fds(&self) -> usize {
        let ready: usize = self
            .ready
            .iter()
            .map(|next| match next {
                Next::Line(line) => line.fds.len(),
                _ => 0,
            })
            .sum();
        self.partial_fds.len() + ready
    }

    fn next(&mut self) -> io::Result<Next> {
        loop {
            if let Some(next) = self.ready.pop_front() {
                return Ok(next);
            }
            if self.closed {
                return Ok(Next::Closed);
            }
            self.receive()?;
            if self.held_fds() > MAX_FDS_PER_CONNECTION {
                return Ok(Next::TooManyFds);
            }
        }
    }

    /// One `recvmsg`: its bytes split into lines; its descriptors go to the line holding the
    /// last byte that came with them.
    fn receive(&mut self) -> io::Result<()> {
        let received = recv_with_fds(self.stream.as_fd(), &mut self.chunk, Wait::AsSocket)?;
        let fds = received.fds;
        if received.truncated {
            // The descriptors that did arrive are closed with `fds`.
            return Err(io::Error::other("passed descriptors were truncated"));
        }
        let len = received.len;
        if len == 0 {
            // A last line without its newline still counts, as it always has.
            self.closed = true;
            self.partial_fds.extend(fds);
            if let Some(Frame::Line(bytes)) = self.framing.finish() {
                let fds = std::mem::take(&mut self.partial_fds);
                self.ready.push_back(Next::Line(Line { bytes, fds }));
            }
            return Ok(());
        }
        let data = &self.chunk[..len];
        for frame in self.framing.push(data) {
            self.ready.push_back(match frame {
                Frame::Line(bytes) => Next::Line(Line {
                    bytes,
                    fds: std::mem::take(&mut self.partial_fds),
                }),
                Frame::Error(error) => Next::Refused(error),
            });
        }
        match self.ready.back_mut() {
            // The last byte ended a line: the descriptors are that line's.
            Some(Next::Line(last)) if data.ends_with(b"\n") => last.fds.extend(fds),
            // Else they wait with the line still arriving (or, after a refusal, are closed
            // with the connection).
            _ => self.partial_fds.extend(fds),
        }
        Ok(())
    }
}

/// Writes one response line in a single write. (Formatting it straight into the socket would
/// write once per JSON token: hundreds of packets for one answer, enough to fill the socket
/// and stall the connection while its client is still sending.)
pub(super) fn answer(
    mut stream: &UnixStream,
    id: Value,
    outcome: Result<Value, ControlError>,
) -> io::Result<()> {
    let mut line = response(id, outcome).to_string().into_bytes();
    line.push(b'\n');
    stream.write_all(&line)
}

pub(super) fn serve_connection(
    stream: UnixStream,
    handler: &dyn Handler,
    idle: Duration,
    peer: Peer,
) -> io::Result<()> {
    stream.set_read_timeout(Some(idle))?;
    stream.set_write_timeout(Some(idle))?;
    let mut reader = LineReader::new(&stream);
    loop {
        let line = match reader.next()? {
            Next::Line(line) => line,
            Next::Closed => return Ok(()),
            Next::Refused(error) => {
                let err = ControlError::new(
                    ErrorCode::InvalidArgument,
                    format!("{error}; closing the connection"),
                );
                answer(&stream, Value::Null, Err(err))?;
                return Ok(());
            }
            Next::TooManyFds => {
                let err = ControlError::new(
                    ErrorCode::InvalidArgument,
                    format!(
                        "more than {MAX_FDS_PER_CONNECTION} descriptors passed without a request \
                         to take them; closing the connection"
                    ),
                );
                answer(&stream, Value::Null, Err(err))?;
                return Ok(());
            }
        };
        // Descriptors that no request takes are closed when the context goes, below.
        let mut context = RequestContext::new(Some(peer), line.fds);
        if line.bytes.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let parsed = parse_line(&line.bytes);
        let (started, op) = (
            Instant::now(),
            crate::stats::control_op(parsed.request.as_ref().ok()),
        );
        let outcome = parsed
            .request
            .and_then(|request| handler.handle_with(request, &mut context));
        crate::stats::DAEMON.answered(
            op,
            outcome.as_ref().err().map(|e| e.code),
            started.elapsed(),
        );
        let after_reply = context.take_after_reply();
        drop(context);
        let written = answer(&stream, parsed.id, outcome);
        if let Some(then) = after_reply {
            then();
        }
        written?;
    }
}
