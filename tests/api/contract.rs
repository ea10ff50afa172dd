//! The API's contract, checked on every response the suite receives: each
//! HTTP response through [`Http`] (`TestApp::http`), each event of a stream
//! it returns, and each frame a [`Ws`] reads must be what
//! `/api/openapi.json` documents, or the test fails.
//!
//! The document is the server's own (`haven::http::openapi::document()`,
//! which `/api/openapi.json` serves, as
//! `openapi::the_served_document_is_openapi_3_1_and_is_the_code_s` checks).
//! A response must have a documented status for its operation, a
//! documented content type, and a body that validates against the schema,
//! made strict: every object is closed (`additionalProperties: false`), so
//! an undocumented field fails as well as a missing or mistyped one. A path
//! that is in no operation may only answer the fallback's `404`, and a
//! documented path with another method `405`.
//!
//! [`Ws`]: crate::helpers::Ws

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, LazyLock, Mutex};
use std::task::{Context, Poll};

use axum::body::Bytes;
use http_body::Frame;

use serde::Serialize;
use serde_json::{Map, Value, json};

/// Responses and frames checked so far in this process. With
/// `HAVEN_TEST_CONTRACT_LOG` set, each check prints a line (`--nocapture`).
static CHECKED: AtomicUsize = AtomicUsize::new(0);

fn checked(what: std::fmt::Arguments) {
    let count = CHECKED.fetch_add(1, Ordering::Relaxed) + 1;
    if std::env::var_os("HAVEN_TEST_CONTRACT_LOG").is_some() {
        let test = std::thread::current().name().unwrap_or("?").to_owned();
        eprintln!("contract check {count} in {test}: {what}");
    }
}

/// The document and the validators made from it so far.
pub struct Contract {
    document: Value,
    operations: Vec<Operation>,
    validators: Mutex<HashMap<String, Arc<jsonschema::Validator>>>,
}

/// One `(method, path)` of the document.
struct Operation {
    method: String,
    /// The path's segments; `None` for a `{parameter}`.
    segments: Vec<Option<String>>,
    /// The JSON pointer of its operation object.
    pointer: String,
}

impl Operation {
    fn matches(&self, path: &[&str]) -> bool {
        self.segments.len() == path.len()
            && self.segments.iter().zip(path).all(|(segment, part)| match segment {
                Some(literal) => literal == part,
                None => !part.is_empty(),
            })
    }

    /// The path, as in the document.
    fn path(&self) -> String {
        self.pointer
            .trim_start_matches("/paths/")
            .rsplit_once('/')
            .unwrap()
            .0
            .replace("~1", "/")
            .replace("~0", "~")
    }

    /// Literal segments first: `/a/b` is chosen over `/a/{x}`.
    fn literals(&self) -> usize {
        self.segments.iter().filter(|segment| segment.is_some()).count()
    }
}

static CONTRACT: LazyLock<Contract> = LazyLock::new(|| {
    let document = serde_json::to_value(haven::http::openapi::document()).expect("the document as JSON");
    Contract::new(document)
});

/// The contract of this build of the server.
pub fn contract() -> &'static Contract {
    &CONTRACT
}

/// A JSON pointer's escaping of one key.
fn escape(key: &str) -> String {
    key.replace('~', "~0").replace('/', "~1")
}

/// The part of a content type before its parameters, lowercase.
fn essence(content_type: &str) -> String {
    content_type.split(';').next().unwrap_or_default().trim().to_ascii_lowercase()
}

fn is_json(essence: &str) -> bool {
    essence == "application/json" || essence.ends_with("+json")
}

/// What a response that breaks the contract gets: a message for the test.
pub type Breach = String;

impl Contract {
    pub fn new(document: Value) -> Self {
        let mut operations = Vec::new();
        for (path, item) in document["paths"].as_object().expect("paths") {
            for method in ["get", "put", "post", "delete", "patch", "head", "options"] {
                if item.get(method).is_none() {
                    continue;
                }
                let segments = path
                    .split('/')
                    .map(|segment| {
                        (!(segment.starts_with('{') && segment.ends_with('}'))).then(|| segment.to_owned())
                    })
                    .collect();
                let pointer = format!("/paths/{}/{method}", escape(path));
                operations.push(Operation { method: method.to_owned(), segments, pointer });
            }
        }
        Contract { document, operations, validators: Mutex::default() }
    }

