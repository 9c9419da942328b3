//! Draws a [`Frame`] with `ratatui`, fitted to the terminal:
//!
//! ```text
//! pagerd 0.1.0 (pid 4242), up 5m 3s, healthy           ← title, always on top
//! forks: 3 serving, 37 waiting, 0 detached, 0 ended; file users: 1
//! vms: 0 starting, 2 running, 0 exited, 0 failed
//! ID      KIND SNAPSHOT STATE   PID  VM  FAULTS/S …     ← table header, stays put
//! busy-1  uffd base     serving 5188 -   12034    …     ← busiest first, as many as fit
//! …
//! q quit · by faults/s · 40 rows, 17 shown · every 1s   ← or why the last refresh failed
//! ```
//!
//! Every line is cut at the terminal's width rather than wrapped; narrow columns (ids,
//! snapshots, VMs) give way first.

use std::time::Duration;

use ratatui::layout::{Constraint, Layout};
use ratatui::style::{Style, Stylize};
use ratatui::text::Line;
use ratatui::widgets::{Cell, Paragraph, Row as TableRow, Table};

use super::frame::{Frame, COLUMNS};

/// How a column of [`COLUMNS`] fits: its least width, its share of any width left over
/// (0: none), and which columns go first when the terminal is too narrow (highest first).
struct Fit {
    min: u16,
    share: u16,
    drop_order: u8,
}

const FITS: [Fit; 9] = [
    Fit {
        min: 9,
        share: 3,
        drop_order: 0,
    }, // ID
    Fit {
        min: 8,
        share: 2,
        drop_order: 6,
    }, // SNAPSHOT
    Fit {
        min: 8,
        share: 0,
        drop_order: 2,
    }, // STATE
    Fit {
        min: 7,
        share: 0,
        drop_order: 4,
    }, // PID
    Fit {
        min: 4,
        share: 1,
        drop_order: 7,
    }, // VM
    Fit {
        min: 8,
        share: 0,
        drop_order: 1,
    }, // FAULTS/S
    Fit {
        min: 9,
        share: 0,
        drop_order: 3,
    }, // FAULTS
    Fit {
        min: 10,
        share: 0,
        drop_order: 5,
    }, // COPIED
    Fit {
        min: 8,
        share: 0,
        drop_order: 5,
    }, // P99
];

/// Space between columns.
const SPACING: u16 = 1;

/// The columns shown in `width` terminal columns, in order, each with its width: as many as
/// fit at their least width, the most important kept, the rest shared out.
fn layout(width: u16) -> Vec<(usize, u16)> {
    let mut by_importance: Vec<usize> = (0..FITS.len()).collect();
    by_importance.sort_by_key(|&i| FITS[i].drop_order);
    let mut chosen = Vec::new();
    let mut used = 0u16;
    for i in by_importance {
        let need = FITS[i].min + if chosen.is_empty() { 0 } else { SPACING };
        if used + need <= width {
            used += need;
            chosen.push(i);
        }
    }
    chosen.sort_unstable();
    let shares: u16 = chosen.iter().map(|&i| FITS[i].share).sum();
    let extra = width - used;
    let mut widths: Vec<(usize, u16)> = chosen
        .iter()
        .map(|&i| {
            let more = (extra * FITS[i].share).checked_div(shares).unwrap_or(0);
            (i, FITS[i].min + more)
        })
        .collect();
    // What rounding left over goes to the first column (the id, whenever anything fits).
    let given: u16 = widths.iter().map(|&(i, w)| w - FITS[i].min).sum();
    if let Some(first) = widths.first_mut() {
        first.1 += extra - given;
    }
    widths
}

/// Lines above the table.
const HEADER_LINES: u16 = 3;

/// Draws `frame` on `f`; `error` is why the last refresh failed (the frame is then older).
pub fn draw(f: &mut ratatui::Frame<'_>, frame: &Frame, interval: Duration, error: Option<&str>) {
    let [header, table, footer] = Layout::vertical([
        Constraint::Length(HEADER_LINES),
        Constraint::Min(1),
        Constraint::Length(1),
    ])
    .areas(f.area());
    f.render_widget(
        Paragraph::new(vec![
            Line::from(frame.title.clone()).bold(),
            Line::from(frame.forks.clone()),
            Line::from(frame.vms.clone()),
        ]),
        header,
    );
    // One line goes to the table's own header.
    let fit = usize::from(table.height.saturating_sub(1));
    let columns = layout(table.width);
    let pick = |cells: Vec<String>| -> Vec<Cell<'static>> {
        columns
            .iter()
            .map(|&(i, _)| Cell::from(cells[i].clone()))
            .collect()
    };
    let rows = frame.rows.iter().take(fit).map(|row| {
        let style = if row.busy() {
            Style::new().bold()
        } else {
            Style::new()
        };
        TableRow::new(pick(row.cells())).style(style)
    });
    let header = pick(COLUMNS.iter().map(|c| (*c).to_owned()).collect());
    let widths = columns.iter().map(|&(_, w)| Constraint::Length(w));
    f.render_widget(
        Table::new(rows, widths)
            .header(TableRow::new(header).reversed())
            .column_spacing(SPACING),
        table,
    );
    let status = match error {
        Some(error) => Line::from(format!("refresh failed: {error}")).red(),
        None => Line::from(format!(
            "q quit · busiest first · {} rows, {} shown · every {}",
            frame.rows.len(),
            frame.rows.len().min(fit),
            humantime::format_duration(interval)
        )),
    };
    f.render_widget(Paragraph::new(status), footer);
}

