//! What the console sends to an address, out of band: email-verification
//! and password-reset tokens (and notices to an existing account), and the
//! calls that spend those tokens. Callers are told nothing either way.

use secrecy::{ExposeSecret, SecretString};

use super::delivery::{Message, MessageKind};
use super::throttle::MailThrottle;
use super::{parse_email, Console, BAD_TOKEN, RESET_TTL_SECS, VERIFICATION_TTL_SECS};
use crate::crypto::opaque::{presented, OpaqueToken};
use crate::domain::console::{check_password, ConsoleUser, Email, NewToken, TokenKind};
use crate::domain::Violations;
use crate::error::{Error, Result};
use crate::store::console::TokenUse;

impl Console {
    /// Sends a token to `user`'s address.
    pub(super) fn deliver(
        &self,
        kind: MessageKind,
        user: &ConsoleUser,
        token: OpaqueToken,
        row: &NewToken,
    ) {
        self.delivery.send(Message {
            kind,
            email: user.email.clone(),
            token: Some(token),
            expires_at: Some(row.expires_at),
            tenant_id: user.tenant_id.clone(),
        });
    }

    /// Whether `email` has an account; if so, its holder is told that
    /// someone tried to create another one (the caller learns nothing).
    pub(super) async fn notify_if_taken(&self, email: &Email) -> Result<bool> {
        let Some(user) = self.store.user_by_email(email).await? else {
            return Ok(false);
        };
        tracing::info!(user_id = %user.id, "account creation for a taken address; owner notified");
        self.delivery.send(Message {
            kind: MessageKind::AccountExists,
            email: user.email.clone(),
            token: None,
            expires_at: None,
            tenant_id: user.tenant_id.clone(),
        });
        Ok(true)
    }

    pub(super) fn reserve_mail(&self, throttle: &MailThrottle, address: &str) -> Result<()> {
        throttle
            .reserve(address, self.clock.now())
            .map_err(|retry_after_seconds| Error::TooManyAttempts {
                retry_after_seconds,
            })
    }

    /// Sends a new email-verification token to an unverified account
    /// (voiding its older ones). The caller is told nothing either way.
    pub async fn request_email_verification(&self, email: &str, address: &str) -> Result<()> {
        let Some(user) = self.mail_recipient(email, address).await? else {
            return Ok(());
        };
        if user.email_verified_at.is_some() {
            return Ok(());
        }
        let (token, row) =
            self.new_token(TokenKind::EmailVerification, &user, VERIFICATION_TTL_SECS);
        self.store.insert_token(row.clone()).await?;
        self.deliver(MessageKind::EmailVerification, &user, token, &row);
        Ok(())
    }

    /// For the calls that send a token: the enabled account of `email`,
    /// after the throttles (per client and per email address) and only
    /// when a delivery is configured (else nothing is stored or sent).
    async fn mail_recipient(&self, email: &str, address: &str) -> Result<Option<ConsoleUser>> {
        let mut v = Violations::default();
        let email = parse_email(email, &mut v);
        v.into_result()?;
        let email = email.expect("validated");
        self.reserve_mail(&self.mail, address)?;
        self.reserve_mail(&self.mail_per_account, email.as_str())?;
        if !self.delivery.delivers() {
            return Ok(None);
        }
        let user = self.store.user_by_email(&email).await?;
        Ok(user.filter(|u| u.disabled_at.is_none()))
    }

    /// Spends an email-verification token.
    pub async fn verify_email(&self, token: &str) -> Result<ConsoleUser> {
        let digest = presented(TokenKind::EmailVerification, token)
            .ok_or_else(|| Error::invalid("token", BAD_TOKEN))?;
        match self.store.verify_email(&digest, self.clock.now()).await? {
            TokenUse::Spent { user, .. } => Ok(user),
            _ => Err(Error::invalid("token", BAD_TOKEN)),
        }
    }

    /// Sends a password-reset token to an existing account (voiding its
    /// older ones). The caller is told nothing either way.
    pub async fn request_password_reset(&self, email: &str, address: &str) -> Result<()> {
        let Some(user) = self.mail_recipient(email, address).await? else {
            return Ok(());
        };
        let (token, row) = self.new_token(TokenKind::PasswordReset, &user, RESET_TTL_SECS);
        self.store.insert_token(row.clone()).await?;
        tracing::info!(user_id = %user.id, "password reset requested");
        self.deliver(MessageKind::PasswordReset, &user, token, &row);
        Ok(())
    }

    /// Sets a new password with a reset token and ends every session. The
    /// token is checked before any hashing, and a weak password is refused
    /// before the token is spent.
    pub async fn reset_password(
        &self,
        token: &str,
        new_password: SecretString,
        request_id: &str,
    ) -> Result<()> {
        let mut v = Violations::default();
        let digest = presented(TokenKind::PasswordReset, token);
        if digest.is_none() {
            v.add("token", BAD_TOKEN);
        }
        check_password("new_password", new_password.expose_secret(), &mut v);
        v.into_result()?;
        let digest = digest.expect("validated");
        let now = self.clock.now();
        if !self
            .store
            .token_is_live(&digest, TokenKind::PasswordReset, now)
            .await?
        {
            return Err(Error::invalid("token", BAD_TOKEN));
        }
        let hash = self.hash(new_password).await?;
        match self
            .store
            .reset_password(&digest, &hash, self.clock.now(), request_id)
            .await?
        {
            TokenUse::Spent { user, .. } => {
                tracing::info!(tenant_id = %user.tenant_id, user_id = %user.id, "password reset");
                Ok(())
            }
            _ => Err(Error::invalid("token", BAD_TOKEN)),
        }
    }
}
