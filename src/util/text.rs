//! Text from outside the box made safe to log: escaped, so a newline or a terminal escape in a part id,
//! a question or a payload cannot forge a log line, and cut short, so a megabyte cannot flood the log.

/// `s` with control characters escaped (`\n`, `\u{1b}`; nothing else, so JSON stays readable), at most
/// `max` characters of it, and how much was left out.
pub fn escaped(s: &str, max: usize) -> String {
    let mut out = String::new();
    for c in s.chars().take(max) {
        if c.is_control() {
            out.extend(c.escape_debug());
        } else {
            out.push(c);
        }
    }
    let total = s.chars().count();
    if total > max {
        out.push_str(&format!("… ({} more characters)", total - max));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_are_escaped_and_long_text_is_cut() {
        assert_eq!(escaped("P-1\nINFO forged", 100), "P-1\\nINFO forged");
        assert_eq!(escaped("\u{1b}[2J", 100), "\\u{1b}[2J");
        assert_eq!(escaped(r#"{"part_id":"P-1\nX"}"#, 100), r#"{"part_id":"P-1\nX"}"#, "JSON is left as it is");
        assert_eq!(escaped(&"A".repeat(10), 4), "AAAA… (6 more characters)");
    }
}
