//! The therapist's appointments list.

use std::cmp::Reverse;
use std::convert::Infallible;

use axum::extract::State;
use axum::http::header::LINK;
use axum::http::{HeaderMap, HeaderValue};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use futures_util::Stream;
use haven_protocol::RiskLevel;
use haven_protocol::api::{Appointment, ClosedAppointment, MessagePreview};
use haven_store::ChatSession;
use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;
use tokio::sync::broadcast::error::RecvError;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use uuid::Uuid;

use super::openapi::ErrorBody;
use super::{ApiError, Json, Query};
use crate::auth::{self, AuthTherapist};
use crate::chat::queue::OnDuty;
use crate::chat::{Revocation, RiskFeed};
use crate::limits::Slot;
use crate::startup::AppState;

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list_appointments))
        .routes(routes!(appointment_events))
        .routes(routes!(closed_appointments))
}

/// Rows of `GET /api/appointments` per page, by default and at most.
pub const PAGE_MAX: usize = 200;

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
struct PageQuery {
    /// Rows per page: 1 to 200 (by default 200 for the open list, 50 for
    /// the closed one).
    #[param(minimum = 1, maximum = 200)]
    limit: Option<usize>,
    /// Where the page starts: only as given in a `Link: <…>; rel="next"`
    /// header.
    cursor: Option<String>,
}

/// One event of `GET /api/appointments/events`: its name (`event:`) and
/// its data (`data:`, one line of JSON).
#[derive(Debug, Serialize, utoipa::ToSchema)]
#[serde(tag = "event", content = "data", rename_all = "lowercase")]
pub enum AppointmentEvent {
    /// The list may have changed: read `GET /api/appointments` again.
    Changed(Changed),
    /// A session the caller can see was flagged.
    Risk(RiskEvent),
}

/// The data of a `changed` event: `{}`.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Changed {}

/// The data of a `risk` event.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct RiskEvent {
    pub session_id: Uuid,
    /// The session's level now.
    pub level: RiskLevel,
}

impl AppointmentEvent {
    /// The event as sent: its name and data are its JSON's `event` and
    /// `data`, so the wire is what the schema says.
    fn to_sse(&self) -> SseEvent {
        let json = serde_json::to_value(self).unwrap_or_default();
        let name = json["event"].as_str().unwrap_or_default();
        SseEvent::default().event(name).data(json["data"].to_string())
    }
}

/// Where a row sorts: flagged sessions that need attention first, highest
/// level first; then unclaimed ones (waiting for a therapist), the longest
/// waiting first; then the caller's own, newest activity first. Compared
/// descending.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct SortKey {
    attention: bool,
    level: u8,
    unclaimed: bool,
    activity: i128,
    id: Uuid,
}

impl SortKey {
    fn of(session: &ChatSession) -> Self {
        let unclaimed = session.therapist_id.is_none();
        // The list is in descending key order: a waiting client who came
        // earlier ranks higher; a chat in progress, by its last activity.
        let activity = match unclaimed {
            true => -session.created_at.unix_timestamp_nanos(),
            false => session.last_message_at.unwrap_or(session.created_at).unix_timestamp_nanos(),
        };
        let attention = session.risk.as_ref().filter(|risk| risk.needs_attention());
        Self {
            attention: attention.is_some(),
            level: attention.map_or(0, |risk| risk.level as u8),
            unclaimed,
            activity,
            id: session.id,
        }
    }

    /// The opaque cursor: where the next page starts.
    fn cursor(self) -> String {
        let (attention, unclaimed) = (u8::from(self.attention), u8::from(self.unclaimed));
        format!("{attention}.{}.{unclaimed}.{}.{}", self.level, self.activity, self.id)
    }

    fn parse(cursor: &str) -> Option<Self> {
        let mut parts = cursor.split('.');
        let mut next = || parts.next();
        let key = Self {
            attention: next()?.parse::<u8>().ok()? == 1,
            level: next()?.parse().ok()?,
            unclaimed: next()?.parse::<u8>().ok()? == 1,
            activity: next()?.parse().ok()?,
            id: next()?.parse().ok()?,
        };
        next().is_none().then_some(key)
    }
}

