//! The trust model (README.md, Security model), written down once: who may be calling
//! ([`Caller`]), every RPC Tollgate serves ([`Rpc`]), and the one rule for
//! each ([`Rpc::rule`]). The gRPC layer identifies the caller and asks
//! [`admit`] once at the top of every handler; the tenant checks that need
//! the store are [`Access`]. No tonic.
//!
//! Refusals: an unidentified caller where one is needed is
//! `Unauthenticated`; an identified caller of the wrong kind or role is
//! `PermissionDenied`; another tenant's object is `NotFound`, exactly like a
//! missing one (so ids cannot be probed). Nothing changes on a refusal.

use std::sync::Arc;

use crate::domain::console::{AuditContext, Role, UserId};
use crate::domain::{KeyId, SubscriptionStatus, TenantId};
use crate::error::{Error, Result};
use crate::store::{KeyRef, Store};

/// Who is calling, as identified from the call's metadata.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    /// No credential of its own: at most the credential inside the request
    /// (Authenticate, CheckQuota by `api_key`, Envoy Check) speaks.
    Anonymous,
    /// A configured gateway identity (`gateway_token`): may ask for quota
    /// and usage of any tenant or key, nothing else.
    Gateway,
    /// The console's backend (`console_backend_token`): may name the end
    /// user's address on Login, nothing else.
    ConsoleBackend,
    /// A console user, from Tollgate's own console access token.
    Console {
        tenant_id: TenantId,
        role: Role,
        user_id: UserId,
    },
    /// Holder of the operator token.
    Operator,
}

/// What a console user's role must allow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Need {
    /// Read the tenant's keys, usage, tenant record: every role.
    Read,
    /// Create, rotate, update, revoke keys; rename the tenant: owners, admins.
    ManageKeys,
    /// Add and list users: owners, admins.
    ManageUsers,
    /// Read the audit log: owners, admins.
    ReadAudit,
    /// See which keys the revocation policy would revoke: owners, admins.
    ReviewRevocations,
}

/// Whether a call needs no caller identity.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Anyone {
    /// An identified caller is required.
    No,
    /// Open to anyone (the request carries its own proof, or the call is
    /// public by nature).
    Yes,
    /// Open when the request carries the credential it asks about (CheckQuota
    /// by `api_key`); otherwise an identified caller is required.
    WithOwnCredential,
}

/// Who may make one RPC.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rule {
    pub anyone: Anyone,
    pub gateway: bool,
    pub console_backend: bool,
    /// Console users whose role allows this, inside their own tenant;
    /// `None`: never.
    pub console: Option<Need>,
    pub operator: bool,
}

const OPEN: Rule = Rule {
    anyone: Anyone::Yes,
    gateway: true,
    console_backend: true,
    console: Some(Need::Read),
    operator: true,
};

const fn tenant(need: Need) -> Rule {
    Rule {
        anyone: Anyone::No,
        gateway: false,
        console_backend: false,
        console: Some(need),
        operator: true,
    }
}

const OPERATOR: Rule = Rule {
    anyone: Anyone::No,
    gateway: false,
    console_backend: false,
    console: None,
    operator: true,
};

macro_rules! rpcs {
    ($($name:ident => $path:literal,)*) => {
        /// Every RPC Tollgate serves, on every service.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum Rpc { $($name,)* }

        impl Rpc {
            /// Every RPC, in table order.
            pub const ALL: &'static [Rpc] = &[$(Rpc::$name,)*];

            /// Its gRPC path, `/package.Service/Method`.
            pub const fn path(self) -> &'static str {
                match self { $(Rpc::$name => $path,)* }
            }

            /// The RPC at a gRPC path (one `match`: cheap on the hot path).
            pub fn from_path(path: &str) -> Option<Rpc> {
                match path {
                    $($path => Some(Rpc::$name),)*
                    _ => None,
                }
            }
        }
    };
}

