//! Hostile control lines: generated from valid requests, then mutated; sent with or without
//! descriptors, whole or in pieces, one or several lines at once; every answer checked.
//!
//! ```text
//!   valid request ─▶ mutations (flip, insert, truncate, duplicate, nest, huge number,
//!                   random op / field / value, long string, bad UTF-8) ─▶ guard ─▶ send
//!   expected answers = LineBuffer frames of the message (what the daemon must see):
//!       each non-blank line ─▶ one response with that line's id
//!       over-long / over-deep line, > 16 descriptors ─▶ one invalid_argument, then closed
//! ```
//!
//! The guard keeps the fuzzer from hurting what it measures: a line that would close the
//! victim or the handoff forks, delete the victim's snapshot, or wait for long is rewritten
//! into a harmless request first (decided by `proto::control::parse_line`, the daemon's own
//! parser).

use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use proto::control::{
    parse_line, request_line, ErrorCode, ForkClose, ForkCreate, ForkWait, Request, Response,
    SnapshotDelete,
};
use proto::framing::{Frame, LineBuffer};
use serde_json::{json, Map, Value};

use crate::fds::{FdFactory, FdKind};
use crate::rng::Rng;

/// The most descriptors the daemon lets wait for their line.
const MAX_FDS_PER_CONNECTION: usize = 16;
/// The most descriptors one message can carry.
const SCM_MAX_FD: usize = 253;
/// Messages up to this size are sent before the answers are read (they fit in the socket).
const INLINE_SEND_BYTES: usize = 16 * 1024;
/// How long an answer may take.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);

const OPS: [&str; 13] = [
    "status",
    "snapshot.record",
    "snapshot.clear_working_set",
    "stats",
    "snapshot.register",
    "snapshot.delete",
    "snapshot.list",
    "snapshot.get",
    "fork.create",
    "fork.list",
    "fork.get",
    "fork.wait",
    "fork.close",
];
const FIELDS: [&str; 14] = [
    "v",
    "forks",
    "prefetch",
    "id",
    "op",
    "snapshot",
    "fork",
    "path",
    "fd",
    "link",
    "defer",
    "force",
    "state",
    "timeout_ms",
];
const STATES: [&str; 6] = ["waiting", "serving", "detached", "ended", "dancing", ""];
const NUMBERS: [&str; 14] = [
    "0",
    "-1",
    "1",
    "2",
    "18446744073709551615",
    "18446744073709551616",
    "-9223372036854775809",
    "1e400",
    "-1e-400",
    "1.5",
    "-0",
    "99999999999999999999999999999999",
    "0.30000000000000004",
    "4096",
];
const INSERTS: [&[u8]; 16] = [
    b"{", b"}", b"[", b"]", b"\"", b",", b":", b"\\", b"\n", b"\0", b"\xff", b"\xc3", b"\r",
    b"\\u0000", b"\\ud800", b" ",
];

const BLANKS: [&[u8]; 3] = [b"", b" ", b"\t \r"];
const NOT_REQUESTS: [&[u8]; 7] = [
    b"[]",
    b"null",
    b"\"status\"",
    b"1",
    b"{}",
    b"{\"v\":1}",
    b"",
];

/// Which protected objects the guard keeps the fuzzer away from.
#[derive(Debug, Clone)]
pub struct Protected {
    /// The snapshot the victim forks.
    pub snapshot: String,
    /// The victim fork.
    pub victim: String,
    /// The prefix of the handoff fuzzer's forks.
    pub handoff_prefix: String,
    /// Whether the inputs come from a `--group` member, who does not own these: deleting the
    /// snapshot or closing the forks is then left for the daemon to refuse.
    pub member: bool,
}

impl Protected {
    fn fork(&self, id: &str) -> bool {
        id == self.victim || id.starts_with(&self.handoff_prefix)
    }
}

/// One generated control input.
#[derive(Debug)]
pub struct Input {
    /// The bytes, ending in a newline.
    pub bytes: Vec<u8>,
    /// What the descriptors passed with it are.
    pub fd_kinds: Vec<FdKind>,
    /// The descriptors.
    pub fds: Vec<OwnedFd>,
    /// Sent in this many pieces (1: whole).
    pub pieces: usize,
}

