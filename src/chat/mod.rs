//! The chat WebSocket, `GET /api/chat/ws/{session_id}`.
//!
//! Admission happens here, before any frame is read: the credential decides
//! the role (a client token → `user`, a therapist token → `therapist`), a
//! cookie credential needs a same-site `Origin`, and `?role=` may only
//! confirm what the credential says. A refused upgrade is completed and then
//! closed with 1008 and the reason, and nothing is written.
//! [`connection`] runs an admitted socket; [`companion`] produces replies.

use std::net::{IpAddr, SocketAddr};

use axum::extract::rejection::QueryRejection;
use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::extract::{ConnectInfo, Query, State};
use axum::http::HeaderMap;
use axum::http::header::{HOST, ORIGIN};
use axum::response::{IntoResponse, Response};
use axum_extra::extract::CookieJar;
use haven_protocol::{Role, close_code};
use haven_store::{Action, Actor, Therapist, TrailEntry};
use serde::Deserialize;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use uuid::Uuid;

use crate::auth::{self, Credential, THERAPIST_COOKIE};
use crate::http::{ApiError, Path};
use crate::limits::SocketSlots;
use crate::startup::AppState;

mod companion;
mod connection;
mod delivery;
pub mod fanout;
mod hub;
pub mod queue;

pub use hub::{Finished, Hub, Revocation, RiskAlert, RiskFeed, Room};

/// Passes on a signal that is not stored (typing, presence) to the
/// connections and dashboards here and on the other instances sharing the
/// database.
pub fn announce(state: &AppState, event: haven_store::SessionEvent) {
    state.hub.apply([event.clone()]);
    let store = state.store.clone();
    tokio::spawn(async move {
        if let Err(error) = store.announce(event).await {
            tracing::debug!(error = %error, "could not announce a typing or presence signal");
        }
    });
}

/// Largest WebSocket message accepted; a larger one closes the socket with
/// 1009. A message of 4,000 characters is at most 24 KiB of escaped JSON.
pub const MAX_MESSAGE_BYTES: usize = 64 * 1024;

/// What the WebSocket layer itself reads before giving up. It is larger than
/// [`MAX_MESSAGE_BYTES`] so that an oversized message is read whole and Haven
/// can answer it with a clean 1009 close; a frame beyond even this limit
/// cannot be drained, so its sender may see the connection reset instead.
const TRANSPORT_LIMIT_BYTES: usize = 1024 * 1024;

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(chat_socket))
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
struct SocketQuery {
    /// `user` or `therapist`: accepted for compatibility; it must match the
    /// credential's kind.
    #[param(pattern = "^(user|therapist)$")]
    role: Option<String>,
    /// Replay every message with a greater seq before live traffic.
    since: Option<i64>,
}

/// A connection that passed admission.
#[derive(Debug)]
pub struct Admitted {
    pub session_id: Uuid,
    pub role: Role,
    /// Set for `therapist` connections.
    pub therapist: Option<Therapist>,
    pub since: Option<i64>,
    /// The credential's hash, to check it again while the socket is open.
    pub token_hash: [u8; 32],
    /// This socket's place under the per-IP and per-credential limits.
    pub slots: SocketSlots,
    /// Where it comes from: recorded in the audit trail for a therapist's
    /// join and reads.
    pub address: IpAddr,
}

