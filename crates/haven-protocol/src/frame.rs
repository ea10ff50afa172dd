//! WebSocket frames, one `type`-tagged enum per direction.

use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

use crate::{ChatMessage, ChatMode, MAX_CLIENT_ID_LEN, MAX_CONTENT_CHARS, RiskLevel};

/// Frames a client sends. Unknown fields (such as `sender` or `role`) are
/// ignored: the sender of a message is always the connection's role.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum ClientFrame {
    Message {
        content: String,
        client_id: String,
    },
    /// The sender is typing (`active`, the default), or stopped without
    /// sending. Not stored; passed on to the session's other side.
    Typing {
        #[serde(default = "typing_default")]
        active: bool,
    },
    /// The client's yes, after a hand-back, to continuing with the
    /// companion. Clients only; not stored as such (a `resume` system
    /// message records it).
    ResumeCompanion,
}

fn typing_default() -> bool {
    true
}

/// Frames the server sends.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum ServerFrame {
    /// A committed message of the session, in seq order.
    Message(ChatMessage),
    /// To the sender only: its message with this `client_id` is committed.
    Ack { client_id: String, seq: i64 },
    /// The session's mode, on connect and on every change. After a
    /// hand-back the mode is `BOT_ONLY` with `companion_paused` until the
    /// client sends `resume_companion`; the field is left out when false.
    Mode {
        chat_mode: ChatMode,
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        companion_paused: bool,
    },
    /// A piece of a companion reply being generated. Append `delta` to the
    /// partial text of `reply_id`; the `message` frame with the same
    /// `reply_id` replaces it.
    AiDelta { reply_id: Uuid, delta: String },
    /// The reply `reply_id` ended without a message (a therapist joined, or
    /// the model failed): drop its partial text.
    AiCancelled { reply_id: Uuid },
    /// The other side of the chat is typing (`active`) or stopped. It
    /// expires after [`crate::TYPING_EXPIRES_SECONDS`] without another.
    /// Never stored, never the companion's.
    Typing { sender: crate::Sender, active: bool },
    /// Whether the other side of the chat has a socket open now: sent on
    /// connect and at every change. To the client it tells of the
    /// therapist (`sender` `therapist`, with the therapist's `name` while
    /// `here`); to the therapist, of the client (`user`). Never stored.
    Presence {
        sender: crate::Sender,
        here: bool,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        name: Option<String>,
    },
    /// To the client only, while its chat waits for a therapist (no
    /// therapist has taken it yet): how many therapists are online now
    /// (with the appointments list or a chat open, on any instance) and
    /// how many waiting chats come before this one in the therapists'
    /// list. Right after the `mode` frame on connect, then at every
    /// change. Never stored.
    Queue { therapists_online: u32, ahead: u32 },
    /// To the client only: its choice whether the therapist who joins sees
    /// the conversation with the companion (`null` until it chooses). On
    /// connect and at every change, so that every open tab of the chat
    /// shows the same choice. Never stored as a message.
    Sharing {
        #[cfg_attr(feature = "openapi", schema(required = true))]
        shared: Option<bool>,
    },
    /// To therapists only: the safety detector flagged a client message of
    /// `session_id` (this socket's session or another one the therapist can
    /// see), and the session's level is now `level`.
    Risk { session_id: Uuid, level: RiskLevel },
    /// The last frame from this connection was refused; nothing was stored.
    Error {
        code: ErrorCode,
        message: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        client_id: Option<String>,
    },
}