rpcs! {
    Authenticate => "/tollgate.v1.AuthService/Authenticate",
    CheckQuota => "/tollgate.v1.AuthService/CheckQuota",
    GetUsage => "/tollgate.v1.AuthService/GetUsage",
    CreateKey => "/tollgate.v1.AuthService/CreateKey",
    RevokeKey => "/tollgate.v1.AuthService/RevokeKey",
    GetKey => "/tollgate.v1.AuthService/GetKey",
    ListKeys => "/tollgate.v1.AuthService/ListKeys",
    RotateKey => "/tollgate.v1.AuthService/RotateKey",
    UpdateKey => "/tollgate.v1.AuthService/UpdateKey",
    CreateTenant => "/tollgate.v1.TenantService/CreateTenant",
    GetTenant => "/tollgate.v1.TenantService/GetTenant",
    UpdateTenant => "/tollgate.v1.TenantService/UpdateTenant",
    ListTenants => "/tollgate.v1.TenantService/ListTenants",
    SignUp => "/tollgate.v1.ConsoleService/SignUp",
    Login => "/tollgate.v1.ConsoleService/Login",
    Refresh => "/tollgate.v1.ConsoleService/Refresh",
    Logout => "/tollgate.v1.ConsoleService/Logout",
    RequestEmailVerification => "/tollgate.v1.ConsoleService/RequestEmailVerification",
    VerifyEmail => "/tollgate.v1.ConsoleService/VerifyEmail",
    RequestPasswordReset => "/tollgate.v1.ConsoleService/RequestPasswordReset",
    ResetPassword => "/tollgate.v1.ConsoleService/ResetPassword",
    GetJwks => "/tollgate.v1.ConsoleService/GetJwks",
    CreateUser => "/tollgate.v1.ConsoleService/CreateUser",
    ListUsers => "/tollgate.v1.ConsoleService/ListUsers",
    UpdateUser => "/tollgate.v1.ConsoleService/UpdateUser",
    DeleteUser => "/tollgate.v1.ConsoleService/DeleteUser",
    ListAuditEvents => "/tollgate.v1.ConsoleService/ListAuditEvents",
    SignInWithProvider => "/tollgate.v1.ConsoleService/SignInWithProvider",
    EnvoyCheck => "/envoy.service.auth.v3.Authorization/Check",
    HealthCheck => "/grpc.health.v1.Health/Check",
    HealthWatch => "/grpc.health.v1.Health/Watch",
    Reflection => "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
    ReflectionAlpha => "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
    ImportKeys => "/tollgate.v1.AuthService/ImportKeys",
    ShouldRateLimit => "/envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit",
    ListPolicyRevocations => "/tollgate.v1.RevocationService/ListPolicyRevocations",
    SetRevocationPolicy => "/tollgate.v1.RevocationService/SetRevocationPolicy",
    ReportLeakedKeys => "/tollgate.v1.RevocationService/ReportLeakedKeys",
}

impl Rpc {
    /// The decision path: never queued behind management work.
    pub const fn is_decision(self) -> bool {
        matches!(
            self,
            Rpc::Authenticate
                | Rpc::CheckQuota
                | Rpc::EnvoyCheck
                | Rpc::HealthCheck
                | Rpc::HealthWatch
                | Rpc::ShouldRateLimit
        )
    }

    /// The rule: the trust model's table.
    pub const fn rule(self) -> Rule {
        use Rpc::*;
        match self {
            // The credential in the request proves itself; denials are answers.
            Authenticate | EnvoyCheck => OPEN,
            // Probing or spending a tenant's or key's quota by id needs a
            // caller that may: the gateway, the tenant's users, the operator.
            CheckQuota => Rule {
                anyone: Anyone::WithOwnCredential,
                gateway: true,
                console_backend: false,
                console: Some(Need::Read),
                operator: true,
            },
            GetUsage => Rule {
                anyone: Anyone::No,
                gateway: true,
                console_backend: false,
                console: Some(Need::Read),
                operator: true,
            },
            GetKey | ListKeys | GetTenant => tenant(Need::Read),
            CreateKey | RevokeKey | RotateKey | UpdateKey => tenant(Need::ManageKeys),
            // Console users may only rename their tenant (checked by the call).
            UpdateTenant => tenant(Need::ManageKeys),
            CreateTenant | ListTenants => OPERATOR,
            // The console's public flows: each proves itself with a password
            // or a token. Login trusts `client_address` only from the
            // console backend.
            SignUp
            | Login
            | Refresh
            | Logout
            | RequestEmailVerification
            | VerifyEmail
            | RequestPasswordReset
            | ResetPassword
            | GetJwks
            | SignInWithProvider => OPEN,
            // Only owners touch or make owners (checked by the call).
            CreateUser | ListUsers | UpdateUser | DeleteUser => tenant(Need::ManageUsers),
            ListAuditEvents => tenant(Need::ReadAudit),
            HealthCheck | HealthWatch | Reflection | ReflectionAlpha => OPEN,
            // Cut-over: keys of any tenant, in bulk, bypassing the key cap.
            ImportKeys => OPERATOR,
            // Envoy's rate-limit service: like ext_authz for descriptors that
            // speak for themselves (a credential; one no limit matches); a
            // tenant or key named by id, or a profile descriptor (values the
            // gateway vouches for), spends others' limits, so, as for
            // CheckQuota by id, only the gateway or the operator may.
            ShouldRateLimit => Rule {
                anyone: Anyone::WithOwnCredential,
                gateway: true,
                console_backend: false,
                console: None,
                operator: true,
            },
            // The dry run shows which keys a policy revokes: the tenant's
            // owners and admins (as for the audit log), read-only.
            ListPolicyRevocations => tenant(Need::ReviewRevocations),
            // A policy is the product's and the operator's; a leak report
            // names keys of any tenant.
            SetRevocationPolicy | ReportLeakedKeys => OPERATOR,
        }
    }
}

