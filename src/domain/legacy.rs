//! Legacy keys: keys a product issued before Tollgate, imported at cut-over.
//! They have the product's `{prefix}_{env}_` start but not Tollgate's
//! checksum; a profile that accepts them (`[keys.legacy]`) lets a key of
//! this shape through the checksum gate, to be looked up by its legacy
//! digest (`crypto::Pepper::legacy_digest`). Unknown ones still cost no
//! query once the known-digest budget is spent.

use serde::Deserialize;

use super::KeyFormat;

/// The shape of the legacy keys a profile accepts (`[keys.legacy]`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LegacyKeys {
    /// Shortest body after `{prefix}_{env}_`.
    #[serde(default = "default_min")]
    pub min_body_length: usize,
    /// Longest body after `{prefix}_{env}_`.
    #[serde(default = "default_max")]
    pub max_body_length: usize,
}

fn default_min() -> usize {
    16
}

fn default_max() -> usize {
    128
}

/// Longest legacy body any profile may accept.
pub const MAX_LEGACY_BODY: usize = 256;

impl LegacyKeys {
    /// Whether the settings make sense (8 ≤ min ≤ max ≤ 256).
    pub fn check(&self) -> Result<(), String> {
        if self.min_body_length < 8
            || self.min_body_length > self.max_body_length
            || self.max_body_length > MAX_LEGACY_BODY
        {
            return Err(format!(
                "needs 8 <= min_body_length <= max_body_length <= {MAX_LEGACY_BODY}"
            ));
        }
        Ok(())
    }

    /// The environment of `key` if it has the shape of a legacy key of
    /// `format`: `{prefix}_{env}_{body}`, a known environment, a body of
    /// the accepted length in `[A-Za-z0-9_-]`.
    pub fn environment_of<'a>(&self, format: &KeyFormat, key: &'a str) -> Option<&'a str> {
        let rest = key.strip_prefix(format.prefix())?.strip_prefix('_')?;
        let (env, body) = rest.split_once('_')?;
        let ok = format.has_environment(env)
            && (self.min_body_length..=self.max_body_length).contains(&body.len())
            && body
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
        ok.then_some(env)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::Alphabet;

    #[test]
    fn only_the_products_shape_passes_the_legacy_gate() {
        let format =
            KeyFormat::new("ms", &["live".into(), "test".into()], Alphabet::Base36, 20).unwrap();
        let legacy = LegacyKeys {
            min_body_length: 16,
            max_body_length: 128,
        };
        assert_eq!(
            legacy.environment_of(&format, "ms_live_1a2b3c4d5e6f7g8h9i0j"),
            Some("live")
        );
        assert_eq!(
            legacy.environment_of(&format, "ms_test_xxxxxxxxxxxxxxxxxxxx"),
            Some("test")
        );
        for bad in [
            "ms_prod_1a2b3c4d5e6f7g8h9i0j",
            "msx_live_1a2b3c4d5e6f7g8h9i0j",
            "ms_live_short",
            "ms_live_1a2b3c4d5e6f7g8h9i0j!",
            "ms_live_1a2b3c4d 5e6f7g8h9i0j",
            "",
        ] {
            assert_eq!(legacy.environment_of(&format, bad), None, "{bad}");
        }
        assert!(LegacyKeys {
            min_body_length: 4,
            max_body_length: 10
        }
        .check()
        .is_err());
    }
}
