//! The web app: server-rendered pages (askama templates in `templates/`)
//! and the static assets they load (`assets/`, embedded in the binary).
//!
//! Pages only choose what to show; every right is checked again by the API
//! and the socket. `?therapist=true` picks the therapist's view of a chat,
//! but the therapist's identity comes from the login cookie alone.

use std::net::SocketAddr;

use askama::Template;
use axum::Form;
use axum::extract::rejection::PathRejection;
use axum::extract::{ConnectInfo, Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum_extra::extract::CookieJar;
use axum_extra::extract::cookie::Cookie;
use serde::Deserialize;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use uuid::Uuid;

use crate::auth::{self, Credential, THERAPIST_COOKIE};
use crate::http::ApiError;
use crate::http::sessions::JOINED_NO_ERASURE;
use crate::safety::CrisisLink;
use crate::startup::AppState;

mod assets;

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(home))
        .routes(routes!(chat))
        .routes(routes!(dashboard))
        .routes(routes!(login_form, login))
        .routes(routes!(logout))
        .routes(routes!(assets::serve))
}

#[derive(Template)]
#[template(path = "home.html")]
struct HomePage {
    /// The chats this browser started, newest first.
    chats: Vec<YourChat>,
}

/// A chat in the home page's "Your chats".
struct YourChat {
    id: Uuid,
    /// RFC 3339, for the page's script to show in local time.
    started: String,
    /// The same in UTC, for a page without script.
    started_text: String,
    state: &'static str,
    state_text: &'static str,
}

impl YourChat {
    fn of(session: &haven_store::ChatSession) -> Self {
        use time::format_description::well_known::Rfc3339;
        let format = time::macros::format_description!(
            "[day padding:none] [month repr:short] [year], [hour]:[minute] UTC"
        );
        let (state, state_text) = match session.chat_mode {
            _ if session.closed_at.is_some() => ("closed", "Closed by the therapist: you can read it"),
            haven_protocol::ChatMode::TherapistJoined => ("joined", "A therapist has joined"),
            haven_protocol::ChatMode::BotOnly => ("companion", "With the companion"),
        };
        Self {
            id: session.id,
            started: session.created_at.format(&Rfc3339).unwrap_or_default(),
            started_text: session.created_at.format(format).unwrap_or_default(),
            state,
            state_text,
        }
    }
}

#[derive(Template)]
#[template(path = "chat.html")]
struct ChatPage<'a> {
    session_id: Uuid,
    therapist_view: bool,
    /// How the therapist's view names the client: "Client" and the last
    /// four hex digits of the session id (the random end of a UUIDv7).
    client_name: String,
    /// The session's flag, for the therapist's view to show at once:
    /// (level, label).
    risk: Option<(&'static str, &'static str)>,
    /// The client's crisis card offers these (docs/safety.md).
    crisis_links: &'a [CrisisLink],
    /// Seconds the joined therapist may be away before the client is
    /// offered the crisis resources and the companion.
    away_seconds: u64,
    /// Why a chat a therapist joined cannot be deleted by its client.
    erase_joined: &'static str,
    /// The client's choice for the companion part: `shared`, `private`,
    /// or empty while they have not chosen.
    sharing: &'static str,
    /// A therapist has joined (now or before): the choice is fixed.
    joined: bool,
}

#[derive(Template)]
#[template(path = "login.html")]
struct LoginPage<'a> {
    problem: Option<&'a str>,
    next: &'a str,
}

#[derive(Template)]
#[template(path = "dashboard.html")]
struct DashboardPage {
    name: String,
}

#[derive(Template)]
#[template(path = "error.html")]
struct ErrorPage<'a> {
    title: &'a str,
    detail: &'a str,
}

/// Renders a template; a template that fails to render is a server error page.
pub(crate) fn page(status: StatusCode, template: &impl Template) -> Response {
    match template.render() {
        Ok(html) => (status, Html(html)).into_response(),
        Err(error) => {
            tracing::error!(error = %error, "template failed to render");
            server_error()
        }
    }
}

