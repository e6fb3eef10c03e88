//! `COPY … FROM STDIN` in text format: how a field is written.

/// Appends `value` to a `COPY` text row, escaping what the format gives a meaning to. Scans
/// bytes (the escaped ones are ASCII, so never part of a longer UTF-8 sequence): the documents
/// written this way — states, releases — are kilobytes of JSON with few of them.
pub(crate) fn field(row: &mut String, value: &str) {
    let bytes = value.as_bytes();
    let mut start = 0;
    for (at, byte) in bytes.iter().enumerate() {
        let escaped = match byte {
            b'\\' => "\\\\",
            b'\n' => "\\n",
            b'\r' => "\\r",
            b'\t' => "\\t",
            _ => continue,
        };
        row.push_str(&value[start..at]);
        row.push_str(escaped);
        start = at + 1;
    }
    row.push_str(&value[start..]);
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
