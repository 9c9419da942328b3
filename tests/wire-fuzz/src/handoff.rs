//! Hostile handoffs on extra forks' sockets: region lists valid and mutated, with no
//! descriptor, one of any kind, or many; sent whole, in pieces, with the descriptors late,
//! cut off by a disconnect, or left hanging until pagerd's handoff timeout.
//!
//! ```text
//!   body: valid regions (±mutations) | bad geometry | many regions | > 1 MiB | deep | junk
//!   fds:  none | uffd | another kind | several | more than one recvmsg holds
//!   mode: whole ─▶ reply must equal the oracle (proto::handoff::parse + validate, fd checks)
//!         pieces | fds late | disconnect ─▶ a reply or a close; `ok` only with one uffd
//!         hang ─▶ kept open; a `timed_out` refusal (or a close) must come later
//! ```

use std::collections::VecDeque;
use std::io::{self, BufRead, BufReader, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use proto::handoff::{
    self, GuestRegionUffdMapping, HandoffReply, MAX_MESSAGE_BYTES, PAGE_SIZE_2M, PAGE_SIZE_4K,
};
use proto::model::RefusalReason;
use serde_json::{json, Value};

use crate::fds::{FdFactory, FdKind};
use crate::rng::Rng;

/// Bodies up to this size arrive in one `recvmsg` when sent whole, so the oracle applies.
const ORACLE_MAX_BYTES: usize = 16 * 1024;
/// How long a reply may take.
const REPLY_TIMEOUT: Duration = Duration::from_secs(30);

/// How a handoff is sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// One `sendmsg` with the descriptors (then a half-close if the body can never complete).
    Whole,
    /// The descriptors with the first of several writes.
    Pieces,
    /// The body first, the descriptors with a last byte.
    FdsLate,
    /// Part of the body, then the connection is closed without reading the reply.
    Disconnect,
    /// Connect and close at once.
    ConnectClose,
    /// Part of the body, then nothing: pagerd must give up at its handoff timeout.
    Hang,
}

/// One generated handoff.
#[derive(Debug)]
pub struct Handoff {
    /// The message.
    pub body: Vec<u8>,
    /// What the descriptors are.
    pub fd_kinds: Vec<FdKind>,
    /// The descriptors.
    pub fds: Vec<OwnedFd>,
    /// How it is sent.
    pub mode: Mode,
}

/// What pagerd must answer a whole handoff with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Served.
    Accepted,
    /// Refused for this reason.
    Refused(RefusalReason),
}

/// Whether `bytes` hold one whole JSON value, or something that never will be (as pagerd's
/// receiver decides when to stop reading).
fn complete(bytes: &[u8]) -> bool {
    match serde_json::from_slice::<serde::de::IgnoredAny>(bytes) {
        Ok(_) => true,
        Err(e) => !e.is_eof(),
    }
}

/// What pagerd must answer to a whole handoff of `body` with descriptors of `kinds`, for a
/// memory file of `file_size` bytes; `None` where only pagerd's reading order decides.
pub fn oracle(body: &[u8], kinds: &[FdKind], file_size: u64) -> Option<Verdict> {
    if body.len() > ORACLE_MAX_BYTES {
        return None;
    }
    if !complete(body) {
        return Some(Verdict::Refused(RefusalReason::Incomplete));
    }
    let refused = |reason| Some(Verdict::Refused(reason));
    match kinds {
        [] => return refused(RefusalReason::NoFd),
        [FdKind::Uffd] => {}
        [_] => return refused(RefusalReason::NotUserfaultfd),
        _ => return refused(RefusalReason::SeveralFds),
    }
    match handoff::parse(body).and_then(|regions| handoff::validate(&regions, file_size)) {
        Ok(()) => Some(Verdict::Accepted),
        Err(e) => refused(e.reason()),
    }
}

/// Makes handoffs for a memory file of `file_size` bytes.
#[derive(Debug)]
pub struct Generator {
    file_size: u64,
    max_fds: u64,
}