/// A friendly HTML error page.
pub fn error_page(status: StatusCode, title: &str, detail: &str) -> Response {
    match (ErrorPage { title, detail }).render() {
        Ok(html) => (status, Html(html)).into_response(),
        Err(_) => (status, title.to_owned()).into_response(),
    }
}

pub fn not_found_page() -> Response {
    error_page(StatusCode::NOT_FOUND, "Page not found", "There is nothing at this address.")
}

fn server_error() -> Response {
    error_page(
        StatusCode::INTERNAL_SERVER_ERROR,
        "Something went wrong",
        "Haven could not show this page. Please try again in a moment.",
    )
}

fn unavailable(error: impl Into<ApiError>) -> Response {
    // Logs the cause (ApiError does) and shows a page instead of JSON.
    let _ = error.into();
    error_page(
        StatusCode::SERVICE_UNAVAILABLE,
        "Haven is busy",
        "Haven cannot reach its database right now. Please try again in a moment.",
    )
}

/// The home page: "Chat Now", and the chats this browser started.
///
/// `/`: "Chat Now", and the chats this browser started (one cookie each).
#[utoipa::path(
    get,
    path = "/",
    tag = "pages",
    responses(
        (status = 200, description = "The page.", body = String, content_type = "text/html"),
        (status = 500, description = "The page failed to render.", body = String, content_type = "text/html"),
        (status = 503, description = "The database is unreachable.", body = String, content_type = "text/html"),
    )
)]
async fn home(State(state): State<AppState>, jar: CookieJar) -> Response {
    let mut chats = Vec::new();
    for (session_id, token) in auth::client_cookies(&jar) {
        match auth::resolve(&state, &token).await {
            Ok(Some(Credential::Client { session_id: own })) if own == session_id => {}
            Ok(_) => continue,
            Err(error) => return unavailable(error),
        }
        match state.store.chat_session(session_id).await {
            Ok(Some(session)) => chats.push(YourChat::of(&session)),
            Ok(None) => {}
            Err(error) => return unavailable(error),
        }
    }
    page(StatusCode::OK, &HomePage { chats })
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
struct ChatQuery {
    /// `true` for the therapist's view (it needs the `haven_therapist`
    /// cookie); it chooses the view only, never a right.
    therapist: Option<String>,
}

/// A session's client as therapists see it named: "Client 59e7".
fn client_name(session_id: Uuid) -> String {
    format!("Client {}", &session_id.simple().to_string()[28..])
}

/// A risk level as the pages word it (as `LEVEL_LABELS` in `alert.js`).
fn level_label(level: haven_protocol::RiskLevel) -> &'static str {
    match level {
        haven_protocol::RiskLevel::None => "No risk",
        haven_protocol::RiskLevel::Concern => "Concern",
        haven_protocol::RiskLevel::High => "High risk",
        haven_protocol::RiskLevel::Imminent => "Imminent risk",
    }
}