/// Sessions in the order of the appointments list.
pub fn waiting_order<'a>(sessions: impl Iterator<Item = &'a ChatSession>) -> Vec<Uuid> {
    let mut keys: Vec<SortKey> = sessions.map(SortKey::of).collect();
    keys.sort_unstable_by_key(|key| Reverse(*key));
    keys.into_iter().map(|key| key.id).collect()
}

/// The open chats the caller can take or has taken.
///
/// `GET /api/appointments?limit=N&cursor=C`: the open sessions the caller
/// can take or has taken, in pages of at most [`PAGE_MAX`] (the default),
/// ordered by [`SortKey`]. Unclaimed sessions that nobody has touched for
/// `--waiting-hours` leave the list (flagged ones stay). When there is
/// more, a `Link: <…>; rel="next"` header gives the next page's URL.
#[utoipa::path(
    get,
    path = "/api/appointments",
    tag = "appointments",
    params(PageQuery),
    security(("therapist_token" = []), ("therapist_cookie" = [])),
    responses(
        (status = 200, description = "One page of the list.", body = Vec<Appointment>,
            headers(("link" = String, description = "`</api/appointments?limit=N&cursor=C>; rel=\"next\"` when there is more"))),
        (status = 400, description = "`invalid_query`: a limit out of range, or a cursor this server did not give.", body = ErrorBody),
        (status = 401, description = "`unauthorized`", body = ErrorBody),
        (status = 500, description = "`internal`", body = ErrorBody),
        (status = 503, description = "`unavailable`", body = ErrorBody),
    )
)]
async fn list_appointments(
    State(state): State<AppState>,
    caller: AuthTherapist,
    Query(page): Query<PageQuery>,
) -> Result<(HeaderMap, Json<Vec<Appointment>>), ApiError> {
    let limit = page.limit.unwrap_or(PAGE_MAX);
    if !(1..=PAGE_MAX).contains(&limit) {
        return Err(ApiError::bad_request("invalid_query", format!("limit must be 1 to {PAGE_MAX}")));
    }
    let after = match page.cursor.as_deref().map(SortKey::parse) {
        None => None,
        Some(Some(key)) => Some(key),
        Some(None) => {
            return Err(ApiError::bad_request("invalid_query", "cursor is not one this server gave"));
        }
    };
    let waiting_since = haven_store::now() - state.settings.waiting_window;
    let sessions = state.store.appointments_for(caller.therapist.id, waiting_since).await?;
    let mut labels = state.store.client_labels(caller.therapist.id).await?;
    let mut glances = state.store.glances_for(caller.therapist.id, waiting_since).await?;
    let mut appointments: Vec<(SortKey, Appointment)> = sessions
        .into_iter()
        .map(|session| (SortKey::of(&session), session))
        .filter(|(key, _)| after.is_none_or(|after| *key < after))
        .map(|(key, session)| {
            let glance = glances.remove(&session.id);
            let unread = glance.as_ref().map_or(0, |glance| glance.unread);
            (
                key,
                Appointment {
                    appointment_id: session.appointment_id,
                    session_id: session.id,
                    status: session.status,
                    chat_mode: session.chat_mode,
                    companion_paused: session.companion_paused,
                    client_label: labels.remove(&session.id),
                    client_online: state.hub.client_online(session.id),
                    therapist_id: session.therapist_id,
                    created_at: session.created_at,
                    last_message_at: session.last_message_at,
                    risk_level: session.risk.as_ref().map_or(RiskLevel::None, |risk| risk.level),
                    risk_first_flagged_at: session.risk.as_ref().map(|risk| risk.first_flagged_at),
                    risk_last_flagged_at: session.risk.as_ref().map(|risk| risk.last_flagged_at),
                    risk_needs_attention: session.risk.as_ref().is_some_and(|risk| risk.needs_attention()),
                    unread: u32::try_from(unread).unwrap_or(u32::MAX),
                    last_message: glance
                        .and_then(|glance| glance.last)
                        .map(|last| MessagePreview::of(&session.for_therapists(last))),
                },
            )
        })
        .collect();
    appointments.sort_unstable_by_key(|(key, _)| Reverse(*key));
    let more = appointments.len() > limit;
    appointments.truncate(limit);
    let mut headers = HeaderMap::new();
    if let Some((last, _)) = appointments.last().filter(|_| more) {
        let next = format!("</api/appointments?limit={limit}&cursor={}>; rel=\"next\"", last.cursor());
        headers.insert(LINK, HeaderValue::from_str(&next).map_err(|e| ApiError::Internal(e.into()))?);
    }
    Ok((headers, Json(appointments.into_iter().map(|(_, appointment)| appointment).collect())))
}