/// What the daemon must answer to one input.
#[derive(Debug, PartialEq)]
pub struct Expected {
    /// One entry per answer: `Some(id)`, a response echoing that id; `None`, an
    /// `invalid_argument` refusal of the connection.
    pub answers: Vec<Option<Value>>,
    /// Whether the daemon closes the connection after them.
    pub closed: bool,
}

/// Makes control inputs.
#[derive(Debug)]
pub struct Generator {
    ids: Vec<String>,
    bad_ids: Vec<String>,
    paths: Vec<String>,
    protected: Protected,
}

impl Generator {
    /// Inputs about these files (`paths`: candidate memory files, some of them bad).
    pub fn new(protected: Protected, paths: Vec<PathBuf>) -> Self {
        let mut ids: Vec<String> = ["fz-0", "fz-1", "fz-2", "s-0", "s-1", "x"]
            .iter()
            .map(|s| (*s).to_owned())
            .collect();
        ids.extend([
            protected.snapshot.clone(),
            protected.victim.clone(),
            format!("{}0", protected.handoff_prefix),
            "x".repeat(64),
        ]);
        let bad_ids = [
            "",
            ".hidden",
            "../../etc/passwd",
            "a/b",
            "é",
            &"x".repeat(65),
        ]
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
        let mut paths: Vec<String> = paths.iter().map(|p| p.display().to_string()).collect();
        paths.extend(
            [
                "/dev/null",
                "/etc/passwd",
                "relative/path",
                "/nonexistent",
                "/",
                "",
            ]
            .iter()
            .map(|s| (*s).to_owned()),
        );
        Self {
            ids,
            bad_ids,
            paths,
            protected,
        }
    }

    fn id(&self, rng: &mut Rng) -> Value {
        let pool = if rng.chance(85) {
            &self.ids
        } else {
            &self.bad_ids
        };
        Value::from(rng.pick(pool).clone())
    }

    /// A valid-looking request object for `op`.
    fn request(&self, rng: &mut Rng, op: &str) -> Map<String, Value> {
        let mut m = Map::new();
        m.insert("v".into(), json!(1));
        if rng.chance(50) {
            m.insert("id".into(), random_value(rng, 2));
        }
        m.insert("op".into(), json!(op));
        let state: &[&str] = if rng.chance(85) {
            &STATES[..4]
        } else {
            &STATES[4..]
        };
        match op {
            "snapshot.register" => {
                m.insert("snapshot".into(), self.id(rng));
                m.insert("path".into(), json!(rng.pick(&self.paths)));
                if rng.chance(60) {
                    m.insert("fd".into(), json!(true));
                }
                if rng.chance(20) {
                    m.insert("link".into(), json!(rng.chance(50)));
                }
            }
            "snapshot.delete" => {
                m.insert("snapshot".into(), self.id(rng));
                for flag in ["defer", "force"] {
                    if rng.chance(30) {
                        m.insert(flag.into(), json!(rng.chance(50)));
                    }
                }
            }
            "snapshot.get" | "snapshot.clear_working_set" => {
                m.insert("snapshot".into(), self.id(rng));
            }
            "snapshot.record" => {
                m.insert("snapshot".into(), self.id(rng));
                if rng.chance(70) {
                    m.insert("forks".into(), json!(rng.below(20)));
                }
            }
            "fork.create" => {
                m.insert("snapshot".into(), self.id(rng));
                if rng.chance(70) {
                    m.insert("fork".into(), self.id(rng));
                }
                if rng.chance(30) {
                    let prefetch = ["off", "working_set", "graduate", "sometimes"];
                    m.insert("prefetch".into(), json!(rng.pick(&prefetch)));
                }
            }
            "fork.get" | "fork.close" => {
                m.insert("fork".into(), self.id(rng));
            }
            "fork.wait" => {
                m.insert("fork".into(), self.id(rng));
                m.insert("state".into(), json!(rng.pick(state)));
                if rng.chance(70) {
                    m.insert("timeout_ms".into(), json!(rng.below(3)));
                }
            }
            _ => {}
        }
        m
    }

