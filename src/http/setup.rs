//! First-run setup: while no therapist account exists, `serve` prints a
//! one-time URL whose page creates the first account. The token lives only in
//! memory (as a hash): it is valid until used or until the process exits.

use std::sync::Mutex;

use axum::Form;
use axum::Router;
use axum::extract::rejection::{FormRejection, PathRejection};
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use haven_store::NewTherapist;
use serde::Deserialize;

use crate::auth;
use crate::startup::AppState;

/// The pending setup token, stored as its hash.
#[derive(Debug, Default)]
pub struct SetupToken {
    hash: Mutex<Option<[u8; 32]>>,
}

impl SetupToken {
    /// Creates the token and returns it; only its hash is kept.
    pub fn issue(&self) -> String {
        let token = auth::new_token("setup_");
        *self.lock() = Some(auth::token_hash(&token));
        token
    }

    fn is_valid(&self, token: &str) -> bool {
        *self.lock() == Some(auth::token_hash(token))
    }

    /// Takes the token if it matches, so two concurrent submissions cannot
    /// both use it.
    fn take(&self, token: &str) -> bool {
        let mut hash = self.lock();
        let matches = *hash == Some(auth::token_hash(token));
        if matches {
            *hash = None;
        }
        matches
    }

    fn restore(&self, token: &str) {
        *self.lock() = Some(auth::token_hash(token));
    }

    fn revoke(&self) {
        *self.lock() = None;
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<[u8; 32]>> {
        // The guarded value is a plain Option; a poisoned lock still holds a valid one.
        self.hash.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

pub fn router() -> Router<AppState> {
    Router::new().route("/setup/{token}", get(setup_form).post(create_first_therapist))
}

#[derive(Debug, Deserialize)]
struct SetupForm {
    name: String,
    email: String,
    password: String,
}

async fn setup_form(State(state): State<AppState>, token: Result<Path<String>, PathRejection>) -> Response {
    let Ok(Path(token)) = token else { return invalid_link() };
    if !state.setup.is_valid(&token) {
        return invalid_link();
    }
    // An account made meanwhile with `haven therapist add` ends the setup.
    if state.store.count_therapists().await.map_or(true, |count| count > 0) {
        state.setup.revoke();
        return invalid_link();
    }
    page(StatusCode::OK, "Create the first therapist account", &form(None))
}

async fn create_first_therapist(
    State(state): State<AppState>,
    token: Result<Path<String>, PathRejection>,
    input: Result<Form<SetupForm>, FormRejection>,
) -> Response {
    let Ok(Path(token)) = token else { return invalid_link() };
    if !state.setup.is_valid(&token) {
        return invalid_link();
    }
    let Ok(Form(input)) = input else {
        let problem = "fill in the name, e-mail and password fields";
        return page(StatusCode::BAD_REQUEST, "Create the first therapist account", &form(Some(problem)));
    };
    let email = auth::normalise_email(&input.email);
    if let Err(problem) = auth::validate_new_account(&email, &input.name, &input.password) {
        return page(StatusCode::BAD_REQUEST, "Create the first therapist account", &form(Some(&problem)));
    }
    if !state.setup.take(&token) {
        return invalid_link();
    }
    match create(&state, email, input).await {
        Ok(()) => {
            tracing::info!("first therapist account created through the setup page");
            page(
                StatusCode::CREATED,
                "Account created",
                "<p>The therapist account is ready. Log in with its e-mail address and password \
                 (<code>POST /api/auth/login</code>); see the README for the API and the web app.</p>",
            )
        }
        Err(SetupError::AlreadyDone) => {
            state.setup.revoke();
            invalid_link()
        }
        Err(SetupError::Failed(error)) => {
            state.setup.restore(&token);
            tracing::error!(error = format!("{error:#}"), "setup failed");
            page(StatusCode::INTERNAL_SERVER_ERROR, "Something went wrong", "<p>Please try again.</p>")
        }
    }
}

enum SetupError {
    /// An account exists already (e.g. created with `haven therapist add`).
    AlreadyDone,
    Failed(anyhow::Error),
}

async fn create(state: &AppState, email: String, input: SetupForm) -> Result<(), SetupError> {
    let count = state.store.count_therapists().await.map_err(|error| SetupError::Failed(error.into()))?;
    if count > 0 {
        return Err(SetupError::AlreadyDone);
    }
    let password_hash = auth::hash_password(input.password).await.map_err(SetupError::Failed)?;
    let new = NewTherapist { email, name: input.name.trim().to_owned(), password_hash };
    state.store.create_therapist(new).await.map_err(|error| SetupError::Failed(error.into()))?;
    Ok(())
}

fn invalid_link() -> Response {
    page(
        StatusCode::NOT_FOUND,
        "This setup link is no longer valid",
        "<p>It has been used already, or the server has restarted since it was printed. \
         Use <code>haven therapist add</code> to create more accounts.</p>",
    )
}

fn form(problem: Option<&str>) -> String {
    let problem = problem.map(|text| format!("<p role=\"alert\">{}</p>", escape(text))).unwrap_or_default();
    format!(
        "{problem}<form method=\"post\">\
         <p><label>Name <input name=\"name\" required maxlength=\"100\"></label></p>\
         <p><label>E-mail <input name=\"email\" type=\"email\" required></label></p>\
         <p><label>Password <input name=\"password\" type=\"password\" required minlength=\"{}\"></label></p>\
         <p><button type=\"submit\">Create account</button></p></form>",
        auth::MIN_PASSWORD_CHARS
    )
}

fn page(status: StatusCode, title: &str, body: &str) -> Response {
    let html = format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <title>{title} · Haven</title></head><body><main><h1>{title}</h1>{body}</main></body></html>"
    );
    (status, Html(html)).into_response()
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}
