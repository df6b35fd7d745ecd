//! API key wire format: `{prefix}_{env}_{body}`.
//!
//! The body is random characters followed by a CRC32 of everything before
//! it, encoded in the same alphabet. The checksum rejects typos and garbage
//! before any cache or database work and lets secret scanners find our keys;
//! the hint shows only checksum characters, so it reveals no randomness.

use std::fmt;

use rand::{Rng, TryRngCore};
use serde::Deserialize;

/// Longest input the parser looks at; anything longer is malformed at once.
pub const MAX_KEY_LEN: usize = 256;

/// The characters a key body is drawn from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Alphabet {
    /// `0-9a-f`
    Hex,
    /// `0-9a-z`
    Base36,
    /// `0-9A-Za-z`
    Base62,
}

impl Alphabet {
    fn chars(self) -> &'static [u8] {
        match self {
            Alphabet::Hex => b"0123456789abcdef",
            Alphabet::Base36 => b"0123456789abcdefghijklmnopqrstuvwxyz",
            Alphabet::Base62 => b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ",
        }
    }

    fn contains(self, b: u8) -> bool {
        match self {
            Alphabet::Hex => matches!(b, b'0'..=b'9' | b'a'..=b'f'),
            Alphabet::Base36 => matches!(b, b'0'..=b'9' | b'a'..=b'z'),
            Alphabet::Base62 => b.is_ascii_alphanumeric(),
        }
    }

    /// Characters needed to hold a 32-bit checksum: 8 hex, 7 base36, 6 base62.
    pub fn checksum_len(self) -> usize {
        let radix = self.chars().len() as u64;
        let mut len = 0;
        let mut span = 1u64;
        while span <= u64::from(u32::MAX) {
            span *= radix;
            len += 1;
        }
        len
    }

    /// Bits of randomness carried by one character.
    pub fn bits_per_char(self) -> f64 {
        (self.chars().len() as f64).log2()
    }

    fn encode_checksum(self, mut value: u32, out: &mut String) {
        let chars = self.chars();
        let radix = chars.len() as u32;
        let len = self.checksum_len();
        let mut buf = vec![chars[0]; len];
        for slot in buf.iter_mut().rev() {
            *slot = chars[(value % radix) as usize];
            value /= radix;
        }
        out.push_str(std::str::from_utf8(&buf).expect("alphabet is ASCII"));
    }
}

/// A product's key format, taken from its profile and validated there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyFormat {
    prefix: String,
    environments: Vec<String>,
    alphabet: Alphabet,
    body_length: usize,
}

/// Why a string is not a well-formed key. All of these are
/// `CREDENTIAL_MALFORMED`; none of them carries the input.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyParseError {
    #[error("key is longer than {MAX_KEY_LEN} characters")]
    TooLong,
    #[error("key does not start with the expected prefix")]
    WrongPrefix,
    #[error("key environment is not one of the profile's environments")]
    UnknownEnvironment,
    #[error("key body must be {expected} characters, got {got}")]
    WrongLength { expected: usize, got: usize },
    #[error("key body contains a character outside its alphabet")]
    InvalidCharacter,
    #[error("key checksum does not match")]
    ChecksumMismatch,
}

/// A key that passed the format and checksum checks. Borrowed from the input.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct ParsedKey<'a> {
    full: &'a str,
    environment: &'a str,
}

impl<'a> ParsedKey<'a> {
    /// The whole key, to be digested. Never log it.
    pub fn expose(&self) -> &'a str {
        self.full
    }

    /// The environment segment (`live`, `test`, …).
    pub fn environment(&self) -> &'a str {
        self.environment
    }
}

impl fmt::Debug for ParsedKey<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ParsedKey({})", hint_of(self.full))
    }
}

/// A freshly generated full key. Its `Debug` shows only the hint.
#[derive(Clone, PartialEq, Eq)]
pub struct ApiKeySecret(String);

impl ApiKeySecret {
    /// The full key, to return to the caller once and to digest.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Hands the full key over to be returned to the caller once.
    pub fn into_exposed(self) -> String {
        self.0
    }