    /// One line's content (no newline yet).
    fn line(&self, rng: &mut Rng) -> Vec<u8> {
        let object = match rng.below(10) {
            // Any op with any fields.
            0 => {
                let mut m = Map::new();
                for _ in 0..rng.below(6) {
                    let field = if rng.chance(80) {
                        (*rng.pick(&FIELDS)).to_owned()
                    } else {
                        random_string(rng)
                    };
                    let value = match field.as_str() {
                        "op" if rng.chance(70) => json!(rng.pick(&OPS)),
                        "v" if rng.chance(50) => json!(1),
                        _ => random_value(rng, 3),
                    };
                    m.insert(field, value);
                }
                m
            }
            _ => {
                let op = *rng.pick(&OPS);
                self.request(rng, op)
            }
        };
        let mut bytes = serde_json::to_vec(&Value::Object(object)).expect("JSON");
        let mutations = if rng.chance(50) { 0 } else { rng.range(1, 3) };
        for _ in 0..mutations {
            mutate(rng, &mut bytes);
        }
        bytes
    }

    /// One input: one line or several, with or without descriptors.
    pub fn input(&self, rng: &mut Rng, factory: &FdFactory) -> io::Result<Input> {
        let fds = factory;
        let lines = if rng.chance(85) { 1 } else { rng.range(2, 4) };
        let mut bytes = Vec::new();
        for _ in 0..lines {
            if rng.chance(3) {
                let blank = BLANKS[rng.index(BLANKS.len())];
                bytes.extend_from_slice(blank);
            } else {
                bytes.extend(self.line(rng));
            }
            bytes.push(b'\n');
        }
        let bytes = self.guard(&bytes);
        let count = match rng.below(200) {
            0..=29 => rng.range(1, 3),
            30..=33 => rng.range(MAX_FDS_PER_CONNECTION as u64 + 1, 40),
            34 => rng.range(41, SCM_MAX_FD as u64),
            _ => 0,
        };
        let (mut fd_kinds, mut fds) =
            fds.random(rng, usize::try_from(count).expect("count"), 10)?;
        // A registration by descriptor, mostly with the file it asks for.
        let by_fd = b"\"fd\":true";
        if input_mentions(&bytes, by_fd) && rng.chance(70) {
            fd_kinds.insert(0, FdKind::SmallFile);
            fds.insert(0, factory.make(FdKind::SmallFile)?);
        }
        let pieces = if rng.chance(10) {
            usize::try_from(rng.range(2, 5)).expect("pieces")
        } else {
            1
        };
        Ok(Input {
            bytes,
            fd_kinds,
            fds,
            pieces,
        })
    }

    /// Rewrites every line that would hurt what the fuzzer measures.
    fn guard(&self, message: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(message.len());
        let mut lines = message.split(|&b| b == b'\n').peekable();
        while let Some(line) = lines.next() {
            let parsed = parse_line(line);
            match parsed.request.ok().and_then(|r| self.defuse(r)) {
                Some(safe) => out.extend(request_line(&parsed.id, &safe).into_bytes()),
                None => out.extend_from_slice(line),
            }
            if lines.peek().is_some() {
                out.push(b'\n');
            }
        }
        out
    }

    /// A harmless version of `request`, if it needs one.
    fn defuse(&self, request: Request) -> Option<Request> {
        fn elsewhere<K: proto::ids::Kind>() -> proto::Id<K> {
            "fz-gone".parse().expect("an id")
        }
        match request {
            Request::SnapshotDelete(SnapshotDelete {
                snapshot,
                defer,
                force,
            }) if snapshot.as_str() == self.protected.snapshot && !self.protected.member => {
                Some(Request::SnapshotDelete(SnapshotDelete {
                    snapshot: elsewhere(),
                    defer,
                    force,
                }))
            }
            Request::ForkClose(ForkClose { fork })
                if self.protected.fork(fork.as_str()) && !self.protected.member =>
            {
                Some(Request::ForkClose(ForkClose { fork: elsewhere() }))
            }
            Request::ForkCreate(ForkCreate {
                snapshot,
                fork: Some(fork),
                prefetch,
            }) if self.protected.fork(fork.as_str()) => Some(Request::ForkCreate(ForkCreate {
                snapshot,
                fork: Some(elsewhere()),
                prefetch,
            })),
            Request::ForkWait(ForkWait {
                fork,
                state,
                timeout_ms,
            }) if timeout_ms.is_none_or(|t| t > 2) => Some(Request::ForkWait(ForkWait {
                fork,
                state,
                timeout_ms: Some(timeout_ms.unwrap_or(0) % 3),
            })),
            _ => None,
        }
    }
}

