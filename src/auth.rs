//! Who a connection is and what it may do. With `JWT_SECRET`, an HS256 JWT
//! names the user (`sub`) and carries permissions; without it the node is
//! in dev mode and trusts `?user=`.

use std::sync::Arc;
use std::time::Duration;

use jsonwebtoken::{errors::ErrorKind, Algorithm, DecodingKey, Validation};
use serde::Deserialize;

use crate::protocol::validate_user;

/// A room permission from a token: an exact name, or a prefix ending in `*`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoomPattern(String);

impl RoomPattern {
    pub fn new(pattern: impl Into<String>) -> Self {
        RoomPattern(pattern.into())
    }

    pub fn matches(&self, room: &str) -> bool {
        match self.0.strip_suffix('*') {
            Some(prefix) => room.starts_with(prefix),
            None => room == self.0,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Permissions {
    /// Rooms the user may join and publish to; `None` means every room.
    pub rooms: Option<Arc<[RoomPattern]>>,
    /// May publish to rooms and send direct messages.
    pub publish: bool,
    /// May broadcast to everybody.
    pub broadcast: bool,
}

impl Permissions {
    pub fn all() -> Self {
        Permissions {
            rooms: None,
            publish: true,
            broadcast: true,
        }
    }

    pub fn may_join(&self, room: &str) -> bool {
        match &self.rooms {
            None => true,
            Some(patterns) => patterns.iter().any(|p| p.matches(room)),
        }
    }

    pub fn may_publish(&self, room: &str) -> bool {
        self.publish && self.may_join(room)
    }
}

#[derive(Debug, Clone)]
pub struct Identity {
    pub user: Arc<str>,
    pub permissions: Permissions,
    /// The token's `exp` (seconds since the epoch); `None` in dev mode.
    pub expires_at: Option<u64>,
}

/// What a connecting client presented.
#[derive(Debug, Default, Clone, Copy)]
pub struct Credentials<'a> {
    /// From `?token=` or `Authorization: Bearer`.
    pub token: Option<&'a str>,
    /// From `?user=` (dev mode only).
    pub user: Option<&'a str>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("a token is required: ?token=<JWT> or Authorization: Bearer <JWT>")]
    Missing,
    #[error("the token has expired")]
    Expired,
    #[error("invalid token: {0}")]
    Invalid(String),
    #[error("invalid user name: {0}")]
    BadUser(String),
}

#[derive(Deserialize)]
struct Claims {
    sub: String,
    exp: u64,
    #[serde(default)]
    rooms: Option<Vec<String>>,
    #[serde(default = "yes")]
    publish: bool,
    #[serde(default)]
    broadcast: bool,
}

fn yes() -> bool {
    true
}

pub enum Authenticator {
    /// No secret: anybody is whoever they say, with every permission.
    Dev,
    Jwt {
        key: Box<DecodingKey>,
        validation: Box<Validation>,
        leeway: Duration,
    },
}

impl Authenticator {
    pub fn hs256(secret: &str, leeway: Duration) -> Self {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.leeway = leeway.as_secs();
        validation.set_required_spec_claims(&["exp", "sub"]);
        validation.validate_aud = false;
        Authenticator::Jwt {
            key: Box::new(DecodingKey::from_secret(secret.as_bytes())),
            validation: Box::new(validation),
            leeway,
        }
    }

    pub fn is_dev(&self) -> bool {
        matches!(self, Authenticator::Dev)
    }

    /// The tolerance applied to `exp` on live sessions.
    pub fn leeway(&self) -> Duration {
        match self {
            Authenticator::Dev => Duration::ZERO,
            Authenticator::Jwt { leeway, .. } => *leeway,
        }
    }

    /// Identifies a connecting client.
    pub fn authenticate(&self, credentials: Credentials<'_>) -> Result<Identity, AuthError> {
        match self {
            Authenticator::Dev => {
                let user = match credentials.user {
                    Some(user) => {
                        validate_user(user).map_err(|r| AuthError::BadUser(r.message.into()))?;
                        user.to_string()
                    }
                    None => format!("guest-{:08x}", fastrand::u32(..)),
                };
                Ok(Identity {
                    user: user.into(),
                    permissions: Permissions::all(),
                    expires_at: None,
                })
            }
            Authenticator::Jwt { .. } => self.verify(credentials.token.ok_or(AuthError::Missing)?),
        }
    }

    /// Verifies a JWT (at connect, or in a `refresh` frame).
    pub fn verify(&self, token: &str) -> Result<Identity, AuthError> {
        let Authenticator::Jwt {
            key, validation, ..
        } = self
        else {
            return Err(AuthError::Invalid(
                "this node runs in dev mode and accepts no tokens".into(),
            ));
        };
        let claims = jsonwebtoken::decode::<Claims>(token, key, validation)
            .map_err(|err| match err.kind() {
                ErrorKind::ExpiredSignature => AuthError::Expired,
                ErrorKind::InvalidSignature => AuthError::Invalid("bad signature".into()),
                ErrorKind::MissingRequiredClaim(claim) => {
                    AuthError::Invalid(format!("the \"{claim}\" claim is required"))
                }
                _ => AuthError::Invalid(err.to_string()),
            })?
            .claims;
        validate_user(&claims.sub)
            .map_err(|r| AuthError::BadUser(format!("\"sub\": {}", r.message)))?;
        Ok(Identity {
            user: claims.sub.into(),
            permissions: Permissions {
                rooms: claims
                    .rooms
                    .map(|rooms| rooms.into_iter().map(RoomPattern::new).collect()),
                publish: claims.publish,
                broadcast: claims.broadcast,
            },
            expires_at: Some(claims.exp),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{encode, EncodingKey, Header};
    use serde_json::json;

    fn now() -> u64 {
        crate::broker::memory::now_ms() / 1000
    }

    fn token(claims: serde_json::Value, secret: &str) -> String {
        encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(secret.as_bytes()),
        )
        .unwrap()
    }

    #[test]
    fn a_valid_token_names_the_user_and_its_permissions() {
        let auth = Authenticator::hs256("s3cret", Duration::from_secs(0));
        let t = token(
            json!({"sub":"alice","exp":now()+60,"rooms":["chat:*","lobby"],"broadcast":true}),
            "s3cret",
        );
        let id = auth
            .authenticate(Credentials {
                token: Some(&t),
                user: Some("mallory"),
            })
            .unwrap();
        assert_eq!(&*id.user, "alice");
        assert!(id.permissions.may_join("chat:42"));
        assert!(id.permissions.may_join("lobby"));
        assert!(!id.permissions.may_join("lobby2"));
        assert!(id.permissions.broadcast);
        assert!(id.permissions.may_publish("lobby"));
    }

    #[test]
    fn missing_forged_and_expired_tokens_are_refused() {
        let auth = Authenticator::hs256("s3cret", Duration::from_secs(0));
        assert_eq!(
            auth.authenticate(Credentials::default()).unwrap_err(),
            AuthError::Missing
        );
        let forged = token(json!({"sub":"alice","exp":now()+60}), "other");
        assert!(matches!(auth.verify(&forged), Err(AuthError::Invalid(_))));
        let expired = token(json!({"sub":"alice","exp":now()-30}), "s3cret");
        assert_eq!(auth.verify(&expired).unwrap_err(), AuthError::Expired);
        let no_exp = token(json!({"sub":"alice"}), "s3cret");
        assert!(matches!(auth.verify(&no_exp), Err(AuthError::Invalid(m)) if m.contains("exp")));
        assert!(matches!(auth.verify("garbage"), Err(AuthError::Invalid(_))));
        let bad_sub = token(json!({"sub":"a b","exp":now()+60}), "s3cret");
        assert!(matches!(auth.verify(&bad_sub), Err(AuthError::BadUser(_))));
    }

    #[test]
    fn read_only_tokens_may_join_but_not_publish() {
        let auth = Authenticator::hs256("k", Duration::from_secs(0));
        let t = token(json!({"sub":"viewer","exp":now()+60,"publish":false}), "k");
        let id = auth.verify(&t).unwrap();
        assert!(id.permissions.may_join("any"));
        assert!(!id.permissions.may_publish("any"));
        assert!(!id.permissions.broadcast);
    }

    #[test]
    fn dev_mode_trusts_the_user_parameter_or_makes_up_a_guest() {
        let auth = Authenticator::Dev;
        let id = auth
            .authenticate(Credentials {
                token: None,
                user: Some("bob"),
            })
            .unwrap();
        assert_eq!(&*id.user, "bob");
        assert_eq!(id.permissions, Permissions::all());
        let guest = auth.authenticate(Credentials::default()).unwrap();
        assert!(guest.user.starts_with("guest-"));
        assert!(auth
            .authenticate(Credentials {
                token: None,
                user: Some("no spaces")
            })
            .is_err());
    }
}
