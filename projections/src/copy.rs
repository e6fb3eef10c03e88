//! `COPY … FROM STDIN` in text format: how a field is written.

/// Appends `value` to a `COPY` text row, escaping what the format gives a meaning to.
pub(crate) fn field(row: &mut String, value: &str) {
    let mut rest = value;
    while let Some(at) = rest.find(['\\', '\n', '\r', '\t']) {
        row.push_str(&rest[..at]);
        row.push_str(match rest.as_bytes()[at] {
            b'\\' => "\\\\",
            b'\n' => "\\n",
            b'\r' => "\\r",
            _ => "\\t",
        });
        rest = &rest[at + 1..];
    }
    row.push_str(rest);
}

#[cfg(test)]
mod tests {
    use super::field;

    #[test]
    fn copy_fields_escape_what_the_text_format_gives_a_meaning_to() {
        let mut row = String::new();
        field(&mut row, "{\"a\":\"x\\\"y\"}\tb\nc\rd é");
        assert_eq!(row, "{\"a\":\"x\\\\\"y\"}\\tb\\nc\\rd é");
    }
}
