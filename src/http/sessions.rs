//! Chat sessions: "Chat Now" and the message history.

use std::net::SocketAddr;

use axum::extract::{ConnectInfo, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum_extra::extract::CookieJar;
use axum_extra::extract::cookie::Cookie;
use haven_protocol::api::{
    AccessLog, AccessRecord, ClientLabel, CompanionSharing, CreatedSession, HandBackRequest,
    MAX_CLIENT_LABEL_CHARS, MessagePage, Transcript,
};
use haven_protocol::{CLOSE_MESSAGE, MAX_CONTENT_CHARS, hand_back_message};
use haven_protocol::{ChatMessage, MessageKind, Sender};
use haven_store::{
    Action, Actor, CloseOutcome, EraseOutcome, HandBackOutcome, Origin, SharingOutcome, TrailEntry,
    TrailFilter,
};
use serde::Deserialize;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use uuid::Uuid;

use super::openapi::ErrorBody;
use super::{ApiError, Json, Path, SessionPath};
use crate::auth::{self, AuthTherapist, CLIENT_TOKEN_PREFIX, Credential, THERAPIST_COOKIE};
use crate::startup::AppState;

/// Default and largest page of `GET /api/sessions/{id}/messages`.
const DEFAULT_PAGE: i64 = 100;
const MAX_PAGE: i64 = 500;

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(create_session))
        .routes(routes!(erase_session))
        .routes(routes!(set_companion_sharing))
        .routes(routes!(list_messages))
        .routes(routes!(close_session))
        .routes(routes!(hand_back))
        .routes(routes!(client_label, set_client_label))
        .routes(routes!(transcript))
        .routes(routes!(access_log))
}

/// Chat Now: a new chat session.
///
/// `POST /api/sessions`: a new `BOT_ONLY` session and its client credential,
/// returned in the body and set as an HttpOnly cookie for browsers.
#[utoipa::path(
    post,
    path = "/api/sessions",
    tag = "sessions",
    responses(
        (status = 201, description = "The session, and its client token (shown once).", body = CreatedSession,
            headers(("set-cookie" = String, description = "`haven_client_{session id as 32 hex digits}`: the same token, HttpOnly"))),
        (status = 429, description = "`rate_limited`: too many new sessions from this address.", body = ErrorBody,
            headers(("retry-after" = u64, description = "Seconds to wait"))),
        (status = 500, description = "`internal`", body = ErrorBody),
        (status = 503, description = "`unavailable`: the database is unreachable.", body = ErrorBody),
    )
)]
async fn create_session(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    jar: CookieJar,
) -> Result<(StatusCode, CookieJar, Json<CreatedSession>), ApiError> {
    if let Some(retry_after) = state.limits.new_session(&*state.store, peer.ip()).await? {
        tracing::warn!("chat session refused: too many from this address");
        crate::limits::count_refusal("sessions_per_ip");
        return Err(ApiError::TooManyRequests { retry_after });
    }
    let token = auth::new_token(CLIENT_TOKEN_PREFIX);
    let created = state.store.create_chat_session(&auth::token_hash(&token)).await?;
    let session = created.outcome;
    tracing::info!(session_id = %session.id, chat_mode = session.chat_mode.as_str(), "chat session created");
    state.hub.apply(created.events);
    // One cookie per chat, so the browser keeps the chats it started; the
    // oldest goes when there are too many.
    let mut jar = jar;
    for (old, _) in auth::client_cookies(&jar).into_iter().skip(auth::MAX_CHATS_PER_BROWSER - 1) {
        jar = jar.remove(Cookie::build(auth::client_cookie_name(old)).path("/"));
    }
    let name = auth::client_cookie_name(session.id);
    let jar = jar.add(auth::auth_cookie(name, token.clone(), state.settings.cookie_secure));
    let body = CreatedSession {
        session_id: session.id,
        appointment_id: session.appointment_id,
        client_token: token,
        chat_mode: session.chat_mode,
    };
    Ok((StatusCode::CREATED, jar, Json(body)))
}

/// What a client is told when a therapist has joined the chat it asked to
/// erase.
pub const JOINED_NO_ERASURE: &str = "A therapist has joined this chat, so it is part of the clinic's \
record and cannot be deleted here. To have it deleted, ask the clinic.";

