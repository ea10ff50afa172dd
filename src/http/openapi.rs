//! The OpenAPI 3.1 document of every HTTP endpoint, at `/api/openapi.json`,
//! and the API reference page that reads it, at `/api/docs`.
//!
//! Nothing here is written by hand: each operation comes from the
//! `#[utoipa::path]` attribute of its handler, registered in the router by
//! the same `routes!` call that routes it (`super::routes`), and each schema
//! from the `utoipa::ToSchema` derive of its type (the bodies and WebSocket
//! frames of `haven-protocol`, behind its `openapi` feature). This module
//! adds what no handler says: the security schemes, and the answers of the
//! layers in front of every handler (`408`, and `403 cross_site_request`
//! for state-changing methods).

use std::sync::LazyLock;

use axum::http::header::CONTENT_TYPE;
use axum::response::{Html, IntoResponse, Response};
use utoipa::openapi::security::{ApiKey, ApiKeyValue, HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::openapi::{ContentBuilder, HttpMethod, OpenApi as Document, Ref, RefOr, ResponseBuilder};
use utoipa::{Modify, OpenApi};

use super::ApiError;

/// The JSON body of every API error (`{"error", "message"}`).
pub use haven_protocol::api::ApiError as ErrorBody;

/// The parts of the document that are not an operation.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "Haven",
        description = "Real-time chat for therapy support: an AI companion until a therapist joins.\n\n\
            Every HTTP endpoint of one Haven server. Errors are JSON `{\"error\", \"message\"}` \
            ([ApiError](#/components/schemas/ApiError)) with a stable `error` code; any path not \
            listed here answers `404 not_found`, and a listed path with another method \
            `405 method_not_allowed`. The chat WebSocket's frames are the schemas \
            [ClientFrame](#/components/schemas/ClientFrame) (client to server) and \
            [ServerFrame](#/components/schemas/ServerFrame) (server to client). docs/protocol.md \
            is the prose of the same contract.",
        license(name = "AGPL-3.0-or-later", identifier = "AGPL-3.0-or-later"),
    ),
    tags(
        (name = "sessions", description = "Chat sessions: Chat Now, history, transcript, close, hand-back, erasure"),
        (name = "chat", description = "The chat WebSocket"),
        (name = "auth", description = "Therapists' login"),
        (name = "appointments", description = "The therapists' list of chats, and its event stream"),
        (name = "safety", description = "The crisis detector and its flags (docs/safety.md)"),
        (name = "health", description = "Liveness and readiness, for load balancers and orchestrators"),
        (name = "docs", description = "This document, and the page that shows it"),
        (name = "pages", description = "HTML pages for people, and their assets"),
    ),
    components(schemas(
        haven_protocol::ClientFrame,
        haven_protocol::ServerFrame,
    )),
    modifiers(&SecuritySchemes),
)]
pub struct ApiDoc;

/// The credentials (docs/protocol.md, "Credentials and roles"). A request
/// with an `Authorization` header is judged by it alone.
struct SecuritySchemes;

impl Modify for SecuritySchemes {
    fn modify(&self, document: &mut Document) {
        let components = document.components.get_or_insert_with(Default::default);
        let bearer = |description: &str| {
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .bearer_format("opaque")
                    .description(Some(description))
                    .build(),
            )
        };
        let cookie = |name: &str, description: &str| {
            SecurityScheme::ApiKey(ApiKey::Cookie(ApiKeyValue::with_description(name, description)))
        };
        components.add_security_scheme(
            "client_token",
            bearer("A client token (`hvc_` and 64 hex digits), from `POST /api/sessions`: one session only."),
        );
        components.add_security_scheme(
            "therapist_token",
            bearer("A therapist token (`hvt_` and 64 hex digits), from `POST /api/auth/login`."),
        );
        components.add_security_scheme(
            "client_cookie",
            cookie(
                "haven_client_{session_id}",
                "The browser's cookie for one chat, named `haven_client_` and the session id as 32 hex \
                 digits; `POST /api/sessions` sets it.",
            ),
        );
        components.add_security_scheme(
            "therapist_cookie",
            cookie("haven_therapist", "The browser's login cookie; `POST /api/auth/login` sets it."),
        );
    }
}

/// The answers of the layers every request passes before its handler.
struct Layers;

impl Modify for Layers {
    fn modify(&self, document: &mut Document) {
        let error = |description: &str| {
            let body = ContentBuilder::new().schema(Some(Ref::from_schema_name("ApiError"))).build();
            ResponseBuilder::new().description(description).content("application/json", body).build()
        };
        for item in document.paths.paths.values_mut() {
            let operations = [
                (HttpMethod::Get, &mut item.get),
                (HttpMethod::Put, &mut item.put),
                (HttpMethod::Post, &mut item.post),
                (HttpMethod::Delete, &mut item.delete),
                (HttpMethod::Patch, &mut item.patch),
            ];
            for (method, operation) in operations {
                let Some(operation) = operation else { continue };
                let responses = &mut operation.responses.responses;
                responses.entry("408".to_owned()).or_insert_with(|| {
                    RefOr::T(error(
                        "`request_timeout`: the request, its body included, did not arrive within \
                         `--request-timeout-seconds`; the connection closes.",
                    ))
                });
                if matches!(method, HttpMethod::Get) {
                    continue;
                }
                let cross_site = "`cross_site_request`: a browser's request from another site \
                                  (its `Sec-Fetch-Site` or `Origin` says so).";
                match responses.get_mut("403") {
                    None => {
                        responses.insert("403".to_owned(), RefOr::T(error(cross_site)));
                    }
                    Some(RefOr::T(forbidden)) => {
                        forbidden.description = format!("{} Or {cross_site}", forbidden.description);
                    }
                    Some(RefOr::Ref(_)) => {}
                }
            }
        }
    }
}

/// The whole document: [`ApiDoc`], every route's operation, the layers'
/// answers.
pub fn document() -> Document {
    let mut document = super::routes().into_openapi();
    Layers.modify(&mut document);
    document
}

/// [`document`] as JSON, made once.
pub(super) static DOCUMENT: LazyLock<Result<String, String>> =
    LazyLock::new(|| document().to_pretty_json().map_err(|error| error.to_string()));

/// This document.
///
/// The OpenAPI 3.1 document of every HTTP endpoint of the server, with the
/// WebSocket frames as component schemas.
#[utoipa::path(
    get,
    path = "/api/openapi.json",
    tag = "docs",
    responses(
        (status = 200, description = "The document.", body = serde_json::Value, content_type = "application/json"),
        (status = 500, description = "`internal`", body = ErrorBody),
    )
)]
pub(super) async fn openapi_json() -> Response {
    match &*DOCUMENT {
        Ok(json) => ([(CONTENT_TYPE, "application/json")], json.as_str()).into_response(),
        Err(error) => ApiError::Internal(anyhow::anyhow!("the OpenAPI document: {error}")).into_response(),
    }
}

/// The API reference page, from this server only.
const DOCS_PAGE: &str = include_str!("../../templates/api_docs.html");

/// The API reference (HTML).
///
/// Swagger UI over `/api/openapi.json`. Its script and style are served by
/// this server (`/assets/`), so the page works offline, under the same
/// Content-Security-Policy as every page.
#[utoipa::path(
    get,
    path = "/api/docs",
    tag = "docs",
    responses((status = 200, description = "The page.", body = String, content_type = "text/html"))
)]
pub(super) async fn docs_page() -> Html<&'static str> {
    Html(DOCS_PAGE)
}
