//! Therapist login and logout.

use std::net::{IpAddr, SocketAddr};

use axum::extract::{ConnectInfo, State};
use axum::http::StatusCode;
use axum_extra::extract::CookieJar;
use axum_extra::extract::cookie::Cookie;
use haven_protocol::api::{LoginRequest, LoginResponse, TherapistProfile};
use haven_store::{Action, Actor, Therapist, TrailEntry};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::openapi::ErrorBody;
use super::{ApiError, Json};
use crate::auth::{self, AuthTherapist, DEVICE_COOKIE, THERAPIST_COOKIE, THERAPIST_TOKEN_PREFIX};
use crate::chat::Revocation;
use crate::startup::AppState;

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(login)).routes(routes!(logout))
}

/// A therapist logs in.
///
/// `POST /api/auth/login`: a therapist token in the body and in an HttpOnly
/// cookie. Unknown e-mail and wrong password get the same answer. Failures
/// lock the pair of account and address, and the address, for a while
/// (`429`); an account's failures from anywhere only slow its logins down.
#[utoipa::path(
    post,
    path = "/api/auth/login",
    tag = "auth",
    request_body = LoginRequest,
    responses(
        (status = 200, description = "Logged in.", body = LoginResponse,
            headers(("set-cookie" = String, description = "`haven_therapist` (the token, HttpOnly) and `haven_device`"))),
        (status = 400, description = "`invalid_json`", body = ErrorBody),
        (status = 401, description = "`invalid_credentials`: unknown e-mail or wrong password, alike.", body = ErrorBody),
        (status = 413, description = "`payload_too_large`", body = ErrorBody),
        (status = 429, description = "`rate_limited`: too many failed logins.", body = ErrorBody,
            headers(("retry-after" = u64, description = "Seconds to wait"))),
        (status = 500, description = "`internal`", body = ErrorBody),
        (status = 503, description = "`unavailable`: the database is unreachable, or password hashing is saturated.", body = ErrorBody),
    )
)]
async fn login(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    jar: CookieJar,
    Json(request): Json<LoginRequest>,
) -> Result<(CookieJar, Json<LoginResponse>), ApiError> {
    let (therapist, token, jar) =
        start_login(&state, peer.ip(), &request.email, request.password, jar).await?;
    let jar = jar.add(auth::auth_cookie(THERAPIST_COOKIE, token.clone(), state.settings.cookie_secure));
    let profile = TherapistProfile { id: therapist.id, name: therapist.name, email: therapist.email };
    Ok((jar, Json(LoginResponse { token, therapist: profile })))
}