impl Generator {
    /// Handoffs for a memory file of `file_size` bytes (a multiple of 2 MiB), with at most
    /// `max_fds` descriptors each.
    pub fn new(file_size: u64, max_fds: u64) -> Self {
        Self { file_size, max_fds }
    }

    /// Up to four regions inside the file, overlapping neither in the VMM's address space nor
    /// in the file.
    fn valid_regions(&self, rng: &mut Rng) -> Vec<GuestRegionUffdMapping> {
        let page = if rng.chance(15) {
            PAGE_SIZE_2M
        } else {
            PAGE_SIZE_4K
        };
        let pages = self.file_size / page;
        let mut regions = Vec::new();
        let mut base = page * rng.range(1, 1 << 20);
        let mut next_offset = rng.below((pages / 2).max(1));
        for _ in 0..rng.range(1, 4) {
            let offset = next_offset + rng.below((pages - next_offset).clamp(1, 8));
            if offset >= pages {
                break;
            }
            let size = rng.range(1, (pages - offset).min(64));
            next_offset = offset + size;
            regions.push(GuestRegionUffdMapping {
                base_host_virt_addr: base,
                size: size * page,
                offset: offset * page,
                page_size: page,
            });
            base += (size + rng.below(16)) * page;
        }
        regions
    }

    /// Regions as JSON in one of the shapes VMMs send.
    fn encode(rng: &mut Rng, regions: &[GuestRegionUffdMapping]) -> Vec<u8> {
        if rng.chance(40) {
            return handoff::encode(regions);
        }
        let list: Vec<Value> = regions
            .iter()
            .map(|r| {
                let mut m = json!({
                    "base_host_virt_addr": r.base_host_virt_addr,
                    "size": r.size,
                    "offset": r.offset,
                });
                match rng.below(3) {
                    0 => m["page_size"] = json!(r.page_size),
                    1 => m["page_size_kib"] = json!(r.page_size),
                    _ => {
                        m["page_size"] = json!(r.page_size);
                        m["page_size_kib"] = json!(r.page_size);
                    }
                }
                if rng.chance(20) {
                    m["unknown"] = json!({"nested": [1, 2, "x"]});
                }
                m
            })
            .collect();
        let value = if rng.chance(30) {
            json!({ "mappings": list })
        } else {
            Value::Array(list)
        };
        serde_json::to_vec(&value).expect("JSON")
    }

    /// One region list broken in one way.
    fn bad_geometry(&self, rng: &mut Rng) -> Vec<u8> {
        let mut regions = self.valid_regions(rng);
        let i = rng.index(regions.len());
        let r = &mut regions[i];
        match rng.below(9) {
            0 => r.base_host_virt_addr += 1 + rng.below(r.page_size - 1),
            1 => r.size += 512,
            2 => r.offset += 8,
            3 => r.size = 0,
            4 => r.offset = self.file_size - r.size + r.page_size,
            5 => r.base_host_virt_addr = u64::MAX - r.page_size + 1,
            6 => r.page_size = *rng.pick(&[0, 1, 8192, 1 << 30, u64::MAX]),
            7 => r.offset = u64::MAX - r.page_size + 1,
            _ => {
                let copy = *r;
                regions.push(GuestRegionUffdMapping {
                    base_host_virt_addr: copy.base_host_virt_addr + copy.page_size / 2,
                    ..copy
                });
            }
        }
        Self::encode(rng, &regions)
    }