/// The chat page (HTML).
///
/// `/chat/{id}` for the session's client; `/chat/{id}?therapist=true` for a
/// logged-in therapist (others are sent to the login page).
#[utoipa::path(
    get,
    path = "/chat/{session_id}",
    tag = "pages",
    params(crate::http::SessionPath, ChatQuery),
    security((), ("client_cookie" = []), ("therapist_cookie" = [])),
    responses(
        (status = 200, description = "The chat page.", body = String, content_type = "text/html"),
        (status = 303, description = "The therapist's view without a login: to the login page.",
            headers(("location" = String, description = "`/therapist/login?next=…`"))),
        (status = 400, description = "The query does not parse.", body = String, content_type = "text/plain"),
        (status = 403, description = "Not this browser's chat, or another therapist's.", body = String, content_type = "text/html"),
        (status = 404, description = "No such chat.", body = String, content_type = "text/html"),
        (status = 500, description = "The page failed to render.", body = String, content_type = "text/html"),
        (status = 503, description = "The database is unreachable.", body = String, content_type = "text/html"),
    )
)]
async fn chat(
    State(state): State<AppState>,
    session_id: Result<Path<String>, PathRejection>,
    Query(query): Query<ChatQuery>,
    jar: CookieJar,
) -> Response {
    let Some(session_id) = session_id.ok().and_then(|Path(id)| crate::http::canonical_uuid(&id)) else {
        return not_found_page();
    };
    let session = match state.store.chat_session(session_id).await {
        Ok(Some(session)) => session,
        Ok(None) => {
            return error_page(StatusCode::NOT_FOUND, "Chat not found", "This chat does not exist.");
        }
        Err(error) => return unavailable(error),
    };
    let therapist_view = query.therapist.as_deref() == Some("true");
    let cookie = |name| jar.get(name).map(|cookie| cookie.value().to_owned());

    if therapist_view {
        let here = format!("/chat/{session_id}?therapist=true");
        let Some(token) = cookie(THERAPIST_COOKIE) else {
            return Redirect::to(&login_url(&here)).into_response();
        };
        return match auth::resolve(&state, &token).await {
            Ok(Some(Credential::Therapist(therapist))) => {
                if session.therapist_id.is_some_and(|holder| holder != therapist.id) {
                    return error_page(
                        StatusCode::FORBIDDEN,
                        "This chat is taken",
                        "Another therapist has joined this chat.",
                    );
                }
                let risk = session.risk.as_ref().map(|risk| (risk.level.as_str(), level_label(risk.level)));
                let crisis_links = state.escalation.links();
                let client_name = client_name(session_id);
                let away_seconds = state.limits.settings.therapist_away_seconds;
                page(
                    StatusCode::OK,
                    &ChatPage {
                        session_id,
                        therapist_view: true,
                        client_name,
                        risk,
                        crisis_links,
                        away_seconds,
                        erase_joined: JOINED_NO_ERASURE,
                        sharing: sharing_of(&session),
                        joined: session.therapist_id.is_some(),
                    },
                )
            }
            Ok(_) => Redirect::to(&login_url(&here)).into_response(),
            Err(error) => unavailable(error),
        };
    }

    let invalid_link = || {
        error_page(
            StatusCode::FORBIDDEN,
            "This chat link is no longer valid",
            "This chat can only be opened in the browser that started it. You can start a new chat from the home page.",
        )
    };
    let Some(token) = auth::client_cookie(&jar, session_id) else {
        return invalid_link();
    };
    match auth::resolve(&state, &token).await {
        Ok(Some(Credential::Client { session_id: own })) if own == session_id => {
            let crisis_links = state.escalation.links();
            let client_name = client_name(session_id);
            let away_seconds = state.limits.settings.therapist_away_seconds;
            page(
                StatusCode::OK,
                &ChatPage {
                    session_id,
                    therapist_view: false,
                    client_name,
                    risk: None,
                    crisis_links,
                    away_seconds,
                    erase_joined: JOINED_NO_ERASURE,
                    sharing: sharing_of(&session),
                    joined: session.therapist_id.is_some(),
                },
            )
        }
        Ok(_) => invalid_link(),
        Err(error) => unavailable(error),
    }
}

fn sharing_of(session: &haven_store::ChatSession) -> &'static str {
    match session.companion_shared {
        None => "",
        Some(true) => "shared",
        Some(false) => "private",
    }
}

/// `/therapist/login?next=PATH` with a local path only.
fn login_url(next: &str) -> String {
    let mut url = String::from("/therapist/login?next=");
    url.extend(next.bytes().map(|byte| match byte {
        b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'/' => (byte as char).to_string(),
        other => format!("%{other:02X}"),
    }));
    url
}