/// Checks a password and records a new login; shared by the API and the
/// login page. Returns the account, its new token, and the cookie jar with
/// this browser's device cookie renewed.
///
/// The policy (docs/reliability.md): failures lock the pair of account and
/// address, and the address, after `--login-failures` within the window;
/// failures of the account from anywhere only slow its logins down (see
/// [`crate::limits::Limits::login_delay`]), and not for a browser whose
/// device cookie says it logged in to the account before. So nobody can
/// lock a therapist out from another address.
pub(crate) async fn start_login(
    state: &AppState,
    ip: IpAddr,
    email: &str,
    password: String,
    jar: CookieJar,
) -> Result<(Therapist, String, CookieJar), ApiError> {
    let email = auth::normalise_email(email);
    let address = crate::limits::limit_key(ip);
    let (account_key, pair_key) = (format!("account:{email}"), format!("pair:{email}|{address}"));
    let locks = [pair_key.clone(), format!("ip:{address}")];
    // A locked pair or address is answered at once, without hashing
    // anything. The counts are in the store, so they hold across instances.
    let limits = &state.limits;
    let store = &*state.store;
    if let Some(retry_after) = limits.login_locked(store, &locks).await? {
        tracing::warn!("login refused: too many failures");
        crate::limits::count_refusal("login_failures");
        return Err(ApiError::TooManyRequests { retry_after });
    }
    let account = store.therapist_with_password(&email).await?;
    let (therapist, stored_hash) = match account {
        Some((therapist, hash)) => (Some(therapist), Some(hash)),
        None => (None, None),
    };
    let now = haven_store::now().unix_timestamp();
    let known = match (&therapist, &stored_hash, jar.get(DEVICE_COOKIE)) {
        (Some(therapist), Some(hash), Some(cookie)) => {
            auth::known_device(cookie.value(), therapist.id, hash, now)
        }
        _ => false,
    };
    if !known {
        let delay = limits.login_delay(store, &account_key).await?;
        if !delay.is_zero() {
            tracing::info!(
                delay_ms = delay.as_millis() as u64,
                "login slowed: the account has recent failures"
            );
            tokio::time::sleep(delay).await;
        }
    }
    let Some(_slot) = limits.hashing_slot().await else {
        tracing::warn!("login refused: password hashing is saturated");
        crate::limits::count_refusal("password_hash_workers");
        return Err(ApiError::Unavailable);
    };
    // Again after the wait: parallel attempts must not slip past the lock.
    if let Some(retry_after) = limits.login_locked(store, &locks).await? {
        crate::limits::count_refusal("login_failures");
        return Err(ApiError::TooManyRequests { retry_after });
    }
    let verified = auth::verify_password(password, stored_hash.clone()).await;
    let tried = therapist.as_ref().map_or(Actor::Unknown, |therapist| Actor::Therapist(therapist.id));
    let Some(therapist) = therapist.filter(|_| verified) else {
        tracing::warn!("login failed");
        metrics::counter!("haven_login_failures_total").increment(1);
        store.append_trail(TrailEntry::new(tried, Action::Login).address(Some(ip)).refused()).await?;
        limits.login_failed(store, &[pair_key, locks[1].clone(), account_key]).await?;
        return Err(ApiError::InvalidCredentials);
    };
    limits.login_succeeded(store, &[&account_key, &pair_key]).await?;
    let token = auth::new_token(THERAPIST_TOKEN_PREFIX);
    let expires_at = haven_store::now() + state.settings.therapist_session;
    state.store.create_auth_session(therapist.id, &auth::token_hash(&token), expires_at, Some(ip)).await?;
    tracing::info!(therapist_id = %therapist.id, "therapist logged in");
    let device = auth::device_cookie_value(therapist.id, stored_hash.as_deref().unwrap_or_default(), now);
    let mut device = auth::auth_cookie(DEVICE_COOKIE, device, state.settings.cookie_secure);
    device.set_max_age(time::Duration::days(auth::DEVICE_DAYS));
    Ok((therapist, token, jar.add(device)))
}

/// A therapist logs out.
///
/// `POST /api/auth/logout`: revokes the token used and clears the cookie;
/// the login's sockets and event streams close.
#[utoipa::path(
    post,
    path = "/api/auth/logout",
    tag = "auth",
    security(("therapist_token" = []), ("therapist_cookie" = [])),
    responses(
        (status = 204, description = "Logged out; the cookie is cleared.",
            headers(("set-cookie" = String, description = "Clears `haven_therapist`"))),
        (status = 401, description = "`unauthorized`", body = ErrorBody),
        (status = 500, description = "`internal`", body = ErrorBody),
        (status = 503, description = "`unavailable`", body = ErrorBody),
    )
)]
async fn logout(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    jar: CookieJar,
    caller: AuthTherapist,
) -> Result<(StatusCode, CookieJar), ApiError> {
    end_login(&state, &caller.token, peer.ip()).await?;
    tracing::info!(therapist_id = %caller.therapist.id, "therapist logged out");
    Ok((StatusCode::NO_CONTENT, jar.remove(Cookie::build(THERAPIST_COOKIE).path("/"))))
}

/// Ends the login of `token`, for the API's logout and the pages' logout
/// alike: deleted from the store, and its sockets here closed with 1008
/// (other instances' sockets close at their next heartbeat, which checks
/// the login again). Recorded in the audit trail from `address`.
pub(crate) async fn end_login(state: &AppState, token: &str, address: IpAddr) -> haven_store::Result<()> {
    let hash = auth::token_hash(token);
    state.store.revoke_auth_session(&hash, Some(address)).await?;
    state.hub.revoke(Revocation::Login(hash));
    Ok(())
}
