//! The fan-out harness as shipped: installed beside pagerd's binaries, with no cargo workspace
//! around, it still runs pagerd (on demand, replaying and graduating a recorded working set)
//! and its baselines, warm and cold, and writes its table, JSON and chart.

use std::path::Path;
use std::process::Command;

use serde_json::Value;
use testkit::binary;

/// Runs the installed `fanout` in `dir` with `args` (and `env`), and returns its JSON.
fn fanout(dir: &Path, args: &[&str], env: &[(&str, &Path)]) -> Value {
    let out = dir.join("results");
    let run = Command::new(dir.join("bin/fanout"))
        .args(args)
        .arg("--out")
        .arg(&out)
        .current_dir(dir)
        .env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .envs(env.iter().copied())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(
        run.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&run.stderr)
    );
    assert!(
        stdout.contains("columns: forks = "),
        "the table explains itself: {stdout}"
    );
    let svg = std::fs::read_to_string(out.join("fanout.svg")).unwrap();
    assert!(svg.contains("<svg") && svg.contains("forks (log scale)"));
    serde_json::from_slice(&std::fs::read(out.join("fanout.json")).unwrap()).unwrap()
}

/// A temp directory with the harness's binaries installed in `bin/`.
fn install() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let bin = dir.path().join("bin");
    std::fs::create_dir(&bin).unwrap();
    for name in ["fanout", "pagerd", "synthetic-vmm", "naive-handler"] {
        std::fs::copy(binary(name), bin.join(name)).unwrap();
    }
    dir
}

/// Whether `outcome` ran and measured a working set.
fn ran(outcome: &Value) -> bool {
    outcome["skipped"].is_null() && outcome["working_set_s"].as_f64() > Some(0.0)
}

#[test]
fn fanout_runs_from_installed_binaries_without_a_workspace() {
    let dir = install();
    let json = fanout(
        dir.path(),
        &[
            "--forks",
            "1,2",
            "--sizes",
            "8",
            "--patterns",
            "hot",
            "--dense-only",
            "--modes",
            "pagerd,pagerd-replay,pagerd-graduate,naive,map-private,fc-handler",
        ],
        &[],
    );
    let rows = json["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 2, "one row per fork count: {json}");
    let fc_handler = testkit::firecracker::uffd_handler();
    for row in rows {
        assert_eq!(row["scenario"]["cold"], false, "{row}");
        let outcome = |mode: &str| &row["outcomes"][mode];
        for mode in [
            "pagerd",
            "pagerd-replay",
            "pagerd-graduate",
            "naive",
            "map-private",
        ] {
            assert!(ran(outcome(mode)), "{mode}: {}", outcome(mode));
            assert!(
                outcome(mode)["fork_faults_per_fork"].as_f64().is_some(),
                "{mode} counts the forks' faults: {}",
                outcome(mode)
            );
        }
        match &fc_handler {
            // The forks check every byte: having run, Firecracker's handler served them.
            Ok(_) => assert!(ran(outcome("fc-handler")), "{}", outcome("fc-handler")),
            Err(why) => assert_eq!(outcome("fc-handler")["skipped"], why.as_str()),
        }
        // On demand, pagerd serves the hot set one fault per page, and the forks see them.
        let pagerd = outcome("pagerd");
        assert!(pagerd["faults_per_fork"].as_f64() > Some(0.0), "{pagerd}");
        assert!(
            pagerd["fork_faults_per_fork"].as_f64() > Some(0.0),
            "{pagerd}"
        );
        assert_eq!(pagerd["replayed_pages_per_fork"].as_f64(), Some(0.0));
        // Replaying, it installs the set recorded first (the same hot set) before the reads.
        for mode in ["pagerd-replay", "pagerd-graduate"] {
            let o = outcome(mode);
            assert!(o["working_set_pages"].as_u64() > Some(0), "{mode}: {o}");
            assert!(
                o["replayed_pages_per_fork"].as_f64() > Some(0.0),
                "{mode}: {o}"
            );
            let against = &row["pagerd_over_baseline"][mode]["pagerd"];
            assert!(against["working_set"].is_number(), "{mode} ÷ pagerd: {row}");
            assert!(against["uffd_faults"].is_number(), "{mode} ÷ pagerd: {row}");
        }
        assert!(outcome("map-private")["faults_per_fork"].is_null());
    }
}

#[test]
fn fanout_runs_cold_and_says_why_a_missing_handler_is_skipped() {
    let dir = install();
    let missing = dir.path().join("no-such-handler");
    let json = fanout(
        dir.path(),
        &[
            "--cold",
            "--forks",
            "2",
            "--sizes",
            "8",
            "--patterns",
            "hot",
            "--dense-only",
            "--modes",
            "pagerd,pagerd-replay,map-private,naive,fc-handler",
        ],
        &[("FC_UFFD_HANDLER", &missing)],
    );
    let rows = json["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 1, "{json}");
    let row = &rows[0];
    assert_eq!(row["scenario"]["cold"], true, "{row}");
    for mode in ["pagerd", "pagerd-replay", "map-private"] {
        let o = &row["outcomes"][mode];
        assert!(ran(o), "{mode}: {o}");
        let cached = o["cached_percent_at_start"].as_f64().unwrap();
        assert!(cached < 5.0, "{mode} started cold: {o}");
    }
    for (mode, why) in [("fc-handler", "FC_UFFD_HANDLER"), ("naive", "MAP_POPULATE")] {
        let skipped = row["outcomes"][mode]["skipped"]
            .as_str()
            .unwrap_or_default();
        assert!(
            skipped.contains(why),
            "{mode} says why it was skipped: {row}"
        );
    }
}