    /// `METHOD path` of the operation that answers `method path`, if any.
    fn operation(&self, method: &str, path: &str) -> Option<String> {
        let method = method.to_ascii_lowercase();
        let parts: Vec<&str> = path.split('/').collect();
        let mut candidates: Vec<&Operation> =
            self.operations.iter().filter(|op| op.method == method && op.matches(&parts)).collect();
        candidates.sort_by_key(|op| std::cmp::Reverse(op.literals()));
        candidates.first().map(|op| format!("{} {}", op.method, op.path()))
    }

    /// The document, as JSON.
    pub fn document(&self) -> &Value {
        &self.document
    }

    /// Checks one HTTP response to `method path` (the path without its
    /// query); `body` is `None` for a stream that was not read.
    pub fn check_response(
        &self,
        method: &str,
        path: &str,
        status: u16,
        content_type: Option<&str>,
        body: Option<&[u8]>,
    ) -> Result<(), Breach> {
        self.response(method, path, status, content_type, body)?;
        checked(format_args!("response {method} {path} {status}"));
        Ok(())
    }

    fn response(
        &self,
        method: &str,
        path: &str,
        status: u16,
        content_type: Option<&str>,
        body: Option<&[u8]>,
    ) -> Result<(), Breach> {
        let method = method.to_ascii_lowercase();
        let parts: Vec<&str> = path.split('/').collect();
        let mut candidates: Vec<&Operation> =
            self.operations.iter().filter(|op| op.matches(&parts)).collect();
        candidates.sort_by_key(|op| std::cmp::Reverse(op.literals()));
        // The most specific path that matches, and its operation for the
        // method (HEAD is answered as GET, without a body).
        let best = candidates.first().map(|op| op.literals());
        let same_path: Vec<&&Operation> = candidates
            .iter()
            .filter(|op| Some(op.literals()) == best && op.segments == candidates[0].segments)
            .collect();
        let wanted = if method == "head" { "get" } else { method.as_str() };
        let Some(operation) = same_path.iter().find(|op| op.method == wanted) else {
            // No operation: only the fallbacks may answer.
            let (expected, why) = match same_path.is_empty() {
                true => (404, "a path the document does not list"),
                false => (405, "a method the document does not list for this path"),
            };
            if status != expected {
                return Err(format!("{method} {path}: {why} answered {status}, not {expected}"));
            }
            let essence = content_type.map(essence).unwrap_or_default();
            if status == 404 && essence == "text/html" {
                return Ok(());
            }
            if !is_json(&essence) {
                return Err(format!("{method} {path}: the {status} fallback answered {content_type:?}"));
            }
            return self.check_body(
                "/components/schemas/ApiError",
                body,
                &format!("{method} {path} ({status})"),
            );
        };
        let context = format!("{method} {path} ({status})");
        let responses =
            self.document.pointer(&format!("{}/responses", operation.pointer)).expect("responses");
        let Some(response) = responses.get(status.to_string()) else {
            let documented: Vec<&String> =
                responses.as_object().map(|map| map.keys().collect()).unwrap_or_default();
            return Err(format!("{context}: status {status} is not documented (only {documented:?})"));
        };
        let response_pointer = format!("{}/responses/{status}", operation.pointer);
        let content = response.get("content").and_then(Value::as_object);
        let Some(content) = content.filter(|content| !content.is_empty()) else {
            return match body {
                Some(body) if !body.is_empty() => Err(format!(
                    "{context}: the document says no body, got {content_type:?}: {}",
                    String::from_utf8_lossy(body)
                )),
                _ => Ok(()),
            };
        };
        let Some(content_type) = content_type else {
            return Err(format!("{context}: no content type (documented: {:?})", content.keys()));
        };
        let essence = essence(content_type);
        let Some(media) = content.get(&essence) else {
            return Err(format!(
                "{context}: content type {content_type:?} is not documented ({:?})",
                content.keys()
            ));
        };
        if essence == "text/event-stream" {
            // Its events are checked as they are read (`Events`).
            return Ok(());
        }
        if media.get("schema").is_none() || !is_json(&essence) {
            // A text body (a page, a script, a Markdown file) or a stream.
            return match body.map(std::str::from_utf8) {
                Some(Err(_)) if essence.starts_with("text/") => {
                    Err(format!("{context}: the text is not UTF-8"))
                }
                _ => Ok(()),
            };
        }
        let schema = format!("{response_pointer}/content/{}/schema", escape(&essence));
        self.check_body(&schema, body, &context)
    }

