//! Plain domain data: keys, tenants, plans, principals and decisions.
//! No sqlx, no prost, no tonic.

pub mod audit;
pub mod console;
pub mod decision;
pub mod identity;
pub mod key;
pub mod key_digest;
pub mod labels;
pub mod legacy;
pub mod limit;
pub mod ratelimit;
pub mod record;
pub mod revocation;
pub mod tenant;
pub mod usage;
pub mod validate;

pub use decision::{CredentialType, Decision, LimitStatus, Principal, Reason, Verdict};
pub use key::{Alphabet, ApiKeySecret, KeyFormat, KeyParseError, ParsedKey};
pub use key_digest::KeyDigest;
pub use labels::KeyLabels;
pub use limit::{LimitPeriod, LimitScope, LimitSpec};
pub use record::{KeyId, KeyRecord, KeyUpdate, NewKey};
pub use tenant::{SubscriptionStatus, Tenant, TenantId, TenantOverrides, TenantUpdate, UsageCarry};
pub use validate::{FieldViolation, Violations};
