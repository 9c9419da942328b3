//! Crash safety: pagerd is SIGKILLed at many points of a scripted sequence of operations, more
//! than two hundred times, and restarted each time. After every restart the state directory and
//! the daemon must agree: no snapshot that a recorded fork references has lost its file, no
//! orphan files or sockets remain, and every `ref_count` equals the number of fork records
//! naming the snapshot.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::mpsc;

use serde_json::{json, Value};
use testkit::{write_snapshot, Daemon};

const ROUNDS: usize = 210;

/// One request on a fresh connection; `None` if the daemon died under it.
fn call(control: &Path, request: Value) -> Option<Value> {
    let mut stream = UnixStream::connect(control).ok()?;
    writeln!(stream, "{request}").ok()?;
    let mut line = String::new();
    BufReader::new(&stream).read_line(&mut line).ok()?;
    serde_json::from_str(&line).ok()
}

/// What a step must answer while the daemon lives: `None` = success, `Some(code)` = that error.
type Expect = Option<&'static str>;

/// The scripted operations of round `r`. Some steps tidy up what an earlier, killed round may
/// have left, so they accept more than one answer.
fn script(r: usize, mem: &Path) -> Vec<(Value, Vec<Expect>)> {
    let (s, t, prev_g) = (
        format!("s{r}"),
        format!("t{r}"),
        format!("g{}", r.wrapping_sub(1)),
    );
    let op = |op: &str, args: Value| {
        let mut v = json!({"v": 1, "op": op});
        v.as_object_mut()
            .unwrap()
            .extend(args.as_object().unwrap().clone());
        v
    };
    vec![
        (
            op("fork.close", json!({"fork": prev_g})),
            vec![None, Some("not_found")],
        ),
        (
            op("snapshot.register", json!({"snapshot": s, "path": mem})),
            vec![None],
        ),
        (
            op(
                "fork.create",
                json!({"snapshot": s, "fork": format!("f{r}a")}),
            ),
            vec![None],
        ),
        (
            op(
                "fork.create",
                json!({"snapshot": s, "fork": format!("f{r}b")}),
            ),
            vec![None],
        ),
        (
            op("snapshot.delete", json!({"snapshot": s})),
            vec![Some("conflict")],
        ),
        (
            op("fork.close", json!({"fork": format!("f{r}a")})),
            vec![None],
        ),
        (
            op("snapshot.delete", json!({"snapshot": s, "defer": true})),
            vec![None],
        ),
        (
            op(
                "fork.create",
                json!({"snapshot": s, "fork": format!("f{r}c")}),
            ),
            vec![Some("conflict")],
        ),
        (
            op("fork.close", json!({"fork": format!("f{r}b")})),
            vec![None],
        ),
        (
            op("snapshot.get", json!({"snapshot": s})),
            vec![Some("not_found")],
        ),
        (
            op("snapshot.register", json!({"snapshot": t, "path": mem})),
            vec![None],
        ),
        (
            op(
                "fork.create",
                json!({"snapshot": t, "fork": format!("g{r}")}),
            ),
            vec![None],
        ),
        (
            op("snapshot.delete", json!({"snapshot": t, "defer": true})),
            vec![None],
        ),
    ]
}

/// Runs round `r`'s script, reporting each finished step, until the daemon dies or it ends.
fn run_script(control: PathBuf, r: usize, mem: PathBuf, progress: mpsc::Sender<usize>) {
    for (i, (request, allowed)) in script(r, &mem).into_iter().enumerate() {
        let Some(response) = call(&control, request.clone()) else {
            return;
        };
        let got: Expect = if response["ok"] == true {
            None
        } else {
            let code = response["error"]["code"].as_str().unwrap_or("?");
            Some(
                [
                    "not_found",
                    "conflict",
                    "invalid_argument",
                    "unavailable",
                    "internal",
                ]
                .into_iter()
                .find(|c| *c == code)
                .unwrap_or("?"),
            )
        };
        assert!(
            allowed.contains(&got),
            "round {r} step {i} {request}: {response}"
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
        let files = names(&state.join("snapshots").join(name));
        assert_eq!(
            files,
            ["memory", "snapshot.json"].map(String::from).into(),
            "{}",
            ctx(name)
        );
    }
    // The daemon agrees: the same snapshots, and each ref_count is the number of records.
    let list = daemon.request("snapshot.list", Value::Null).unwrap();
    let listed: BTreeSet<String> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(
        listed,
        dirs,
        "{}",
        ctx("listed snapshots differ from the directories")
    );
    for info in list.as_array().unwrap() {
        let id = info["id"].as_str().unwrap();
        let expected = refs.get(id).cloned().unwrap_or_default();
        assert_eq!(
            info["ref_count"],
            expected.len(),
            "{}",
            ctx(&format!("ref_count of {id}: {info}"))
        );
        let forks: BTreeSet<String> = info["forks"]
            .as_array()
            .unwrap()
            .iter()
            .map(|f| f.as_str().unwrap().to_owned())
            .collect();
        assert_eq!(forks, expected, "{}", ctx(id));
    }
    // Every recorded fork is known, and exactly the waiting ones have sockets.
    let forks = daemon.request("fork.list", Value::Null).unwrap();
    let known: BTreeSet<String> = forks
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(
        known,
        recorded,
        "{}",
        ctx("forks known to the daemon differ from the records")
    );
    let waiting: BTreeSet<String> = forks
        .as_array()
        .unwrap()
        .iter()
        .filter(|f| f["state"] == "waiting")
        .map(|f| format!("{}.sock", f["id"].as_str().unwrap()))
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
    // A fork whose VMM lives through every restart: detached, never reaped, always counted.
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
    assert_eq!(daemon.fork("anchored")["state"], "detached");
    assert_eq!(
        daemon.error_code("snapshot.delete", json!({"snapshot": "anchor"})),
        "conflict"
    );
    anchor_vmm.kill();
}
