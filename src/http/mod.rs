//! The HTTP surface: one module per resource, each with its own `router()`.

use anyhow::Context;
use axum::Router;
use axum::extract::{DefaultBodyLimit, FromRequest, MatchedPath, Request, State};
use axum::http::header::{
    CACHE_CONTROL, CONTENT_SECURITY_POLICY as CONTENT_SECURITY_POLICY_HEADER, REFERRER_POLICY,
    X_CONTENT_TYPE_OPTIONS, X_FRAME_OPTIONS,
};
use axum::http::{HeaderMap, HeaderValue, StatusCode, Uri};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use haven_protocol::api::ApiError as ErrorBody;
use haven_store::StoreError;
use serde::Serialize;
use tower_http::csrf::CsrfLayer;
use tower_http::set_header::SetResponseHeaderLayer;
use tower_http::trace::TraceLayer;
use utoipa::OpenApi;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::startup::AppState;

pub(crate) mod appointments;
pub(crate) mod auth;
pub mod openapi;
mod safety;
pub(crate) mod sessions;
pub mod setup;

/// The largest request body accepted (login, setup forms).
const MAX_BODY_BYTES: usize = 16 * 1024;

/// What pages and scripts may load: only this origin, no inline code.
/// `connect-src 'self'` covers the same-origin WebSocket.
const CONTENT_SECURITY_POLICY: &str = "default-src 'self'; script-src 'self'; style-src 'self'; \
     img-src 'self' data:; connect-src 'self'; object-src 'none'; base-uri 'none'; \
     form-action 'self'; frame-ancestors 'none'";

/// Every route of the service, each with its OpenAPI operation: the router
/// and `/api/openapi.json` are made from this one list.
pub(crate) fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::with_openapi(openapi::ApiDoc::openapi())
        .routes(routes!(healthz))
        .routes(routes!(readyz))
        .routes(routes!(openapi::openapi_json))
        .routes(routes!(openapi::docs_page))
        .merge(sessions::router())
        .merge(auth::router())
        .merge(appointments::router())
        .merge(safety::router())
        .merge(setup::router())
        .merge(crate::chat::router())
        .merge(crate::pages::router())
}

/// A session in a path (its OpenAPI parameter; handlers take the text and
/// check it with [`canonical_uuid`]).
#[derive(utoipa::IntoParams)]
#[into_params(parameter_in = Path)]
pub(crate) struct SessionPath {
    /// The session id, lowercase and hyphenated; any other form is `404`.
    #[allow(dead_code)]
    session_id: uuid::Uuid,
}

/// Every route of the service, with its security layers.
pub fn router(state: AppState) -> anyhow::Result<Router> {
    // The document is made once, here, so a broken one stops the start.
    if let Err(error) = &*openapi::DOCUMENT {
        anyhow::bail!("the OpenAPI document cannot be written: {error}");
    }
    // Cross-site POSTs with cookies are refused (Sec-Fetch-Site / Origin);
    // non-browser clients send neither header and pass.
    let mut csrf = CsrfLayer::new();
    for origin in &state.settings.allowed_origins {
        csrf = csrf.add_trusted_origin(origin).with_context(|| format!("allowed origin {origin:?}"))?;
    }
    let csrf = csrf.with_rejection_response(|_| ApiError::CrossSiteRequest.into_response());
    let header = |name, value| SetResponseHeaderLayer::if_not_present(name, HeaderValue::from_static(value));
    let deadline = std::time::Duration::from_secs(state.limits.settings.request_timeout_seconds.max(1));

    let (routes, _) = routes().split_for_parts();
    Ok(routes
        .fallback(not_found)
        // API bodies are small; anything larger is refused with 413.
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .method_not_allowed_fallback(method_not_allowed)
        .layer(axum::middleware::from_fn(move |request: Request, next: Next| {
            request_deadline(deadline, request, next)
        }))
        .layer(csrf)
        .layer(header(CONTENT_SECURITY_POLICY_HEADER, CONTENT_SECURITY_POLICY))
        .layer(header(X_CONTENT_TYPE_OPTIONS, "nosniff"))
        .layer(header(REFERRER_POLICY, "same-origin"))
        .layer(header(X_FRAME_OPTIONS, "DENY"))
        // Transcripts and dashboards must not land in a browser's disk cache;
        // only the static assets say otherwise (`no-cache`).
        .layer(header(CACHE_CONTROL, "no-store"))
        .layer(TraceLayer::new_for_http().make_span_with(|request: &Request| {
            // The route pattern, never the URI: paths and queries can carry secrets.
            let route = request.extensions().get::<MatchedPath>().map_or("unmatched", MatchedPath::as_str);
            tracing::info_span!("http", method = %request.method(), route)
        }))
        .with_state(state))
}

/// A request, its body's upload included, must reach its response within
/// `--request-timeout-seconds`: a client that declares a body and never
/// sends it gets 408, and its connection closes. (WebSocket upgrades and
/// event streams answer at once; their lives are not bounded by this.)
async fn request_deadline(deadline: std::time::Duration, request: Request, next: Next) -> Response {
    match tokio::time::timeout(deadline, next.run(request)).await {
        Ok(response) => response,
        Err(_) => {
            tracing::info!("request deadline passed");
            let mut response = ApiError::RequestTimeout.into_response();
            response.headers_mut().insert(axum::http::header::CONNECTION, HeaderValue::from_static("close"));
            response
        }
    }
}