fn denied(why: &str) -> Error {
    Error::PermissionDenied(why.to_string())
}

/// Whether `caller` may make `rpc` (`own_credential`: the request carries
/// the credential it asks about). Tenant checks come after, in [`Access`].
pub fn admit(rpc: Rpc, caller: &Caller, own_credential: bool) -> Result<()> {
    let rule = rpc.rule();
    match rule.anyone {
        Anyone::Yes => return Ok(()),
        Anyone::WithOwnCredential if own_credential => return Ok(()),
        _ => {}
    }
    match caller {
        Caller::Anonymous => Err(Error::Unauthenticated),
        Caller::Operator if rule.operator => Ok(()),
        Caller::Gateway if rule.gateway => Ok(()),
        Caller::ConsoleBackend if rule.console_backend => Ok(()),
        Caller::Console { role, .. } => match rule.console {
            None => Err(denied("this call is for the operator only")),
            Some(need) => role_allows(*role, need),
        },
        Caller::Operator | Caller::Gateway | Caller::ConsoleBackend => {
            Err(denied("this credential may not make this call"))
        }
    }
}

fn role_allows(role: Role, need: Need) -> Result<()> {
    match need {
        Need::Read => Ok(()),
        _ if role.manages() => Ok(()),
        Need::ManageKeys => Err(denied("only owners and admins manage keys")),
        Need::ManageUsers => Err(denied("only owners and admins manage users")),
        Need::ReadAudit => Err(denied("only owners and admins read the audit log")),
        Need::ReviewRevocations => Err(denied(
            "only owners and admins review the revocation policy",
        )),
    }
}

/// Subscription states in which console users may change things: other
/// states (past due, canceled, suspended) leave the console read-only
/// until billing is sorted out. The operator is never paused.
fn console_may_write(status: SubscriptionStatus) -> bool {
    matches!(
        status,
        SubscriptionStatus::Active | SubscriptionStatus::Trialing
    )
}

impl Caller {
    /// The tenant a call may touch, given the `tenant_id` it names (empty:
    /// none). The operator and the gateway get what they asked; a console
    /// user gets their own tenant, and another one is `NotFound` like a
    /// missing one.
    pub fn tenant_scope(&self, requested: &str) -> Result<String> {
        match self {
            Caller::Operator | Caller::Gateway => Ok(requested.to_string()),
            Caller::Console { tenant_id, .. } => {
                if requested.is_empty() || requested == tenant_id.as_str() {
                    Ok(tenant_id.to_string())
                } else {
                    Err(Error::NotFound("tenant"))
                }
            }
            Caller::Anonymous | Caller::ConsoleBackend => {
                Err(denied("this credential may not name a tenant"))
            }
        }
    }

    /// Whether the caller may give a user `role` (only owners make owners).
    pub fn may_grant(&self, role: Role) -> Result<()> {
        match self {
            Caller::Console { role: mine, .. } if role == Role::Owner && *mine != Role::Owner => {
                Err(denied("only owners add owners"))
            }
            _ => Ok(()),
        }
    }

    /// Whether this is a console user (whose reach is narrower).
    pub fn is_console_user(&self) -> bool {
        matches!(self, Caller::Console { .. })
    }

    /// The audit context of this caller's changes.
    pub fn audit(&self, request_id: &str) -> AuditContext {
        AuditContext {
            actor: match self {
                Caller::Operator => "operator".into(),
                Caller::Gateway => "gateway".into(),
                Caller::ConsoleBackend => "console-backend".into(),
                Caller::Anonymous => "anonymous".into(),
                Caller::Console { user_id, .. } => format!("user:{user_id}"),
            },
            request_id: request_id.to_string(),
        }
    }
}