fn input_mentions(bytes: &[u8], needle: &[u8]) -> bool {
    bytes.windows(needle.len()).any(|w| w == needle)
}

/// What the daemon must answer to `input`: the frames the daemon's own framing makes of it.
pub fn expected(input: &Input) -> Expected {
    if input.fds.len() > MAX_FDS_PER_CONNECTION {
        return Expected {
            answers: vec![None],
            closed: true,
        };
    }
    let mut framing = LineBuffer::for_requests();
    let mut frames = framing.push(&input.bytes);
    frames.extend(framing.finish());
    let mut answers = Vec::new();
    for frame in frames {
        match frame {
            Frame::Line(line) if line.iter().all(u8::is_ascii_whitespace) => {}
            Frame::Line(line) => answers.push(Some(parse_line(&line).id)),
            Frame::Error(_) => {
                answers.push(None);
                return Expected {
                    answers,
                    closed: true,
                };
            }
        }
    }
    Expected {
        answers,
        closed: false,
    }
}

/// A random JSON value, nesting at most `depth` deep.
fn random_value(rng: &mut Rng, depth: u32) -> Value {
    match rng.below(if depth == 0 { 5 } else { 7 }) {
        0 => Value::Null,
        1 => json!(rng.chance(50)),
        2 => {
            let number = NUMBERS[rng.index(NUMBERS.len())];
            serde_json::from_str(number).unwrap_or(Value::Null)
        }
        3 => json!(rng.next_u64() >> rng.below(64)),
        4 => json!(random_string(rng)),
        5 => Value::Array(
            (0..rng.below(4))
                .map(|_| random_value(rng, depth - 1))
                .collect(),
        ),
        _ => Value::Object(
            (0..rng.below(4))
                .map(|_| (random_string(rng), random_value(rng, depth - 1)))
                .collect(),
        ),
    }
}

fn random_string(rng: &mut Rng) -> String {
    match rng.below(6) {
        0 => (*rng.pick(&OPS)).to_owned(),
        1 => (*rng.pick(&FIELDS)).to_owned(),
        2 => String::new(),
        3 => "é\u{0}\u{ffff}\"\\".into(),
        _ => (0..rng.below(12))
            .map(|_| char::from(b'a' + u8::try_from(rng.below(26)).expect("a letter")))
            .collect(),
    }
}

/// One mutation of a line's bytes.
fn mutate(rng: &mut Rng, bytes: &mut Vec<u8>) {
    let at = |rng: &mut Rng, bytes: &Vec<u8>| rng.index(bytes.len() + 1);
    match rng.below(12) {
        0 if !bytes.is_empty() => {
            let i = rng.index(bytes.len());
            bytes[i] ^= 1 << rng.below(8);
        }
        1 => {
            let i = at(rng, bytes);
            let insert = rng.pick(&INSERTS);
            bytes.splice(i..i, insert.iter().copied());
        }
        2 => {
            let i = at(rng, bytes);
            bytes.truncate(i);
        }
        3 if !bytes.is_empty() => {
            let (a, b) = (rng.index(bytes.len()), rng.index(bytes.len()));
            let span = bytes[a.min(b)..a.max(b)].to_vec();
            let i = at(rng, bytes);
            bytes.splice(i..i, span);
        }
        4 => {
            // A duplicate key.
            let field = rng.pick(&FIELDS);
            let dup = format!("{{\"{field}\":1,");
            if bytes.first() == Some(&b'{') {
                bytes.splice(0..1, dup.bytes());
            }
        }
        5 => {
            // Deep nesting, around the limits and far beyond.
            let depth = *rng.pick(&[2usize, 127, 128, 129, 1000, 100_000]);
            let i = at(rng, bytes);
            let open = if rng.chance(50) { b'[' } else { b'{' };
            bytes.splice(i..i, std::iter::repeat_n(open, depth));
            if rng.chance(50) {
                let j = at(rng, bytes);
                let close = if open == b'[' { b']' } else { b'}' };
                bytes.splice(j..j, std::iter::repeat_n(close, depth));
            }
        }
        6 => {
            // A huge or odd number after a colon.
            if let Some(colon) = bytes.iter().position(|&b| b == b':') {
                let number = rng.pick(&NUMBERS);
                bytes.splice(colon + 1..colon + 1, number.bytes().chain([b',']));
            }
        }
        7 => {
            // A long string value: under and over the line limit.
            let len = *rng.pick(&[1000usize, 60_000, 65_536, 70_000]);
            let text = format!("\"pad\":\"{}\",", "a".repeat(len));
            if bytes.first() == Some(&b'{') {
                bytes.splice(1..1, text.bytes());
            }
        }
        8 => {
            // Another op.
            let op = rng.pick(&OPS);
            let field = format!("\"op\":\"{op}\",");
            if bytes.first() == Some(&b'{') {
                bytes.splice(1..1, field.bytes());
            }
        }
        9 => {
            // A random field.
            let field = format!("\"{}\":{},", rng.pick(&FIELDS), random_value(rng, 2));
            if bytes.first() == Some(&b'{') {
                bytes.splice(1..1, field.bytes());
            }
        }
        10 => {
            // Random bytes.
            let i = at(rng, bytes);
            let junk: Vec<u8> = (0..rng.range(1, 8)).map(|_| rng.byte()).collect();
            bytes.splice(i..i, junk);
        }
        _ => {
            // Whole JSON values that are not requests.
            let other = NOT_REQUESTS[rng.index(NOT_REQUESTS.len())];
            *bytes = other.to_vec();
        }
    }
}