/// Liveness: the process answers.
#[utoipa::path(
    get,
    path = "/healthz",
    tag = "health",
    responses((status = 200, description = "Always `ok`.", body = String, content_type = "text/plain", example = "ok"))
)]
async fn healthz() -> &'static str {
    "ok"
}

/// How long `/readyz` waits for the database's answer.
const READY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

/// `200` body of `GET /readyz`.
#[derive(Debug, Serialize, utoipa::ToSchema)]
struct Readiness {
    status: Ready,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
enum Ready {
    Ready,
}

/// Readiness: whether this instance should get traffic.
///
/// `GET /readyz`: 200 `{"status": "ready"}` when the database answers a
/// read within [`READY_TIMEOUT`] and, on PostgreSQL, the notification
/// listener is connected; 503 `not_ready` with the reason otherwise.
#[utoipa::path(
    get,
    path = "/readyz",
    tag = "health",
    responses(
        (status = 200, description = "Ready.", body = Readiness),
        (status = 503, description = "`not_ready`, with the reason as `message`.", body = ErrorBody),
    )
)]
async fn readyz(State(state): State<AppState>) -> Result<Json<Readiness>, ApiError> {
    if !state.listening.load(std::sync::atomic::Ordering::Relaxed) {
        return Err(ApiError::NotReady("the notification listener is reconnecting to the database"));
    }
    match tokio::time::timeout(READY_TIMEOUT, state.store.ping()).await {
        Ok(Ok(())) => Ok(Json(Readiness { status: Ready::Ready })),
        Ok(Err(error)) => {
            tracing::debug!(error = %error, "readiness: the database does not answer");
            Err(ApiError::NotReady("the database does not answer"))
        }
        Err(_) => Err(ApiError::NotReady("the database does not answer")),
    }
}

/// A page for browsers, JSON for API clients.
async fn not_found(uri: Uri, headers: HeaderMap) -> Response {
    if crate::pages::wants_html(&headers, uri.path()) {
        crate::pages::not_found_page()
    } else {
        ApiError::NotFound.into_response()
    }
}

async fn method_not_allowed() -> ApiError {
    ApiError::MethodNotAllowed
}

