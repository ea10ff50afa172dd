//! Any bytes a client can send as a text frame: parsing answers without
//! panicking, and what it accepts is a valid message.
#![no_main]

use haven_protocol::{ClientInput, MAX_CLIENT_ID_LEN, MAX_CONTENT_CHARS, parse_client_frame};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Ok(ClientInput::Message(message)) = parse_client_frame(text) {
        assert!(!message.content.trim().is_empty());
        assert!(message.content.chars().count() <= MAX_CONTENT_CHARS);
        assert!(!message.client_id.is_empty() && message.client_id.len() <= MAX_CLIENT_ID_LEN);
    }
});