/// The chat a client credential of the request (cookie or bearer) is for,
/// if it is `session_id`: `401` without a valid credential, `403` with
/// another chat's or a therapist's, `404` for an id that is not a UUID.
async fn own_chat(state: &AppState, headers: &HeaderMap, session_id: &str) -> Result<Uuid, ApiError> {
    let canonical = super::canonical_uuid(session_id);
    let mut credentials = Vec::new();
    for token in request_tokens(headers, canonical) {
        if let Some(credential) = auth::resolve(state, &token).await? {
            credentials.push(credential);
        }
    }
    if credentials.is_empty() {
        return Err(ApiError::Unauthorized);
    }
    let session_id = canonical.ok_or(ApiError::NotFound)?;
    let own = credentials
        .iter()
        .any(|credential| matches!(credential, Credential::Client { session_id: own } if *own == session_id));
    if own { Ok(session_id) } else { Err(ApiError::Forbidden) }
}

/// The client's choice: may the therapist see the conversation with the companion?
///
/// `PUT /api/sessions/{id}/companion-sharing {"shared"}`: the client's
/// choice, while no therapist has joined, whether the therapist who joins
/// sees the conversation with the companion. Until they choose it is
/// private.
#[utoipa::path(
    put,
    path = "/api/sessions/{session_id}/companion-sharing",
    tag = "sessions",
    params(SessionPath),
    request_body = CompanionSharing,
    security(("client_token" = []), ("client_cookie" = [])),
    responses(
        (status = 204, description = "Chosen."),
        (status = 400, description = "`invalid_json`", body = ErrorBody),
        (status = 401, description = "`unauthorized`: no valid credential.", body = ErrorBody),
        (status = 403, description = "`forbidden`: another chat's or a therapist's credential.", body = ErrorBody),
        (status = 404, description = "`not_found`: the id is not a session id.", body = ErrorBody),
        (status = 409, description = "`conflict`: a therapist has joined; the choice is fixed.", body = ErrorBody),
        (status = 413, description = "`payload_too_large`", body = ErrorBody),
        (status = 500, description = "`internal`", body = ErrorBody),
        (status = 503, description = "`unavailable`", body = ErrorBody),
    )
)]
async fn set_companion_sharing(
    State(state): State<AppState>,
    Path(session_id): Path<String>,
    headers: HeaderMap,
    Json(request): Json<CompanionSharing>,
) -> Result<StatusCode, ApiError> {
    let session_id = own_chat(&state, &headers, &session_id).await?;
    let chosen = state.store.set_companion_shared(session_id, request.shared).await?;
    match chosen.outcome {
        SharingOutcome::Set => {
            tracing::info!(session_id = %session_id, shared = request.shared, "companion part sharing chosen");
            state.hub.apply(chosen.events);
            Ok(StatusCode::NO_CONTENT)
        }
        SharingOutcome::Joined => {
            Err(ApiError::Conflict("a therapist has joined: the choice can no longer change".into()))
        }
    }
}