/// The caller's closed chats.
///
/// `GET /api/appointments/closed?limit=N&cursor=C`: the caller's closed
/// chats, the most recently closed first, in pages of at most
/// [`PAGE_MAX`] (50 by default), with a `Link: <…>; rel="next"` header
/// when there is more. Each chat's transcript opens read-only in the chat
/// page and downloads as the open ones do.
#[utoipa::path(
    get,
    path = "/api/appointments/closed",
    tag = "appointments",
    params(PageQuery),
    security(("therapist_token" = []), ("therapist_cookie" = [])),
    responses(
        (status = 200, description = "One page, the most recently closed first.", body = Vec<ClosedAppointment>,
            headers(("link" = String, description = "`</api/appointments/closed?limit=N&cursor=C>; rel=\"next\"` when there is more"))),
        (status = 400, description = "`invalid_query`: a limit out of range, or a cursor this server did not give.", body = ErrorBody),
        (status = 401, description = "`unauthorized`", body = ErrorBody),
        (status = 500, description = "`internal`", body = ErrorBody),
        (status = 503, description = "`unavailable`", body = ErrorBody),
    )
)]
async fn closed_appointments(
    State(state): State<AppState>,
    caller: AuthTherapist,
    Query(page): Query<PageQuery>,
) -> Result<(HeaderMap, Json<Vec<ClosedAppointment>>), ApiError> {
    let limit = page.limit.unwrap_or(50);
    if !(1..=PAGE_MAX).contains(&limit) {
        return Err(ApiError::bad_request("invalid_query", format!("limit must be 1 to {PAGE_MAX}")));
    }
    let before =
        match page.cursor.as_deref() {
            None => None,
            Some(cursor) => Some(parse_closed_cursor(cursor).ok_or_else(|| {
                ApiError::bad_request("invalid_query", "cursor is not one this server gave")
            })?),
        };
    // One more than asked: whether there is a next page.
    let mut sessions = state.store.closed_for(caller.therapist.id, before, limit as u32 + 1).await?;
    let more = sessions.len() > limit;
    sessions.truncate(limit);
    let mut labels = state.store.client_labels(caller.therapist.id).await?;
    let mut headers = HeaderMap::new();
    if let Some(last) = sessions.last().filter(|_| more)
        && let Some(closed_at) = last.closed_at
    {
        let cursor = format!("{}.{}", closed_at.unix_timestamp_nanos(), last.id);
        let next = format!("</api/appointments/closed?limit={limit}&cursor={cursor}>; rel=\"next\"");
        headers.insert(LINK, HeaderValue::from_str(&next).map_err(|e| ApiError::Internal(e.into()))?);
    }
    let rows = sessions
        .into_iter()
        .filter_map(|session| {
            Some(ClosedAppointment {
                appointment_id: session.appointment_id,
                client_label: labels.remove(&session.id),
                session_id: session.id,
                created_at: session.created_at,
                closed_at: session.closed_at?,
                messages: session.last_seq,
                risk_level: session.risk.as_ref().map_or(RiskLevel::None, |risk| risk.level),
            })
        })
        .collect();
    Ok((headers, Json(rows)))
}

fn parse_closed_cursor(cursor: &str) -> Option<(time::OffsetDateTime, Uuid)> {
    let (nanos, id) = cursor.split_once('.')?;
    let closed_at = time::OffsetDateTime::from_unix_timestamp_nanos(nanos.parse().ok()?).ok()?;
    Some((closed_at, id.parse().ok()?))
}