/// Only Haven's own pages that a login leads to may be a redirect target:
/// the dashboard, or a chat by its canonical id, with a plain query at
/// most. Anything else (another host, control characters, whitespace,
/// escapes) leads to the dashboard.
fn local_path(next: Option<&str>) -> &str {
    let known = |path: &str| {
        let (route, query) = path.split_once('?').unwrap_or((path, ""));
        let page = route == "/therapist"
            || route.strip_prefix("/chat/").is_some_and(|id| crate::http::canonical_uuid(id).is_some());
        page && query.bytes().all(|byte| byte.is_ascii_alphanumeric() || b"=&-_".contains(&byte))
    };
    match next {
        Some(path) if known(path) => path,
        _ => "/therapist",
    }
}

/// The therapist's dashboard (HTML).
///
/// The appointments list, kept live by `/api/appointments/events`.
#[utoipa::path(
    get,
    path = "/therapist",
    tag = "pages",
    security((), ("therapist_cookie" = [])),
    responses(
        (status = 200, description = "The dashboard.", body = String, content_type = "text/html"),
        (status = 303, description = "Not logged in: to the login page.",
            headers(("location" = String, description = "`/therapist/login`"))),
        (status = 500, description = "The page failed to render.", body = String, content_type = "text/html"),
        (status = 503, description = "The database is unreachable.", body = String, content_type = "text/html"),
    )
)]
async fn dashboard(State(state): State<AppState>, jar: CookieJar) -> Response {
    let Some(token) = jar.get(THERAPIST_COOKIE).map(|cookie| cookie.value().to_owned()) else {
        return Redirect::to("/therapist/login").into_response();
    };
    match auth::resolve(&state, &token).await {
        Ok(Some(Credential::Therapist(therapist))) => {
            page(StatusCode::OK, &DashboardPage { name: therapist.name })
        }
        Ok(_) => Redirect::to("/therapist/login").into_response(),
        Err(error) => unavailable(error),
    }
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
struct NextQuery {
    /// Where a login leads: the dashboard or a chat page; anything else
    /// leads to the dashboard.
    next: Option<String>,
}

/// The therapists' login form (HTML).
#[utoipa::path(
    get,
    path = "/therapist/login",
    tag = "pages",
    params(NextQuery),
    responses(
        (status = 200, description = "The form.", body = String, content_type = "text/html"),
        (status = 400, description = "The query does not parse.", body = String, content_type = "text/plain"),
        (status = 500, description = "The page failed to render.", body = String, content_type = "text/html"),
    )
)]
async fn login_form(Query(query): Query<NextQuery>) -> Response {
    page(StatusCode::OK, &LoginPage { problem: None, next: local_path(query.next.as_deref()) })
}

#[derive(Deserialize, utoipa::ToSchema)]
#[schema(as = LoginForm)]
struct LoginForm {
    email: String,
    password: String,
    /// Where to go on success: the dashboard or a chat page.
    next: Option<String>,
}