/// The client erases their chat.
///
/// `DELETE /api/sessions/{id}`: the client erases their chat, while no
/// therapist has joined it. Every message and flag record and the
/// credential are deleted, not hidden; the chat leaves every dashboard, and
/// its sockets close with 1008 "chat erased".
#[utoipa::path(
    delete,
    path = "/api/sessions/{session_id}",
    tag = "sessions",
    params(SessionPath),
    security(("client_token" = []), ("client_cookie" = [])),
    responses(
        (status = 204, description = "Erased; the chat's cookie is cleared.",
            headers(("set-cookie" = String, description = "Clears `haven_client_{id}`"))),
        (status = 401, description = "`unauthorized`: no valid credential.", body = ErrorBody),
        (status = 403, description = "`forbidden`: another chat's or a therapist's credential.", body = ErrorBody),
        (status = 404, description = "`not_found`: the id is not a session id.", body = ErrorBody),
        (status = 409, description = "`conflict`: a therapist has joined this chat.", body = ErrorBody),
        (status = 500, description = "`internal`", body = ErrorBody),
        (status = 503, description = "`unavailable`", body = ErrorBody),
    )
)]
async fn erase_session(
    State(state): State<AppState>,
    Path(session_id): Path<String>,
    headers: HeaderMap,
    jar: CookieJar,
) -> Result<(StatusCode, CookieJar), ApiError> {
    let session_id = own_chat(&state, &headers, &session_id).await?;
    let erased = state.store.erase_chat(session_id).await?;
    match erased.outcome {
        EraseOutcome::Erased { .. } => {
            tracing::info!(session_id = %session_id, "chat erased by its client");
            state.hub.apply(erased.events);
            let cookie = Cookie::build(auth::client_cookie_name(session_id)).path("/");
            Ok((StatusCode::NO_CONTENT, jar.remove(cookie)))
        }
        EraseOutcome::Joined => Err(ApiError::Conflict(JOINED_NO_ERASURE.into())),
    }
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
struct PageQuery {
    /// Only messages with a greater seq (default 0).
    #[param(minimum = 0)]
    after: Option<i64>,
    /// At most this many (default 100; more than 500 is read as 500).
    #[param(minimum = 1)]
    limit: Option<i64>,
}

/// A session's messages, in seq order.
///
/// `GET /api/sessions/{id}/messages?after=SEQ&limit=N`: for the session's
/// client or its assigned therapist. A therapist's read is recorded in the
/// audit trail.
#[utoipa::path(
    get,
    path = "/api/sessions/{session_id}/messages",
    tag = "sessions",
    params(SessionPath, PageQuery),
    security(("client_token" = []), ("client_cookie" = []), ("therapist_token" = []), ("therapist_cookie" = [])),
    responses(
        (status = 200, description = "The page of messages.", body = MessagePage),
        (status = 400, description = "`invalid_query`", body = ErrorBody),
        (status = 401, description = "`unauthorized`: no valid credential.", body = ErrorBody),
        (status = 403, description = "`forbidden`: not this session's client or therapist.", body = ErrorBody),
        (status = 404, description = "`not_found`: no such session.", body = ErrorBody),
        (status = 500, description = "`internal`", body = ErrorBody),
        (status = 503, description = "`unavailable`", body = ErrorBody),
    )
)]
async fn list_messages(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Path(session_id): Path<String>,
    query: Result<Query<PageQuery>, axum::extract::rejection::QueryRejection>,
    headers: HeaderMap,
) -> Result<Json<MessagePage>, ApiError> {
    let Query(query) = query?;
    let after = query.after.unwrap_or(0);
    if after < 0 {
        return Err(ApiError::bad_request("invalid_query", "after must be 0 or more"));
    }
    let limit = query.limit.unwrap_or(DEFAULT_PAGE);
    if limit < 1 {
        return Err(ApiError::bad_request("invalid_query", "limit must be at least 1"));
    }
    // Who is asking comes first: without a credential nothing is revealed,
    // not even whether the session exists.
    let mut credentials = Vec::new();
    for token in request_tokens(&headers, super::canonical_uuid(&session_id)) {
        if let Some(credential) = auth::resolve(&state, &token).await? {
            credentials.push(credential);
        }
    }
    if credentials.is_empty() {
        return Err(ApiError::Unauthorized);
    }
    let session_id = super::canonical_uuid(&session_id).ok_or(ApiError::NotFound)?;
    let session = state.store.chat_session(session_id).await?.ok_or(ApiError::NotFound)?;
    let therapist = credentials.iter().find_map(|credential| match credential {
        Credential::Therapist(therapist) if session.therapist_id == Some(therapist.id) => Some(therapist.id),
        _ => None,
    });
    let client = credentials
        .iter()
        .any(|credential| matches!(credential, Credential::Client { session_id: own } if *own == session.id));
    let limit = limit.min(MAX_PAGE);
    // A therapist's read is recorded in the audit trail; the client reading
    // their own chat is not.
    let messages = match (therapist, client) {
        (Some(therapist_id), _) => {
            let read = TrailEntry::new(Actor::Therapist(therapist_id), Action::Read).address(Some(peer.ip()));
            let messages = state.store.read_messages(session.id, after, limit, read).await?;
            messages.into_iter().map(|message| session.for_therapists(message)).collect()
        }
        (None, true) => state.store.messages_after(session.id, after, limit).await?,
        (None, false) => {
            // Another therapist's chat: the attempt is recorded.
            for credential in &credentials {
                if let Credential::Therapist(therapist) = credential {
                    let read = TrailEntry::new(Actor::Therapist(therapist.id), Action::Read);
                    state
                        .store
                        .append_trail(read.session(session.id).address(Some(peer.ip())).refused())
                        .await?;
                }
            }
            return Err(ApiError::Forbidden);
        }
    };
    Ok(Json(MessagePage { messages }))
}

