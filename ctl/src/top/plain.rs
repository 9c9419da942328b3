//! A [`Frame`] as plain text, for `pagerctl top` writing to a pipe or a file: the header lines,
//! then every row as a table, one frame after another with a blank line between.

use super::frame::{Frame, COLUMNS};
use crate::table;

/// The text of `frame`.
pub fn text(frame: &Frame) -> String {
    let rows: Vec<Vec<String>> = frame.rows.iter().map(|r| r.cells()).collect();
    format!(
        "{}\n{}\n{}\n\n{}",
        frame.title,
        frame.forks,
        frame.vms,
        table::render(&COLUMNS, &rows)
    )
}
