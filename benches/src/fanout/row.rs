//! One row of fan-out results (a scenario, every mode) and its ratios: each pagerd mode
//! against each baseline that ran, and pagerd's prefetching modes against its on-demand one.

use serde::Serialize;
use serde_json::{json, Value};

use super::{Mode, Outcome, Scenario};

/// A row of results: one scenario, every mode.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    /// The scenario.
    pub scenario: Scenario,
    /// Outcome per mode, in [`Mode::ALL`] order.
    pub outcomes: Vec<(Mode, Outcome)>,
}

/// `a ÷ b`, or null when there is no baseline figure.
fn ratio(a: f64, b: f64) -> Value {
    if b > 0.0 {
        json!(a / b)
    } else {
        Value::Null
    }
}

/// [`ratio`] of figures only some modes have.
fn ratio_of(a: Option<f64>, b: Option<f64>) -> Value {
    match (a, b) {
        (Some(a), Some(b)) => ratio(a, b),
        _ => Value::Null,
    }
}

/// [`ratio`] of faults per fork, or null when the other mode took less than one per fork (a
/// copied fork faults on nothing: dividing by its stray fault or two says nothing).
fn faults_ratio(a: Option<f64>, b: Option<f64>) -> Value {
    ratio_of(a, b.filter(|&b| b >= 1.0))
}

/// The figures of `p` as ratios to those of `b`.
fn figures(p: &Outcome, b: &Outcome) -> serde_json::Map<String, Value> {
    let value = json!({
        "ready": ratio(p.ready_s, b.ready_s),
        "working_set": ratio(p.working_set_s, b.working_set_s),
        "latency_p99": ratio(p.latency_p99_ns as f64, b.latency_p99_ns as f64),
        "faults": faults_ratio(p.fork_faults_per_fork, b.fork_faults_per_fork),
        "forks_anon_memory": ratio(p.forks_anon_kib as f64, b.forks_anon_kib as f64),
        "guest_memory": ratio(p.forks_guest_pss_kib as f64, b.forks_guest_pss_kib as f64),
        "total_cpu": ratio(p.server_cpu_s + p.forks_cpu_s, b.server_cpu_s + b.forks_cpu_s),
    });
    match value {
        Value::Object(map) => map,
        _ => unreachable!("a JSON object"),
    }
}

impl Row {
    /// The outcome of `mode`, if it ran.
    fn ran(&self, mode: Mode) -> Option<&Outcome> {
        self.outcomes
            .iter()
            .find(|(m, o)| *m == mode && o.skipped.is_none())
            .map(|(_, o)| o)
    }

    /// Each pagerd mode's figures as ratios to each baseline that ran, and those of
    /// `pagerd-replay` and `pagerd-graduate` to on-demand `pagerd` (under the key `pagerd`, with
    /// `uffd_faults` from pagerd's counters too), as `{pagerd_mode: {against: {figure: ratio}}}`
    /// (mode ÷ the other, so below 1 means the mode is faster or cheaper).
    pub fn ratios(&self) -> Value {
        let mut out = serde_json::Map::new();
        for (mode, p) in &self.outcomes {
            if !mode.is_pagerd() || p.skipped.is_some() {
                continue;
            }
            let mut against = serde_json::Map::new();
            if matches!(mode, Mode::PagerdReplay | Mode::PagerdGraduate) {
                if let Some(on_demand) = self.ran(Mode::Pagerd) {
                    let mut f = figures(p, on_demand);
                    f.insert(
                        "uffd_faults".into(),
                        faults_ratio(p.faults_per_fork, on_demand.faults_per_fork),
                    );
                    against.insert(Mode::Pagerd.name().to_owned(), Value::Object(f));
                }
            }
            for (base, b) in &self.outcomes {
                if !base.is_pagerd() && b.skipped.is_none() {
                    against.insert(base.name().to_owned(), Value::Object(figures(p, b)));
                }
            }
            out.insert(mode.name().to_owned(), Value::Object(against));
        }
        Value::Object(out)
    }
}
