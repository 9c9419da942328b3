//! The fan-out harness as shipped: installed beside pagerd's binaries, with no cargo workspace
//! around, it still runs pagerd and its baselines and writes its table, JSON and chart.

use std::process::Command;

use serde_json::Value;
use testkit::binary;

#[test]
fn fanout_runs_from_installed_binaries_without_a_workspace() {
    let dir = tempfile::tempdir().unwrap();
    let bin = dir.path().join("bin");
    std::fs::create_dir(&bin).unwrap();
    for name in ["fanout", "pagerd", "synthetic-vmm", "naive-handler"] {
        std::fs::copy(binary(name), bin.join(name)).unwrap();
    }
    let out = dir.path().join("results");
    let run = Command::new(bin.join("fanout"))
        .args([
            "--forks",
            "1,2",
            "--sizes",
            "8",
            "--patterns",
            "hot",
            "--dense-only",
            "--modes",
            "pagerd,naive,map-private",
            "--out",
        ])
        .arg(&out)
        .current_dir(dir.path())
        .env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
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
    let json: Value =
        serde_json::from_slice(&std::fs::read(out.join("fanout.json")).unwrap()).unwrap();
    let rows = json["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 2, "one row per fork count: {json}");
    for row in rows {
        for mode in ["pagerd", "naive", "map-private"] {
            let outcome = &row["outcomes"][mode];
            assert!(
                outcome["skipped"].is_null() && outcome["working_set_s"].as_f64() > Some(0.0),
                "{mode}: {outcome}"
            );
        }
    }
    let svg = std::fs::read_to_string(out.join("fanout.svg")).unwrap();
    assert!(svg.contains("<svg") && svg.contains("forks (log scale)"));
}
