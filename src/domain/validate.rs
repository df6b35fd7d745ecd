//! Input validation results: every bad field named, with a reason.

/// One bad field of a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldViolation {
    /// The request field, as named in the API (`scopes[2]`, `ttl_seconds`).
    pub field: String,
    /// What is wrong and what is accepted. Never echoes a secret.
    pub description: String,
}

/// Collects violations so a request reports all its bad fields at once.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Violations(pub Vec<FieldViolation>);

impl Violations {
    /// Records a bad field.
    pub fn add(&mut self, field: impl Into<String>, description: impl Into<String>) {
        self.0.push(FieldViolation {
            field: field.into(),
            description: description.into(),
        });
    }

    /// `Ok(())` when nothing was recorded.
    pub fn into_result(self) -> Result<(), Violations> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(self)
        }
    }
}

/// A scope is 1-64 characters of `[a-z0-9_.:/*-]`, starting with a letter or digit.
pub fn is_valid_scope(scope: &str) -> bool {
    (1..=64).contains(&scope.len())
        && scope.as_bytes()[0].is_ascii_alphanumeric()
        && scope
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"_.:/*-".contains(&b))
}

/// Checks a list of scopes for shape and count; `field` names the list.
pub fn check_scopes(field: &str, scopes: &[String], v: &mut Violations) {
    if scopes.len() > 64 {
        v.add(field, "at most 64 scopes");
    }
    for (i, s) in scopes.iter().enumerate() {
        if !is_valid_scope(s) {
            v.add(
                format!("{field}[{i}]"),
                "scope must be 1-64 characters of [a-z0-9_.:/*-], starting with a letter or digit",
            );
        }
    }
}

/// Names are 1-128 printable characters.
pub fn check_name(field: &str, name: &str, v: &mut Violations) {
    if name.trim().is_empty() || name.chars().count() > 128 || name.chars().any(char::is_control) {
        v.add(field, "must be 1-128 printable characters");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scopes() {
        assert!(is_valid_scope("messages:send"));
        assert!(is_valid_scope("emails/*"));
        assert!(!is_valid_scope(""));
        assert!(!is_valid_scope("Messages"));
        assert!(!is_valid_scope(":send"));
        assert!(!is_valid_scope(&"a".repeat(65)));
    }
}
