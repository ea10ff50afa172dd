//! First-run setup: while no therapist account exists, `serve` prints a
//! one-time URL whose page creates the first account. The token lives only in
//! memory (as a hash): it is valid until used or until the process exits.

use std::net::{IpAddr, SocketAddr};
use std::sync::Mutex;

use askama::Template;
use axum::Form;
use axum::extract::rejection::{FormRejection, PathRejection};
use axum::extract::{ConnectInfo, Path, State};
use axum::http::StatusCode;
use axum::response::Response;
use haven_store::{Actor, NewTherapist, Origin};
use serde::Deserialize;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

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

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(setup_form, create_first_therapist))
}

/// The setup form's fields.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[schema(as = SetupForm)]
struct SetupForm {
    name: String,
    email: String,
    /// At least 8 characters.
    password: String,
}

/// The first-run setup page (HTML).
///
/// While no therapist account exists, `haven serve` prints a one-time URL
/// whose page creates the first account. The token is valid until used or
/// until the process exits.
#[utoipa::path(
    get,
    path = "/setup/{token}",
    tag = "pages",
    params(("token" = String, Path, description = "The one-time token `serve` printed")),
    responses(
        (status = 200, description = "The form.", body = String, content_type = "text/html"),
        (status = 404, description = "The link is no longer valid (used, or the server restarted).",
            body = String, content_type = "text/html"),
    )
)]
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
    form(StatusCode::OK, None, "", "")
}

/// Creates the first therapist account (HTML form post).
#[utoipa::path(
    post,
    path = "/setup/{token}",
    tag = "pages",
    params(("token" = String, Path, description = "The one-time token `serve` printed")),
    request_body(content = SetupForm, content_type = "application/x-www-form-urlencoded"),
    responses(
        (status = 201, description = "The account exists: the page says so.", body = String, content_type = "text/html"),
        (status = 400, description = "The form again, with the problem.", body = String, content_type = "text/html"),
        (status = 404, description = "The link is no longer valid.", body = String, content_type = "text/html"),
        (status = 500, description = "Setup failed; the link stays valid.", body = String, content_type = "text/html"),
    )
)]
async fn create_first_therapist(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    token: Result<Path<String>, PathRejection>,
    input: Result<Form<SetupForm>, FormRejection>,
) -> Response {
    let Ok(Path(token)) = token else { return invalid_link() };
    if !state.setup.is_valid(&token) {
        return invalid_link();
    }
    let Ok(Form(input)) = input else {
        let problem = "Fill in the name, e-mail and password fields.";
        return form(StatusCode::BAD_REQUEST, Some(problem), "", "");
    };
    let email = auth::normalise_email(&input.email);
    if let Err(problem) = auth::validate_new_account(&email, &input.name, &input.password) {
        return form(StatusCode::BAD_REQUEST, Some(&problem), &input.name, &input.email);
    }
    if !state.setup.take(&token) {
        return invalid_link();
    }
    match create(&state, email, input, peer.ip()).await {
        Ok(()) => {
            tracing::info!("first therapist account created through the setup page");
            crate::pages::page(StatusCode::CREATED, &SetupDone)
        }
        Err(SetupError::AlreadyDone) => {
            state.setup.revoke();
            invalid_link()
        }
        Err(SetupError::Failed(error)) => {
            state.setup.restore(&token);
            tracing::error!(error = format!("{error:#}"), "setup failed");
            crate::pages::error_page(
                StatusCode::INTERNAL_SERVER_ERROR,
                "Something went wrong",
                "Please try again.",
            )
        }
    }
}

enum SetupError {
    /// An account exists already (e.g. created with `haven therapist add`).
    AlreadyDone,
    Failed(anyhow::Error),
}

/// Creates the first account; the audit trail records the operator who
/// holds the setup link, from `address`.
async fn create(
    state: &AppState,
    email: String,
    input: SetupForm,
    address: IpAddr,
) -> Result<(), SetupError> {
    let count = state.store.count_therapists().await.map_err(|error| SetupError::Failed(error.into()))?;
    if count > 0 {
        return Err(SetupError::AlreadyDone);
    }
    let password_hash = auth::hash_password(input.password).await.map_err(SetupError::Failed)?;
    let new = NewTherapist { email, name: input.name.trim().to_owned(), password_hash };
    let by = Origin::new(Actor::Operator, Some(address));
    state.store.create_therapist(new, by).await.map_err(|error| SetupError::Failed(error.into()))?;
    Ok(())
}

fn invalid_link() -> Response {
    crate::pages::error_page(
        StatusCode::NOT_FOUND,
        "This setup link is no longer valid",
        "It has been used already, or the server has restarted since it was printed. \
         Use `haven therapist add` to create more accounts.",
    )
}

/// The setup form, with what was typed (never the password) and the
/// problem with it, if any.
#[derive(Template)]
#[template(path = "setup.html")]
struct SetupPage<'a> {
    problem: Option<&'a str>,
    name: &'a str,
    email: &'a str,
    min_password: usize,
}

#[derive(Template)]
#[template(path = "setup_done.html")]
struct SetupDone;

fn form(status: StatusCode, problem: Option<&str>, name: &str, email: &str) -> Response {
    crate::pages::page(status, &SetupPage { problem, name, email, min_password: auth::MIN_PASSWORD_CHARS })
}
