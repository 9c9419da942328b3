//! Reporting fan-out results: a table on the terminal, a JSON file, and an SVG chart of
//! time-to-working-set against the number of forks, pagerd beside the baselines.

use std::path::Path;

use plotters::prelude::*;
use serde_json::json;

use crate::fanout::{Mode, Pattern, Row};

/// A figure some modes lack, `-` for them.
fn maybe(value: Option<f64>, decimals: usize) -> String {
    value.map_or_else(|| "-".to_owned(), |v| format!("{v:.decimals$}"))
}

/// The table printed after a run: one line per scenario and mode, with pagerd's ratios.
pub fn table(rows: &[Row]) -> String {
    let mut out = format!(
        "{:<6} {:>5} {:<10} {:<6} {:<5} {:<16} {:>8} {:>9} {:>10} {:>9} {:>10} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>11} {:>12}\n",
        "forks",
        "MiB",
        "pattern",
        "zeros",
        "cache",
        "mode",
        "ready_s",
        "wset_s",
        "pages/s",
        "p50_us",
        "p99_us",
        "flt/fork",
        "uffd/fork",
        "repl/fork",
        "cached%",
        "srv_cpu",
        "srv_MiB",
        "fork_anon_MiB",
        "guest_pss_MiB"
    );
    for row in rows {
        let s = &row.scenario;
        for (mode, o) in &row.outcomes {
            let head = format!(
                "{:<6} {:>5} {:<10} {:<6} {:<5} {:<16}",
                s.forks,
                s.size_mib,
                s.pattern.name(),
                if s.sparse { "75%" } else { "none" },
                s.cache(),
                mode.name()
            );
            if let Some(why) = &o.skipped {
                out += &format!("{head} skipped: {why}\n");
                continue;
            }
            out += &format!(
                "{head} {:>8.3} {:>9.3} {:>10.0} {:>9.2} {:>10.1} {:>9} {:>9} {:>9} {:>9} {:>9.2} {:>9} {:>11} {:>12}\n",
                o.ready_s,
                o.working_set_s,
                o.pages_per_s,
                o.latency_p50_ns as f64 / 1e3,
                o.latency_p99_ns as f64 / 1e3,
                maybe(o.fork_faults_per_fork, 0),
                maybe(o.faults_per_fork, 0),
                maybe(o.replayed_pages_per_fork, 0),
                maybe(o.cached_percent_at_start, 2),
                o.server_cpu_s,
                o.server_peak_rss_kib / 1024,
                o.forks_anon_kib / 1024,
                o.forks_guest_pss_kib / 1024
            );
        }
        let ratios = row.ratios();
        for (pagerd_mode, against) in ratios.as_object().into_iter().flatten() {
            let parts: Vec<String> = against
                .as_object()
                .into_iter()
                .flatten()
                .map(|(base, r)| {
                    let f = |k: &str| r[k].as_f64().map_or("-".to_owned(), |v| format!("{v:.2}"));
                    format!(
                        "{base}: wset {} ready {} p99 {} faults {} mem {} cpu {}",
                        f("working_set"),
                        f("ready"),
                        f("latency_p99"),
                        f("faults"),
                        f("guest_memory"),
                        f("total_cpu")
                    )
                })
                .collect();
            out += &format!("       {pagerd_mode} ÷  {}\n", parts.join(" | "));
        }
    }
    out + TABLE_LEGEND
}

/// What the table's columns and ratio lines mean.
pub const TABLE_LEGEND: &str = "
columns: forks = VMMs started at once; MiB = snapshot size; pattern = what each fork reads
  (sequential: first 25% in order; random: 10% random pages, different per fork; hot: the same
  10% for every fork); zeros = share of all-zero pages in the snapshot; cache = the snapshot's
  files in the page cache when the forks start (warm) or dropped (cold); ready_s = until every
  fork has read its first page; wset_s = until every fork has read its working set; pages/s =
  working-set pages read per second over all forks; p50_us/p99_us = one page read inside a
  fork (first touch, including the fault round trip); flt/fork = page faults one fork took on
  guest memory while reading (its own count, every mode); uffd/fork = faults pagerd served per
  fork and repl/fork = pages it installed per fork from the recorded working set (pagerd's
  uffd modes); cached% = share of the snapshot's files still cached when cold forks started;
  srv_cpu = CPU seconds of the page server (pagerd, or all handlers); srv_MiB = its peak RSS;
  fork_anon_MiB = anonymous memory of all forks; guest_pss_MiB = Pss of all forks' guest
  memory, every fork alive.
