//! What a Dockerfile builds from: the images its `FROM` lines and `COPY --from` flags read,
//! read the way the Docker Engine's builder reads them (parser directives, line continuations,
//! comments, global `ARG`s and build arguments in `FROM`).
//!
//! The engine's builder resolves those names against every image it stores, other tenants'
//! included; the deploy worker lets a build start only once each name is one the deployment
//! may use ([`crate::images`]). A Dockerfile this module cannot read with certainty is refused
//! rather than guessed at.

use std::collections::{HashMap, HashSet};

/// An image a Dockerfile reads, and where.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageUse {
    /// The reference, with build arguments substituted.
    pub reference: String,
    /// The line it appears on (1-based), for the log.
    pub line: usize,
}

/// The images `text` builds from (not `scratch`, not its own stages), in order and each once;
/// `build_args` are the build arguments the build gets.
///
/// # Errors
/// With the reason, when a `FROM` or `--from` cannot be read with certainty: a variable without
/// a value, an expansion form the builder reads differently, a `--from` with a variable.
pub fn images(text: &str, build_args: &HashMap<String, String>) -> Result<Vec<ImageUse>, String> {
    let mut found: Vec<ImageUse> = Vec::new();
    let mut stages: HashSet<String> = HashSet::new();
    let mut stage_count = 0usize;
    // `ARG`s before the first `FROM` (with their defaults): the only variables `FROM` sees.
    let mut global_args: HashMap<String, Option<String>> = HashMap::new();
    let add = |found: &mut Vec<ImageUse>, reference: String, line: usize| {
        if !found.iter().any(|u| u.reference == reference) {
            found.push(ImageUse { reference, line });
        }
    };
    for (line, instruction) in instructions(text) {
        let mut words = instruction.split_whitespace();
        let Some(keyword) = words.next() else { continue };
        let rest: Vec<&str> = words.collect();
        match keyword.to_ascii_uppercase().as_str() {
            "ARG" if stage_count == 0 => {
                for arg in &rest {
                    let (name, default) = match arg.split_once('=') {
                        Some((n, d)) => (n, Some(unquote(d))),
                        None => (*arg, None),
                    };
                    global_args.insert(name.to_owned(), default);
                }
            }
            "FROM" => {
                let operands: Vec<&str> = rest.iter().copied().filter(|w| !w.starts_with("--")).collect();
                let Some(base) = operands.first() else {
                    return Err(format!("line {line}: FROM names no image"));
                };
                let values = |name: &str| -> Option<String> {
                    global_args.get(name)?;
                    build_args.get(name).cloned().or_else(|| global_args.get(name).cloned().flatten())
                };
                let base = expand(base, values).map_err(|e| format!("line {line}: FROM {base}: {e}"))?;
                let base_lower = base.to_ascii_lowercase();
                if base_lower != "scratch" && !stages.contains(&base_lower) {
                    add(&mut found, base, line);
                }
                if let [_, as_kw, name, ..] = operands.as_slice()
                    && as_kw.eq_ignore_ascii_case("as")
                {
                    stages.insert(name.to_ascii_lowercase());
                }
                stage_count += 1;
            }
            "COPY" | "ADD" => {
                for flag in rest.iter().take_while(|w| w.starts_with("--")) {
                    let Some(from) = flag.strip_prefix("--from=") else { continue };
                    let from = unquote(from);
                    if from.contains('$') {
                        return Err(format!("line {line}: --from={from}: name a stage or an image, without variables"));
                    }
                    let is_stage_index = from.parse::<usize>().is_ok_and(|i| i < stage_count);
                    if !is_stage_index && !stages.contains(&from.to_ascii_lowercase()) {
                        add(&mut found, from, line);
                    }
                }
            }
            _ => {}
        }
    }
    Ok(found)
}

/// The instructions of `text` with the line each starts on: comments and blank lines left
/// out, continued lines joined, the escape character taken from its parser directive.
fn instructions(text: &str) -> Vec<(usize, String)> {
    let mut escape = '\\';
    let mut in_directives = true;
    let mut out = Vec::new();
    let mut current: Option<(usize, String)> = None;
    for (n, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if in_directives {
            if let Some(directive) = line.strip_prefix('#') {
                if let Some((key, value)) = directive.split_once('=')
                    && key.trim().eq_ignore_ascii_case("escape")
                {
                    escape = value.trim().chars().next().unwrap_or('\\');
                }
                continue;
            }
            in_directives = false;
        }
        // Comments (and empty lines) inside a continued instruction do not end it.
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (body, continues) = match line.strip_suffix(escape) {
            Some(body) => (body, true),
            None => (line, false),
        };
        let entry = current.get_or_insert_with(|| (n + 1, String::new()));
        if !entry.1.is_empty() {
            entry.1.push(' ');
        }
        entry.1.push_str(body.trim_end());
        if !continues && let Some(done) = current.take() {
            out.push(done);
        }
    }
    out.extend(current);
    out
}