#[cfg(test)]
mod tests {
    use ratatui::backend::TestBackend;
    use ratatui::Terminal;

    use super::*;
    use crate::top::frame::Row;

    fn row(id: &str, rate: f64) -> Row {
        Row {
            id: id.into(),
            kind: "uffd",
            snapshot: "base".into(),
            state: "serving".into(),
            pid: Some(4242),
            vm: Some("vm-a".into()),
            rate: Some(rate),
            faults: Some(123_456),
            copied: Some(1 << 30),
            p99: Some(12_300),
            rank: 0,
        }
    }

    fn screen(frame: &Frame, width: u16, height: u16, error: Option<&str>) -> Vec<String> {
        let mut terminal = Terminal::new(TestBackend::new(width, height)).unwrap();
        terminal
            .draw(|f| draw(f, frame, Duration::from_secs(1), error))
            .unwrap();
        let buffer = terminal.backend().buffer().clone();
        (0..height)
            .map(|y| {
                (0..width)
                    .map(|x| buffer[(x, y)].symbol().to_owned())
                    .collect::<String>()
            })
            .collect()
    }

    fn frame(rows: usize) -> Frame {
        Frame {
            title: "pagerd 0.1.0 (pid 1), up 5s, healthy".into(),
            forks: format!("forks: {rows} serving, 0 waiting, 0 detached, 0 ended; file users: 0"),
            vms: "vms: 0 starting, 1 running, 0 exited, 0 failed".into(),
            rows: (0..rows)
                .map(|i| row(&format!("fork-{i:02}"), (rows - i) as f64))
                .collect(),
        }
    }

    #[test]
    fn the_header_stays_on_top_and_the_rows_that_fit_follow_it() {
        let lines = screen(&frame(40), 80, 24, None);
        assert!(lines[0].starts_with("pagerd 0.1.0"), "{lines:#?}");
        assert!(lines[3].starts_with("ID "), "{lines:#?}");
        assert!(lines[4].starts_with("fork-00 "), "{lines:#?}");
        assert!(lines[22].starts_with("fork-18 "), "{lines:#?}");
        assert!(
            lines[23].contains("40 rows, 19 shown") && lines[23].starts_with("q quit"),
            "{lines:#?}"
        );
    }

    #[test]
    fn a_narrow_terminal_keeps_the_ids_and_rates_and_cuts_the_rest() {
        let lines = screen(&frame(3), 40, 10, None);
        assert!(lines[0].starts_with("pagerd"), "{lines:#?}");
        assert!(lines[1].starts_with("forks: 3 serving"), "{lines:#?}");
        assert!(lines[3].starts_with("ID "), "{lines:#?}");
        assert!(lines[3].contains("FAULTS/S"), "{lines:#?}");
        assert!(!lines[3].contains("SNAPSHOT"), "{lines:#?}");
        assert!(lines[4].starts_with("fork-00 "), "{lines:#?}");
    }

    #[test]
    fn columns_fill_the_width_exactly() {
        for width in [20, 40, 79, 80, 120, 200] {
            let columns = layout(width);
            let used: u16 =
                columns.iter().map(|&(_, w)| w).sum::<u16>() + SPACING * (columns.len() as u16 - 1);
            assert_eq!(used, width, "{columns:?}");
            assert_eq!(columns[0].0, 0, "the id always shows: {columns:?}");
        }
        assert_eq!(layout(80).len(), COLUMNS.len());
    }

    #[test]
    fn a_failed_refresh_is_said_at_the_bottom() {
        let lines = screen(&frame(1), 80, 10, Some("cannot connect to pagerd"));
        assert!(
            lines[9].starts_with("refresh failed: cannot connect"),
            "{lines:#?}"
        );
    }
}
