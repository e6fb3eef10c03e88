//! `COPY … FROM STDIN` in text format: how a field is written, and how the rows are sent.

use anyhow::Context as _;
use sqlx::PgConnection;

/// Sends `rows` (text format, one line a row) through `statement` (`copy … from stdin`);
/// `what` names them in errors.
pub(crate) async fn write(tx: &mut PgConnection, statement: &str, rows: String, what: &str) -> anyhow::Result<()> {
    let mut copy = tx.copy_in_raw(statement).await.with_context(|| format!("writing {what}"))?;
    copy.send(rows.into_bytes()).await.with_context(|| format!("writing {what}"))?;
    copy.finish().await.with_context(|| format!("writing {what}"))?;
    Ok(())
}

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
