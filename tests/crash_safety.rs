//! Crash safety: pagerd is SIGKILLed at many points of a scripted sequence of operations, more
//! than two hundred times, and restarted each time. After every restart the state directory and
//! the daemon must agree: no snapshot that a recorded fork references has lost its file, no
//! orphan files or sockets remain, and every `ref_count` equals the number of fork records
//! naming the snapshot.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::mpsc;

use proto::client::{Client, ClientError};
use proto::control::{
    ErrorCode, ForkClose, ForkCreate, Request, SnapshotDelete, SnapshotGet, SnapshotRegister,
};
use proto::model::{ForkListEntry, ForkState};
use serde_json::Value;
use testkit::{id, write_snapshot, Daemon};

const ROUNDS: usize = 210;

/// What a step must answer while the daemon lives: `None` = success, `Some(code)` = that error.
type Expect = Option<ErrorCode>;

/// One request on a fresh connection: its answer (`None` = success), or `None` if the daemon
/// died under it.
fn call(client: &Client, request: &Request) -> Option<Expect> {
    match client.call_value(request) {
        Ok(_) => Some(None),
        Err(ClientError::Refused(e)) => Some(Some(e.code)),
        Err(_) => None,
    }
}

/// The scripted operations of round `r`. Some steps tidy up what an earlier, killed round may
/// have left, so they accept more than one answer.
fn script(r: usize, mem: &Path) -> Vec<(Request, Vec<Expect>)> {
    let (s, t) = (id(&format!("s{r}")), id(&format!("t{r}")));
    let fork = |name: String| id(&name);
    let create = |snapshot: &proto::SnapshotId, name: String| {
        Request::ForkCreate(ForkCreate {
            snapshot: snapshot.clone(),
            fork: Some(fork(name)),
            prefetch: None,
        })
    };
    let close = |name: String| Request::ForkClose(ForkClose { fork: fork(name) });
    let register = |snapshot: &proto::SnapshotId| {
        Request::SnapshotRegister(SnapshotRegister {
            snapshot: snapshot.clone(),
            path: Some(mem.to_owned()),
            fd: false,
            link: false,
            vmstate: None,
            vmm: None,
        })
    };
    let delete = |snapshot: &proto::SnapshotId, defer: bool| {
        Request::SnapshotDelete(SnapshotDelete {
            snapshot: snapshot.clone(),
            defer,
            force: false,
        })
    };
    use ErrorCode::{Conflict, NotFound};
    vec![
        (
            close(format!("g{}", r.wrapping_sub(1))),
            vec![None, Some(NotFound)],
        ),
        (register(&s), vec![None]),
        (create(&s, format!("f{r}a")), vec![None]),
        (create(&s, format!("f{r}b")), vec![None]),
        (delete(&s, false), vec![Some(Conflict)]),
        (close(format!("f{r}a")), vec![None]),
        (delete(&s, true), vec![None]),
        (create(&s, format!("f{r}c")), vec![Some(Conflict)]),
        (close(format!("f{r}b")), vec![None]),
        (
            Request::SnapshotGet(SnapshotGet {
                snapshot: s.clone(),
            }),
            vec![Some(NotFound)],
        ),
        (register(&t), vec![None]),
        (create(&t, format!("g{r}")), vec![None]),
        (delete(&t, true), vec![None]),
    ]
}

/// Runs round `r`'s script, reporting each finished step, until the daemon dies or it ends.
fn run_script(control: PathBuf, r: usize, mem: PathBuf, progress: mpsc::Sender<usize>) {
    let client = Client::new(&control);
    for (i, (request, allowed)) in script(r, &mem).into_iter().enumerate() {
        let Some(got) = call(&client, &request) else {
            return;
        };
        assert!(
            allowed.contains(&got),
            "round {r} step {i} {request:?}: {got:?}"
        );
        if progress.send(i + 1).is_err() {
            return;
        }
    }
}

fn names(dir: &Path) -> BTreeSet<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect()
}