    /// Non-secret display form.
    pub fn hint(&self) -> String {
        hint_of(&self.0)
    }
}

impl fmt::Debug for ApiKeySecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ApiKeySecret({})", self.hint())
    }
}

/// `msgf_live_…a1b2`: the prefix, environment and last four characters (all
/// of them checksum, so no randomness is shown).
pub fn hint_of(key: &str) -> String {
    let tail_start = key.len().saturating_sub(4);
    let head_end = key.rfind('_').map(|i| i + 1).unwrap_or(0).min(tail_start);
    match (key.get(..head_end), key.get(tail_start..)) {
        (Some(head), Some(tail)) => format!("{head}…{tail}"),
        _ => "…".to_string(),
    }
}

/// Why a key format is unusable.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum KeyFormatError {
    #[error("prefix must be 1-16 characters of [a-z0-9], starting with a letter")]
    Prefix,
    #[error("environments must be 1-8 distinct names of [a-z]{{1,16}}")]
    Environments,
    #[error("body_length leaves {bits:.0} bits of randomness; at least 64 are needed and at most 128 characters are allowed")]
    BodyLength { bits: f64 },
}

impl KeyFormat {
    /// Builds a format, refusing ones that would make weak or ambiguous keys.
    pub fn new(
        prefix: &str,
        environments: &[String],
        alphabet: Alphabet,
        body_length: usize,
    ) -> Result<Self, KeyFormatError> {
        let prefix_ok = (1..=16).contains(&prefix.len())
            && prefix.as_bytes()[0].is_ascii_lowercase()
            && prefix
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
        if !prefix_ok {
            return Err(KeyFormatError::Prefix);
        }
        let mut seen = std::collections::BTreeSet::new();
        let envs_ok = (1..=8).contains(&environments.len())
            && environments.iter().all(|e| {
                (1..=16).contains(&e.len())
                    && e.bytes().all(|b| b.is_ascii_lowercase())
                    && seen.insert(e.as_str())
            });
        if !envs_ok {
            return Err(KeyFormatError::Environments);
        }
        let random = body_length.saturating_sub(alphabet.checksum_len());
        let bits = random as f64 * alphabet.bits_per_char();
        if bits < 64.0 || body_length > 128 {
            return Err(KeyFormatError::BodyLength { bits });
        }
        Ok(Self {
            prefix: prefix.to_string(),
            environments: environments.to_vec(),
            alphabet,
            body_length,
        })
    }

    /// The key prefix (`msgf`).
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The environments keys may be issued for, first is the default.
    pub fn environments(&self) -> &[String] {
        &self.environments
    }

    /// Whether `env` is one of this format's environments.
    pub fn has_environment(&self, env: &str) -> bool {
        self.environments.iter().any(|e| e == env)
    }

    /// Length of a whole key for `env`.
    fn key_len(&self, env: &str) -> usize {
        self.prefix.len() + 1 + env.len() + 1 + self.body_length
    }

    /// Generates a new key for `env` from the OS CSPRNG.
    pub fn generate(&self, env: &str) -> ApiKeySecret {
        debug_assert!(self.has_environment(env));
        let chars = self.alphabet.chars();
        let random_len = self.body_length - self.alphabet.checksum_len();
        let mut key = String::with_capacity(self.key_len(env));
        key.push_str(&self.prefix);
        key.push('_');
        key.push_str(env);
        key.push('_');
        let mut rng = rand::rngs::OsRng.unwrap_err();
        for _ in 0..random_len {
            key.push(chars[rng.random_range(0..chars.len())] as char);
        }
        let crc = crc32fast::hash(key.as_bytes());
        self.alphabet.encode_checksum(crc, &mut key);
        ApiKeySecret(key)
    }

