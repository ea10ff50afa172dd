//! JSON bodies of the HTTP API.

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use uuid::Uuid;

use crate::{ChatMessage, ChatMode};

/// `201` body of `POST /api/sessions`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CreatedSession {
    pub session_id: Uuid,
    pub appointment_id: Uuid,
    /// The client's credential for this one session. Shown once.
    pub client_token: String,
    pub chat_mode: ChatMode,
}

/// Body of `POST /api/auth/login`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LoginRequest {
    pub email: String,
    pub password: String,
}

/// A therapist account as the API shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TherapistProfile {
    pub id: Uuid,
    pub name: String,
    pub email: String,
}

/// Body of a successful login.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LoginResponse {
    pub token: String,
    pub therapist: TherapistProfile,
}

/// Appointment status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AppointmentStatus {
    /// Waiting for a therapist; any therapist may join.
    Open,
    /// Claimed by one therapist.
    Assigned,
}

/// One row of `GET /api/appointments`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Appointment {
    pub appointment_id: Uuid,
    pub session_id: Uuid,
    pub status: AppointmentStatus,
    pub chat_mode: ChatMode,
    pub therapist_id: Option<Uuid>,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339::option")]
    pub last_message_at: Option<OffsetDateTime>,
}

/// Body of `GET /api/sessions/{id}/messages`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MessagePage {
    pub messages: Vec<ChatMessage>,
}

/// Body of every API error.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ApiError {
    pub error: String,
    pub message: String,
}
