//! Who a connection is and what it may do. With `JWT_SECRET` (HS256) or
//! `JWT_PUBLIC_KEY` (RS256 or ES256, from the key's type), a JWT names the
//! user (`sub`) and carries permissions; without either the node is in dev
//! mode and trusts `?user=`.

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

/// Why the configured key cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("cannot read JWT_PUBLIC_KEY {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("JWT_PUBLIC_KEY {0} is neither an RSA nor an EC (P-256) public key in PEM")]
    Unusable(String),
}

/// What tokens must satisfy beyond the signature.
#[derive(Debug, Clone, Default)]
pub struct TokenRules {
    pub audience: Option<String>,
    pub issuer: Option<String>,
    pub leeway: Duration,
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
        Self::jwt(
            DecodingKey::from_secret(secret.as_bytes()),
            Algorithm::HS256,
            &TokenRules {
                leeway,
                ..TokenRules::default()
            },
        )
    }

    /// Verifies with `key`, accepting exactly one algorithm: a token that
    /// names another one (`none` included) is refused.
    pub fn jwt(key: DecodingKey, algorithm: Algorithm, rules: &TokenRules) -> Self {
        let mut validation = Validation::new(algorithm);
        validation.leeway = rules.leeway.as_secs();
        validation.validate_nbf = true;
        let mut required = vec!["exp", "sub"];
        match &rules.audience {
            Some(audience) => {
                validation.set_audience(&[audience]);
                required.push("aud");
            }
            None => validation.validate_aud = false,
        }
        if let Some(issuer) = &rules.issuer {
            validation.set_issuer(&[issuer]);
            required.push("iss");
        }
        validation.set_required_spec_claims(&required);
        Authenticator::Jwt {
            key: Box::new(key),
            validation: Box::new(validation),
            leeway: rules.leeway,
        }
    }

    /// An RS256 or ES256 verifier from a PEM public key (the type decides).
    pub fn from_public_key_file(
        path: &std::path::Path,
        rules: &TokenRules,
    ) -> Result<Self, KeyError> {
        let pem = std::fs::read(path).map_err(|source| KeyError::Read {
            path: path.display().to_string(),
            source,
        })?;
        if let Ok(key) = DecodingKey::from_rsa_pem(&pem) {
            return Ok(Self::jwt(key, Algorithm::RS256, rules));
        }
        if let Ok(key) = DecodingKey::from_ec_pem(&pem) {
            return Ok(Self::jwt(key, Algorithm::ES256, rules));
        }
        Err(KeyError::Unusable(path.display().to_string()))
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
                ErrorKind::InvalidAudience => AuthError::Invalid("wrong audience (aud)".into()),
                ErrorKind::InvalidIssuer => AuthError::Invalid("wrong issuer (iss)".into()),
                ErrorKind::InvalidAlgorithm => {
                    AuthError::Invalid("signed with an algorithm this node does not accept".into())
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

/// The claims of a token minted by `roomcast token`.
#[derive(serde::Serialize)]
struct MintedClaims<'a> {
    sub: &'a str,
    exp: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    rooms: Option<&'a [String]>,
    broadcast: bool,
    publish: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    aud: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    iss: Option<&'a str>,
}

/// Signs an HS256 token (for testing and scripts: `roomcast token`).
pub fn mint_hs256(
    secret: &str,
    args: &crate::config::TokenArgs,
    audience: Option<&str>,
    issuer: Option<&str>,
    now_secs: u64,
) -> Result<String, AuthError> {
    validate_user(&args.user).map_err(|r| AuthError::BadUser(r.message.into()))?;
    let claims = MintedClaims {
        sub: &args.user,
        exp: now_secs + args.ttl.as_secs(),
        rooms: (!args.rooms.is_empty()).then_some(args.rooms.as_slice()),
        broadcast: args.broadcast,
        publish: !args.read_only,
        aud: audience,
        iss: issuer,
    };
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )
    .map_err(|e| AuthError::Invalid(e.to_string()))
}

/// How long a ticket from `POST /auth/ticket` stays usable.
pub const TICKET_TTL: Duration = Duration::from_secs(30);

/// An unguessable token (192 bits from the OS), hex-encoded.
pub fn random_ticket() -> std::io::Result<String> {
    use std::io::Read;
    let mut bytes = [0u8; 24];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut bytes)?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// Whether `given` is one of `keys`, in time that does not depend on where