/// A control connection that checks every answer.
pub struct Connection {
    stream: UnixStream,
    reader: BufReader<UnixStream>,
}

/// What one input did.
#[derive(Debug, Default, Clone, Copy)]
pub struct Outcome {
    /// Answers read.
    pub answers: u64,
    /// Answers that were errors, by code.
    pub errors: [u64; ErrorCode::ALL.len()],
    /// Whether the daemon closed the connection afterwards.
    pub closed: bool,
}

impl Outcome {
    fn count(&mut self, code: ErrorCode) {
        if let Some(i) = ErrorCode::ALL.iter().position(|&c| c == code) {
            self.errors[i] += 1;
        }
    }
}

impl Connection {
    /// Wraps a connection already made (e.g. as another user).
    pub fn from_stream(stream: UnixStream) -> io::Result<Self> {
        stream.set_read_timeout(Some(ANSWER_TIMEOUT))?;
        stream.set_write_timeout(Some(ANSWER_TIMEOUT))?;
        let reader = BufReader::new(stream.try_clone()?);
        Ok(Self { stream, reader })
    }

    /// Connects to the control socket.
    pub fn open(socket: &Path) -> io::Result<Self> {
        let stream = UnixStream::connect(socket)?;
        stream.set_read_timeout(Some(ANSWER_TIMEOUT))?;
        stream.set_write_timeout(Some(ANSWER_TIMEOUT))?;
        let reader = BufReader::new(stream.try_clone()?);
        Ok(Self { stream, reader })
    }

    /// Sends `input` and checks the daemon's answers against `expected`; `Err` describes a
    /// violation.
    pub fn exchange(&mut self, input: &Input, expected: &Expected) -> Result<Outcome, String> {
        // The daemon may close before it has read everything (a refused line): the answers
        // still tell. A large message is sent from a thread of its own while the answers are
        // read, as a pipelining client would, so that neither side waits for the other.
        let (stream, reader) = (&self.stream, &mut self.reader);
        if input.bytes.len() <= INLINE_SEND_BYTES {
            let _ = send(stream, input);
            return check(reader, expected);
        }
        std::thread::scope(|scope| {
            scope.spawn(move || {
                let _ = send(stream, input);
            });
            let outcome = check(reader, expected);
            // Unblock the sender if the answers went wrong.
            if outcome.is_err() {
                let _ = stream.shutdown(std::net::Shutdown::Both);
            }
            outcome
        })
    }
}