/// Who read or changed the chat.
///
/// `GET /api/sessions/{id}/access-log`: who read or changed the chat, for
/// its therapist (the chat page's "Access log"). Read-only: the trail is
/// only ever appended to.
#[utoipa::path(
    get,
    path = "/api/sessions/{session_id}/access-log",
    tag = "sessions",
    params(SessionPath),
    security(("therapist_token" = []), ("therapist_cookie" = [])),
    responses(
        (status = 200, description = "The chat's records, oldest first.", body = AccessLog),
        (status = 401, description = "`unauthorized`", body = ErrorBody),
        (status = 403, description = "`forbidden`: not the caller's chat.", body = ErrorBody),
        (status = 404, description = "`not_found`: no such session.", body = ErrorBody),
        (status = 500, description = "`internal`", body = ErrorBody),
        (status = 503, description = "`unavailable`", body = ErrorBody),
    )
)]
async fn access_log(
    State(state): State<AppState>,
    Path(session_id): Path<String>,
    caller: AuthTherapist,
) -> Result<Json<AccessLog>, ApiError> {
    let session_id = super::canonical_uuid(&session_id).ok_or(ApiError::NotFound)?;
    let session = state.store.chat_session(session_id).await?.ok_or(ApiError::NotFound)?;
    if session.therapist_id != Some(caller.therapist.id) {
        return Err(ApiError::Forbidden);
    }
    let names: std::collections::HashMap<Uuid, String> =
        state.store.therapists().await?.into_iter().map(|therapist| (therapist.id, therapist.name)).collect();
    let mut filter = TrailFilter { session_id: Some(session_id), limit: MAX_PAGE, ..TrailFilter::default() };
    let mut records = Vec::new();
    loop {
        let page = state.store.trail(&filter).await?;
        let Some(last) = page.last() else { break };
        filter.after = last.seq;
        records.extend(page.into_iter().map(|record| AccessRecord {
            seq: record.seq,
            at: record.at,
            therapist: record.therapist_id.and_then(|id| names.get(&id).cloned()),
            actor: record.actor,
            action: record.action,
            address: record.address,
            outcome: record.outcome,
            detail: record.detail,
        }));
    }
    Ok(Json(AccessLog { records }))
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
struct TranscriptQuery {
    /// `json` (the default) or `markdown`.
    #[param(pattern = "^(json|markdown)$")]
    format: Option<String>,
}

/// The whole chat, as a file.
///
/// `GET /api/sessions/{id}/transcript?format=markdown|json`: the whole
/// chat, with every message's sender, kind and time, as a file for the
/// session's therapist to keep. The read is recorded in the audit trail.
#[utoipa::path(
    get,
    path = "/api/sessions/{session_id}/transcript",
    tag = "sessions",
    params(SessionPath, TranscriptQuery),
    security(("therapist_token" = []), ("therapist_cookie" = [])),
    responses(
        (status = 200, description = "The transcript, as an attachment.",
            content((Transcript = "application/json"), (String = "text/markdown")),
            headers(("content-disposition" = String, description = "`attachment; filename=\"haven-chat-XXXXXXXX.json\"` (or `.md`)"))),
        (status = 400, description = "`invalid_query`: an unknown format.", body = ErrorBody),
        (status = 401, description = "`unauthorized`", body = ErrorBody),
        (status = 403, description = "`forbidden`: not the caller's chat.", body = ErrorBody),
        (status = 404, description = "`not_found`: no such session.", body = ErrorBody),
        (status = 500, description = "`internal`", body = ErrorBody),
        (status = 503, description = "`unavailable`", body = ErrorBody),
    )
)]
async fn transcript(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Path(session_id): Path<String>,
    query: Result<Query<TranscriptQuery>, axum::extract::rejection::QueryRejection>,
    caller: AuthTherapist,
) -> Result<axum::response::Response, ApiError> {
    use axum::response::IntoResponse;
    let Query(query) = query?;
    let markdown = match query.format.as_deref() {
        None | Some("json") => false,
        Some("markdown") => true,
        Some(_) => return Err(ApiError::bad_request("invalid_query", "format must be markdown or json")),
    };
    let session_id = super::canonical_uuid(&session_id).ok_or(ApiError::NotFound)?;
    let session = state.store.chat_session(session_id).await?.ok_or(ApiError::NotFound)?;
    if session.therapist_id != Some(caller.therapist.id) {
        return Err(ApiError::Forbidden);
    }
    let mut messages: Vec<ChatMessage> = Vec::new();
    loop {
        let after = messages.last().map_or(0, |message| message.seq);
        let export = TrailEntry::new(Actor::Therapist(caller.therapist.id), Action::Export);
        let page =
            state.store.read_messages(session_id, after, MAX_PAGE, export.address(Some(peer.ip()))).await?;
        if page.is_empty() {
            break;
        }
        let page = page.into_iter().map(|message| session.for_therapists(message));
        messages.extend(page);
    }
    tracing::info!(session_id = %session_id, messages = messages.len(), markdown, "transcript downloaded");
    let transcript = Transcript {
        session_id,
        started_at: session.created_at,
        chat_mode: session.chat_mode,
        closed: session.closed_at.is_some(),
        messages,
    };
    let name = format!("haven-chat-{}", &session_id.simple().to_string()[..8]);
    let (content_type, extension, body) = if markdown {
        ("text/markdown; charset=utf-8", "md", transcript_markdown(&transcript))
    } else {
        let json =
            serde_json::to_string_pretty(&transcript).map_err(|error| ApiError::Internal(error.into()))?;
        ("application/json", "json", json)
    };
    let disposition = format!("attachment; filename=\"{name}.{extension}\"");
    Ok((
        [
            (axum::http::header::CONTENT_TYPE, content_type.to_owned()),
            (axum::http::header::CONTENT_DISPOSITION, disposition),
        ],
        body,
    )
        .into_response())
}