/// An API error: always JSON `{"error": code, "message": text}`.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The request is malformed; `code` says how.
    #[error("{message}")]
    BadRequest { code: &'static str, message: String },
    /// No valid credential for this endpoint.
    #[error("authentication required")]
    Unauthorized,
    /// Login failed; the same for an unknown e-mail and a wrong password.
    #[error("e-mail or password is incorrect")]
    InvalidCredentials,
    /// The credential is valid but not for this resource.
    #[error("not allowed")]
    Forbidden,
    #[error("not found")]
    NotFound,
    #[error("method not allowed")]
    MethodNotAllowed,
    /// A browser request from another site carrying this site's cookies.
    #[error("cross-site request refused")]
    CrossSiteRequest,
    #[error("{0}")]
    Conflict(String),
    /// Too many requests; retry after the given time.
    #[error("too many requests; retry later")]
    TooManyRequests { retry_after: std::time::Duration },
    /// The request (its body included) took longer than the request deadline.
    #[error("the request took too long; send it again")]
    RequestTimeout,
    /// The request body is larger than the API accepts.
    #[error("the request body is too large")]
    PayloadTooLarge,
    /// The database is unreachable; nothing was changed, retry later.
    #[error("service temporarily unavailable")]
    Unavailable,
    /// `/readyz`: this instance should not get traffic now, for the reason.
    #[error("{0}")]
    NotReady(&'static str),
    /// A bug or corrupt data. Details are logged, never returned.
    #[error("internal error")]
    Internal(#[source] anyhow::Error),
}

impl ApiError {
    pub fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        ApiError::BadRequest { code, message: message.into() }
    }

    fn status_and_code(&self) -> (StatusCode, &'static str) {
        match self {
            ApiError::BadRequest { code, .. } => (StatusCode::BAD_REQUEST, code),
            ApiError::Unauthorized => (StatusCode::UNAUTHORIZED, "unauthorized"),
            ApiError::InvalidCredentials => (StatusCode::UNAUTHORIZED, "invalid_credentials"),
            ApiError::Forbidden => (StatusCode::FORBIDDEN, "forbidden"),
            ApiError::NotFound => (StatusCode::NOT_FOUND, "not_found"),
            ApiError::MethodNotAllowed => (StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed"),
            ApiError::CrossSiteRequest => (StatusCode::FORBIDDEN, "cross_site_request"),
            ApiError::Conflict(_) => (StatusCode::CONFLICT, "conflict"),
            ApiError::TooManyRequests { .. } => (StatusCode::TOO_MANY_REQUESTS, "rate_limited"),
            ApiError::RequestTimeout => (StatusCode::REQUEST_TIMEOUT, "request_timeout"),
            ApiError::PayloadTooLarge => (StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large"),
            ApiError::Unavailable => (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
            ApiError::NotReady(_) => (StatusCode::SERVICE_UNAVAILABLE, "not_ready"),
            ApiError::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
        }
    }
}

impl From<StoreError> for ApiError {
    fn from(error: StoreError) -> Self {
        match error {
            StoreError::NotFound => ApiError::NotFound,
            StoreError::Conflict(what) => ApiError::Conflict(what.to_owned()),
            StoreError::Unavailable(_) => {
                tracing::error!(error = %error, "database unavailable");
                ApiError::Unavailable
            }
            StoreError::Corrupt(_) => ApiError::Internal(error.into()),
        }
    }
}

impl From<anyhow::Error> for ApiError {
    fn from(error: anyhow::Error) -> Self {
        ApiError::Internal(error)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if let ApiError::Internal(error) = &self {
            tracing::error!(error = format!("{error:#}"), "internal error");
        }
        let (status, code) = self.status_and_code();
        let body = ErrorBody { error: code.to_owned(), message: self.to_string() };
        let mut response = (status, axum::Json(body)).into_response();
        if let ApiError::TooManyRequests { retry_after } = self {
            response.headers_mut().insert(axum::http::header::RETRY_AFTER, retry_after_value(retry_after));
        }
        response
    }
}

/// `axum::extract::Path`, but a path that does not parse (bad percent
/// encoding, not UTF-8) is a JSON 404.
#[derive(axum::extract::FromRequestParts)]
#[from_request(via(axum::extract::Path), rejection(ApiError))]
pub struct Path<T>(pub T);

/// `axum::extract::Query`, but a query that does not parse is a JSON 400
/// `invalid_query`.
#[derive(axum::extract::FromRequestParts)]
#[from_request(via(axum::extract::Query), rejection(ApiError))]
pub struct Query<T>(pub T);

impl From<axum::extract::rejection::PathRejection> for ApiError {
    fn from(_: axum::extract::rejection::PathRejection) -> Self {
        ApiError::NotFound
    }
}

/// `axum::Json`, but a body that does not parse gets Haven's error shape,
/// and a string holding U+0000 (which PostgreSQL cannot store) is refused
/// here, the same on every store, as `invalid_json`.
pub struct Json<T>(pub T);

impl<S: Send + Sync, T: serde::de::DeserializeOwned> FromRequest<S> for Json<T> {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &S) -> Result<Self, ApiError> {
        let axum::Json(value) = axum::Json::<serde_json::Value>::from_request(request, state).await?;
        if holds_nul(&value) {
            return Err(ApiError::bad_request("invalid_json", "strings must not contain U+0000"));
        }
        serde_json::from_value(value).map(Json).map_err(|error| {
            ApiError::bad_request(
                "invalid_json",
                format!("Failed to deserialize the JSON body into the target type: {error}"),
            )
        })
    }
}

/// The session, if it is in the caller's appointments (open, or theirs).
pub(super) async fn visible_session(
    state: &AppState,
    session_id: &str,
    caller: &crate::auth::AuthTherapist,
) -> Result<haven_store::ChatSession, ApiError> {
    let session_id = canonical_uuid(session_id).ok_or(ApiError::NotFound)?;
    let session = state.store.chat_session(session_id).await?.ok_or(ApiError::NotFound)?;
    match session.therapist_id {
        Some(holder) if holder != caller.therapist.id => Err(ApiError::Forbidden),
        _ => Ok(session),
    }
}

/// A session id as Haven writes it: lowercase and hyphenated. Uppercase,
/// braced, `urn:uuid:` and unhyphenated forms name no session (404).
pub fn canonical_uuid(text: &str) -> Option<uuid::Uuid> {
    uuid::Uuid::parse_str(text).ok().filter(|id| id.hyphenated().to_string() == text)
}

fn holds_nul(value: &serde_json::Value) -> bool {
    use serde_json::Value;
    match value {
        Value::String(text) => text.contains('\0'),
        Value::Array(items) => items.iter().any(holds_nul),
        Value::Object(fields) => fields.iter().any(|(key, value)| key.contains('\0') || holds_nul(value)),
        Value::Null | Value::Bool(_) | Value::Number(_) => false,
    }
}

impl<T: serde::Serialize> IntoResponse for Json<T> {
    fn into_response(self) -> Response {
        axum::Json(self.0).into_response()
    }
}

/// Whole seconds, rounded up, for a `Retry-After` header.
pub fn retry_after_value(wait: std::time::Duration) -> HeaderValue {
    let seconds = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
    HeaderValue::from(seconds.max(1))
}

impl From<axum::extract::rejection::JsonRejection> for ApiError {
    fn from(rejection: axum::extract::rejection::JsonRejection) -> Self {
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            return ApiError::PayloadTooLarge;
        }
        ApiError::bad_request("invalid_json", rejection.body_text())
    }
}

impl From<axum::extract::rejection::QueryRejection> for ApiError {
    fn from(rejection: axum::extract::rejection::QueryRejection) -> Self {
        ApiError::bad_request("invalid_query", rejection.body_text())
    }
}