/// Reads the answers to one input and checks them against `expected`.
fn check(reader: &mut BufReader<UnixStream>, expected: &Expected) -> Result<Outcome, String> {
    let mut outcome = Outcome::default();
    for want in &expected.answers {
        let mut line = String::new();
        match reader.read_line(&mut line) {
            Ok(0) => return Err(format!("the connection closed before an answer ({want:?})")),
            Ok(_) => {}
            Err(e) => return Err(format!("no answer ({want:?}): {e}")),
        }
        let response: Response =
            serde_json::from_str(&line).map_err(|e| format!("not a response ({e}): {line:?}"))?;
        if response.v != proto::control::PROTOCOL_VERSION {
            return Err(format!("wrong version: {line}"));
        }
        outcome.answers += 1;
        match want {
            Some(id) => {
                if &response.id != id {
                    return Err(format!("the id {id} came back as {}", response.id));
                }
                if !response.ok {
                    let error = response.error.as_ref().ok_or("an error without error")?;
                    if error.message.is_empty() {
                        return Err(format!("an error without a message: {line}"));
                    }
                    outcome.count(error.code);
                }
            }
            None => {
                let code = response.error.as_ref().map(|e| e.code);
                if response.ok || code != Some(ErrorCode::InvalidArgument) {
                    return Err(format!("expected an invalid_argument refusal: {line}"));
                }
                outcome.count(ErrorCode::InvalidArgument);
            }
        }
    }
    if expected.closed {
        let mut rest = Vec::new();
        match reader.read_to_end(&mut rest) {
            Ok(_) if rest.is_empty() => {}
            Ok(_) => {
                return Err(format!(
                    "more after the refusal: {:?}",
                    String::from_utf8_lossy(&rest)
                ))
            }
            // A close with unread bytes resets the connection.
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => {}
            Err(e) => return Err(format!("the connection was not closed: {e}")),
        }
        outcome.closed = true;
    }
    Ok(outcome)
}

/// Sends `input`: its descriptors with the first piece.
fn send(mut stream: &UnixStream, input: &Input) -> io::Result<()> {
    let fds: Vec<_> = input.fds.iter().map(AsFd::as_fd).collect();
    let piece = input.bytes.len().div_ceil(input.pieces).max(1);
    let mut chunks = input.bytes.chunks(piece);
    let first = chunks.next().unwrap_or_default();
    proto::fdpass::send_with_fds(stream, first, &fds)?;
    for chunk in chunks {
        stream.write_all(chunk)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn generator() -> Generator {
        Generator::new(
            Protected {
                snapshot: "base".into(),
                victim: "victim".into(),
                member: false,
                handoff_prefix: "hf-".into(),
            },
            vec![PathBuf::from("/tmp/small")],
        )
    }

    #[test]
    fn the_guard_defuses_what_would_hurt_the_victim() {
        let g = generator();
        let message = concat!(
            r#"{"v":1,"op":"fork.close","fork":"victim"}"#,
            "\n",
            r#"{"v":1,"id":3,"op":"snapshot.delete","snapshot":"base","defer":true}"#,
            "\n",
            r#"{"v":1,"op":"fork.wait","fork":"x","state":"ended"}"#,
            "\n",
            r#"{"v":1,"op":"fork.close","fork":"hf-7"}"#,
            "\n",
            r#"{"v":1,"op":"fork.close","fork":"fz-1"}"#,
            "\n"
        );
        let guarded = g.guard(message.as_bytes());
        let lines: Vec<Request> = guarded
            .split(|&b| b == b'\n')
            .filter(|l| !l.is_empty())
            .map(|l| parse_line(l).request.unwrap())
            .collect();
        assert_eq!(lines.len(), 5);
        for request in &lines[..4] {
            assert!(g.defuse(request.clone()).is_none(), "{request:?}");
        }
        assert_eq!(
            parse_line(guarded.split(|&b| b == b'\n').nth(1).unwrap()).id,
            3
        );
        assert!(guarded.ends_with(b"\n"));
        assert!(String::from_utf8_lossy(&guarded).contains("\"fork\":\"fz-1\""));
    }

    #[test]
    fn inputs_are_deterministic_and_answers_predicted() {
        let dir = tempfile::tempdir().unwrap();
        let small = testkit::write_snapshot(&dir.path().join("small"), 4096, 1, 0, 0);
        let fds = FdFactory::new(dir.path(), &small);
        let g = generator();
        let (mut a, mut b) = (Rng::new(42), Rng::new(42));
        let mut refused = 0;
        for _ in 0..2000 {
            let x = g.input(&mut a, &fds).unwrap();
            let y = g.input(&mut b, &fds).unwrap();
            assert_eq!(x.bytes, y.bytes);
            assert_eq!(x.fd_kinds, y.fd_kinds);
            assert!(x.bytes.ends_with(b"\n"));
            let e = expected(&x);
            refused += usize::from(e.closed);
        }
        assert!(refused > 0, "some inputs close the connection");
    }
}