/// A transcript as Markdown: a heading, then each message with its sender
/// and time (UTC), its text quoted line by line.
fn transcript_markdown(transcript: &Transcript) -> String {
    use std::fmt::Write;
    use time::format_description::well_known::Rfc3339;
    let time = |at: time::OffsetDateTime| at.format(&Rfc3339).unwrap_or_default();
    let state = if transcript.closed { "closed" } else { transcript.chat_mode.as_str() };
    let mut out = format!(
        "# Haven chat {}\n\nSession `{}`, started {}, {state}. Times are UTC.\n",
        &transcript.session_id.simple().to_string()[..8],
        transcript.session_id,
        time(transcript.started_at),
    );
    let mut messages = transcript.messages.iter().peekable();
    while let Some(message) = messages.next() {
        if message.private {
            let mut hidden = 1;
            while messages.next_if(|next| next.private).is_some() {
                hidden += 1;
            }
            let _ = write!(out, "\n*{}*\n", private_placeholder(hidden));
            continue;
        }
        let who = match (message.sender, message.kind) {
            (Sender::User, _) => "Client",
            (Sender::Therapist, _) => "Therapist",
            (Sender::Ai, _) => "Companion",
            (Sender::System, MessageKind::Crisis) => "System (crisis resources)",
            (Sender::System, _) => "System",
        };
        let _ = write!(out, "\n**{who}** · {} · #{}\n\n", time(message.created_at), message.seq);
        for line in message.content.lines() {
            let _ = writeln!(out, "> {line}");
        }
    }
    out
}

/// What therapists see in place of `count` messages of the conversation
/// with the companion that the client keeps private.
fn private_placeholder(count: usize) -> String {
    match count {
        1 => "1 earlier message with the companion is private".to_owned(),
        _ => format!("{count} earlier messages with the companion are private"),
    }
}