    /// Strictly parses `input`: exact prefix, known environment, exact body
    /// length, alphabet, and checksum. Does no I/O.
    pub fn parse<'a>(&self, input: &'a str) -> Result<ParsedKey<'a>, KeyParseError> {
        if input.len() > MAX_KEY_LEN {
            return Err(KeyParseError::TooLong);
        }
        let rest = input
            .strip_prefix(self.prefix.as_str())
            .and_then(|r| r.strip_prefix('_'))
            .ok_or(KeyParseError::WrongPrefix)?;
        let (env, body) = rest
            .split_once('_')
            .ok_or(KeyParseError::UnknownEnvironment)?;
        if !self.has_environment(env) {
            return Err(KeyParseError::UnknownEnvironment);
        }
        if body.len() != self.body_length {
            return Err(KeyParseError::WrongLength {
                expected: self.body_length,
                got: body.len(),
            });
        }
        if !body.bytes().all(|b| self.alphabet.contains(b)) {
            return Err(KeyParseError::InvalidCharacter);
        }
        let split = input.len() - self.alphabet.checksum_len();
        let mut expected = String::with_capacity(8);
        self.alphabet
            .encode_checksum(crc32fast::hash(&input.as_bytes()[..split]), &mut expected);
        if expected.as_bytes() != &input.as_bytes()[split..] {
            return Err(KeyParseError::ChecksumMismatch);
        }
        Ok(ParsedKey {
            full: input,
            environment: env,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn envs() -> Vec<String> {
        vec!["live".into(), "test".into()]
    }

    fn msgflash() -> KeyFormat {
        KeyFormat::new("msgf", &envs(), Alphabet::Hex, 64).unwrap()
    }

    #[test]
    fn a_msgflash_key_is_prefix_env_and_64_lowercase_hex() {
        let key = msgflash().generate("live");
        let s = key.expose();
        assert_eq!(s.len(), "msgf_live_".len() + 64);
        assert!(s.starts_with("msgf_live_"));
        assert!(s["msgf_live_".len()..]
            .bytes()
            .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')));
        assert_eq!(msgflash().parse(s).unwrap().environment(), "live");
    }

    #[test]
    fn checksum_widths_fit_32_bits() {
        assert_eq!(Alphabet::Hex.checksum_len(), 8);
        assert_eq!(Alphabet::Base36.checksum_len(), 7);
        assert_eq!(Alphabet::Base62.checksum_len(), 6);
    }

    #[test]
    fn the_documented_example_key_is_malformed_because_its_checksum_is_wrong() {
        // The doc's example, assembled so no whole key literal sits in src/.
        let doc = format!(
            "msgf_live_{}",
            "a1b2c3d4e5f6a7b8c9d0e1f2a3b4c5d6e7f8a9b0c1d2e3f4a5b6c7d8e9f0a1b2"
        );
        assert_eq!(msgflash().parse(&doc), Err(KeyParseError::ChecksumMismatch));
    }

    #[test]
    fn strict_parser_refuses_each_kind_of_damage() {
        let f = msgflash();
        let key = f.generate("test");
        let s = key.expose();
        assert_eq!(f.parse(&s.to_uppercase()), Err(KeyParseError::WrongPrefix));
        assert_eq!(
            f.parse(&s.replace("_test_", "_prod_")),
            Err(KeyParseError::UnknownEnvironment)
        );
        assert!(matches!(
            f.parse(&s[..s.len() - 1]),
            Err(KeyParseError::WrongLength { .. })
        ));
        let mut upper = s.to_string();
        upper.replace_range(s.len() - 1.., "A");
        assert_eq!(f.parse(&upper), Err(KeyParseError::InvalidCharacter));
        assert_eq!(f.parse(&"x".repeat(300)), Err(KeyParseError::TooLong));
        assert_eq!(f.parse(""), Err(KeyParseError::WrongPrefix));
    }

    #[test]
    fn hint_shows_prefix_env_and_last_four_only() {
        let key = msgflash().generate("live");
        let hint = key.hint();
        assert!(hint.starts_with("msgf_live_…"));
        assert_eq!(hint.chars().count(), "msgf_live_…".chars().count() + 4);
        assert!(key.expose().ends_with(&hint[hint.len() - 4..]));
        assert_eq!(format!("{key:?}"), format!("ApiKeySecret({hint})"));
    }

    #[test]
    fn weak_formats_are_refused() {
        assert!(KeyFormat::new("ms", &envs(), Alphabet::Hex, 20).is_err());
        assert!(KeyFormat::new("Ms", &envs(), Alphabet::Hex, 64).is_err());
        assert!(KeyFormat::new("ms", &["li_ve".into()], Alphabet::Hex, 64).is_err());
        assert!(KeyFormat::new("ms", &envs(), Alphabet::Base36, 20).is_ok());
    }

    fn any_format() -> impl Strategy<Value = KeyFormat> {
        (
            prop_oneof![
                Just(Alphabet::Hex),
                Just(Alphabet::Base36),
                Just(Alphabet::Base62)
            ],
            24usize..100,
        )
            .prop_map(|(alphabet, len)| KeyFormat::new("tg", &envs(), alphabet, len).unwrap())
    }

    proptest! {
        #[test]
        fn every_generated_key_parses(format in any_format(), live in any::<bool>()) {
            let env = if live { "live" } else { "test" };
            let key = format.generate(env);
            prop_assert_eq!(format.parse(key.expose()).unwrap().environment(), env);
        }

        #[test]
        fn any_single_character_substitution_is_caught(
            format in any_format(),
            pos in any::<prop::sample::Index>(),
            replacement in any::<prop::sample::Index>(),
        ) {
            let key = format.generate("live");
            let s = key.expose();
            let body_start = "tg_live_".len();
            let i = body_start + pos.index(s.len() - body_start);
            let chars = format.alphabet.chars();
            let c = chars[replacement.index(chars.len())];
            prop_assume!(c != s.as_bytes()[i]);
            let mut damaged = s.as_bytes().to_vec();
            damaged[i] = c;
            let damaged = String::from_utf8(damaged).unwrap();
            prop_assert_eq!(format.parse(&damaged), Err(KeyParseError::ChecksumMismatch));
        }

        #[test]
        fn arbitrary_input_never_panics(input in parser_input()) {
            check_parse(&msgflash(), &input)?;
        }
    }

    /// One edit of a real key: which edit, where, and with what.
    #[derive(Debug, Clone)]
    enum Edit {
        Replace(prop::sample::Index, char),
        Insert(prop::sample::Index, char),
        Remove(prop::sample::Index),
        Truncate(prop::sample::Index),
        Append(String),
    }

    fn edit() -> impl Strategy<Value = Edit> {
        let index = any::<prop::sample::Index>;
        prop_oneof![
            (index(), key_char()).prop_map(|(i, c)| Edit::Replace(i, c)),
            (index(), key_char()).prop_map(|(i, c)| Edit::Insert(i, c)),
            index().prop_map(Edit::Remove),
            index().prop_map(Edit::Truncate),
            "\\PC{1,200}".prop_map(Edit::Append),
        ]
    }

    /// Characters a damaged key may hold: its alphabet, the separator,
    /// look-alikes from other alphabets, and multi-byte characters (two,
    /// three and four bytes of UTF-8).
    fn key_char() -> impl Strategy<Value = char> {
        prop_oneof![
            prop::sample::select(b"0123456789abcdef".map(char::from).to_vec()),
            prop::sample::select(vec!['_', 'A', 'F', 'g', 'z', 'Z', ' ', '\0', '-']),
            prop::sample::select(vec!['é', 'ß', 'Ω', '€', '０', 'ａ', '🔑', '\u{10FFFF}']),
            any::<char>(),
        ]
    }

    /// Applies `edits` to `key`, on character boundaries.
    fn damaged(key: &str, edits: &[Edit]) -> String {
        let mut chars: Vec<char> = key.chars().collect();
        for e in edits {
            match e {
                Edit::Replace(i, c) if !chars.is_empty() => {
                    let at = i.index(chars.len());
                    chars[at] = *c;
                }
                Edit::Insert(i, c) => chars.insert(i.index(chars.len() + 1), *c),
                Edit::Remove(i) if !chars.is_empty() => {
                    chars.remove(i.index(chars.len()));
                }
                Edit::Truncate(i) => chars.truncate(i.index(chars.len() + 1)),
                Edit::Append(tail) => chars.extend(tail.chars()),
                _ => {}
            }
        }
        chars.into_iter().collect()
    }

    /// Inputs that reach every branch of the parser, not only its first
    /// check: real keys with a few edits (substitutions, insertions,
    /// removals, truncation, anything appended, multi-byte characters
    /// included); the valid prefix followed by environments and bodies of
    /// every kind; and arbitrary text, multi-byte included.
    fn parser_input() -> impl Strategy<Value = String> {
        let env = prop_oneof![
            Just("live".to_string()),
            Just("test".to_string()),
            "[a-z]{0,6}",
            "\\PC{0,4}",
        ];
        let body = prop_oneof![
            "[0-9a-f]{64}",
            "[0-9a-f]{0,80}",
            "[0-9a-fA-F_]{64}",
            "[0-9a-f]{60}\\PC{1,4}",
            "\\PC{0,70}",
        ];
        prop_oneof![
            3 => (any::<bool>(), prop::collection::vec(edit(), 0..4)).prop_map(|(live, edits)| {
                let key = msgflash().generate(if live { "live" } else { "test" });
                damaged(key.expose(), &edits)
            }),
            3 => (env, body).prop_map(|(env, body)| format!("msgf_{env}_{body}")),
            1 => "\\PC{0,300}",
            1 => ".{0,300}",
        ]
    }

    /// Parses `input` with `format` and checks the answer is the right one
    /// for what the input is (a panic fails the property too).
    fn check_parse(
        format: &KeyFormat,
        input: &str,
    ) -> Result<Option<KeyParseError>, TestCaseError> {
        match format.parse(input) {
            Ok(parsed) => {
                prop_assert_eq!(parsed.expose(), input);
                prop_assert!(format.has_environment(parsed.environment()));
                prop_assert!(input.is_ascii());
                let split = input.len() - format.alphabet.checksum_len();
                let mut expected = String::new();
                let crc = crc32fast::hash(&input.as_bytes()[..split]);
                format.alphabet.encode_checksum(crc, &mut expected);
                prop_assert_eq!(&input[split..], expected.as_str());
                Ok(None)
            }
            Err(e) => {
                let shown = format!("{e} {e:?}");
                prop_assert!(input.len() < 8 || !shown.contains(input), "{}", shown);
                Ok(Some(e))
            }
        }
    }

    /// The generator is worth running: over a few thousand of its inputs
    /// every outcome of the parser occurs, so every check is exercised.
    #[test]
    fn the_property_inputs_reach_every_branch_of_the_parser() {
        use proptest::test_runner::{Config, TestRunner};
        let format = msgflash();
        let seen = std::cell::RefCell::new(std::collections::BTreeMap::new());
        let mut runner = TestRunner::new(Config {
            cases: 4096,
            ..Config::default()
        });
        let outcome = |e: &Option<KeyParseError>| match e {
            None => "ok",
            Some(KeyParseError::TooLong) => "too long",
            Some(KeyParseError::WrongPrefix) => "wrong prefix",
            Some(KeyParseError::UnknownEnvironment) => "unknown environment",
            Some(KeyParseError::WrongLength { .. }) => "wrong length",
            Some(KeyParseError::InvalidCharacter) => "invalid character",
            Some(KeyParseError::ChecksumMismatch) => "checksum mismatch",
        };
        let multi_byte = std::cell::Cell::new(0);
        runner
            .run(&parser_input(), |input| {
                let e = check_parse(&format, &input)?;
                *seen.borrow_mut().entry(outcome(&e)).or_insert(0) += 1;
                if !input.is_ascii() && e != Some(KeyParseError::WrongPrefix) {
                    multi_byte.set(multi_byte.get() + 1);
                }
                Ok(())
            })
            .unwrap();
        for branch in [
            "ok",
            "too long",
            "wrong prefix",
            "unknown environment",
            "wrong length",
            "invalid character",
            "checksum mismatch",
        ] {
            let seen = seen.borrow();
            assert!(
                seen.get(branch).copied().unwrap_or(0) >= 20,
                "{branch}: {seen:?}"
            );
        }
        assert!(
            multi_byte.get() >= 20,
            "multi-byte input past the prefix: {seen:?}"
        );
    }
}
