//! Plain-text tables for people, laid out by `comfy-table`: a header row and left-aligned
//! columns two spaces apart, each as wide as its widest cell counted in terminal columns
//! (`µs` is two, not three bytes). At a terminal the table fits its width: long cells wrap
//! inside their column instead of the line wrapping.

use std::io::IsTerminal;

use comfy_table::presets::NOTHING;
use comfy_table::{ContentArrangement, Table};

/// Renders `rows` under `header`, fitted to the terminal's width when stdout is one.
pub fn render(header: &[&str], rows: &[Vec<String>]) -> String {
    let width = std::io::stdout()
        .is_terminal()
        .then(|| ratatui::crossterm::terminal::size().ok())
        .flatten()
        .map(|(columns, _)| columns);
    render_within(header, rows, width)
}

/// [`render`] for a known width (`None`: as wide as the cells need).
pub fn render_within(header: &[&str], rows: &[Vec<String>], width: Option<u16>) -> String {
    let mut table = Table::new();
    table.load_preset(NOTHING).set_header(header.to_vec());
    for row in rows {
        table.add_row(row.clone());
    }
    for column in table.column_iter_mut() {
        column.set_padding((0, 2));
    }
    if let Some(width) = width {
        table
            .set_width(width)
            .set_content_arrangement(ContentArrangement::Dynamic);
    }
    table
        .lines()
        .map(|l| l.trim_end().to_owned() + "\n")
        .collect()
}

#[cfg(test)]
mod tests {
    use super::render_within;

    #[test]
    fn pads_columns_to_the_widest_cell() {
        let out = render_within(
            &["ID", "STATE"],
            &[vec!["fork-10".into(), "serving".into()]],
            None,
        );
        assert_eq!(out, "ID       STATE\nfork-10  serving\n");
    }

    #[test]
    fn counts_terminal_columns_not_bytes() {
        let out = render_within(
            &["P99", "ID"],
            &[
                vec!["12.3 µs".into(), "a".into()],
                vec!["850 ns".into(), "b".into()],
            ],
            None,
        );
        let starts: Vec<usize> = out
            .lines()
            .map(|l| {
                l.chars()
                    .position(|c| c == 'a' || c == 'b' || c == 'I')
                    .unwrap()
            })
            .collect();
        assert_eq!(starts, [9, 9, 9], "{out}");
    }

    #[test]
    fn fits_a_narrow_terminal() {
        let rows = vec![vec![
            "a-rather-long-fork-identifier".to_owned(),
            "serving".to_owned(),
            "/var/lib/pagerd/snapshots/base/memory".to_owned(),
        ]];
        let out = render_within(&["ID", "STATE", "PATH"], &rows, Some(40));
        assert!(out.lines().all(|l| l.chars().count() <= 40), "{out}");
        assert!(out.contains("serving"), "{out}");
    }
}