    /// A body of some kind.
    fn body(&self, rng: &mut Rng) -> Vec<u8> {
        match rng.below(100) {
            0..=44 => {
                let regions = self.valid_regions(rng);
                let mut body = Self::encode(rng, &regions);
                if rng.chance(30) {
                    for _ in 0..rng.range(1, 3) {
                        mutate(rng, &mut body);
                    }
                }
                body
            }
            45..=64 => self.bad_geometry(rng),
            65..=69 => {
                // Many small regions: under the limit, or just over it.
                let count = *rng.pick(&[100u64, 4096, 4097]);
                let regions: Vec<GuestRegionUffdMapping> = (0..count)
                    .map(|i| GuestRegionUffdMapping {
                        base_host_virt_addr: (i + 1) * 0x10_0000,
                        size: PAGE_SIZE_4K,
                        offset: (i % (self.file_size / PAGE_SIZE_4K)) * PAGE_SIZE_4K,
                        page_size: PAGE_SIZE_4K,
                    })
                    .collect();
                handoff::encode(&regions)
            }
            70 => {
                // Past the size limit: padding that never completes a value.
                let mut body = b"[".to_vec();
                body.resize(MAX_MESSAGE_BYTES + 1 + rng.index(4096), b' ');
                body
            }
            71..=75 => {
                let depth = *rng.pick(&[127usize, 128, 129, 5000]);
                let mut body = vec![b'['; depth];
                body.extend(std::iter::repeat_n(b']', depth));
                body
            }
            76..=83 => (0..rng.range(1, 64)).map(|_| rng.byte()).collect(),
            84..=86 => Vec::new(),
            _ => {
                let odd: &[&[u8]] = &[
                    b"null",
                    b"{}",
                    b"{\"mappings\":{}}",
                    b"[1,2,3]",
                    b"[{}]",
                    b"[{\"base_host_virt_addr\":-1,\"size\":4096,\"offset\":0,\"page_size\":4096}]",
                    b"[{\"base_host_virt_addr\":4096,\"size\":1e3,\"offset\":0,\"page_size\":4096}]",
                    b"[{\"base_host_virt_addr\":4096,\"size\":18446744073709551616,\"offset\":0,\"page_size\":4096}]",
                    b"[{\"base_host_virt_addr\":\"4096\",\"size\":4096,\"offset\":0,\"page_size\":4096}]",
                ];
                rng.pick(odd).to_vec()
            }
        }
    }

    /// One handoff.
    pub fn handoff(&self, rng: &mut Rng, fds: &FdFactory) -> io::Result<Handoff> {
        let body = self.body(rng);
        let count = match rng.below(100) {
            0..=9 => 0,
            10..=84 => 1,
            85..=94 => rng.range(2, 3),
            _ => rng.range(9, 20),
        }
        .min(self.max_fds);
        let (fd_kinds, fds) = fds.random(rng, usize::try_from(count).expect("count"), 70)?;
        let mode = match rng.below(100) {
            0..=69 => Mode::Whole,
            70..=77 => Mode::Pieces,
            78..=82 => Mode::FdsLate,
            83..=90 => Mode::Disconnect,
            91..=92 => Mode::ConnectClose,
            _ => Mode::Hang,
        };
        Ok(Handoff {
            body,
            fd_kinds,
            fds,
            mode,
        })
    }
}

const INSERTS: [&[u8]; 5] = [b"9999999999999999999999", b"-", b".5", b"e9", b","];

/// One mutation of a body's bytes.
fn mutate(rng: &mut Rng, body: &mut Vec<u8>) {
    if body.is_empty() {
        return;
    }
    let i = rng.index(body.len());
    match rng.below(5) {
        0 => body[i] ^= 1 << rng.below(8),
        1 => body.truncate(i),
        2 => {
            let span = body[i..].to_vec();
            body.extend(span);
        }
        3 => {
            let insert = INSERTS[rng.index(INSERTS.len())];
            body.splice(i..i, insert.iter().copied());
        }
        _ => body[i] = rng.byte(),
    }
}

/// What happened to one handoff.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Handled {
    /// pagerd serves it: the fork must be replaced.
    Accepted,
    /// Refused with this reason.
    Refused(RefusalReason),
    /// Closed without a reply, or not read (disconnects).
    NoReply,
    /// Left hanging; its reply comes later.
    Hanging,
}

fn borrowed(fds: &[OwnedFd]) -> Vec<BorrowedFd<'_>> {
    fds.iter().map(AsFd::as_fd).collect()
}

