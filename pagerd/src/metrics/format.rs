//! The two text formats a scraper may ask for, and which one it asked for (`Accept`).
//!
//! ```text
//!   Accept: application/openmetrics-text;version=1.0.0,…;q=0.75,text/plain;version=0.0.4;q=0.5
//!        ─▶ OpenMetrics 1.0.0: the library's exposition as it is (`# EOF`, `# UNIT`, counter
//!           families named without `_total`)
//!   no Accept, */*, text/plain ─▶ the classic text format 0.0.4: the same samples, with each
//!           family named as its samples are (`x_total` counter, `x_info` gauge), no `# UNIT`,
//!           no `# EOF`
//! ```
//!
//! The classic format is derived from the library's OpenMetrics text, line by line: the
//! samples are the same in both, only the family descriptions differ.

use prometheus_client::encoding::text::encode;
use prometheus_client::registry::Registry;

/// An exposition format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Format {
    /// OpenMetrics text 1.0.0.
    OpenMetrics,
    /// Prometheus' classic text format 0.0.4.
    Classic,
}

impl Format {
    /// The format an `Accept` header prefers: the acceptable one with the highest `q` (the
    /// first listed on a tie); the classic format when it names neither.
    pub fn negotiate(accept: Option<&str>) -> Self {
        let mut best: Option<(Self, f64)> = None;
        for range in accept.unwrap_or_default().split(',') {
            let mut parts = range.split(';').map(str::trim);
            let media = parts.next().unwrap_or_default().to_ascii_lowercase();
            let (mut q, mut version) = (1.0, None);
            for param in parts {
                match param.split_once('=').map(|(k, v)| (k.trim(), v.trim())) {
                    Some(("q", v)) => q = v.parse().unwrap_or(0.0),
                    Some(("version", v)) => version = Some(v.trim_matches('"').to_owned()),
                    _ => {}
                }
            }
            let format = match (media.as_str(), version.as_deref()) {
                ("application/openmetrics-text", None | Some("1.0.0" | "0.0.1")) => {
                    Self::OpenMetrics
                }
                ("text/plain", None | Some("0.0.4")) | ("text/*" | "*/*", _) => Self::Classic,
                _ => continue,
            };
            if q > 0.0 && best.is_none_or(|(_, best_q)| q > best_q) {
                best = Some((format, q));
            }
        }
        best.map_or(Self::Classic, |(format, _)| format)
    }

    /// The `Content-Type` of an answer in this format.
    pub fn content_type(self) -> &'static str {
        match self {
            Self::OpenMetrics => "application/openmetrics-text; version=1.0.0; charset=utf-8",
            Self::Classic => "text/plain; version=0.0.4; charset=utf-8",
        }
    }

    /// `registry` in this format.
    pub fn encode(self, registry: &Registry) -> Result<String, std::fmt::Error> {
        let mut openmetrics = String::new();
        encode(&mut openmetrics, registry)?;
        Ok(match self {
            Self::OpenMetrics => openmetrics,
            Self::Classic => classic(&openmetrics),
        })
    }
}

/// The classic text format of an OpenMetrics exposition: families renamed as their samples
/// are, types the classic format knows, no `# UNIT` or `# EOF`.
fn classic(openmetrics: &str) -> String {
    let mut out = String::with_capacity(openmetrics.len());
    // A family's HELP comes before its TYPE, which says how to rename both.
    let mut help: Option<(&str, &str)> = None;
    for line in openmetrics.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            help = rest.split_once(' ');
        } else if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (family, kind) = rest.split_once(' ').unwrap_or((rest, "unknown"));
            let (suffix, kind) = match kind {
                "counter" => ("_total", "counter"),
                "info" => ("_info", "gauge"),
                "gauge" | "histogram" | "summary" => ("", kind),
                _ => ("", "untyped"),
            };
            if let Some((_, text)) = help.take().filter(|(name, _)| *name == family) {
                // OpenMetrics also escapes quotes in HELP; the classic format does not.
                let text = text.replace("\\\"", "\"");
                out.push_str(&format!("# HELP {family}{suffix} {text}\n"));
            }
            out.push_str(&format!("# TYPE {family}{suffix} {kind}\n"));
        } else if !line.starts_with('#') {
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use prometheus_client::metrics::counter::Counter;
    use prometheus_client::metrics::histogram::Histogram;
    use prometheus_client::metrics::info::Info;
    use prometheus_client::registry::Unit;

    use super::*;

    /// What Prometheus 2 sends.
    const PROMETHEUS: &str = "application/openmetrics-text;version=1.0.0,\
        application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";

    #[test]
    fn accept_picks_the_preferred_format() {
        assert_eq!(Format::negotiate(Some(PROMETHEUS)), Format::OpenMetrics);
        assert_eq!(Format::negotiate(None), Format::Classic);
        assert_eq!(Format::negotiate(Some("*/*")), Format::Classic);
        assert_eq!(
            Format::negotiate(Some("text/plain;version=0.0.4")),
            Format::Classic
        );
        assert_eq!(
            Format::negotiate(Some(
                "text/plain;q=0.9, application/openmetrics-text; version=1.0.0"
            )),
            Format::OpenMetrics
        );
        assert_eq!(
            Format::negotiate(Some("application/openmetrics-text;q=0, text/plain")),
            Format::Classic,
            "q=0 refuses"
        );
        assert_eq!(
            Format::negotiate(Some("application/openmetrics-text;version=2.0.0")),
            Format::Classic,
            "a version this daemon does not write"
        );
        assert_eq!(Format::negotiate(Some("application/json")), Format::Classic);
    }

    #[test]
    fn the_classic_format_names_families_as_their_samples() {
        let mut registry = Registry::with_prefix("p");
        let counter: Counter = Counter::default();
        counter.inc();
        registry.register("faults", "Faults \"read\"", counter);
        registry.register_with_unit("latency", "Latency", Unit::Seconds, Histogram::new([0.5]));
        registry.register("build", "Build", Info::new([("version", "1")]));
        let text = Format::Classic.encode(&registry).unwrap();
        assert_eq!(
            text,
            "# HELP p_faults_total Faults \"read\".\n\
             # TYPE p_faults_total counter\n\
             p_faults_total 1\n\
             # HELP p_latency_seconds Latency.\n\
             # TYPE p_latency_seconds histogram\n\
             p_latency_seconds_sum 0.0\n\
             p_latency_seconds_count 0\n\
             p_latency_seconds_bucket{le=\"0.5\"} 0\n\
             p_latency_seconds_bucket{le=\"+Inf\"} 0\n\
             # HELP p_build_info Build.\n\
             # TYPE p_build_info gauge\n\
             p_build_info{version=\"1\"} 1\n"
        );
        let openmetrics = Format::OpenMetrics.encode(&registry).unwrap();
        assert!(openmetrics.contains("# TYPE p_faults counter\n"));
        assert!(openmetrics.contains("# UNIT p_latency_seconds seconds\n"));
        assert!(openmetrics.ends_with("# EOF\n"));
    }
}
