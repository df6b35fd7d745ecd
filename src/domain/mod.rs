//! Plain domain data: keys, tenants, plans, principals and decisions.
//! No sqlx, no prost, no tonic.

pub mod audit;
pub mod console;
pub mod decision;
pub mod key;
pub mod limit;
pub mod record;
pub mod revocation;
pub mod tenant;
pub mod validate;

pub use decision::{CredentialType, Decision, LimitStatus, Principal, Reason, Verdict};
pub use key::{Alphabet, ApiKeySecret, KeyFormat, KeyParseError, ParsedKey};
pub use limit::{LimitPeriod, LimitScope, LimitSpec};
pub use record::{KeyId, KeyRecord, KeyUpdate, NewKey};
pub use tenant::{SubscriptionStatus, Tenant, TenantId, TenantOverrides, TenantUpdate, UsageCarry};
pub use validate::{FieldViolation, Violations};