    /// Checks a JSON body against the schema at `pointer` in the document.
    fn check_body(&self, pointer: &str, body: Option<&[u8]>, context: &str) -> Result<(), Breach> {
        let Some(body) = body else { return Ok(()) };
        let value: Value = serde_json::from_slice(body).map_err(|error| {
            format!("{context}: the body is not JSON ({error}): {}", String::from_utf8_lossy(body))
        })?;
        self.check_value(pointer, &value).map_err(|why| format!("{context}: {why}"))
    }

    /// Checks a value against the strict form of the schema at `pointer`.
    pub fn check_value(&self, pointer: &str, value: &Value) -> Result<(), Breach> {
        let validator = self.validator(pointer);
        let errors: Vec<String> = validator
            .iter_errors(value)
            .map(|error| format!("at {:?}: {error}", error.instance_path().as_str()))
            .collect();
        if errors.is_empty() {
            Ok(())
        } else {
            Err(format!("does not match {pointer}: {}\n{value:#}", errors.join("; ")))
        }
    }

    /// Checks one event of a `text/event-stream` answer (`event:` and
    /// `data:` lines) against its content's schema, which is an event as
    /// `{"event", "data"}`.
    pub fn check_event(&self, operation: &str, block: &str) -> Result<(), Breach> {
        let (mut name, mut data) = (None, Vec::new());
        for line in block.lines() {
            if line.starts_with(':') || line.is_empty() {
                continue; // A comment: the keep-alive.
            }
            let (field, value) = line.split_once(':').unwrap_or((line, ""));
            let value = value.strip_prefix(' ').unwrap_or(value);
            match field {
                "event" => name = Some(value.to_owned()),
                "data" => data.push(value.to_owned()),
                other => return Err(format!("{operation}: an event with a field {other:?}: {block:?}")),
            }
        }
        if name.is_none() && data.is_empty() {
            return Ok(());
        }
        let data = data.join("\n");
        let data: Value = serde_json::from_str(&data)
            .map_err(|error| format!("{operation}: an event's data is not JSON ({error}): {block:?}"))?;
        // An event with no name is a `message` (the default of the format).
        let event = json!({"event": name.as_deref().unwrap_or("message"), "data": data});
        let pointer = self
            .operations
            .iter()
            .find(|op| format!("{} {}", op.method, op.path()) == operation)
            .map(|op| format!("{}/responses/200/content/text~1event-stream/schema", op.pointer))
            .unwrap_or_else(|| panic!("no operation {operation}"));
        self.check_value(&pointer, &event).map_err(|why| format!("{operation}: an event {why}"))?;
        checked(format_args!("event {operation} {}", event["event"]));
        Ok(())
    }

    /// Checks a frame the server sent against `ServerFrame`.
    pub fn check_server_frame(&self, text: &str) -> Result<(), Breach> {
        let value: Value =
            serde_json::from_str(text).map_err(|error| format!("a frame is not JSON ({error}): {text}"))?;
        self.check_value("/components/schemas/ServerFrame", &value)?;
        checked(format_args!("frame {}", value["type"]));
        Ok(())
    }

    fn validator(&self, pointer: &str) -> Arc<jsonschema::Validator> {
        let mut validators = self.validators.lock().unwrap();
        if let Some(validator) = validators.get(pointer) {
            return validator.clone();
        }
        let schema = self.document.pointer(pointer).unwrap_or_else(|| panic!("no schema at {pointer}"));
        let mut strict = self.strict(schema, 0);
        strict["$schema"] = json!("https://json-schema.org/draft/2020-12/schema");
        let validator = jsonschema::options()
            .should_validate_formats(true)
            .build(&strict)
            .unwrap_or_else(|error| panic!("the schema at {pointer} does not compile: {error}\n{strict:#}"));
        let validator = Arc::new(validator);
        validators.insert(pointer.to_owned(), validator.clone());
        validator
    }

