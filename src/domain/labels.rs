//! Key labels: a small bounded map of name → value per key (MessageSmart's
//! "Plan: optional tier or plan label for grouping keys" is one), set at
//! create and update, filterable in ListKeys, sent upstream where the
//! profile asks. Not secret: they are shown, audited and logged freely.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::Violations;

/// Labels one key may carry.
pub const MAX_LABELS: usize = 16;
/// Longest label name (a DNS label's length: it becomes a header name).
pub const MAX_LABEL_NAME: usize = 63;
/// Longest label value.
pub const MAX_LABEL_VALUE: usize = 128;

/// A key's labels, validated: at most [`MAX_LABELS`], names
/// `[a-z][a-z0-9_-]*` up to [`MAX_LABEL_NAME`], values of 1 to
/// [`MAX_LABEL_VALUE`] printable ASCII characters without surrounding
/// spaces (they travel as HTTP header values).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct KeyLabels(BTreeMap<String, String>);

/// Whether `name` is a valid label name.
pub fn is_label_name(name: &str) -> bool {
    let b = name.as_bytes();
    (1..=MAX_LABEL_NAME).contains(&b.len())
        && b[0].is_ascii_lowercase()
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'_' || *c == b'-')
}

fn is_label_value(value: &str) -> bool {
    (1..=MAX_LABEL_VALUE).contains(&value.len())
        && value.bytes().all(|c| (0x20..0x7f).contains(&c))
        && !value.starts_with(' ')
        && !value.ends_with(' ')
}

impl KeyLabels {
    /// Validates `labels` as the request field `field`, recording every
    /// violation (each names `field.<name>`, or `field` itself for the
    /// count or a name too odd to quote).
    pub fn parse(
        field: &str,
        labels: impl IntoIterator<Item = (String, String)>,
        v: &mut Violations,
    ) -> KeyLabels {
        let labels: BTreeMap<String, String> = labels.into_iter().collect();
        if labels.len() > MAX_LABELS {
            v.add(field, format!("at most {MAX_LABELS} labels"));
        }
        for (name, value) in &labels {
            if !is_label_name(name) {
                let quotable =
                    name.len() <= MAX_LABEL_NAME && name.bytes().all(|c| c.is_ascii_graphic());
                v.add(
                    if quotable {
                        format!("{field}.{name}")
                    } else {
                        field.to_string()
                    },
                    format!(
                        "label names are 1..={MAX_LABEL_NAME} characters of [a-z0-9_-], \
                         starting with a letter"
                    ),
                );
            } else if !is_label_value(value) {
                v.add(
                    format!("{field}.{name}"),
                    format!(
                        "label values are 1..={MAX_LABEL_VALUE} printable ASCII characters, \
                         without leading or trailing spaces"
                    ),
                );
            }
        }
        KeyLabels(labels)
    }

    /// The value of label `name`.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.0.get(name).map(String::as_str)
    }

    /// Whether there are no labels.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Every label, by name.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }

    /// Whether every label of `selector` is here with the same value.
    pub fn matches(&self, selector: &KeyLabels) -> bool {
        selector.iter().all(|(k, v)| self.get(k) == Some(v))
    }

    /// The labels as a map.
    pub fn as_map(&self) -> &BTreeMap<String, String> {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(pairs: &[(&str, &str)]) -> (KeyLabels, Vec<String>) {
        let mut v = Violations::default();
        let l = KeyLabels::parse(
            "labels",
            pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())),
            &mut v,
        );
        (l, v.0.into_iter().map(|x| x.field).collect())
    }

    #[test]
    fn labels_are_bounded_and_each_bad_one_is_named() {
        let (l, bad) = parse(&[("plan", "gold"), ("team", "core-api")]);
        assert!(bad.is_empty());
        assert_eq!(l.get("plan"), Some("gold"));

        let (_, bad) = parse(&[("Plan", "gold"), ("tier", ""), ("ok", "fine"), ("x", " y")]);
        assert_eq!(bad, ["labels.Plan", "labels.tier", "labels.x"]);
        let (_, bad) = parse(&[("plan\n", "gold")]);
        assert_eq!(bad, ["labels"], "an unquotable name is not echoed");
        let long = "v".repeat(MAX_LABEL_VALUE + 1);
        let (_, bad) = parse(&[("plan", &long)]);
        assert_eq!(bad, ["labels.plan"]);
        let many: Vec<(String, String)> = (0..=MAX_LABELS)
            .map(|i| (format!("l{i}"), "v".to_string()))
            .collect();
        let mut v = Violations::default();
        KeyLabels::parse("labels", many, &mut v);
        assert_eq!(v.0.len(), 1);
        assert_eq!(v.0[0].field, "labels");
    }

    #[test]
    fn a_selector_matches_keys_holding_all_its_labels() {
        let (key, _) = parse(&[("plan", "gold"), ("team", "core")]);
        let (gold, _) = parse(&[("plan", "gold")]);
        let (silver, _) = parse(&[("plan", "silver")]);
        assert!(key.matches(&gold));
        assert!(key.matches(&KeyLabels::default()));
        assert!(!key.matches(&silver));
        assert!(!KeyLabels::default().matches(&gold));
    }
}
