//! What one connection has told its client, and what a room event may add
//! to it: messages in seq order with no gap and no repeat, the mode after
//! the join message, nothing from the companion after that, and nothing at
//! all after the closing message.
//!
//! Plain state with no I/O: `connection.rs` acts on its answers (sending,
//! reading the database), and the room's model check in `hub.rs` drives
//! the same decisions under every interleaving it explores.

use haven_protocol::{ChatMessage, ChatMode, MessageKind, Sender, ServerFrame};
use uuid::Uuid;

use super::hub::Event;

/// Who may speak in a session, as the `mode` frame tells it: the mode, and
/// after a hand-back whether the companion waits for the client's yes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mode {
    pub chat_mode: ChatMode,
    pub companion_paused: bool,
}

impl Mode {
    pub const BOT_ONLY: Mode = Mode { chat_mode: ChatMode::BotOnly, companion_paused: false };
    pub const THERAPIST_JOINED: Mode = Mode { chat_mode: ChatMode::TherapistJoined, companion_paused: false };
    pub const HANDED_BACK: Mode = Mode { chat_mode: ChatMode::BotOnly, companion_paused: true };

    pub fn of(session: &haven_store::ChatSession) -> Mode {
        Mode { chat_mode: session.chat_mode, companion_paused: session.companion_paused }
    }

    /// The mode a message of this kind leaves the session in, if it
    /// changes it: read from the kind, never the text.
    pub fn after(kind: MessageKind) -> Option<Mode> {
        match kind {
            MessageKind::Join => Some(Mode::THERAPIST_JOINED),
            MessageKind::Handback => Some(Mode::HANDED_BACK),
            MessageKind::Resume => Some(Mode::BOT_ONLY),
            MessageKind::Chat | MessageKind::Close | MessageKind::Crisis | MessageKind::Notice => None,
        }
    }

    /// The companion may stream to the client.
    pub fn companion_speaks(self) -> bool {
        self == Mode::BOT_ONLY
    }

    pub fn frame(self) -> ServerFrame {
        ServerFrame::Mode { chat_mode: self.chat_mode, companion_paused: self.companion_paused }
    }
}

/// What to do with one event from the room.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Live {
    /// Send its frame: the next message, or a companion delta the client
    /// may still see.
    Send,
    /// Send nothing: a message the client has, or a delta that comes too
    /// late (after the join, or of a reply the client has whole).
    Skip,
    /// Events were missed: read what is stored since `last_seq`, and the
    /// session's mode, from the database.
    Resync,
}

#[derive(Debug)]
pub struct Delivery {
    /// The highest seq the client has: sent by this connection, or covered
    /// by the `since` it connected with.
    pub last_seq: i64,
    /// The mode last told to the client. Once it is `THERAPIST_JOINED`
    /// (which the connection tells right after the join message), or the
    /// companion is paused, no companion delta follows, whatever order the
    /// events raced in.
    pub mode: Mode,
    /// The reply that was streaming when this connection opened: the client
    /// gets it as the committed message.
    skipped_reply: Option<Uuid>,
    /// The last companion reply a catch-up read from the database: deltas
    /// of it still in the channel come too late.
    finished_reply: Option<Uuid>,
    /// This connection's side of the chat: its own typing and presence
    /// signals are not sent back to it.
    own: Sender,
}

impl Delivery {
    pub fn new(own: Sender, skipped_reply: Option<Uuid>) -> Self {
        Self { last_seq: 0, mode: Mode::BOT_ONLY, skipped_reply, finished_reply: None, own }
    }

    /// Decides on a live event. Deciding to send a message counts it as the
    /// client's; the caller then acts on the event's `closes` and `mode`
    /// (for a message the client already had, too).
    pub fn live(&mut self, event: &Event) -> Live {
        if event.resync {
            return Live::Resync;
        }
        if let Some(sender) = event.from_side {
            return if sender == self.own { Live::Skip } else { Live::Send };
        }
        let Some(seq) = event.seq else {
            let late = event.reply_id == self.skipped_reply || event.reply_id == self.finished_reply;
            return if self.mode.companion_speaks() && !late { Live::Send } else { Live::Skip };
        };
        if seq > self.last_seq + 1 {
            // Out of order or missed: the database has everything up to
            // here, and the mode that goes with it.
            return Live::Resync;
        }
        if seq <= self.last_seq {
            return Live::Skip;
        }
        self.last_seq = seq;
        Live::Send
    }

    /// A message read from the database was sent to the client. (The caller
    /// then tells the mode after a join message, and closes after a closing
    /// one, as for a live event.)
    pub fn stored(&mut self, message: &ChatMessage) {
        if message.sender == Sender::Ai {
            self.finished_reply = message.reply_id;
        }
        self.last_seq = message.seq;
    }

    /// Whether the client must be told `mode` (it differs from the last one
    /// told); it counts as told.
    pub fn tell_mode(&mut self, mode: Mode) -> bool {
        std::mem::replace(&mut self.mode, mode) != mode
    }
}