/// Stable codes of `error` frames.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum ErrorCode {
    /// The frame is not JSON, or a field has the wrong type.
    InvalidJson,
    /// The frame has no `type`, or one the server does not know.
    UnknownType,
    /// A binary frame; Haven speaks JSON text frames only.
    UnsupportedFrame,
    MissingClientId,
    /// `client_id` is empty or longer than 64 bytes.
    InvalidClientId,
    /// `content` is missing, empty or only whitespace.
    EmptyContent,
    /// `content` is longer than 4,000 characters.
    ContentTooLong,
    /// `content` holds a character no message may hold (U+0000).
    InvalidContent,
    /// The message could not be stored right now; re-send it with the same
    /// `client_id`.
    Unavailable,
    /// Too many messages on this connection; nothing was stored. Re-send it
    /// later with the same `client_id`.
    RateLimited,
    /// The chat was closed by its therapist; nothing more can be sent to it.
    /// The socket closes with 1008 after this frame.
    ChatClosed,
    /// `resume_companion` when the companion is not waiting for the
    /// client's answer (no hand-back, or already answered).
    NotPaused,
    /// `resume_companion` while the joined therapist is in the chat, or has
    /// been away for less than the away time.
    TherapistHere,
    /// A frame this connection's role may not send (`resume_companion`
    /// from a therapist).
    NotAllowed,
}

/// A validated frame from a client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientInput {
    /// A message to store.
    Message(NewMessage),
    /// A typing signal to pass on.
    Typing { active: bool },
    /// The client's yes to continuing with the companion.
    ResumeCompanion,
}

/// A validated message from a client, ready to be stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewMessage {
    pub content: String,
    pub client_id: String,
}

/// Why a client frame was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FrameError {
    pub code: ErrorCode,
    pub message: String,
    pub client_id: Option<String>,
}

impl FrameError {
    fn new(code: ErrorCode, message: impl Into<String>, client_id: Option<String>) -> Self {
        Self { code, message: message.into(), client_id }
    }

    pub fn into_frame(self) -> ServerFrame {
        ServerFrame::Error { code: self.code, message: self.message, client_id: self.client_id }
    }
}

/// Parses and validates one text frame from a client.
///
/// Errors carry the frame's `client_id` whenever it has a usable one, so the
/// client can tell which pending message was refused.
pub fn parse_client_frame(text: &str) -> Result<ClientInput, FrameError> {
    let value: Value = serde_json::from_str(text)
        .map_err(|_| FrameError::new(ErrorCode::InvalidJson, "frame is not valid JSON", None))?;
    let Some(object) = value.as_object() else {
        return Err(FrameError::new(ErrorCode::InvalidJson, "frame must be a JSON object", None));
    };
    let client_id = match object.get("client_id") {
        None | Some(Value::Null) => None,
        Some(Value::String(id)) => Some(id.clone()),
        Some(_) => {
            return Err(FrameError::new(ErrorCode::InvalidClientId, "client_id must be a string", None));
        }
    };
    let usable_id = client_id.clone().filter(|id| valid_client_id(id));
    match object.get("type").and_then(Value::as_str) {
        Some("message") => {}
        Some("resume_companion") => return Ok(ClientInput::ResumeCompanion),
        Some("typing") => {
            return match object.get("active") {
                None | Some(Value::Null) => Ok(ClientInput::Typing { active: true }),
                Some(Value::Bool(active)) => Ok(ClientInput::Typing { active: *active }),
                Some(_) => Err(FrameError::new(ErrorCode::InvalidJson, "active must be a boolean", None)),
            };
        }
        Some(other) => {
            let message = format!("unknown frame type {:?}", truncate(other, 32));
            return Err(FrameError::new(ErrorCode::UnknownType, message, usable_id));
        }
        None => {
            return Err(FrameError::new(ErrorCode::UnknownType, "frame has no type", usable_id));
        }
    }
    let Some(client_id) = client_id else {
        return Err(FrameError::new(ErrorCode::MissingClientId, "client_id is required", None));
    };
    if !valid_client_id(&client_id) {
        return Err(FrameError::new(
            ErrorCode::InvalidClientId,
            format!("client_id must be 1 to {MAX_CLIENT_ID_LEN} bytes"),
            None,
        ));
    }
    let content = match object.get("content") {
        Some(Value::String(content)) => content,
        None | Some(Value::Null) => {
            return Err(FrameError::new(ErrorCode::EmptyContent, "content is required", Some(client_id)));
        }
        Some(_) => {
            return Err(FrameError::new(ErrorCode::InvalidJson, "content must be a string", Some(client_id)));
        }
    };
    if content.trim().is_empty() {
        return Err(FrameError::new(ErrorCode::EmptyContent, "content is empty", Some(client_id)));
    }
    // PostgreSQL cannot store U+0000 in text; refused here, on every store.
    if content.contains('\0') {
        return Err(FrameError::new(
            ErrorCode::InvalidContent,
            "content must not contain U+0000",
            Some(client_id),
        ));
    }
    if content.chars().count() > MAX_CONTENT_CHARS {
        return Err(FrameError::new(
            ErrorCode::ContentTooLong,
            format!("content is longer than {MAX_CONTENT_CHARS} characters"),
            Some(client_id),
        ));
    }
    Ok(ClientInput::Message(NewMessage { content: content.clone(), client_id }))
}