/// a key first differs (nor on which key matched).
pub fn key_matches(keys: &[String], given: &str) -> bool {
    let given = given.as_bytes();
    keys.iter().fold(false, |found, key| {
        let key = key.as_bytes();
        let mut diff = (key.len() ^ given.len()) as u8 | u8::from(key.len() != given.len());
        for (i, k) in key.iter().enumerate() {
            diff |= k ^ given.get(i).copied().unwrap_or(0);
        }
        found | (diff == 0)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{encode, EncodingKey, Header};
    use serde_json::json;

    fn now() -> u64 {
        crate::protocol::now_ms() / 1000
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

    fn fixture(name: &str) -> std::path::PathBuf {
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures")
            .join(name)
    }

    fn signed(algorithm: Algorithm, private_pem: &str, claims: serde_json::Value) -> String {
        let pem = std::fs::read(fixture(private_pem)).unwrap();
        let key = match algorithm {
            Algorithm::RS256 => EncodingKey::from_rsa_pem(&pem).unwrap(),
            _ => EncodingKey::from_ec_pem(&pem).unwrap(),
        };
        encode(&Header::new(algorithm), &claims, &key).unwrap()
    }

    #[test]
    fn public_keys_verify_rs256_and_es256_and_nothing_else() {
        let rules = TokenRules::default();
        let rsa = Authenticator::from_public_key_file(&fixture("rsa-public.pem"), &rules).unwrap();
        let ec = Authenticator::from_public_key_file(&fixture("ec-public.pem"), &rules).unwrap();
        let claims = json!({"sub":"alice","exp":now()+60});
        let rs_token = signed(Algorithm::RS256, "rsa-private.pem", claims.clone());
        let es_token = signed(Algorithm::ES256, "ec-private.pem", claims.clone());
        assert_eq!(&*rsa.verify(&rs_token).unwrap().user, "alice");
        assert_eq!(&*ec.verify(&es_token).unwrap().user, "alice");
        assert!(rsa.verify(&es_token).is_err());
        assert!(ec.verify(&rs_token).is_err());
        // An HS256 token made with the public key as the secret (the classic
        // algorithm confusion) is refused.
        let public = std::fs::read(fixture("rsa-public.pem")).unwrap();
        let confused = encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(&public),
        )
        .unwrap();
        assert!(matches!(rsa.verify(&confused), Err(AuthError::Invalid(_))));
        assert!(Authenticator::from_public_key_file(&fixture("README.md"), &rules).is_err());
    }

    #[test]
    fn alg_none_is_refused() {
        use base64_url as b64;
        let auth = Authenticator::hs256("k", Duration::from_secs(0));
        let header = b64(r#"{"alg":"none","typ":"JWT"}"#);
        let body = b64(&format!(r#"{{"sub":"alice","exp":{}}}"#, now() + 60));
        assert!(auth.verify(&format!("{header}.{body}.")).is_err());
    }

    /// Unpadded base64url, enough to forge tokens by hand.
    fn base64_url(text: &str) -> String {
        const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
        let bytes = text.as_bytes();
        let mut out = String::new();
        for chunk in bytes.chunks(3) {
            let n =
                chunk.iter().fold(0u32, |acc, b| (acc << 8) | *b as u32) << (8 * (3 - chunk.len()));
            for i in 0..=chunk.len() {
                out.push(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize] as char);
            }
        }
        out
    }

    #[test]
    fn audience_and_issuer_are_enforced_when_configured() {
        let rules = TokenRules {
            audience: Some("chat".into()),
            issuer: Some("https://id.example".into()),
            leeway: Duration::from_secs(0),
        };
        let auth = Authenticator::jwt(DecodingKey::from_secret(b"k"), Algorithm::HS256, &rules);
        let sign = |claims: serde_json::Value| token(claims, "k");
        let good = sign(json!({"sub":"a","exp":now()+60,"aud":"chat","iss":"https://id.example"}));
        assert!(auth.verify(&good).is_ok());
        let wrong_aud =
            sign(json!({"sub":"a","exp":now()+60,"aud":"other","iss":"https://id.example"}));
        assert!(matches!(auth.verify(&wrong_aud), Err(AuthError::Invalid(m)) if m.contains("aud")));
        let no_iss = sign(json!({"sub":"a","exp":now()+60,"aud":"chat"}));
        assert!(auth.verify(&no_iss).is_err());
        // Without an audience configured, a token carrying one is accepted.
        let plain = Authenticator::hs256("k", Duration::from_secs(0));
        assert!(plain.verify(&wrong_aud).is_ok());
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
    fn minted_tokens_verify_with_their_permissions() {
        let args = crate::config::TokenArgs {
            user: "alice".into(),
            ttl: Duration::from_secs(3600),
            rooms: vec!["chat:*".into()],
            broadcast: true,
            read_only: true,
        };
        let t = mint_hs256("s", &args, None, None, now()).unwrap();
        let id = Authenticator::hs256("s", Duration::ZERO)
            .verify(&t)
            .unwrap();
        assert_eq!(&*id.user, "alice");
        assert!(id.permissions.may_join("chat:1") && !id.permissions.may_join("x"));
        assert!(id.permissions.broadcast && !id.permissions.publish);
        assert!(id.expires_at.unwrap() >= now() + 3599);
    }

    #[test]
    fn tickets_are_long_and_different_and_keys_match_exactly() {
        let (a, b) = (random_ticket().unwrap(), random_ticket().unwrap());
        assert_eq!(a.len(), 48);
        assert_ne!(a, b);
        let keys = vec!["k".repeat(20), "other-key-0123456789".to_string()];
        assert!(key_matches(&keys, &"k".repeat(20)));
        assert!(key_matches(&keys, "other-key-0123456789"));
        assert!(!key_matches(&keys, &"k".repeat(19)));
        assert!(!key_matches(&keys, &"k".repeat(21)));
        assert!(!key_matches(&keys, ""));
        assert!(!key_matches(&[], "anything"));
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
