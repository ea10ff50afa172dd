//! Therapist login and logout.

use std::net::{IpAddr, SocketAddr};

use axum::Router;
use axum::extract::{ConnectInfo, State};
use axum::http::StatusCode;
use axum::routing::post;
use axum_extra::extract::CookieJar;
use axum_extra::extract::cookie::Cookie;
use haven_protocol::api::{LoginRequest, LoginResponse, TherapistProfile};
use haven_store::Therapist;

use super::{ApiError, Json};
use crate::auth::{self, AuthTherapist, THERAPIST_COOKIE, THERAPIST_TOKEN_PREFIX};
use crate::chat::Revocation;
use crate::startup::AppState;

pub fn router() -> Router<AppState> {
    Router::new().route("/api/auth/login", post(login)).route("/api/auth/logout", post(logout))
}

/// `POST /api/auth/login`: a therapist token in the body and in an HttpOnly
/// cookie. Unknown e-mail and wrong password get the same answer.
async fn login(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    jar: CookieJar,
    Json(request): Json<LoginRequest>,
) -> Result<(CookieJar, Json<LoginResponse>), ApiError> {
    let (therapist, token) = start_login(&state, peer.ip(), &request.email, request.password).await?;
    let jar = jar.add(auth::auth_cookie(THERAPIST_COOKIE, token.clone(), state.settings.cookie_secure));
    let profile = TherapistProfile { id: therapist.id, name: therapist.name, email: therapist.email };
    Ok((jar, Json(LoginResponse { token, therapist: profile })))
}

/// Checks a password and records a new login; shared by the API and the
/// login page. Returns the account and its new token.
pub(crate) async fn start_login(
    state: &AppState,
    ip: IpAddr,
    email: &str,
    password: String,
) -> Result<(Therapist, String), ApiError> {
    let email = auth::normalise_email(email);
    // A locked account or IP is answered at once, without hashing anything.
    let keys = [format!("account:{email}"), format!("ip:{}", crate::limits::limit_key(ip))];
    // The counts are in the store, so the lock holds across instances.
    let limits = &state.limits;
    let store = &*state.store;
    if let Some(retry_after) = limits.login_locked(store, &keys).await? {
        tracing::warn!("login refused: too many failures");
        return Err(ApiError::TooManyRequests { retry_after });
    }
    let account = store.therapist_with_password(&email).await?;
    let (therapist, stored_hash) = match account {
        Some((therapist, hash)) => (Some(therapist), Some(hash)),
        None => (None, None),
    };
    let Some(_slot) = limits.hashing_slot().await else {
        tracing::warn!("login refused: password hashing is saturated");
        return Err(ApiError::Unavailable);
    };
    // Again after the wait: parallel attempts must not slip past the lock.
    if let Some(retry_after) = limits.login_locked(store, &keys).await? {
        return Err(ApiError::TooManyRequests { retry_after });
    }
    let verified = auth::verify_password(password, stored_hash).await;
    let Some(therapist) = therapist.filter(|_| verified) else {
        tracing::warn!("login failed");
        limits.login_failed(store, &keys).await?;
        return Err(ApiError::InvalidCredentials);
    };
    limits.login_succeeded(store, &keys[0]).await?;
    let token = auth::new_token(THERAPIST_TOKEN_PREFIX);
    let expires_at = haven_store::now() + state.settings.therapist_session;
    state.store.create_auth_session(therapist.id, &auth::token_hash(&token), expires_at).await?;
    tracing::info!(therapist_id = %therapist.id, "therapist logged in");
    Ok((therapist, token))
}

/// `POST /api/auth/logout`: revokes the token used and clears the cookie.
async fn logout(
    State(state): State<AppState>,
    jar: CookieJar,
    caller: AuthTherapist,
) -> Result<(StatusCode, CookieJar), ApiError> {
    let hash = auth::token_hash(&caller.token);
    state.store.revoke_auth_session(&hash).await?;
    state.hub.revoke(Revocation::Login(hash));
    tracing::info!(therapist_id = %caller.therapist.id, "therapist logged out");
    Ok((StatusCode::NO_CONTENT, jar.remove(Cookie::build(THERAPIST_COOKIE).path("/"))))
}