    /// The schema with every `$ref` inlined, every `allOf` of objects
    /// merged into one object, and every object closed to properties it
    /// does not list.
    pub fn strict(&self, schema: &Value, depth: usize) -> Value {
        assert!(depth < 32, "the schemas nest too deep (a recursive type?)");
        let Some(object) = schema.as_object() else { return schema.clone() };
        if let Some(reference) = object.get("$ref").and_then(Value::as_str) {
            let pointer =
                reference.strip_prefix('#').unwrap_or_else(|| panic!("an external $ref {reference}"));
            let target =
                self.document.pointer(pointer).unwrap_or_else(|| panic!("a dangling $ref {reference}"));
            return self.strict(target, depth + 1);
        }
        let mut out = Map::new();
        for (key, value) in object {
            let value = match key.as_str() {
                "properties" | "patternProperties" | "$defs" => Value::Object(
                    value
                        .as_object()
                        .into_iter()
                        .flatten()
                        .map(|(name, schema)| (name.clone(), self.strict(schema, depth + 1)))
                        .collect(),
                ),
                "items" | "additionalProperties" | "not" | "contains" | "propertyNames" => {
                    self.strict(value, depth + 1)
                }
                "oneOf" | "anyOf" | "allOf" | "prefixItems" => Value::Array(
                    value
                        .as_array()
                        .into_iter()
                        .flatten()
                        .map(|schema| self.strict(schema, depth + 1))
                        .collect(),
                ),
                _ => value.clone(),
            };
            out.insert(key.clone(), value);
        }
        if let Some(Value::Array(parts)) = out.get("allOf")
            && parts
                .iter()
                .all(|part| part.get("properties").is_some() || part.get("type") == Some(&json!("object")))
        {
            let parts = parts.clone();
            out.remove("allOf");
            let mut properties =
                out.remove("properties").and_then(|p| p.as_object().cloned()).unwrap_or_default();
            let mut required: Vec<Value> =
                out.remove("required").and_then(|r| r.as_array().cloned()).unwrap_or_default();
            for part in parts {
                for (name, schema) in part.get("properties").and_then(Value::as_object).into_iter().flatten()
                {
                    properties.insert(name.clone(), schema.clone());
                }
                for name in part.get("required").and_then(Value::as_array).into_iter().flatten() {
                    if !required.contains(name) {
                        required.push(name.clone());
                    }
                }
            }
            out.insert("type".into(), json!("object"));
            out.insert("properties".into(), Value::Object(properties));
            out.insert("required".into(), Value::Array(required));
        }
        let object = out.contains_key("properties") || out.get("type") == Some(&json!("object"));
        if object && !out.contains_key("additionalProperties") {
            out.insert("additionalProperties".into(), json!(false));
        }
        Value::Object(out)
    }
}

/// A `reqwest::Client` whose every response to the app is checked against
/// the contract before the test sees it. It offers the part of
/// `reqwest::Client` the suite uses.
#[derive(Clone)]
pub struct Http {
    client: reqwest::Client,
    /// `http://127.0.0.1:PORT`: responses from elsewhere (a mock model, the
    /// metrics listener) are not the API's.
    origin: Arc<Mutex<String>>,
}

impl Http {
    pub fn new(client: reqwest::Client, origin: &str) -> Self {
        Self { client, origin: Arc::new(Mutex::new(origin.to_owned())) }
    }

    pub(crate) fn set_origin(&self, origin: &str) {
        *self.origin.lock().unwrap() = origin.to_owned();
    }

    pub fn get(&self, url: impl AsRef<str>) -> Request {
        self.request(reqwest::Method::GET, url)
    }

    pub fn post(&self, url: impl AsRef<str>) -> Request {
        self.request(reqwest::Method::POST, url)
    }

    pub fn put(&self, url: impl AsRef<str>) -> Request {
        self.request(reqwest::Method::PUT, url)
    }

    pub fn delete(&self, url: impl AsRef<str>) -> Request {
        self.request(reqwest::Method::DELETE, url)
    }

    pub fn request(&self, method: reqwest::Method, url: impl AsRef<str>) -> Request {
        let url = url.as_ref().to_owned();
        Request {
            builder: self.client.request(method.clone(), &url),
            method,
            url,
            origin: self.origin.clone(),
        }
    }
}

/// The body of a `text/event-stream` answer, checking each event as it
/// passes (the test fails at the first that breaks the contract).
struct Events {
    inner: reqwest::Body,
    /// What came after the last whole event.
    pending: String,
    /// `METHOD path` of the operation, as in the document.
    operation: String,
}

impl http_body::Body for Events {
    type Data = Bytes;
    type Error = reqwest::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled
            && let Some(data) = frame.data_ref()
        {
            this.pending.push_str(&String::from_utf8_lossy(data));
            while let Some(end) = this.pending.find("\n\n") {
                let block: String = this.pending.drain(..end + 2).collect();
                contract()
                    .check_event(&this.operation, &block)
                    .unwrap_or_else(|breach| panic!("the API broke its contract: {breach}"));
            }
        }
        polled
    }
}

/// A request being built; [`Request::send`] checks its response.
pub struct Request {
    builder: reqwest::RequestBuilder,
    method: reqwest::Method,
    url: String,
    origin: Arc<Mutex<String>>,
}