fn read_reply(stream: &UnixStream) -> Result<Option<HandoffReply>, String> {
    let mut line = String::new();
    match BufReader::new(stream).read_line(&mut line) {
        Ok(0) => Ok(None),
        Ok(_) => serde_json::from_str(&line)
            .map(Some)
            .map_err(|e| format!("not a handoff reply ({e}): {line:?}")),
        Err(e) if e.kind() == io::ErrorKind::ConnectionReset => Ok(None),
        Err(e) => Err(format!("no reply: {e}")),
    }
}

/// Checks a reply against what was sent; `Err` describes a violation.
fn judge(h: &Handoff, reply: Option<HandoffReply>) -> Result<Handled, String> {
    let Some(reply) = reply else {
        return Ok(Handled::NoReply);
    };
    if reply.ok {
        if h.fd_kinds != [FdKind::Uffd] {
            return Err(format!(
                "a handoff with descriptors {:?} was accepted",
                h.fd_kinds
            ));
        }
        return Ok(Handled::Accepted);
    }
    let error = reply.error.ok_or("a refusal without an error")?;
    Ok(Handled::Refused(error.reason))
}

/// The first half of `body` if it cannot be a whole value yet (so that pagerd waits for
/// more), else the start of a region list.
fn unfinished(body: &[u8]) -> &[u8] {
    let half = &body[..body.len() / 2];
    if half.is_empty() || complete(half) {
        b"[{\"size\":"
    } else {
        half
    }
}

/// Sends one handoff to `socket` and checks the reply; hanging connections go to `hanging`.
pub fn exchange(
    socket: &Path,
    h: &Handoff,
    file_size: u64,
    hanging: &mut Hanging,
) -> Result<Handled, String> {
    let stream = UnixStream::connect(socket).map_err(|e| format!("connect: {e}"))?;
    stream
        .set_read_timeout(Some(REPLY_TIMEOUT))
        .map_err(|e| e.to_string())?;
    let fds = borrowed(&h.fds);
    // pagerd may close before it has read everything (too large): the reply still tells.
    match h.mode {
        Mode::Whole => {
            let _ = proto::fdpass::send_with_fds(&stream, &h.body, &fds);
            if !complete(&h.body) {
                // Never complete: tell pagerd nothing more comes.
                let _ = stream.shutdown(std::net::Shutdown::Write);
            }
            let reply = read_reply(&stream)?;
            let result = judge(h, reply)?;
            if let Some(want) = oracle(&h.body, &h.fd_kinds, file_size) {
                let got = match result {
                    Handled::Accepted => Verdict::Accepted,
                    Handled::Refused(reason) => Verdict::Refused(reason),
                    _ => return Err(format!("no reply where {want:?} was due")),
                };
                if got != want {
                    return Err(format!("pagerd answered {got:?} where {want:?} was due"));
                }
            }
            Ok(result)
        }
        Mode::Pieces | Mode::FdsLate => {
            let mut pieces: Vec<&[u8]> = h.body.chunks(h.body.len().div_ceil(4).max(1)).collect();
            if h.mode == Mode::FdsLate {
                for p in &pieces {
                    let _ = (&stream).write_all(p);
                }
                let _ = proto::fdpass::send_with_fds(&stream, b" ", &fds);
            } else {
                let first = if pieces.is_empty() {
                    &b""[..]
                } else {
                    pieces.remove(0)
                };
                let _ = proto::fdpass::send_with_fds(&stream, first, &fds);
                for p in pieces {
                    let _ = (&stream).write_all(p);
                }
            }
            let _ = stream.shutdown(std::net::Shutdown::Write);
            judge(h, read_reply(&stream)?)
        }
        Mode::Disconnect => {
            let _ = proto::fdpass::send_with_fds(&stream, unfinished(&h.body), &fds);
            Ok(Handled::NoReply)
        }
        Mode::ConnectClose => Ok(Handled::NoReply),
        Mode::Hang => {
            let _ = proto::fdpass::send_with_fds(&stream, unfinished(&h.body), &fds);
            hanging.push(stream)?;
            Ok(Handled::Hanging)
        }
    }
}