fn valid_client_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= MAX_CLIENT_ID_LEN && !id.contains('\0')
}

fn truncate(text: &str, max_chars: usize) -> String {
    text.chars().take(max_chars).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn code(text: &str) -> ErrorCode {
        parse_client_frame(text).unwrap_err().code
    }

    #[test]
    fn a_nul_character_is_refused_in_content_and_in_client_id() {
        let refused =
            parse_client_frame(r#"{"type":"message","client_id":"a","content":"hello\u0000world"}"#);
        let refused = refused.unwrap_err();
        assert_eq!((refused.code, refused.client_id.as_deref()), (ErrorCode::InvalidContent, Some("a")));
        assert_eq!(
            code(r#"{"type":"message","client_id":"a\u0000","content":"hi"}"#),
            ErrorCode::InvalidClientId
        );
    }

    #[test]
    fn accepts_a_message_and_ignores_a_forged_sender() {
        let parsed =
            parse_client_frame(r#"{"type":"message","content":"hi","client_id":"a","sender":"therapist"}"#)
                .unwrap();
        assert_eq!(parsed, ClientInput::Message(NewMessage { content: "hi".into(), client_id: "a".into() }));
    }

    #[test]
    fn a_typing_signal_is_active_unless_it_says_otherwise() {
        assert_eq!(parse_client_frame(r#"{"type":"typing"}"#), Ok(ClientInput::Typing { active: true }));
        let stopped = parse_client_frame(r#"{"type":"typing","active":false,"sender":"therapist"}"#);
        assert_eq!(stopped, Ok(ClientInput::Typing { active: false }));
        assert_eq!(code(r#"{"type":"typing","active":"yes"}"#), ErrorCode::InvalidJson);
        let frame = ServerFrame::Typing { sender: crate::Sender::User, active: true };
        let json = serde_json::to_value(frame).unwrap();
        assert_eq!(json, serde_json::json!({"type":"typing","sender":"user","active":true}));
    }

    #[test]
    fn refuses_bad_frames_with_stable_codes() {
        assert_eq!(code("not json"), ErrorCode::InvalidJson);
        assert_eq!(code("[1]"), ErrorCode::InvalidJson);
        assert_eq!(code(r#"{"content":"x","client_id":"a"}"#), ErrorCode::UnknownType);
        assert_eq!(code(r#"{"type":"shout","client_id":"a"}"#), ErrorCode::UnknownType);
        assert_eq!(code(r#"{"type":"message","content":"x"}"#), ErrorCode::MissingClientId);
        assert_eq!(code(r#"{"type":"message","content":"x","client_id":""}"#), ErrorCode::InvalidClientId);
        assert_eq!(code(r#"{"type":"message","content":"x","client_id":7}"#), ErrorCode::InvalidClientId);
        assert_eq!(code(r#"{"type":"message","content":" \n\t","client_id":"a"}"#), ErrorCode::EmptyContent);
        assert_eq!(code(r#"{"type":"message","client_id":"a"}"#), ErrorCode::EmptyContent);
        assert_eq!(code(r#"{"type":"message","content":5,"client_id":"a"}"#), ErrorCode::InvalidJson);
    }

    #[test]
    fn content_limit_counts_characters_not_bytes() {
        let at_limit = "é".repeat(MAX_CONTENT_CHARS);
        let frame = serde_json::json!({"type":"message","content":at_limit,"client_id":"a"}).to_string();
        assert!(parse_client_frame(&frame).is_ok());
        let over = "a".repeat(MAX_CONTENT_CHARS + 1);
        let frame = serde_json::json!({"type":"message","content":over,"client_id":"a"}).to_string();
        let error = parse_client_frame(&frame).unwrap_err();
        assert_eq!(error.code, ErrorCode::ContentTooLong);
        assert_eq!(error.client_id.as_deref(), Some("a"));
    }

    #[test]
    fn server_frames_have_the_documented_shape() {
        let ack = serde_json::to_value(ServerFrame::Ack { client_id: "c".into(), seq: 3 }).unwrap();
        assert_eq!(ack, serde_json::json!({"type":"ack","client_id":"c","seq":3}));
        let mode = ServerFrame::Mode { chat_mode: ChatMode::TherapistJoined, companion_paused: false };
        let mode = serde_json::to_value(mode).unwrap();
        assert_eq!(mode, serde_json::json!({"type":"mode","chat_mode":"THERAPIST_JOINED"}));
        let paused = ServerFrame::Mode { chat_mode: ChatMode::BotOnly, companion_paused: true };
        let paused = serde_json::to_value(paused).unwrap();
        assert_eq!(paused, serde_json::json!({"type":"mode","chat_mode":"BOT_ONLY","companion_paused":true}));
        assert_eq!(parse_client_frame(r#"{"type":"resume_companion"}"#), Ok(ClientInput::ResumeCompanion));
    }

    mod properties {
        use proptest::prelude::*;

        use super::super::*;

        /// Whatever a client sends, parsing answers without panicking, and
        /// only well-formed messages are accepted.
        fn check(text: &str) {
            match parse_client_frame(text) {
                Ok(ClientInput::Typing { .. } | ClientInput::ResumeCompanion) => {}
                Ok(ClientInput::Message(message)) => {
                    assert!(!message.content.trim().is_empty());
                    assert!(message.content.chars().count() <= MAX_CONTENT_CHARS);
                    assert!(!message.client_id.is_empty() && message.client_id.len() <= MAX_CLIENT_ID_LEN);
                }
                Err(error) => assert!(!error.message.is_empty()),
            }
        }

        fn json_value() -> impl Strategy<Value = serde_json::Value> {
            let leaf = prop_oneof![
                Just(serde_json::Value::Null),
                any::<bool>().prop_map(serde_json::Value::from),
                any::<i64>().prop_map(serde_json::Value::from),
                ".{0,40}".prop_map(serde_json::Value::from),
                Just(serde_json::Value::from("message")),
            ];
            leaf.prop_recursive(3, 24, 6, |inner| {
                prop_oneof![
                    prop::collection::vec(inner.clone(), 0..4).prop_map(serde_json::Value::from),
                    prop::collection::btree_map(
                        prop_oneof![
                            Just("type".to_owned()),
                            Just("content".to_owned()),
                            Just("client_id".to_owned()),
                            ".{0,8}"
                        ],
                        inner,
                        0..5
                    )
                    .prop_map(|map| serde_json::Value::Object(map.into_iter().collect())),
                ]
            })
        }

        proptest! {
            #[test]
            fn arbitrary_text_never_panics(text in ".{0,300}") {
                check(&text);
            }

            #[test]
            fn arbitrary_json_never_panics(value in json_value()) {
                check(&value.to_string());
            }

            #[test]
            fn message_frames_are_accepted_exactly_when_valid(
                content in ".{0,50}",
                client_id in ".{0,80}",
                extra in ".{0,10}",
            ) {
                let frame = serde_json::json!({"type": "message", "content": content, "client_id": client_id, "sender": extra});
                let valid = !content.trim().is_empty()
                    && !content.contains('\0')
                    && !client_id.is_empty()
                    && client_id.len() <= MAX_CLIENT_ID_LEN
                    && !client_id.contains('\0');
                prop_assert_eq!(parse_client_frame(&frame.to_string()).is_ok(), valid);
            }
        }
    }
}