impl Request {
    fn map(self, change: impl FnOnce(reqwest::RequestBuilder) -> reqwest::RequestBuilder) -> Self {
        Self { builder: change(self.builder), ..self }
    }

    pub fn json<T: Serialize + ?Sized>(self, body: &T) -> Self {
        self.map(|builder| builder.json(body))
    }

    pub fn form<T: Serialize + ?Sized>(self, body: &T) -> Self {
        self.map(|builder| builder.form(body))
    }

    pub fn body(self, body: impl Into<reqwest::Body>) -> Self {
        self.map(|builder| builder.body(body))
    }

    pub fn bearer_auth(self, token: impl std::fmt::Display) -> Self {
        self.map(|builder| builder.bearer_auth(token))
    }

    pub fn header<K, V>(self, name: K, value: V) -> Self
    where
        reqwest::header::HeaderName: TryFrom<K>,
        <reqwest::header::HeaderName as TryFrom<K>>::Error: Into<axum::http::Error>,
        reqwest::header::HeaderValue: TryFrom<V>,
        <reqwest::header::HeaderValue as TryFrom<V>>::Error: Into<axum::http::Error>,
    {
        self.map(|builder| builder.header(name, value))
    }

    /// Sends the request; the response is checked against the contract
    /// (the test panics if it breaks it) and handed back whole.
    pub async fn send(self) -> reqwest::Result<reqwest::Response> {
        let response = self.builder.send().await?;
        let origin = self.origin.lock().unwrap().clone();
        let (Ok(requested), Ok(origin)) = (reqwest::Url::parse(&self.url), reqwest::Url::parse(&origin))
        else {
            return Ok(response);
        };
        if requested.origin() != origin.origin() {
            return Ok(response);
        }
        // After a redirect (Haven's are all 303) the answer is a GET's.
        let method = match response.url() == &requested {
            true => self.method.to_string(),
            false => "GET".to_owned(),
        };
        let path = response.url().path().to_owned();
        let status = response.status();
        let content_type = response
            .headers()
            .get(reqwest::header::CONTENT_TYPE)
            .and_then(|value| value.to_str().ok())
            .map(str::to_owned);
        if content_type.as_deref().is_some_and(|value| essence(value) == "text/event-stream") {
            // A stream is for the test to read: its head is checked now,
            // and each event as the test reads it.
            contract()
                .check_response(&method, &path, status.as_u16(), content_type.as_deref(), None)
                .unwrap_or_else(|breach| panic!("the API broke its contract: {breach}"));
            let operation = contract()
                .operation(&method, &path)
                .unwrap_or_else(|| panic!("{method} {path} answered a stream but has no operation"));
            let response: axum::http::Response<reqwest::Body> = response.into();
            let (parts, body) = response.into_parts();
            let events = Events { inner: body, pending: String::new(), operation };
            return Ok(reqwest::Response::from(axum::http::Response::from_parts(
                parts,
                reqwest::Body::wrap(events),
            )));
        }
        let version = response.version();
        let headers = response.headers().clone();
        let body = response.bytes().await?;
        contract()
            .check_response(&method, &path, status.as_u16(), content_type.as_deref(), Some(&body))
            .unwrap_or_else(|breach| panic!("the API broke its contract: {breach}"));
        let mut rebuilt = axum::http::Response::new(body);
        *rebuilt.status_mut() = status;
        *rebuilt.version_mut() = version;
        *rebuilt.headers_mut() = headers;
        Ok(reqwest::Response::from(rebuilt))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn session() -> Value {
        json!({
            "session_id": "0192a6f0-7a4e-7c3d-9f1e-2b3c4d5e6f70",
            "appointment_id": "0192a6f0-7a4e-7c3d-9f1e-2b3c4d5e6f71",
            "client_token": "hvc_00",
            "chat_mode": "BOT_ONLY",
        })
    }

    fn check(status: u16, body: &Value) -> Result<(), Breach> {
        let body = serde_json::to_vec(body).unwrap();
        contract().check_response("POST", "/api/sessions", status, Some("application/json"), Some(&body))
    }

    #[test]
    fn a_documented_response_passes() {
        check(201, &session()).unwrap();
    }

    #[test]
    fn an_undocumented_field_fails() {
        let mut body = session();
        body["role"] = json!("therapist");
        let breach = check(201, &body).unwrap_err();
        assert!(breach.contains("role"), "{breach}");
    }

    #[test]
    fn a_missing_or_mistyped_field_fails() {
        let mut missing = session();
        missing.as_object_mut().unwrap().remove("client_token");
        assert!(check(201, &missing).is_err());
        let mut mistyped = session();
        mistyped["chat_mode"] = json!("SOMETHING_ELSE");
        assert!(check(201, &mistyped).is_err());
        let mut not_a_uuid = session();
        not_a_uuid["session_id"] = json!("12");
        assert!(check(201, &not_a_uuid).is_err(), "formats are checked");
    }

    #[test]
    fn an_undocumented_status_fails() {
        let breach = check(200, &session()).unwrap_err();
        assert!(breach.contains("status 200 is not documented"), "{breach}");
        let error = json!({"error": "conflict", "message": "x"});
        assert!(check(409, &error).is_err());
    }

    #[test]
    fn an_undocumented_content_type_or_body_fails() {
        let html = b"<p>hello</p>";
        let breach = contract()
            .check_response("POST", "/api/sessions", 201, Some("text/html; charset=utf-8"), Some(html))
            .unwrap_err();
        assert!(breach.contains("content type"), "{breach}");
        // 204 has no body.
        let path = "/api/sessions/0192a6f0-7a4e-7c3d-9f1e-2b3c4d5e6f70/close";
        contract().check_response("POST", path, 204, None, Some(b"")).unwrap();
        assert!(contract().check_response("POST", path, 204, Some("application/json"), Some(b"{}")).is_err());
    }

    #[test]
    fn only_the_fallbacks_answer_undocumented_paths_and_methods() {
        let error = serde_json::to_vec(&json!({"error": "not_found", "message": "not found"})).unwrap();
        contract()
            .check_response("GET", "/api/nothing", 404, Some("application/json"), Some(&error))
            .unwrap();
        assert!(
            contract()
                .check_response("GET", "/api/nothing", 200, Some("application/json"), Some(b"{}"))
                .is_err()
        );
        let error = serde_json::to_vec(&json!({"error": "method_not_allowed", "message": "no"})).unwrap();
        contract()
            .check_response("PATCH", "/api/sessions", 405, Some("application/json"), Some(&error))
            .unwrap();
        assert!(contract().check_response("PATCH", "/api/sessions", 200, None, Some(b"")).is_err());
    }

    #[test]
    fn events_of_a_stream_are_checked_strictly_too() {
        let stream = "get /api/appointments/events";
        let contract = contract();
        contract.check_event(stream, "event: changed\ndata: {}\n\n").unwrap();
        contract.check_event(stream, ":\n\n").unwrap();
        let risk = r#"{"session_id":"0192a6f0-7a4e-7c3d-9f1e-2b3c4d5e6f70","level":"high"}"#;
        contract.check_event(stream, &format!("event: risk\ndata: {risk}\n\n")).unwrap();
        let extra = r#"{"session_id":"0192a6f0-7a4e-7c3d-9f1e-2b3c4d5e6f70","level":"high","text":"x"}"#;
        assert!(contract.check_event(stream, &format!("event: risk\ndata: {extra}\n\n")).is_err());
        assert!(contract.check_event(stream, "event: changed\ndata: {\"x\":1}\n\n").is_err());
        assert!(contract.check_event(stream, "event: shout\ndata: {}\n\n").is_err());
        assert!(contract.check_event(stream, "data: {}\n\n").is_err(), "an unnamed event");
    }

    #[test]
    fn frames_are_checked_strictly_too() {
        let contract = contract();
        contract.check_server_frame(r#"{"type":"ack","client_id":"c","seq":3}"#).unwrap();
        contract.check_server_frame(r#"{"type":"mode","chat_mode":"BOT_ONLY"}"#).unwrap();
        let message = json!({
            "type": "message", "seq": 1, "id": "0192a6f0-7a4e-7c3d-9f1e-2b3c4d5e6f70", "sender": "ai",
            "kind": "chat", "content": "hi", "created_at": "2026-11-26T10:53:27.123456Z", "client_id": null,
            "reply_id": "0192a6f0-7a4e-7c3d-9f1e-2b3c4d5e6f70",
        });
        contract.check_server_frame(&message.to_string()).unwrap();
        let mut extra = message.clone();
        extra["role"] = json!("therapist");
        assert!(contract.check_server_frame(&extra.to_string()).is_err());
        assert!(contract.check_server_frame(r#"{"type":"ack","client_id":"c"}"#).is_err());
        assert!(contract.check_server_frame(r#"{"type":"shout"}"#).is_err());
    }
}
