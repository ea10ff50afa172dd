//! Credentials: how a request proves who it is.
//!
//! Haven uses opaque random tokens (256 bits) stored only as SHA-256 hashes.
//! The prefix tells the kind, so a token is looked up in one table only:
//! `hvc_…` is a client's credential for one chat session, `hvt_…` a
//! therapist's login. Browsers carry the same tokens in HttpOnly cookies.
//! A connection's role is the kind of its credential — never a query
//! parameter or a field of a frame.

use std::sync::OnceLock;

use argon2::{Argon2, PasswordHasher, PasswordVerifier};
use axum::extract::FromRequestParts;
use axum::http::HeaderMap;
use axum::http::header::AUTHORIZATION;
use axum::http::request::Parts;
use axum_extra::extract::CookieJar;
use axum_extra::extract::cookie::{Cookie, SameSite};
use haven_store::{StoreError, Therapist};
use hmac::{KeyInit, Mac};
use sha2::{Digest, Sha256};
use uuid::Uuid;

use crate::http::ApiError;
use crate::startup::AppState;

pub const CLIENT_TOKEN_PREFIX: &str = "hvc_";
pub const THERAPIST_TOKEN_PREFIX: &str = "hvt_";
/// Cookie holding a client's credential (set by `POST /api/sessions`): one
/// per chat, named `haven_client_{session id in hex}` ([`client_cookie_name`]),
/// so a browser keeps every chat it started. A browser from before that
/// holds one cookie of this plain name, still read.
pub const CLIENT_COOKIE: &str = "haven_client";
/// The most chats one browser keeps; starting another forgets the oldest.
pub const MAX_CHATS_PER_BROWSER: usize = 20;
/// Cookie holding a therapist's login (set by `POST /api/auth/login`).
pub const THERAPIST_COOKIE: &str = "haven_therapist";
/// Cookie marking a browser that has logged in to an account before (see
/// [`device_cookie_value`]).
pub const DEVICE_COOKIE: &str = "haven_device";
/// How long a browser stays known after its last successful login.
pub const DEVICE_DAYS: i64 = 90;
/// Shortest password accepted for a therapist account.
pub const MIN_PASSWORD_CHARS: usize = 8;

/// A fresh random token with the given kind prefix.
pub fn new_token(prefix: &str) -> String {
    let bytes: [u8; 32] = rand::random();
    let mut token = String::with_capacity(prefix.len() + 64);
    token.push_str(prefix);
    for byte in bytes {
        token.push_str(&format!("{byte:02x}"));
    }
    token
}