fn check_invariants(daemon: &Daemon, round: usize) {
    let state = daemon.state_dir();
    let ctx = |what: &str| format!("after kill {round}: {what}");
    // Fork records: well-formed, and their snapshots still have their files.
    let mut refs: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut recorded = BTreeSet::new();
    for name in names(&state.join("forks")) {
        if let Some(id) = name.strip_prefix(".reserve-") {
            // Room kept for a waiting fork's attach record: only beside its record.
            assert!(
                state.join("forks").join(format!("{id}.json")).exists(),
                "{}",
                ctx(&format!("room kept for fork {id}, which has no record"))
            );
            continue;
        }
        let id = name
            .strip_suffix(".json")
            .unwrap_or_else(|| panic!("{}", ctx(&format!("stray file forks/{name}"))));
        let record: Value =
            serde_json::from_slice(&std::fs::read(state.join("forks").join(&name)).unwrap())
                .unwrap();
        assert_eq!(record["id"], id);
        let snapshot = record["snapshot"].as_str().unwrap().to_owned();
        assert!(
            state
                .join("snapshots")
                .join(&snapshot)
                .join("memory")
                .exists(),
            "{}",
            ctx(&format!(
                "fork {id} references {snapshot}, whose memory file is gone"
            ))
        );
        refs.entry(snapshot).or_default().insert(id.to_owned());
        recorded.insert(id.to_owned());
    }
    // Snapshot directories: whole, and no temp or trash left.
    let dirs = names(&state.join("snapshots"));
    for name in &dirs {
        assert!(
            !name.starts_with('.'),
            "{}",
            ctx(&format!("leftover snapshots/{name}"))
        );
        // The zero map is a cache of the memory file: a copy is registered with it, and
        // any other snapshot gets it when it is first mapped.
        let mut files = names(&state.join("snapshots").join(name));
        files.remove("zero-map");
        assert_eq!(
            files,
            ["memory", "snapshot.json"].map(String::from).into(),
            "{}",
            ctx(name)
        );
    }
    // The daemon agrees: the same snapshots, and each ref_count is the number of records.
    let list = daemon.snapshots();
    let listed: BTreeSet<String> = list.iter().map(|s| s.id.to_string()).collect();
    assert_eq!(
        listed,
        dirs,
        "{}",
        ctx("listed snapshots differ from the directories")
    );
    for info in &list {
        let id = info.id.as_str();
        let expected = refs.get(id).cloned().unwrap_or_default();
        assert_eq!(
            info.ref_count,
            Some(expected.len()),
            "{}",
            ctx(&format!("ref_count of {id}: {info:?}"))
        );
        let forks: BTreeSet<String> = info
            .forks
            .as_ref()
            .unwrap_or_else(|| panic!("{}", ctx(&format!("forks of {id} unknown"))))
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(forks, expected, "{}", ctx(id));
    }
    // Every recorded fork is known, and exactly the waiting and served ones have sockets (a
    // served fork's socket answers `already_serving`).
    let forks = daemon.forks();
    let known: BTreeSet<String> = forks
        .iter()
        .map(|f| match f {
            ForkListEntry::Uffd(fork) => fork.id.to_string(),
            ForkListEntry::File(user) => user.id.clone(),
        })
        .collect();
    assert_eq!(
        known,
        recorded,
        "{}",
        ctx("forks known to the daemon differ from the records")
    );
    let waiting: BTreeSet<String> = forks
        .iter()
        .filter_map(|f| match f {
            ForkListEntry::Uffd(fork)
                if matches!(fork.state, ForkState::Waiting | ForkState::Serving) =>
            {
                Some(format!("{}.sock", fork.id))
            }
            _ => None,
        })
        .collect();
    assert_eq!(
        names(&state.join("sockets")),
        waiting,
        "{}",
        ctx("sockets differ from the waiting forks")
    );
}

#[test]
fn two_hundred_kills_leave_records_files_and_counts_consistent() {
    let dir = tempfile::tempdir().unwrap();
    let mem = write_snapshot(&dir.path().join("mem"), 64 * 1024, 31, 3, 0);
    let mut daemon = Daemon::start(&[("anchor", &mem)], &[]);
    // A fork whose VMM lives through every restart: taken back and served again each time,
    // never reaped, always counted.
    let anchor_vmm = daemon.attach_holding_vmm("anchor", "anchored", &mem);

    let mut kills = 0;
    let mut kill_points = BTreeSet::new();
    for round in 0..ROUNDS {
        let (tx, rx) = mpsc::channel();
        let (control, mem2) = (daemon.control_socket().to_owned(), mem.clone());
        let client = std::thread::spawn(move || run_script(control, round, mem2, tx));
        // Kill once the client has finished `after` steps, as it starts the next one.
        let after = (round * 5) % 14;
        let mut done = 0;
        while done < after {
            match rx.recv() {
                Ok(n) => done = n,
                Err(_) => break,
            }
        }
        daemon.sigkill();
        kills += 1;
        kill_points.insert(done);
        client
            .join()
            .expect("the script's answers were as expected while the daemon lived");
        daemon.respawn();
        check_invariants(&daemon, round);
    }
    assert!(kills >= 200, "{kills} kills");
    assert!(
        kill_points.len() >= 12,
        "kills landed at only {kill_points:?}"
    );
    let anchored = daemon.fork("anchored");
    assert_eq!(anchored.state, ForkState::Serving, "{anchored:?}");
    assert_eq!(anchored.recovered, 1, "{anchored:?}");
    assert_eq!(
        daemon.error_code(SnapshotDelete {
            snapshot: id("anchor"),
            defer: false,
            force: false,
        }),
        ErrorCode::Conflict
    );
    anchor_vmm.kill();
}