/// Tenant checks that need the store: a key named by id must belong to
/// the caller's tenant, and console writes wait for an active subscription.
pub struct Access {
    store: Arc<dyn Store>,
}

impl Access {
    /// Checks against `store`.
    pub fn new(store: Arc<dyn Store>) -> Self {
        Self { store }
    }

    /// For `rpc` on the tenant `requested` names: the tenant scope to pass
    /// down (see [`Caller::tenant_scope`]); a console write also needs the
    /// tenant's subscription in good standing.
    pub async fn tenant(&self, rpc: Rpc, caller: &Caller, requested: &str) -> Result<String> {
        let scope = caller.tenant_scope(requested)?;
        self.writable(rpc, caller).await?;
        Ok(scope)
    }

    /// For `rpc` on key `key_id` (with the optional `tenant_id` it names):
    /// the tenant scope to pass down. A console user's scope is their own
    /// tenant; a key of another tenant is `NotFound`, like a missing one.
    pub async fn key(
        &self,
        rpc: Rpc,
        caller: &Caller,
        key_id: &str,
        requested_tenant: &str,
    ) -> Result<String> {
        let scope = caller.tenant_scope(requested_tenant)?;
        if let Caller::Console { tenant_id, .. } = caller {
            // A malformed id is reported by the call itself.
            if let Ok(id) = KeyId::parse_str(key_id) {
                let owner = self
                    .store
                    .get_key(KeyRef { id, tenant: None })
                    .await?
                    .map(|k| k.tenant_id);
                if owner.is_some_and(|t| &t != tenant_id) {
                    return Err(Error::NotFound("key"));
                }
            }
        }
        self.writable(rpc, caller).await?;
        Ok(scope)
    }

    /// A console user's write needs the tenant's subscription active.
    async fn writable(&self, rpc: Rpc, caller: &Caller) -> Result<()> {
        let Caller::Console { tenant_id, .. } = caller else {
            return Ok(());
        };
        if !matches!(rpc.rule().console, Some(Need::ManageKeys)) {
            return Ok(());
        }
        let tenant = self
            .store
            .get_tenant(tenant_id)
            .await?
            .ok_or(Error::NotFound("tenant"))?;
        if console_may_write(tenant.status) {
            Ok(())
        } else {
            Err(Error::FailedPrecondition(format!(
                "the tenant's subscription is {}: the console is read-only until it is active",
                tenant.status.as_str()
            )))
        }
    }
}

