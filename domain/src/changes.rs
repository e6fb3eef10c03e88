//! Configuration described field by field, so the audit log and `applicationDiff` can show
//! before and after values — and, for secrets, only that they changed.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// One field's value as shown in history.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum FieldValue {
    /// A value that may be shown.
    Plain(serde_json::Value),
    /// A secret: only its digest, to tell changed from unchanged.
    Secret {
        /// Keyed hash of the plaintext.
        digest: String,
    },
}

/// What a secret reads as in history.
pub const SECRET_PLACEHOLDER: &str = "[secret]";

impl FieldValue {
    fn shown(&self) -> serde_json::Value {
        match self {
            Self::Plain(value) => value.clone(),
            Self::Secret { .. } => serde_json::Value::String(SECRET_PLACEHOLDER.to_owned()),
        }
    }

    fn is_secret(&self) -> bool {
        matches!(self, Self::Secret { .. })
    }
}

/// One changed field: `before` is `None` when the field was added, `after` when it was removed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Change {
    /// Dotted path, e.g. `gitRef` or `env.DATABASE_URL`.
    pub field: String,
    /// The value before, or `None` when the field was absent.
    pub before: Option<serde_json::Value>,
    /// The value after, or `None` when the field was removed.
    pub after: Option<serde_json::Value>,
    /// Whether the field holds a secret (its values then read as `[secret]`).
    pub secret: bool,
}

/// Configuration as a flat map from field path to value.
pub trait Describe {
    /// Every field that makes up the configuration, by dotted path.
    fn describe(&self) -> BTreeMap<String, FieldValue>;
}

/// The changes between two descriptions, in field order.
#[must_use]
pub fn diff(before: &BTreeMap<String, FieldValue>, after: &BTreeMap<String, FieldValue>) -> Vec<Change> {
    let mut changes = Vec::new();
    for (field, old) in before {
        match after.get(field) {
            Some(new) if new == old => {}
            Some(new) => changes.push(Change {
                field: field.clone(),
                before: Some(old.shown()),
                after: Some(new.shown()),
                secret: old.is_secret() || new.is_secret(),
            }),
            None => changes.push(Change {
                field: field.clone(),
                before: Some(old.shown()),
                after: None,
                secret: old.is_secret(),
            }),
        }
    }
    for (field, new) in after {
        if !before.contains_key(field) {
            changes.push(Change {
                field: field.clone(),
                before: None,
                after: Some(new.shown()),
                secret: new.is_secret(),
            });
        }
    }
    changes.sort_by(|a, b| a.field.cmp(&b.field));
    changes
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn map(entries: &[(&str, FieldValue)]) -> BTreeMap<String, FieldValue> {
        entries.iter().map(|(k, v)| ((*k).to_owned(), v.clone())).collect()
    }

    #[test]
    fn a_diff_names_added_changed_and_removed_fields() {
        let before = map(&[("name", FieldValue::Plain(json!("web"))), ("port", FieldValue::Plain(json!(80)))]);
        let after = map(&[("name", FieldValue::Plain(json!("api"))), ("image", FieldValue::Plain(json!("nginx")))]);
        let changes = diff(&before, &after);
        let fields: Vec<_> = changes.iter().map(|c| (c.field.as_str(), c.before.clone(), c.after.clone())).collect();
        assert_eq!(
            fields,
            vec![
                ("image", None, Some(json!("nginx"))),
                ("name", Some(json!("web")), Some(json!("api"))),
                ("port", Some(json!(80)), None),
            ]
        );
    }

    #[test]
    fn a_secret_shows_only_that_it_changed() {
        let before = map(&[("env.TOKEN", FieldValue::Secret { digest: "a".into() })]);
        let same = map(&[("env.TOKEN", FieldValue::Secret { digest: "a".into() })]);
        let other = map(&[("env.TOKEN", FieldValue::Secret { digest: "b".into() })]);
        assert!(diff(&before, &same).is_empty());
        let changes = diff(&before, &other);
        assert_eq!(changes.len(), 1);
        assert!(changes[0].secret);
        assert_eq!(changes[0].after, Some(json!(SECRET_PLACEHOLDER)));
    }
}