/// The login form's post (HTML).
///
/// The login form: on success the HttpOnly cookie is set and the browser is
/// sent on to `next` (the dashboard by default). The same limits as
/// `POST /api/auth/login` apply.
#[utoipa::path(
    post,
    path = "/therapist/login",
    tag = "pages",
    request_body(content = LoginForm, content_type = "application/x-www-form-urlencoded"),
    responses(
        (status = 303, description = "Logged in: on to `next`.",
            headers(("location" = String), ("set-cookie" = String, description = "`haven_therapist` and `haven_device`"))),
        (status = 400, description = "The form does not parse.", body = String, content_type = "text/plain"),
        (status = 401, description = "The form again: the e-mail or password is incorrect.", body = String, content_type = "text/html"),
        (status = 413, description = "The form is over 16 KiB.", body = String, content_type = "text/plain"),
        (status = 415, description = "The body is not a form.", body = String, content_type = "text/plain"),
        (status = 422, description = "A field is missing.", body = String, content_type = "text/plain"),
        (status = 429, description = "The form again: too many failed attempts.", body = String, content_type = "text/html",
            headers(("retry-after" = u64, description = "Seconds to wait"))),
        (status = 500, description = "The page failed to render.", body = String, content_type = "text/html"),
        (status = 503, description = "The database is unreachable.", body = String, content_type = "text/html"),
    )
)]
async fn login(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    jar: CookieJar,
    Form(form): Form<LoginForm>,
) -> Response {
    let next = local_path(form.next.as_deref()).to_owned();
    match crate::http::auth::start_login(&state, peer.ip(), &form.email, form.password, jar).await {
        Ok((_, token, jar)) => {
            let jar = jar.add(auth::auth_cookie(THERAPIST_COOKIE, token, state.settings.cookie_secure));
            (jar, Redirect::to(&next)).into_response()
        }
        Err(ApiError::InvalidCredentials) => {
            let problem = Some("The e-mail address or password is incorrect.");
            page(StatusCode::UNAUTHORIZED, &LoginPage { problem, next: &next })
        }
        Err(ApiError::TooManyRequests { retry_after }) => {
            let minutes = retry_after.as_secs().div_ceil(60).max(1);
            let problem = format!("Too many failed attempts. Try again in {minutes} minutes.");
            let mut response =
                page(StatusCode::TOO_MANY_REQUESTS, &LoginPage { problem: Some(&problem), next: &next });
            response.headers_mut().insert(header::RETRY_AFTER, crate::http::retry_after_value(retry_after));
            response
        }
        Err(error) => unavailable(error),
    }
}

/// The dashboard's "Log out" (form post).
///
/// Revokes the login and clears the cookie.
#[utoipa::path(
    post,
    path = "/therapist/logout",
    tag = "pages",
    security((), ("therapist_cookie" = [])),
    responses(
        (status = 303, description = "Logged out: to the login page.",
            headers(("location" = String, description = "`/therapist/login`"), ("set-cookie" = String, description = "Clears `haven_therapist`"))),
        (status = 503, description = "The database is unreachable.", body = String, content_type = "text/html"),
    )
)]
async fn logout(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    jar: CookieJar,
) -> Response {
    if let Some(cookie) = jar.get(THERAPIST_COOKIE)
        && let Err(error) = crate::http::auth::end_login(&state, cookie.value(), peer.ip()).await
    {
        return unavailable(error);
    }
    let jar = jar.remove(Cookie::build(THERAPIST_COOKIE).path("/"));
    (jar, Redirect::to("/therapist/login")).into_response()
}

/// Whether a request wants a page rather than JSON (for the 404 fallback).
pub fn wants_html(headers: &HeaderMap, path: &str) -> bool {
    !path.starts_with("/api/")
        && headers
            .get(header::ACCEPT)
            .and_then(|accept| accept.to_str().ok())
            .is_some_and(|accept| accept.contains("text/html"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_local_paths_are_redirect_targets() {
        let chat = "/chat/0192a6f0-7a4e-7c3d-9f1e-2b3c4d5e6f70?therapist=true";
        assert_eq!(local_path(Some(chat)), chat);
        assert_eq!(local_path(Some("/therapist")), "/therapist");
        assert_eq!(local_path(Some("/\t/evil.example/x")), "/therapist");
        assert_eq!(local_path(Some("/\n")), "/therapist");
        assert_eq!(local_path(Some("/ /evil.example")), "/therapist");
        assert_eq!(local_path(Some("/chat/x?therapist=true")), "/therapist", "not a session id");
        assert_eq!(local_path(Some("/chat/0192A6F0-7A4E-7C3D-9F1E-2B3C4D5E6F70")), "/therapist");
        assert_eq!(local_path(Some("//evil.example")), "/therapist");
        assert_eq!(local_path(Some("https://evil.example")), "/therapist");
        assert_eq!(local_path(Some("/\\evil.example")), "/therapist");
        assert_eq!(local_path(None), "/therapist");
    }

    #[test]
    fn login_url_encodes_the_query() {
        assert_eq!(login_url("/chat/a?therapist=true"), "/therapist/login?next=/chat/a%3Ftherapist%3Dtrue");
    }
}