/// Server-sent events: the list changed, or a session was flagged.
///
/// `GET /api/appointments/events`: server-sent `changed` events whenever the
/// list may have changed (the dashboard then re-reads `/api/appointments`),
/// and a `risk` event `{"session_id", "level"}` the moment a session the
/// caller can see is flagged. A login holds at most
/// `--max-event-streams-per-login` streams (429 beyond). A stream ends at
/// shutdown, at once when its login is revoked on this instance, and
/// otherwise within one heartbeat interval of its login ending in any way
/// (logout or revocation elsewhere, `haven therapist disable` or `passwd`,
/// idle expiry): like a socket's heartbeat, it re-checks its credential.
///
/// Events: `event: changed` with `data: {}`, and `event: risk` with a
/// [RiskEvent](#/components/schemas/RiskEvent) as `data`; comments keep the
/// stream alive. The content's schema is one event, as its name and data.
#[utoipa::path(
    get,
    path = "/api/appointments/events",
    tag = "appointments",
    security(("therapist_token" = []), ("therapist_cookie" = [])),
    responses(
        (status = 200, description = "The event stream, open until the login ends or the server stops.",
            body = AppointmentEvent, content_type = "text/event-stream"),
        (status = 401, description = "`unauthorized`", body = ErrorBody),
        (status = 429, description = "`rate_limited`: this login has too many streams open.", body = ErrorBody,
            headers(("retry-after" = u64, description = "Seconds to wait"))),
        (status = 500, description = "`internal`", body = ErrorBody),
        (status = 503, description = "`unavailable`", body = ErrorBody),
    )
)]
async fn appointment_events(
    State(state): State<AppState>,
    caller: AuthTherapist,
) -> Result<Sse<impl Stream<Item = Result<SseEvent, Infallible>>>, ApiError> {
    /// What the stream waits on.
    struct Feed {
        changes: broadcast::Receiver<()>,
        risks: RiskFeed,
        revocations: broadcast::Receiver<Revocation>,
        recheck: tokio::time::Interval,
        state: AppState,
        login: [u8; 32],
        therapist_id: Uuid,
        _slot: Slot<[u8; 32]>,
        /// An open list counts its therapist as online for waiting clients.
        _on_duty: OnDuty,
    }
    let login = auth::token_hash(&caller.token);
    let period = std::time::Duration::from_secs(state.limits.settings.heartbeat_seconds.max(1));
    let slot =
        state.limits.open_event_stream(login).ok_or(ApiError::TooManyRequests { retry_after: period })?;
    let feed = Feed {
        changes: state.hub.watch_appointments(),
        risks: state.hub.watch_risks(caller.therapist.id),
        revocations: state.hub.watch_revocations(),
        recheck: tokio::time::interval_at(tokio::time::Instant::now() + period, period),
        state: state.clone(),
        login,
        therapist_id: caller.therapist.id,
        _slot: slot,
        _on_duty: OnDuty::start(&state, caller.therapist.id),
    };
    let events = futures_util::stream::unfold(feed, |mut feed| async move {
        loop {
            tokio::select! {
                () = feed.state.shutdown.cancelled() => return None,
                _ = feed.recheck.tick() => {
                    let settings = &feed.state.settings;
                    // Reading does not count as activity: an open dashboard
                    // does not keep an idle login alive.
                    match feed.state.store.therapist_by_token(&feed.login, haven_store::now(), settings.therapist_idle, false).await {
                        Ok(Some(_)) => continue,
                        Ok(None) => {
                            tracing::info!("event stream: login ended, closing");
                            return None;
                        }
                        // A database outage is not the therapist's fault.
                        Err(error) => {
                            tracing::warn!(error = %error, "event stream: credential re-check failed");
                            continue;
                        }
                    }
                }
                revoked = feed.revocations.recv() => match revoked {
                    Ok(Revocation::Login(hash)) if hash == feed.login => return None,
                    Ok(Revocation::Therapist(id)) if id == feed.therapist_id => return None,
                    Err(RecvError::Closed) => return None,
                    _ => continue,
                },
                alert = feed.risks.recv() => match alert {
                    Ok(alert) => {
                        let risk = RiskEvent { session_id: alert.session_id, level: alert.level };
                        return Some((Ok(AppointmentEvent::Risk(risk).to_sse()), feed));
                    }
                    // Missed alerts still show in the list the next `changed` brings.
                    Err(RecvError::Lagged(_)) => continue,
                    Err(RecvError::Closed) => return None,
                },
                next = feed.changes.recv() => match next {
                    // A lagged receiver missed some ticks; one refresh covers them all.
                    Ok(()) | Err(RecvError::Lagged(_)) => {
                        return Some((Ok(AppointmentEvent::Changed(Changed {}).to_sse()), feed));
                    }
                    Err(RecvError::Closed) => return None,
                },
            }
        }
    });
    Ok(Sse::new(events).keep_alive(KeepAlive::default()))
}
