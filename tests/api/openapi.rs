//! `/api/openapi.json` and `/api/docs`: the document covers every route, and
//! the reference page is served whole by Haven, under its CSP. (Every
//! response of the suite is checked against the document: crate::contract.)

use std::collections::BTreeSet;

use serde_json::{Value, json};

use crate::contract::contract;
use crate::helpers::TestApp;

/// Every route the router serves, as `METHOD path` (the same list as
/// `haven::http::routes`, written out here so that a route dropped from the
/// document, or added to it by mistake, fails).
const ROUTES: [&str; 33] = [
    "GET /healthz",
    "GET /readyz",
    "GET /api/openapi.json",
    "GET /api/docs",
    "POST /api/sessions",
    "DELETE /api/sessions/{session_id}",
    "PUT /api/sessions/{session_id}/companion-sharing",
    "GET /api/sessions/{session_id}/messages",
    "POST /api/sessions/{session_id}/close",
    "POST /api/sessions/{session_id}/hand-back",
    "GET /api/sessions/{session_id}/label",
    "PUT /api/sessions/{session_id}/label",
    "GET /api/sessions/{session_id}/transcript",
    "GET /api/sessions/{session_id}/access-log",
    "GET /api/sessions/{session_id}/risk",
    "POST /api/sessions/{session_id}/risk/acknowledge",
    "POST /api/auth/login",
    "POST /api/auth/logout",
    "GET /api/appointments",
    "GET /api/appointments/events",
    "GET /api/appointments/closed",
    "POST /api/safety/classify",
    "GET /api/safety/report",
    "GET /api/chat/ws/{session_id}",
    "GET /setup/{token}",
    "POST /setup/{token}",
    "GET /",
    "GET /chat/{session_id}",
    "GET /therapist",
    "GET /therapist/login",
    "POST /therapist/login",
    "POST /therapist/logout",
    "GET /assets/{file}",
];

/// `METHOD path` of every operation in the document.
fn documented(document: &Value) -> BTreeSet<String> {
    let mut operations = BTreeSet::new();
    for (path, item) in document["paths"].as_object().unwrap() {
        for (method, _) in item.as_object().unwrap() {
            if ["get", "put", "post", "delete", "patch", "head", "options", "trace"]
                .contains(&method.as_str())
            {
                operations.insert(format!("{} {path}", method.to_uppercase()));
            }
        }
    }
    operations
}

#[tokio::test]
async fn the_served_document_is_openapi_3_1_and_is_the_code_s() {
    let app = TestApp::spawn().await;
    let response = app.http.get(app.url("/api/openapi.json")).send().await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "application/json");
    let served: Value = response.json().await.unwrap();
    assert_eq!(&served, contract().document(), "the suite checks against what the server serves");
    assert_eq!(served["openapi"], "3.1.0");
    let breaches = openapi_3_1_breaches(&served);
    assert!(breaches.is_empty(), "not a valid OpenAPI 3.1 document: {breaches:#?}");
    assert_eq!(served["info"]["title"], "Haven");
    assert!(served["info"]["version"].is_string());
    let schemas = served["components"]["schemas"].as_object().unwrap();
    for frame in ["ClientFrame", "ServerFrame", "ApiError", "ChatMessage"] {
        assert!(schemas.contains_key(frame), "{frame} is a component schema");
    }
    // Every operation answers at least one documented status, and every
    // reference resolves.
    for (path, item) in served["paths"].as_object().unwrap() {
        for (method, operation) in item.as_object().unwrap() {
            let responses = operation["responses"].as_object().unwrap();
            assert!(!responses.is_empty(), "{method} {path} documents no response");
            assert!(operation["summary"].is_string(), "{method} {path} has no summary");
        }
    }
    let mut references = Vec::new();
    collect_references(&served, &mut references);
    for reference in references {
        let pointer = reference.strip_prefix('#').expect("local references only");
        assert!(served.pointer(pointer).is_some(), "{reference} resolves");
    }
    // The WebSocket's frames are referred to from its operation.
    let socket = &served["paths"]["/api/chat/ws/{session_id}"]["get"];
    let description = socket["description"].as_str().unwrap();
    assert!(description.contains("#/components/schemas/ClientFrame"), "{description}");
    assert!(description.contains("#/components/schemas/ServerFrame"), "{description}");
    assert!(socket["responses"]["101"].is_object());
}

/// Where `document` breaks the JSON Schema of OpenAPI 3.1 documents
/// (tests/api/data/README.md).
fn openapi_3_1_breaches(document: &Value) -> Vec<String> {
    let schema: Value = serde_json::from_str(include_str!("data/openapi-3.1-schema.json")).unwrap();
    let validator = jsonschema::validator_for(&schema).expect("the OpenAPI 3.1 schema compiles");
    validator
        .iter_errors(document)
        .map(|error| format!("at {}: {error}", error.instance_path().as_str()))
        .collect()
}

#[test]
fn the_openapi_3_1_schema_refuses_a_broken_document() {
    let mut document = contract().document().clone();
    assert_eq!(openapi_3_1_breaches(&document), Vec::<String>::new());
    document["openapi"] = json!("3.0.3");
    assert!(!openapi_3_1_breaches(&document).is_empty(), "3.0 is not 3.1");
    let mut document = contract().document().clone();
    document["paths"]["/healthz"]["get"]["responses"]["200"] = json!({"content": {}});
    assert!(!openapi_3_1_breaches(&document).is_empty(), "a response needs a description");
    let mut document = contract().document().clone();
    document["paths"]["/healthz"]["get"]["parameters"] = json!([{"name": "x", "in": "body"}]);
    assert!(!openapi_3_1_breaches(&document).is_empty(), "no parameter is in a body");
}

