//! The user a task acts for: a verified user ID token from a users' issuer
//! (single-use, addressed to this broker or the agent, bounding the task's
//! life), or a user an agent allowed to assert names.

use super::Broker;
use super::sessions::{OAuthError, TokenRequest, federation_error};
use crate::model::{Agent, UserContext};

/// The user a new task acts for, and the user token that vouched (if any).
pub(crate) struct VerifiedUser {
    pub(crate) context: UserContext,
    pub(crate) token: Option<UserTokenUse>,
}

/// A user token spent by opening a task: recorded with the task so it
/// cannot open another, and the task ends when it expires.
#[derive(Debug, Clone)]
pub(crate) struct UserTokenUse {
    pub(crate) issuer: String,
    pub(crate) jti: String,
    pub(crate) exp: i64,
}

impl Broker {
    /// The user a new task acts for: a verified `user_token` from a users'
    /// issuer, or an `on_behalf_of` id from an agent allowed to assert users.
    pub(crate) async fn user_context(
        &self,
        agent: &Agent,
        req: &TokenRequest,
    ) -> Result<Option<VerifiedUser>, OAuthError> {
        let token = req.user_token.as_deref().filter(|s| !s.is_empty());
        let asserted = req
            .on_behalf_of
            .as_deref()
            .map(str::trim)
            .filter(|s| !s.is_empty());
        match (token, asserted) {
            (None, None) => Ok(None),
            (Some(_), Some(_)) => Err(OAuthError::new(
                "invalid_request",
                "send either `user_token` or `on_behalf_of`, not both",
            )),
            (Some(t), None) => {
                let fed = self
                    .federation
                    .verify(t)
                    .await
                    .map_err(|e| federation_error(&e, "user_token: "))?;
                if !fed.users {
                    return Err(OAuthError::new(
                        "invalid_grant",
                        format!(
                            "user_token: issuer `{}` vouches for workloads, not users",
                            fed.issuer
                        ),
                    ));
                }
                // Issued to this broker or to the agent presenting it, not
                // to some other client that passed it on.
                if let Some(azp) = &fed.azp
                    && azp != &fed.audience
                    && azp != &agent.id
                {
                    return Err(OAuthError::new(
                        "invalid_grant",
                        format!(
                            "user_token: it was issued to `{}` (azp), not to this broker or agent `{}`",
                            crate::limits::claimed_label(azp),
                            agent.id
                        ),
                    ));
                }
                // Single use: its `jti`, or its hash when it has none.
                let jti = fed.jti.clone().unwrap_or_else(|| {
                    use sha2::Digest;
                    format!("sha256:{}", hex::encode(sha2::Sha256::digest(t.as_bytes())))
                });
                Ok(Some(VerifiedUser {
                    token: Some(UserTokenUse {
                        issuer: fed.issuer.clone(),
                        jti,
                        exp: fed.exp,
                    }),
                    context: UserContext {
                        id: fed.subject,
                        issuer: fed.issuer,
                        groups: fed.groups,
                    },
                }))
            }
            (None, Some(id)) => {
                if !agent.may_assert_users {
                    return Err(OAuthError::new(
                        "invalid_request",
                        format!(
                            "agent `{}` may not assert the user it acts for: send the user's ID token as `user_token`",
                            agent.id
                        ),
                    ));
                }
                Ok(Some(VerifiedUser {
                    token: None,
                    context: UserContext {
                        id: id.to_owned(),
                        issuer: "asserted".into(),
                        groups: Vec::new(),
                    },
                }))
            }
        }
    }
}
