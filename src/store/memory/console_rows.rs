//! The console's rows kept by [`MemoryStore`](super::MemoryStore): users,
//! the email index and tokens, with the rules on them that need no other
//! table. The `ConsoleStore` impl over them is `console_memory.rs`.

use std::collections::{BTreeMap, HashMap};

use chrono::{DateTime, Utc};

use crate::domain::console::{ConsoleUser, Email, NewToken, Role, TokenKind, UserId};
use crate::domain::TenantId;
use crate::store::console::{TokenUse, LAST_OWNER, ROLE_MOVED};
use crate::store::StoreError;

pub(in crate::store) struct StoredToken {
    pub(in crate::store) token: NewToken,
    pub(in crate::store) used_at: Option<DateTime<Utc>>,
}

/// Console rows kept by [`MemoryStore`].
#[derive(Default)]
pub(in crate::store) struct ConsoleState {
    pub(in crate::store) users: BTreeMap<UserId, ConsoleUser>,
    pub(in crate::store) by_email: HashMap<Email, UserId>,
    pub(in crate::store) tokens: HashMap<[u8; 32], StoredToken>,
    /// Provider identities: (issuer, subject) → user.
    pub(in crate::store) identities: HashMap<(String, String), UserId>,
}

impl ConsoleState {
    pub(in crate::store) fn add_user(&mut self, user: ConsoleUser, verification: NewToken) {
        self.by_email.insert(user.email.clone(), user.id);
        self.users.insert(user.id, user);
        self.add_token(verification);
    }

    /// Stores a token; a verification or reset token voids the older ones.
    pub(in crate::store) fn add_token(&mut self, token: NewToken) {
        if matches!(
            token.kind,
            TokenKind::EmailVerification | TokenKind::PasswordReset
        ) {
            for t in self.tokens.values_mut() {
                if t.token.user_id == token.user_id && t.token.kind == token.kind {
                    t.used_at.get_or_insert(token.created_at);
                }
            }
        }
        self.tokens.insert(
            token.digest,
            StoredToken {
                token,
                used_at: None,
            },
        );
    }

    pub(in crate::store) fn end_everything(&mut self, user: UserId, now: DateTime<Utc>) {
        for t in self.tokens.values_mut() {
            if t.token.user_id == user {
                t.used_at.get_or_insert(now);
            }
        }
    }

    /// `user` of `tenant`, still with `expected_role`.
    pub(in crate::store) fn tenant_user(
        &self,
        tenant: &TenantId,
        user: UserId,
        expected_role: Role,
    ) -> Result<ConsoleUser, StoreError> {
        let found = self
            .users
            .get(&user)
            .filter(|u| &u.tenant_id == tenant)
            .ok_or(StoreError::NotFound)?;
        if found.role != expected_role {
            return Err(StoreError::Precondition(ROLE_MOVED));
        }
        Ok(found.clone())
    }

    /// Whether `tenant` keeps an enabled owner once `user` is `replaced`.
    pub(in crate::store) fn keeps_an_owner(
        &self,
        tenant: &TenantId,
        user: UserId,
        replaced: Option<&ConsoleUser>,
    ) -> Result<(), StoreError> {
        let owner = |u: &ConsoleUser| u.role == Role::Owner && u.disabled_at.is_none();
        let others = self
            .users
            .values()
            .any(|u| &u.tenant_id == tenant && u.id != user && owner(u));
        if others || replaced.is_some_and(owner) {
            Ok(())
        } else {
            Err(StoreError::Precondition(LAST_OWNER))
        }
    }

    pub(in crate::store) fn spend(
        &mut self,
        digest: &[u8; 32],
        kind: TokenKind,
        now: DateTime<Utc>,
    ) -> TokenUse {
        let Some(t) = self.tokens.get_mut(digest).filter(|t| t.token.kind == kind) else {
            return TokenUse::Unknown;
        };
        if t.used_at.is_some() {
            if let Some(family) = t.token.family {
                for other in self.tokens.values_mut() {
                    if other.token.family == Some(family) {
                        other.used_at.get_or_insert(now);
                    }
                }
            }
            return TokenUse::Replayed;
        }
        if t.token.expires_at <= now {
            return TokenUse::Unknown;
        }
        let (user_id, family, expires_at) = (t.token.user_id, t.token.family, t.token.expires_at);
        match self.users.get(&user_id).filter(|u| u.disabled_at.is_none()) {
            Some(user) => {
                t.used_at = Some(now);
                TokenUse::Spent {
                    user: user.clone(),
                    family,
                    expires_at,
                }
            }
            None => TokenUse::Unknown,
        }
    }
}