/// The therapist closes the chat.
///
/// `POST /api/sessions/{id}/close`: the assigned therapist ends the chat.
/// Every socket of the session gets the closing message and then closes with
/// 1008, the session leaves the appointments lists, and the client's
/// credential only reads the transcript from then on. Closing twice is not
/// an error.
#[utoipa::path(
    post,
    path = "/api/sessions/{session_id}/close",
    tag = "sessions",
    params(SessionPath),
    security(("therapist_token" = []), ("therapist_cookie" = [])),
    responses(
        (status = 204, description = "Closed (or already closed)."),
        (status = 401, description = "`unauthorized`", body = ErrorBody),
        (status = 403, description = "`forbidden`: not the caller's chat.", body = ErrorBody),
        (status = 404, description = "`not_found`: no such session.", body = ErrorBody),
        (status = 500, description = "`internal`", body = ErrorBody),
        (status = 503, description = "`unavailable`", body = ErrorBody),
    )
)]
async fn close_session(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Path(session_id): Path<String>,
    caller: AuthTherapist,
) -> Result<StatusCode, ApiError> {
    let session_id = super::canonical_uuid(&session_id).ok_or(ApiError::NotFound)?;
    let closed = state
        .store
        .close_chat_session(session_id, caller.therapist.id, CLOSE_MESSAGE, Some(peer.ip()))
        .await?;
    match closed.outcome {
        CloseOutcome::Closed => {
            tracing::info!(session_id = %session_id, "chat closed by its therapist");
            state.hub.apply(closed.events);
            Ok(StatusCode::NO_CONTENT)
        }
        CloseOutcome::AlreadyClosed => Ok(StatusCode::NO_CONTENT),
        CloseOutcome::NotYours => Err(ApiError::Forbidden),
    }
}

/// The therapist hands the chat back to the companion.
///
/// `POST /api/sessions/{id}/hand-back {"note"}`: the therapist who joined
/// ends their part without closing the chat. In one transaction the note
/// (if any) is stored as the therapist's message, then the hand-back
/// message; the session is `BOT_ONLY` again with the companion paused until
/// the client says yes, and the therapist's sockets close with 1000.
#[utoipa::path(
    post,
    path = "/api/sessions/{session_id}/hand-back",
    tag = "sessions",
    params(SessionPath),
    request_body = HandBackRequest,
    security(("therapist_token" = []), ("therapist_cookie" = [])),
    responses(
        (status = 204, description = "Handed back."),
        (status = 400, description = "`invalid_json`, or `note_too_long` (over 4,000 characters).", body = ErrorBody),
        (status = 401, description = "`unauthorized`", body = ErrorBody),
        (status = 403, description = "`forbidden`: not the caller's chat.", body = ErrorBody),
        (status = 404, description = "`not_found`: no such session.", body = ErrorBody),
        (status = 409, description = "`conflict`: the therapist is not in the chat now, or it is closed.", body = ErrorBody),
        (status = 413, description = "`payload_too_large`", body = ErrorBody),
        (status = 500, description = "`internal`", body = ErrorBody),
        (status = 503, description = "`unavailable`", body = ErrorBody),
    )
)]
async fn hand_back(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Path(session_id): Path<String>,
    caller: AuthTherapist,
    Json(request): Json<HandBackRequest>,
) -> Result<StatusCode, ApiError> {
    let session_id = super::canonical_uuid(&session_id).ok_or(ApiError::NotFound)?;
    let note = request.note.as_deref().map(str::trim).filter(|note| !note.is_empty());
    if note.is_some_and(|note| note.chars().count() > MAX_CONTENT_CHARS) {
        let message = format!("the note is longer than {MAX_CONTENT_CHARS} characters");
        return Err(ApiError::bad_request("note_too_long", message));
    }
    let message = hand_back_message(&caller.therapist.name);
    let by = Origin::new(Actor::Therapist(caller.therapist.id), Some(peer.ip()));
    let handed = state.store.hand_back(session_id, caller.therapist.id, note, &message, by).await?;
    match handed.outcome {
        HandBackOutcome::HandedBack => {
            tracing::info!(session_id = %session_id, "chat handed back to the companion");
            state.hub.apply(handed.events);
            Ok(StatusCode::NO_CONTENT)
        }
        HandBackOutcome::NotJoined => Err(ApiError::Conflict("the therapist is not in this chat now".into())),
        HandBackOutcome::Closed => Err(ApiError::Conflict("the chat is closed".into())),
        HandBackOutcome::NotYours => Err(ApiError::Forbidden),
    }
}