/// Why a connection is refused. The reason is sent in the close frame.
#[derive(Debug)]
enum Refusal {
    Policy(&'static str),
    Unavailable,
}

impl From<haven_store::StoreError> for Refusal {
    fn from(error: haven_store::StoreError) -> Self {
        tracing::error!(error = %error, "database error while admitting a connection");
        Refusal::Unavailable
    }
}

/// The chat WebSocket.
///
/// A WebSocket upgrade (`Connection: Upgrade`, `Upgrade: websocket`). The
/// credential (bearer header, or a cookie with a same-site `Origin`) decides
/// the role. Every frame is a JSON text frame: the client sends
/// [ClientFrame](#/components/schemas/ClientFrame)s and the server sends
/// [ServerFrame](#/components/schemas/ServerFrame)s. A refused connection
/// is upgraded (`101`) and then closed at once with 1008 and the reason
/// (unknown session, missing or invalid credential, role mismatch, foreign
/// origin, another therapist's chat, closed chat, too many connections),
/// or 1011 when the database is unreachable. docs/protocol.md has the
/// close codes and the order of frames.
#[utoipa::path(
    get,
    path = "/api/chat/ws/{session_id}",
    tag = "chat",
    params(crate::http::SessionPath, SocketQuery),
    security(("client_token" = []), ("client_cookie" = []), ("therapist_token" = []), ("therapist_cookie" = [])),
    responses(
        (status = 101, description = "Switching Protocols: the socket is open (or is closed at once with the reason of a refusal)."),
        (status = 400, description = "`websocket_required`: not a WebSocket upgrade; or `invalid_query`.", body = crate::http::openapi::ErrorBody),
        (status = 404, description = "`not_found`: the path does not parse.", body = crate::http::openapi::ErrorBody),
    )
)]
async fn chat_socket(
    State(state): State<AppState>,
    Path(session_id): Path<String>,
    query: Result<Query<SocketQuery>, QueryRejection>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    upgrade: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Response {
    let query = match query {
        Ok(Query(query)) => query,
        Err(rejection) => return ApiError::from(rejection).into_response(),
    };
    let Ok(upgrade) = upgrade else {
        return ApiError::bad_request("websocket_required", "this endpoint is a WebSocket").into_response();
    };
    let upgrade = upgrade
        .max_message_size(TRANSPORT_LIMIT_BYTES)
        .max_frame_size(TRANSPORT_LIMIT_BYTES)
        // Allocated up front for every socket: small, because most sockets
        // are idle and most chat frames fit; it grows for a larger frame
        // (docs/benchmarks.md).
        .read_buffer_size(512)
        .write_buffer_size(16 * 1024)
        .max_write_buffer_size(4 * MAX_MESSAGE_BYTES);
    match admit(&state, &session_id, &query, &headers, peer.ip()).await {
        Ok(admitted) => {
            // The upgrade's task keeps room for its callback's captures for
            // the socket's whole life, after the callback has run: boxed,
            // they take a pointer's room there, and are freed once moved.
            let arguments = Box::new((state, admitted));
            upgrade.on_upgrade(move |socket| {
                let (state, admitted) = *arguments;
                connection::run(state, admitted, socket)
            })
        }
        Err(refusal) => {
            let (code, reason) = match refusal {
                Refusal::Policy(reason) => (close_code::POLICY_VIOLATION, reason),
                Refusal::Unavailable => {
                    (close_code::INTERNAL_ERROR, "service temporarily unavailable, retry")
                }
            };
            // The path's session id is logged only if it is one.
            let session_id = crate::http::canonical_uuid(&session_id).map(tracing::field::display);
            // The requested role only when it is a known one: no raw query text in logs.
            let role = match query.role.as_deref() {
                None => "from credential",
                Some(role @ ("user" | "therapist")) => role,
                Some(_) => "invalid",
            };
            tracing::warn!(session_id, role, reason, "connection rejected");
            upgrade.on_upgrade(move |socket| close(socket, code, reason))
        }
    }
}

/// Decides who the connection is, from its credential alone.
async fn admit(
    state: &AppState,
    session_id: &str,
    query: &SocketQuery,
    headers: &HeaderMap,
    ip: IpAddr,
) -> Result<Admitted, Refusal> {
    let session_id = crate::http::canonical_uuid(session_id).ok_or(Refusal::Policy("unknown session"))?;
    let requested = match query.role.as_deref() {
        None => None,
        Some("user") => Some(Role::User),
        Some("therapist") => Some(Role::Therapist),
        Some(_) => return Err(Refusal::Policy("unknown role")),
    };

    let (token, by_cookie) = match auth::bearer(headers) {
        Some(token) => (token.to_owned(), false),
        None => {
            (cookie_token(headers, requested, session_id).ok_or(Refusal::Policy("missing credential"))?, true)
        }
    };
    // Another site can make a browser open a socket with its cookies; only
    // the browser's Origin header tells them apart. Bearer tokens are never
    // sent automatically, so they need no such check.
    if by_cookie && !origin_allowed(headers, &state.settings.allowed_origins) {
        return Err(Refusal::Policy("origin not allowed"));
    }

    let token_hash = auth::token_hash(&token);
    let admitted = |role, therapist| -> Result<Admitted, Refusal> {
        let slots =
            state.limits.open_socket(ip, token_hash).ok_or(Refusal::Policy("too many connections"))?;
        Ok(Admitted { session_id, role, therapist, since: query.since, token_hash, slots, address: ip })
    };
    match auth::resolve(state, &token).await? {
        None => Err(Refusal::Policy("invalid or expired credential")),
        Some(_) if requested.is_some_and(|role| role != credential_role_of(&token)) => {
            Err(Refusal::Policy("role does not match credential"))
        }
        Some(Credential::Client { session_id: own }) if own != session_id => {
            Err(Refusal::Policy("credential is for another session"))
        }
        Some(Credential::Client { .. }) => {
            // A closed chat keeps its client's credential for reading its
            // transcript, not for a socket.
            let session =
                state.store.chat_session(session_id).await?.ok_or(Refusal::Policy("unknown session"))?;
            if session.closed_at.is_some() {
                return Err(Refusal::Policy("chat closed"));
            }
            admitted(Role::User, None)
        }
        Some(Credential::Therapist(therapist)) => {
            let session =
                state.store.chat_session(session_id).await?.ok_or(Refusal::Policy("unknown session"))?;
            if session.closed_at.is_some() {
                return Err(Refusal::Policy("chat closed"));
            }
            if session.therapist_id.is_some_and(|holder| holder != therapist.id) {
                let attempt = TrailEntry::new(Actor::Therapist(therapist.id), Action::Join);
                state.store.append_trail(attempt.session(session_id).address(Some(ip)).refused()).await?;
                return Err(Refusal::Policy("session is assigned to another therapist"));
            }
            admitted(Role::Therapist, Some(therapist))
        }
    }
}

fn credential_role_of(token: &str) -> Role {
    if token.starts_with(auth::THERAPIST_TOKEN_PREFIX) { Role::Therapist } else { Role::User }
}

/// The cookie credential for the requested role. Without `?role=` the
/// browser's client cookie for this session is used if present, else the
/// therapist cookie.
fn cookie_token(headers: &HeaderMap, requested: Option<Role>, session_id: Uuid) -> Option<String> {
    let jar = CookieJar::from_headers(headers);
    let client = || auth::client_cookie(&jar, session_id);
    let therapist = || jar.get(THERAPIST_COOKIE).map(|cookie| cookie.value().to_owned());
    match requested {
        Some(Role::User) => client(),
        Some(Role::Therapist) => therapist(),
        None => client().or_else(therapist),
    }
}

/// The request's `Origin` is this server's own (same host and port as the
/// `Host` header) or on the allow-list.
fn origin_allowed(headers: &HeaderMap, allowed: &[String]) -> bool {
    let Some(origin) = headers.get(ORIGIN).and_then(|value| value.to_str().ok()) else {
        return false;
    };
    let origin = origin.trim_end_matches('/');
    if allowed.iter().any(|allowed| allowed.eq_ignore_ascii_case(origin)) {
        return true;
    }
    let authority = origin.strip_prefix("https://").or_else(|| origin.strip_prefix("http://"));
    let host = headers.get(HOST).and_then(|value| value.to_str().ok());
    matches!((authority, host), (Some(authority), Some(host)) if authority.eq_ignore_ascii_case(host))
}

/// Completes a refused upgrade with a close frame carrying the reason.
async fn close(mut socket: WebSocket, code: u16, reason: &'static str) {
    let frame = CloseFrame { code, reason: reason.into() };
    let _ = socket.send(Message::Close(Some(frame))).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(origin: Option<&str>, host: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(HOST, host.parse().unwrap());
        if let Some(origin) = origin {
            headers.insert(ORIGIN, origin.parse().unwrap());
        }
        headers
    }

    #[test]
    fn own_origin_and_allow_list_pass_others_do_not() {
        let allowed = vec!["https://chat.example.org".to_owned()];
        assert!(origin_allowed(&headers(Some("http://127.0.0.1:8000"), "127.0.0.1:8000"), &allowed));
        assert!(origin_allowed(&headers(Some("https://chat.example.org"), "10.0.0.1:8000"), &allowed));
        assert!(!origin_allowed(&headers(Some("http://127.0.0.1:8001"), "127.0.0.1:8000"), &allowed));
        assert!(!origin_allowed(&headers(Some("https://evil.example"), "127.0.0.1:8000"), &allowed));
        assert!(!origin_allowed(&headers(None, "127.0.0.1:8000"), &allowed));
    }
}