/// What is stored instead of a token. Tokens carry 256 random bits, so a
/// fast hash is enough; comparing hashes (in SQL or in memory) leaks nothing
/// useful about the token through timing.
pub fn token_hash(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

/// The value of a device cookie for this account: `ID.ISSUED.MAC`, where
/// MAC is an HMAC-SHA-256 of the account id and the issue time (Unix
/// seconds) keyed with the account's stored password hash. Nothing is
/// stored for it; a new password makes every earlier device unknown, and it
/// is good for [`DEVICE_DAYS`]. It proves only that this browser logged in
/// to this account before: it is never a credential.
pub fn device_cookie_value(therapist_id: Uuid, password_hash: &str, issued: i64) -> String {
    let mac = device_mac(therapist_id, password_hash, issued).finalize().into_bytes();
    let hex: String = mac.iter().map(|byte| format!("{byte:02x}")).collect();
    format!("{therapist_id}.{issued}.{hex}")
}

/// Does this device cookie say the browser logged in to this account
/// before (with its current password, within [`DEVICE_DAYS`])?
pub fn known_device(cookie: &str, therapist_id: Uuid, password_hash: &str, now: i64) -> bool {
    let mut parts = cookie.splitn(3, '.');
    let (Some(id), Some(issued), Some(hex)) = (parts.next(), parts.next(), parts.next()) else {
        return false;
    };
    let (Ok(id), Ok(issued)) = (id.parse::<Uuid>(), issued.parse::<i64>()) else {
        return false;
    };
    let fresh = (0..=DEVICE_DAYS * 86_400).contains(&(now - issued));
    let mac: Option<Vec<u8>> = (hex.len() == 64)
        .then(|| (0..64).step_by(2).map(|i| u8::from_str_radix(hex.get(i..i + 2)?, 16).ok()).collect())
        .flatten();
    id == therapist_id
        && fresh
        && mac.is_some_and(|mac| device_mac(therapist_id, password_hash, issued).verify_slice(&mac).is_ok())
}

fn device_mac(therapist_id: Uuid, password_hash: &str, issued: i64) -> hmac::Hmac<Sha256> {
    let mut mac =
        hmac::Hmac::<Sha256>::new_from_slice(password_hash.as_bytes()).expect("HMAC takes any key length");
    mac.update(format!("haven-device:{therapist_id}:{issued}").as_bytes());
    mac
}

/// Who a valid credential belongs to.
#[derive(Debug, Clone)]
pub enum Credential {
    /// A client's credential, bound to one chat session.
    Client {
        session_id: Uuid,
    },
    Therapist(Therapist),
}

/// Looks a token up by its kind. `None` for unknown, malformed or expired tokens.
pub async fn resolve(state: &AppState, token: &str) -> Result<Option<Credential>, StoreError> {
    let hash = token_hash(token);
    if token.starts_with(CLIENT_TOKEN_PREFIX) {
        let session = state.store.session_for_client_token(&hash).await?;
        Ok(session.map(|session_id| Credential::Client { session_id }))
    } else if token.starts_with(THERAPIST_TOKEN_PREFIX) {
        let therapist = state
            .store
            .therapist_by_token(&hash, haven_store::now(), state.settings.therapist_idle, true)
            .await?;
        Ok(therapist.map(Credential::Therapist))
    } else {
        Ok(None)
    }
}

/// The token of an `Authorization: Bearer` header, if any.
pub fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

/// An auth cookie: HttpOnly, `SameSite=Strict`, for the whole site.
/// The name of the cookie holding a browser's credential for one chat.
pub fn client_cookie_name(session_id: Uuid) -> String {
    format!("{CLIENT_COOKIE}_{}", session_id.simple())
}

/// The client credential this browser holds for a chat, if any.
pub fn client_cookie(jar: &CookieJar, session_id: Uuid) -> Option<String> {
    jar.get(&client_cookie_name(session_id))
        .or_else(|| jar.get(CLIENT_COOKIE))
        .map(|cookie| cookie.value().to_owned())
}

/// Every chat this browser holds a per-chat cookie for, newest first
/// (session ids are UUIDv7, ordered by time), with its token.
pub fn client_cookies(jar: &CookieJar) -> Vec<(Uuid, String)> {
    let prefix = format!("{CLIENT_COOKIE}_");
    let mut chats: Vec<(Uuid, String)> = jar
        .iter()
        .filter_map(|cookie| {
            let id = cookie.name().strip_prefix(&prefix)?;
            Some((Uuid::try_parse(id).ok()?, cookie.value().to_owned()))
        })
        .collect();
    chats.sort_by_key(|chat| std::cmp::Reverse(chat.0));
    chats
}

pub fn auth_cookie(
    name: impl Into<std::borrow::Cow<'static, str>>,
    token: String,
    secure: bool,
) -> Cookie<'static> {
    Cookie::build((name, token)).http_only(true).same_site(SameSite::Strict).path("/").secure(secure).build()
}

/// The therapist making an API request, by bearer token or login cookie.
pub struct AuthTherapist {
    pub therapist: Therapist,
    /// The token used, so logout can revoke exactly this login.
    pub token: String,
}

impl FromRequestParts<AppState> for AuthTherapist {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Self::Rejection> {
        let token = match bearer(&parts.headers) {
            Some(token) => token.to_owned(),
            None => CookieJar::from_headers(&parts.headers)
                .get(THERAPIST_COOKIE)
                .map(|cookie| cookie.value().to_owned())
                .ok_or(ApiError::Unauthorized)?,
        };
        match resolve(state, &token).await? {
            Some(Credential::Therapist(therapist)) => Ok(AuthTherapist { therapist, token }),
            _ => Err(ApiError::Unauthorized),
        }
    }
}