fn unquote(s: &str) -> String {
    s.trim_matches(|c| c == '"' || c == '\'').to_owned()
}

/// Substitutes `$NAME` and `${NAME}` (also `${NAME:-default}` and `${NAME-default}`) with
/// `values`; any other form, or a variable with no value, is an error: the builder would
/// read it differently, or as empty.
fn expand(word: &str, values: impl Fn(&str) -> Option<String>) -> Result<String, String> {
    let word = unquote(word);
    let mut out = String::new();
    let mut chars = word.chars().peekable();
    while let Some(c) = chars.next() {
        if c != '$' {
            out.push(c);
            continue;
        }
        let (name, default) = if chars.peek() == Some(&'{') {
            chars.next();
            let mut inner = String::new();
            loop {
                match chars.next() {
                    Some('}') => break,
                    Some(ch) => inner.push(ch),
                    None => return Err("an unclosed ${".to_owned()),
                }
            }
            match inner.split_once(":-").or_else(|| inner.split_once('-')) {
                Some((name, default)) => (name.to_owned(), Some(default.to_owned())),
                None => (inner, None),
            }
        } else {
            let mut name = String::new();
            while let Some(&ch) = chars.peek() {
                if ch.is_ascii_alphanumeric() || ch == '_' {
                    name.push(ch);
                    chars.next();
                } else {
                    break;
                }
            }
            (name, None)
        };
        if name.is_empty() || !name.chars().all(|ch| ch.is_ascii_alphanumeric() || ch == '_') {
            return Err(format!("the variable ${{{name}}} cannot be read here"));
        }
        match values(&name).filter(|v| !v.is_empty()).or(default) {
            Some(value) => out.push_str(&value),
            None => return Err(format!("the variable {name} has no value")),
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refs(text: &str, args: &[(&str, &str)]) -> Result<Vec<String>, String> {
        let args = args.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect();
        images(text, &args).map(|found| found.into_iter().map(|u| u.reference).collect())
    }

    #[test]
    fn bases_and_copied_images_are_found_but_not_stages_or_scratch() {
        let text = "# syntax=docker/dockerfile:1\nFROM --platform=linux/amd64 node:20 AS Build\nRUN make\n\
                    FROM scratch\nCOPY --from=build /out /out\nCOPY --from=0 /a /a\n\
                    COPY --chown=1:1 --from=zpanel/other:tag /secret /s\nfrom BUILD as again\n";
        assert_eq!(refs(text, &[]), Ok(vec!["node:20".to_owned(), "zpanel/other:tag".to_owned()]));
    }

    #[test]
    fn continued_lines_comments_and_the_escape_directive_are_read_as_the_builder_reads_them() {
        assert_eq!(refs("FROM \\\n  zpanel/a\n", &[]), Ok(vec!["zpanel/a".to_owned()]));
        assert_eq!(
            refs("# escape=`\nFROM alpine\nCOPY `\n# a comment\n --from=zpanel/b / /\n", &[]).map(|r| r.len()),
            Ok(2)
        );
    }

    #[test]
    fn from_sees_global_args_and_build_arguments() {
        let text = "ARG BASE=alpine\nARG TAG\nFROM ${BASE}:${TAG:-3}\n";
        assert_eq!(refs(text, &[]), Ok(vec!["alpine:3".to_owned()]));
        assert_eq!(refs(text, &[("BASE", "zpanel/x"), ("TAG", "t")]), Ok(vec!["zpanel/x:t".to_owned()]));
        // A build argument not declared before FROM does not reach it.
        assert!(refs("FROM $BASE\n", &[("BASE", "zpanel/x")]).is_err());
        assert!(refs("ARG B\nFROM ${B:+x}\n", &[("B", "1")]).is_err());
    }

    #[test]
    fn a_variable_in_copy_from_is_refused() {
        assert!(refs("FROM alpine\nARG S=zpanel/x\nCOPY --from=$S / /\n", &[]).is_err());
    }
}