fn collect_references(value: &Value, references: &mut Vec<String>) {
    match value {
        Value::Object(map) => {
            if let Some(Value::String(reference)) = map.get("$ref") {
                references.push(reference.clone());
            }
            map.values().for_each(|value| collect_references(value, references));
        }
        Value::Array(items) => items.iter().for_each(|value| collect_references(value, references)),
        _ => {}
    }
}

#[test]
fn every_route_of_the_router_is_documented_and_nothing_else() {
    let expected: BTreeSet<String> = ROUTES.iter().map(|route| route.to_string()).collect();
    let documented = documented(contract().document());
    let missing: Vec<_> = expected.difference(&documented).collect();
    let extra: Vec<_> = documented.difference(&expected).collect();
    assert!(missing.is_empty() && extra.is_empty(), "not documented: {missing:?}; not routed: {extra:?}");
}

/// Routes are registered only with `routes!`, which documents them: no
/// plain `.route(…)` is left in the server's code but the metrics
/// listener's (a separate address, `--metrics-bind`).
#[test]
fn no_route_is_registered_without_its_document() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut stack = vec![root];
    let mut plain = Vec::new();
    while let Some(directory) = stack.pop() {
        for entry in std::fs::read_dir(&directory).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|extension| extension == "rs") {
                let text = std::fs::read_to_string(&path).unwrap();
                for needle in [".route(", ".route_service(", ".nest(", ".nest_service("] {
                    if text.contains(needle) && !path.ends_with("prometheus.rs") {
                        plain.push(format!("{} uses {needle}", path.display()));
                    }
                }
            }
        }
    }
    assert!(plain.is_empty(), "{plain:#?}");
}

/// Each documented operation, asked without a credential, answers a status
/// it documents (checked by the client) and is routed: never the
/// fallback's JSON `404` or `405`.
#[tokio::test]
async fn every_documented_operation_is_routed_and_answers_as_documented() {
    let app = TestApp::spawn().await;
    let session = uuid::Uuid::now_v7().to_string();
    for operation in documented(contract().document()) {
        let (method, path) = operation.split_once(' ').unwrap();
        let url = app.url(
            &path.replace("{session_id}", &session).replace("{token}", "x").replace("{file}", "app.css"),
        );
        let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let mut request = app.http.request(method.clone(), url);
        if path.starts_with("/api/") && matches!(method, reqwest::Method::POST | reqwest::Method::PUT) {
            request = request.json(&json!({}));
        }
        if path == "/api/appointments/events" {
            request = request.header("accept", "text/event-stream");
        }
        let response = request.send().await.unwrap();
        let status = response.status().as_u16();
        let content_type =
            response.headers().get("content-type").map(|value| value.to_str().unwrap().to_owned());
        if content_type.as_deref() == Some("application/json") {
            let body: Value = response.json().await.unwrap();
            assert!(
                !(status == 404 && body["error"] == "not_found" || status == 405),
                "{operation}: answered by the fallback: {status} {body}"
            );
        }
    }
}

#[tokio::test]
async fn the_docs_page_is_served_with_the_pages_csp_and_loads_only_this_server_s_files() {
    let app = TestApp::spawn().await;
    let home = app.http.get(app.url("/")).send().await.unwrap();
    let csp = home.headers()["content-security-policy"].to_str().unwrap().to_owned();
    assert!(csp.contains("script-src 'self'") && csp.contains("style-src 'self'"), "{csp}");

    let response = app.http.get(app.url("/api/docs")).send().await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-security-policy"], csp.as_str(), "the same CSP as every page");
    assert_eq!(response.headers()["x-content-type-options"], "nosniff");
    let page = response.text().await.unwrap();
    assert!(!page.contains("<style") && !page.contains(" style="), "no inline style");

    // Every script and style sheet the page names is a path on this server,
    // and is served.
    let mut files = Vec::new();
    for attribute in ["src=\"", "href=\""] {
        for (at, _) in page.match_indices(attribute) {
            let rest = &page[at + attribute.len()..];
            files.push(rest[..rest.find('"').unwrap()].to_owned());
        }
    }
    let scripts = page.matches("<script").count();
    assert_eq!(page.matches("<script src=\"/").count(), scripts, "no inline script");
    assert!(files.iter().any(|file| file == "/assets/swagger-ui-bundle.js"), "{files:?}");
    assert!(files.iter().any(|file| file == "/assets/swagger-ui.css"), "{files:?}");
    for file in &files {
        assert!(file.starts_with('/') && !file.starts_with("//"), "{file} is not this server's");
        let response = app.http.get(app.url(file)).send().await.unwrap();
        assert_eq!(response.status(), 200, "{file}");
        if file.starts_with("/assets/") {
            assert!(response.headers().get("content-security-policy").is_some(), "{file}");
        }
    }
    // The script that starts the page reads this server's document and asks
    // no public validator.
    let init = app.http.get(app.url("/assets/api-docs.js")).send().await.unwrap().text().await.unwrap();
    assert!(init.contains("url: \"/api/openapi.json\"") && init.contains("validatorUrl: null"), "{init}");
}