/// The forward-auth listener (`[forward_auth]`: NGINX `auth_request`,
/// Traefik ForwardAuth) is a gateway surface, not an RPC: only the gateway
/// should reach it. Network policy is the first guard (the chart's
/// NetworkPolicy, or a port only the gateway's network can reach); on top
/// of it, mTLS (`[forward_auth.tls] client_ca_file`: no certificate, no
/// connection) and/or a shared secret the gateway sends in
/// `x-tollgate-gateway-secret` (`gateway_secret_file`). With a secret
/// configured only [`Caller::Gateway`] (the secret proved) is admitted;
/// without one, anyone who reaches the port, since the credential in the
/// request proves itself as on `EnvoyCheck`. Health paths stay open, like
/// the gRPC health service.
pub fn admit_forward_auth(caller: &Caller, gateway_secret_required: bool) -> Result<()> {
    match caller {
        Caller::Gateway => Ok(()),
        Caller::Anonymous if !gateway_secret_required => Ok(()),
        Caller::Anonymous => Err(Error::Unauthenticated),
        _ => Err(denied("only the gateway calls the forward-auth listener")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(role: Role) -> Caller {
        Caller::Console {
            tenant_id: TenantId::parse("a").unwrap(),
            role,
            user_id: uuid::Uuid::nil(),
        }
    }

    #[test]
    fn console_users_stay_in_their_tenant_and_role() {
        let viewer = user(Role::Viewer);
        assert_eq!(viewer.tenant_scope("").unwrap(), "a");
        assert_eq!(viewer.tenant_scope("a").unwrap(), "a");
        assert!(matches!(
            viewer.tenant_scope("b"),
            Err(Error::NotFound("tenant"))
        ));
        assert!(admit(Rpc::CreateKey, &viewer, false).is_err());
        assert!(admit(Rpc::CreateKey, &user(Role::Developer), false).is_err());
        assert!(admit(Rpc::CreateKey, &user(Role::Admin), false).is_ok());
        assert!(admit(Rpc::ListTenants, &user(Role::Owner), false).is_err());
        assert!(user(Role::Admin).may_grant(Role::Owner).is_err());
        assert!(user(Role::Owner).may_grant(Role::Owner).is_ok());
        assert_eq!(Caller::Operator.tenant_scope("b").unwrap(), "b");
        assert_eq!(Caller::Operator.audit("r").actor, "operator");
    }

    #[test]
    fn every_rpc_has_one_path_and_narrow_callers_stay_narrow() {
        for rpc in Rpc::ALL {
            assert_eq!(Rpc::from_path(rpc.path()), Some(*rpc));
        }
        for rpc in Rpc::ALL.iter().filter(|r| r.rule().anyone != Anyone::Yes) {
            assert!(matches!(
                admit(*rpc, &Caller::Anonymous, false),
                Err(Error::Unauthenticated)
            ));
            assert!(
                admit(*rpc, &Caller::ConsoleBackend, false).is_err(),
                "{rpc:?}"
            );
        }
        assert!(admit(Rpc::CheckQuota, &Caller::Anonymous, true).is_ok());
        assert!(admit(Rpc::CheckQuota, &Caller::Gateway, false).is_ok());
        assert!(admit(Rpc::GetUsage, &Caller::Gateway, false).is_ok());
        assert!(admit(Rpc::GetKey, &Caller::Gateway, false).is_err());
        assert!(admit(Rpc::ShouldRateLimit, &Caller::Anonymous, true).is_ok());
        assert!(admit(Rpc::ShouldRateLimit, &Caller::Gateway, false).is_ok());
        assert!(admit(Rpc::ShouldRateLimit, &Caller::Operator, false).is_ok());
        assert!(admit(Rpc::ShouldRateLimit, &user(Role::Owner), false).is_err());
        assert!(console_may_write(SubscriptionStatus::Trialing));
        assert!(!console_may_write(SubscriptionStatus::PastDue));
    }

    #[test]
    fn the_forward_auth_listener_admits_only_the_gateway_once_a_secret_is_set() {
        assert!(admit_forward_auth(&Caller::Gateway, true).is_ok());
        assert!(matches!(
            admit_forward_auth(&Caller::Anonymous, true),
            Err(Error::Unauthenticated)
        ));
        for other in [Caller::Operator, Caller::ConsoleBackend, user(Role::Owner)] {
            assert!(admit_forward_auth(&other, true).is_err(), "{other:?}");
            assert!(admit_forward_auth(&other, false).is_err(), "{other:?}");
        }
        // Without a secret, network policy (and mTLS) decide who reaches it.
        assert!(admit_forward_auth(&Caller::Anonymous, false).is_ok());
        assert!(admit_forward_auth(&Caller::Gateway, false).is_ok());
    }

    #[test]
    fn revocation_policies_are_reviewed_by_admins_and_set_and_fed_by_the_operator() {
        let dry = Rpc::ListPolicyRevocations;
        assert!(matches!(
            admit(dry, &Caller::Anonymous, false),
            Err(Error::Unauthenticated)
        ));
        assert!(admit(dry, &Caller::Gateway, false).is_err());
        assert!(admit(dry, &Caller::ConsoleBackend, false).is_err());
        assert!(admit(dry, &user(Role::Viewer), false).is_err());
        assert!(admit(dry, &user(Role::Developer), false).is_err());
        assert!(admit(dry, &user(Role::Admin), false).is_ok());
        assert!(admit(dry, &user(Role::Owner), false).is_ok());
        assert!(admit(dry, &Caller::Operator, false).is_ok());
        // A console admin sees their own tenant only.
        assert!(matches!(
            user(Role::Admin).tenant_scope("b"),
            Err(Error::NotFound("tenant"))
        ));
        for rpc in [Rpc::SetRevocationPolicy, Rpc::ReportLeakedKeys] {
            assert!(matches!(
                admit(rpc, &Caller::Anonymous, false),
                Err(Error::Unauthenticated)
            ));
            assert!(admit(rpc, &Caller::Gateway, false).is_err());
            assert!(admit(rpc, &Caller::ConsoleBackend, false).is_err());
            assert!(admit(rpc, &user(Role::Owner), false).is_err(), "{rpc:?}");
            assert!(admit(rpc, &Caller::Operator, false).is_ok());
        }
    }
}