/// Hashes a password with argon2id (default parameters, random salt) on the
/// blocking pool, so hashing never stalls chat traffic on the async workers.
pub async fn hash_password(password: String) -> anyhow::Result<String> {
    tokio::task::spawn_blocking(move || {
        Argon2::default()
            .hash_password(password.as_bytes())
            .map(|hash| hash.to_string())
            .map_err(|error| anyhow::anyhow!("hashing the password failed: {error}"))
    })
    .await?
}

/// Checks a password against a stored hash. With no stored hash (unknown
/// e-mail) it still does the same work against a dummy hash, so the answer
/// takes as long either way.
pub async fn verify_password(password: String, stored: Option<String>) -> bool {
    static DUMMY: OnceLock<String> = OnceLock::new();
    tokio::task::spawn_blocking(move || {
        let known = stored.is_some();
        let hash = stored.unwrap_or_else(|| {
            DUMMY
                .get_or_init(|| {
                    Argon2::default()
                        .hash_password(b"no such account")
                        .map(|h| h.to_string())
                        .unwrap_or_default()
                })
                .clone()
        });
        let matches = Argon2::default().verify_password(password.as_bytes(), hash.as_str()).is_ok();
        known && matches
    })
    .await
    .unwrap_or(false)
}

/// Normalises an e-mail address for storage and lookup.
pub fn normalise_email(email: &str) -> String {
    email.trim().to_lowercase()
}

/// Checks a new account's fields; the error text is shown to the person.
pub fn validate_new_account(email: &str, name: &str, password: &str) -> Result<(), String> {
    let at = email.find('@');
    if email.len() > 254 || !at.is_some_and(|at| at > 0 && at < email.len() - 1) {
        return Err("enter a valid e-mail address".into());
    }
    if name.trim().is_empty() || name.chars().count() > 100 {
        return Err("enter a name of 1 to 100 characters".into());
    }
    if password.chars().count() < MIN_PASSWORD_CHARS || password.len() > 1024 {
        return Err(format!("the password needs at least {MIN_PASSWORD_CHARS} characters"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_device_cookie_is_known_only_for_its_account_password_and_time() {
        let (id, hash, now) = (Uuid::now_v7(), "$argon2id$v=19$m=19456,t=2,p=1$salt$hash", 1_800_000_000);
        let cookie = device_cookie_value(id, hash, now);
        assert!(known_device(&cookie, id, hash, now + 3600));
        assert!(!known_device(&cookie, Uuid::now_v7(), hash, now), "another account");
        assert!(!known_device(&cookie, id, "$argon2id$another", now), "another password");
        assert!(!known_device(&cookie, id, hash, now + (DEVICE_DAYS + 1) * 86_400), "too old");
        let other = if cookie.ends_with('0') { '1' } else { '0' };
        let forged = format!("{}{other}", &cookie[..cookie.len() - 1]);
        assert!(!known_device(&forged, id, hash, now), "a changed MAC");
        assert!(!known_device("nonsense", id, hash, now));
    }

    #[test]
    fn tokens_are_random_prefixed_and_hash_stably() {
        let a = new_token(CLIENT_TOKEN_PREFIX);
        let b = new_token(CLIENT_TOKEN_PREFIX);
        assert_ne!(a, b);
        assert!(a.starts_with("hvc_") && a.len() == 4 + 64);
        assert_eq!(token_hash(&a), token_hash(&a));
        assert_ne!(token_hash(&a), token_hash(&b));
    }

    #[test]
    fn bearer_header_is_parsed_case_insensitively() {
        let mut headers = HeaderMap::new();
        headers.insert(AUTHORIZATION, "bearer hvt_abc".parse().unwrap());
        assert_eq!(bearer(&headers), Some("hvt_abc"));
        headers.insert(AUTHORIZATION, "Basic xyz".parse().unwrap());
        assert_eq!(bearer(&headers), None);
    }

    #[test]
    fn new_accounts_are_validated() {
        assert!(validate_new_account("a@b.org", "Ann", "long enough").is_ok());
        assert!(validate_new_account("nope", "Ann", "long enough").is_err());
        assert!(validate_new_account("a@b.org", " ", "long enough").is_err());
        assert!(validate_new_account("a@b.org", "Ann", "short").is_err());
    }
}