/// The caller's private name for the session's client.
///
/// `GET /api/sessions/{id}/label`: the caller's private name for the
/// session's client, for a therapist who can see the session.
#[utoipa::path(
    get,
    path = "/api/sessions/{session_id}/label",
    tag = "sessions",
    params(SessionPath),
    security(("therapist_token" = []), ("therapist_cookie" = [])),
    responses(
        (status = 200, description = "The name, or `null`.", body = ClientLabel),
        (status = 401, description = "`unauthorized`", body = ErrorBody),
        (status = 403, description = "`forbidden`: another therapist's chat.", body = ErrorBody),
        (status = 404, description = "`not_found`: no such session.", body = ErrorBody),
        (status = 500, description = "`internal`", body = ErrorBody),
        (status = 503, description = "`unavailable`", body = ErrorBody),
    )
)]
async fn client_label(
    State(state): State<AppState>,
    Path(session_id): Path<String>,
    caller: AuthTherapist,
) -> Result<Json<ClientLabel>, ApiError> {
    let session = super::visible_session(&state, &session_id, &caller).await?;
    let mut labels = state.store.client_labels(caller.therapist.id).await?;
    Ok(Json(ClientLabel { label: labels.remove(&session.id) }))
}

/// Names the session's client, for the caller only.
///
/// `PUT /api/sessions/{id}/label {"label"}`: sets (or, blank or `null`,
/// forgets) the caller's private name for the session's client, on one
/// line. Nobody else sees it, the client least of all.
#[utoipa::path(
    put,
    path = "/api/sessions/{session_id}/label",
    tag = "sessions",
    params(SessionPath),
    request_body = ClientLabel,
    security(("therapist_token" = []), ("therapist_cookie" = [])),
    responses(
        (status = 200, description = "The name as stored (whitespace collapsed), or `null`.", body = ClientLabel),
        (status = 400, description = "`invalid_json`, or `label_too_long` (over 60 characters).", body = ErrorBody),
        (status = 401, description = "`unauthorized`", body = ErrorBody),
        (status = 403, description = "`forbidden`: another therapist's chat.", body = ErrorBody),
        (status = 404, description = "`not_found`: no such session.", body = ErrorBody),
        (status = 413, description = "`payload_too_large`", body = ErrorBody),
        (status = 500, description = "`internal`", body = ErrorBody),
        (status = 503, description = "`unavailable`", body = ErrorBody),
    )
)]
async fn set_client_label(
    State(state): State<AppState>,
    Path(session_id): Path<String>,
    caller: AuthTherapist,
    Json(request): Json<ClientLabel>,
) -> Result<Json<ClientLabel>, ApiError> {
    let session = super::visible_session(&state, &session_id, &caller).await?;
    let label = request.label.map(|label| label.split_whitespace().collect::<Vec<_>>().join(" "));
    let label = label.filter(|label| !label.is_empty());
    if label.as_ref().is_some_and(|label| label.chars().count() > MAX_CLIENT_LABEL_CHARS) {
        let message = format!("the name is longer than {MAX_CLIENT_LABEL_CHARS} characters");
        return Err(ApiError::bad_request("label_too_long", message));
    }
    state.store.set_client_label(caller.therapist.id, session.id, label.as_deref()).await?;
    Ok(Json(ClientLabel { label }))
}

/// The tokens a request about a session offers: the bearer token alone if
/// there is one, otherwise the browser's client cookie for that session and
/// the therapist cookie.
fn request_tokens(headers: &HeaderMap, session_id: Option<Uuid>) -> Vec<String> {
    if let Some(token) = auth::bearer(headers) {
        return vec![token.to_owned()];
    }
    let jar = CookieJar::from_headers(headers);
    let client = session_id.and_then(|id| auth::client_cookie(&jar, id));
    client.into_iter().chain(jar.get(THERAPIST_COOKIE).map(|cookie| cookie.value().to_owned())).collect()
}