/// Handoff connections left hanging, checked as their replies come.
#[derive(Debug)]
pub struct Hanging {
    open: VecDeque<(UnixStream, Instant)>,
    limit: usize,
    grace: Duration,
    /// Replies that came: `timed_out` refusals, or closes.
    pub answered: u64,
}

impl Hanging {
    /// At most `limit` open at once; each must be answered within `grace`.
    pub fn new(limit: usize, grace: Duration) -> Self {
        Self {
            open: VecDeque::new(),
            limit,
            grace,
            answered: 0,
        }
    }

    fn push(&mut self, stream: UnixStream) -> Result<(), String> {
        while self.open.len() >= self.limit {
            self.settle_oldest()?;
        }
        self.open.push_back((stream, Instant::now()));
        Ok(())
    }

    /// Waits for the oldest connection's answer.
    fn settle_oldest(&mut self) -> Result<(), String> {
        let Some((stream, since)) = self.open.pop_front() else {
            return Ok(());
        };
        let left = self.grace.saturating_sub(since.elapsed());
        stream
            .set_read_timeout(Some(left.max(Duration::from_millis(1))))
            .map_err(|e| e.to_string())?;
        match read_reply(&stream) {
            Ok(None) => {}
            Ok(Some(reply)) => {
                let reason = reply.error.as_ref().map(|e| e.reason);
                if reply.ok
                    || !matches!(
                        reason,
                        Some(RefusalReason::TimedOut | RefusalReason::AlreadyServing)
                    )
                {
                    return Err(format!("a hanging handoff was answered {reply:?}"));
                }
            }
            Err(e) => {
                return Err(format!(
                    "a hanging handoff was not answered within {:?}: {e}",
                    self.grace
                ))
            }
        }
        self.answered += 1;
        Ok(())
    }

    /// Settles every connection whose answer is due by now.
    pub fn settle_due(&mut self, timeout: Duration) -> Result<(), String> {
        while self
            .open
            .front()
            .is_some_and(|(_, since)| since.elapsed() > timeout)
        {
            self.settle_oldest()?;
        }
        Ok(())
    }

    /// Waits for every answer.
    pub fn settle_all(&mut self) -> Result<(), String> {
        while !self.open.is_empty() {
            self.settle_oldest()?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_oracle_follows_pagerds_order_of_checks() {
        let good = br#"[{"base_host_virt_addr":4096,"size":4096,"offset":0,"page_size":4096}]"#;
        let size = 8 << 20;
        use FdKind::*;
        assert_eq!(oracle(good, &[Uffd], size), Some(Verdict::Accepted));
        assert_eq!(
            oracle(good, &[], size),
            Some(Verdict::Refused(RefusalReason::NoFd))
        );
        assert_eq!(
            oracle(good, &[DevNull], size),
            Some(Verdict::Refused(RefusalReason::NotUserfaultfd))
        );
        assert_eq!(
            oracle(good, &[Uffd, Uffd], size),
            Some(Verdict::Refused(RefusalReason::SeveralFds))
        );
        assert_eq!(
            oracle(&good[..10], &[Uffd], size),
            Some(Verdict::Refused(RefusalReason::Incomplete))
        );
        assert_eq!(
            oracle(good, &[Uffd], 0),
            Some(Verdict::Refused(RefusalReason::PastEndOfFile))
        );
        assert_eq!(oracle(&[b' '; 20_000], &[Uffd], size), None);
    }

    #[test]
    fn generated_valid_regions_validate() {
        let g = Generator::new(8 << 20, 20);
        let mut rng = Rng::new(3);
        for _ in 0..1000 {
            let regions = g.valid_regions(&mut rng);
            handoff::validate(&regions, 8 << 20).unwrap();
            let body = Generator::encode(&mut rng, &regions);
            assert_eq!(handoff::parse(&body).unwrap(), regions);
        }
    }
}
