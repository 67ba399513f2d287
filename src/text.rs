//! Text that a sender chose, made safe to show: in a log line or on a terminal, no sender may
//! move the cursor, recolour the screen, forge a line or reverse the text after it.

use std::borrow::Cow;
use std::fmt::Write as _;

/// Text as it may appear in a log line or on a terminal: control characters (C0, DEL, C1),
/// line and paragraph separators and bidi overrides become visible escapes (`\x1b`, `\n`,
/// `\u{202e}`); everything else, `\` included, is left as it is.
pub fn escape_control(text: &str) -> Cow<'_, str> {
    fn hostile(c: char) -> bool {
        c.is_control()
            || matches!(
                c,
                // Line and paragraph separators; bidi embeddings, overrides and isolates; bidi
                // and zero-width marks, joiners and invisible operators, which can reorder or
                // hide what is shown.
                '\u{061c}'
                    | '\u{200b}'..='\u{200f}'
                    | '\u{2028}'..='\u{202e}'
                    | '\u{2060}'..='\u{2064}'
                    | '\u{2066}'..='\u{2069}'
                    | '\u{feff}'
            )
    }
    if !text.chars().any(hostile) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        match c {
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if hostile(c) && (c as u32) < 0x80 => out.push_str(&format!("\\x{:02x}", c as u32)),
            c if hostile(c) => out.push_str(&format!("\\u{{{:x}}}", c as u32)),
            c => out.push(c),
        }
    }
    Cow::Owned(out)
}

/// `text` cut to at most `max` characters, the last being `…` when it was cut: a value a
/// sender chose, kept to a size a log line or a table cell can hold.
pub fn cut(text: &str, max: usize) -> Cow<'_, str> {
    match text.char_indices().nth(max) {
        None => Cow::Borrowed(text),
        Some(_) => {
            let mut kept: String = text.chars().take(max.saturating_sub(1)).collect();
            kept.push('…');
            Cow::Owned(kept)
        }
    }
}

/// [`escape_control`] for each line of `text`: its line breaks stay, nothing else can drive the
/// terminal (for output made of a sender's values, line by line).
pub fn escape_lines(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for line in text.split_inclusive('\n') {
        let (line, end) = match line.strip_suffix('\n') {
            Some(line) => (line, "\n"),
            None => (line, ""),
        };
        out.push_str(&escape_control(line));
        out.push_str(end);
    }
    out
}

/// `rows` under `header`, each column as wide as its widest cell (in characters), two spaces
/// apart; a column marked in `right` is right-aligned (numbers), the others left-aligned, and
/// the last column has no trailing spaces. Cells are shown as given: escape what a sender
/// chose first ([`escape_control`]), which also keeps one row per line.
pub fn table<const N: usize>(header: [&str; N], right: [bool; N], rows: &[[String; N]]) -> String {
    let mut widths = header.map(|h| h.chars().count());
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let header = header.map(String::from);
    for row in std::iter::once(&header).chain(rows) {
        let mut line = String::new();
        for (i, cell) in row.iter().enumerate() {
            if i > 0 {
                line.push_str("  ");
            }
            let pad = " ".repeat(widths[i] - cell.chars().count());
            if right[i] {
                line.push_str(&pad);
                line.push_str(cell);
            } else {
                line.push_str(cell);
                // The last column needs no trailing spaces.
                if i + 1 < row.len() {
                    line.push_str(&pad);
                }
            }
        }
        let _ = writeln!(out, "{line}");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_are_escaped_and_plain_text_is_borrowed() {
        assert!(matches!(
            escape_control("push ok ünïcode \\x"),
            Cow::Borrowed(_)
        ));
        assert_eq!(
            escape_control("a\u{1b}[31mred\u{7}\r\nfake line\u{9b}\u{202e}"),
            "a\\x1b[31mred\\x07\\r\\nfake line\\u{9b}\\u{202e}"
        );
        // Regression (an adversary's finding): bidi marks and zero-width characters were
        // shown as they were.
        assert_eq!(
            escape_control("a\u{200f}b\u{61c}c\u{200b}d\u{feff}e\u{2060}"),
            "a\\u{200f}b\\u{61c}c\\u{200b}d\\u{feff}e\\u{2060}"
        );
    }
}