ratios: `MODE ÷ BASE` lines divide a pagerd mode's figure by a baseline's (and by on-demand
  pagerd's, for pagerd-replay and pagerd-graduate), so below 1 is better for the mode in every
  column (wset, ready, p99 latency, faults per fork, guest memory, total CPU).
";

/// Writes every row, with ratios and the machine it ran on, as JSON.
pub fn write_json(rows: &[Row], machine: &serde_json::Value, path: &Path) -> std::io::Result<()> {
    let rows: Vec<_> = rows
        .iter()
        .map(|r| {
            let outcomes: serde_json::Map<String, serde_json::Value> = r
                .outcomes
                .iter()
                .map(|(m, o)| (m.name().to_owned(), serde_json::to_value(o).expect("outcome serializes")))
                .collect();
            json!({"scenario": r.scenario, "outcomes": outcomes, "pagerd_over_baseline": r.ratios()})
        })
        .collect();
    let doc = json!({"machine": machine, "rows": rows});
    std::fs::write(path, serde_json::to_string_pretty(&doc).expect("json"))
}

/// One color per mode, in [`Mode::ALL`] order.
const COLORS: [RGBColor; 9] = [
    RED,
    RGBColor(199, 21, 133),
    RGBColor(128, 0, 0),
    RGBColor(255, 140, 0),
    RGBColor(160, 82, 45),
    BLUE,
    GREEN,
    MAGENTA,
    RGBColor(0, 139, 139),
];

/// Height of one line of the legend under the panels.
const LEGEND_LINE: u32 = 28;

/// Width of one legend entry (the longest mode name fits).
const LEGEND_SLOT: u32 = 160;

/// The modes that have at least one measured outcome.
fn measured_modes(rows: &[Row]) -> Vec<Mode> {
    Mode::ALL
        .into_iter()
        .filter(|mode| {
            rows.iter().any(|r| {
                r.outcomes
                    .iter()
                    .any(|(m, o)| m == mode && o.skipped.is_none())
            })
        })
        .collect()
}

/// Draws time-to-working-set against forks (log scale: N spans 1 to 128), one panel per
/// snapshot size, page cache (warm, cold) and pattern (dense snapshots), one line per mode, and
/// one legend under all panels so that no legend covers a point.
pub fn write_chart(rows: &[Row], path: &Path) -> Result<(), Box<dyn std::error::Error>> {
    let mut sizes: Vec<(u64, bool)> = rows
        .iter()
        .map(|r| (r.scenario.size_mib, r.scenario.cold))
        .collect();
    sizes.sort_unstable();
    sizes.dedup();
    let mut patterns: Vec<Pattern> = rows.iter().map(|r| r.scenario.pattern).collect();
    patterns.sort_unstable();
    patterns.dedup();
    let modes = measured_modes(rows);
    let (width, panels_height) = (420 * patterns.len() as u32, 320 * sizes.len() as u32);
    let per_line = (width / LEGEND_SLOT).max(1);
    let legend_height = LEGEND_LINE * (modes.len() as u32).div_ceil(per_line).max(1) + 8;
    let root = SVGBackend::new(path, (width, panels_height + legend_height)).into_drawing_area();
    root.fill(&WHITE)?;
    let (panel_area, legend_area) = root.split_vertically(panels_height);
    let panels = panel_area.split_evenly((sizes.len(), patterns.len()));
    for (i, panel) in panels.iter().enumerate() {
        let ((size, cold), pattern) = (sizes[i / patterns.len()], patterns[i % patterns.len()]);
        let cells: Vec<&Row> = rows
            .iter()
            .filter(|r| {
                r.scenario.size_mib == size
                    && r.scenario.cold == cold
                    && r.scenario.pattern == pattern
                    && !r.scenario.sparse
            })
            .collect();
        let max_n = cells.iter().map(|r| r.scenario.forks).max().unwrap_or(1) as f64;
        let max_t = cells
            .iter()
            .flat_map(|r| {
                r.outcomes
                    .iter()
                    .filter(|(_, o)| o.skipped.is_none())
                    .map(|(_, o)| o.working_set_s)
            })
            .fold(0.001, f64::max);
        let mut chart = ChartBuilder::on(panel)
            .caption(
                format!(
                    "{size} MiB, {}{}",
                    pattern.name(),
                    if cold { ", cold cache" } else { "" }
                ),
                ("sans-serif", 16),
            )
            .margin(10)
            .x_label_area_size(30)
            .y_label_area_size(45)
            .build_cartesian_2d((0.8..max_n * 1.25).log_scale(), 0.0..max_t * 1.1)?;
        chart
            .configure_mesh()
            .x_desc("forks (log scale)")
            .x_label_formatter(&|n| format!("{n:.0}"))
            .y_desc("s to working set")
            .draw()?;
        for (k, mode) in Mode::ALL.iter().enumerate() {
            let points: Vec<(f64, f64)> = cells
                .iter()
                .filter_map(|r| {
                    let (_, o) = r.outcomes.iter().find(|(m, _)| m == mode)?;
                    o.skipped
                        .is_none()
                        .then_some((r.scenario.forks as f64, o.working_set_s))
                })
                .collect();
            if points.is_empty() {
                continue;
            }
            let color = COLORS[k];
            chart.draw_series(LineSeries::new(points.clone(), color.stroke_width(2)))?;
            chart.draw_series(
                points
                    .into_iter()
                    .map(|p| Circle::new(p, 3, color.filled())),
            )?;
        }
    }
    let slot = i32::try_from(width / per_line)?;
    for (j, mode) in modes.iter().enumerate() {
        let k = Mode::ALL.iter().position(|m| m == mode).unwrap_or(0);
        let (line, column) = (j as u32 / per_line, j as u32 % per_line);
        let x = i32::try_from(column)? * slot + 10;
        let y = i32::try_from(line * LEGEND_LINE + LEGEND_LINE / 2 + 4)?;
        legend_area.draw(&PathElement::new(
            vec![(x, y), (x + 20, y)],
            COLORS[k].stroke_width(3),
        ))?;
        legend_area.draw(&Text::new(
            mode.name(),
            (x + 26, y - 7),
            ("sans-serif", 14).into_font(),
        ))?;
    }
    root.present()?;
    Ok(())
}
