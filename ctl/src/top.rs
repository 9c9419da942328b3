//! `pagerctl top`: a live view of forks and their fault rates for a person at a terminal,
//! redrawn in place every interval (plain frames one after another when stdout is not a
//! terminal).

use std::collections::HashMap;
use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

use proto::client::{Client, ClientError};
use proto::model::ForkListEntry;

use crate::{table, units};

/// Clears the terminal and puts the cursor home.
const CLEAR: &str = "\x1b[H\x1b[2J";

/// Shows `iterations` frames (for ever when `None`), `interval` apart.
pub fn run(
    client: &Client,
    interval: Duration,
    iterations: Option<u64>,
) -> Result<(), ClientError> {
    let terminal = std::io::stdout().is_terminal();
    let mut previous: HashMap<String, u64> = HashMap::new();
    let mut last = Instant::now();
    let mut frame = 0u64;
    loop {
        let status = client.status()?;
        let forks = client.forks()?;
        let now = Instant::now();
        let seconds = now.duration_since(last).as_secs_f64().max(1e-3);
        let mut rows: Vec<(f64, Vec<String>)> = Vec::new();
        let mut current = HashMap::new();
        for entry in &forks {
            let ForkListEntry::Uffd(fork) = entry else {
                continue;
            };
            let faults = fork.stats.faults;
            let rate = previous.get(fork.id.as_str()).map_or(0.0, |before| {
                faults.saturating_sub(*before) as f64 / seconds
            });
            current.insert(fork.id.to_string(), faults);
            rows.push((
                rate,
                vec![
                    fork.id.to_string(),
                    fork.snapshot.to_string(),
                    fork.state.to_string(),
                    fork.vmm_pid.map_or_else(|| "-".into(), |p| p.to_string()),
                    format!("{rate:.0}"),
                    faults.to_string(),
                    units::bytes(fork.stats.bytes_copied),
                    units::nanos(fork.stats.latency_ns.p99),
                ],
            ));
        }
        rows.sort_by(|a, b| b.0.total_cmp(&a.0).then_with(|| a.1[0].cmp(&b.1[0])));
        let files = forks.len() - rows.len();
        let mut out = String::new();
        if terminal {
            out.push_str(CLEAR);
        } else if frame > 0 {
            out.push('\n');
        }
        out.push_str(&format!(
            "pagerd {} (pid {}), up {}: {} serving, {} waiting, {} detached, {} ended; {} file users\n\n",
            status.version,
            status.pid,
            units::uptime(status.uptime_ms),
            status.forks.serving,
            status.forks.waiting,
            status.forks.detached,
            status.forks.ended,
            files,
        ));
        out.push_str(&table::render(
            &[
                "ID", "SNAPSHOT", "STATE", "PID", "FAULTS/S", "FAULTS", "COPIED", "P99",
            ],
            &rows.into_iter().map(|(_, row)| row).collect::<Vec<_>>(),
        ));
        let mut stdout = std::io::stdout().lock();
        let _ = stdout.write_all(out.as_bytes());
        let _ = stdout.flush();
        drop(stdout);
        previous = current;
        last = now;
        frame += 1;
        if iterations.is_some_and(|n| frame >= n) {
            return Ok(());
        }
        std::thread::sleep(interval);
    }
}
