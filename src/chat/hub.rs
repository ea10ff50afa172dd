//! Live fan-out within one process: one room per chat session with a
//! broadcast channel of events.
//!
//! Two kinds of event travel through a room:
//! - **Messages**, published only after their transaction committed, each
//!   with its seq. Writers finish in any order (a batch's callers wake in
//!   any order, and other instances' messages arrive later), so the room
//!   holds a message whose predecessor is not published yet, for at most
//!   [`HOLD`], and sends it once the gap fills. Every connection therefore
//!   normally sees the same events in the same order. A receiver that still
//!   sees a seq beyond the next one it expects (a hold timed out, or the
//!   channel lagged) reads the missing messages from the database, which
//!   has them already; one that sees a seq it has delivered drops it. So
//!   clients see every message once, in order, whatever the channel does.
//! - **Companion deltas** (`ai_delta`, `ai_cancelled`), which are not stored.
//!   They are published under the lock of the room's companion state
//!   (`chat::companion::Companion`), which the takeover and the close also
//!   take: once the join message is published, no delta follows it.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, PoisonError, Weak};
// The room's locks. Under the `model-check` feature they are Shuttle's, so
// that its scheduler can switch threads at each of them (the `model_check`
// tests below); the server always uses the standard library's.
#[cfg(feature = "model-check")]
use shuttle::sync::{Mutex, MutexGuard};
#[cfg(not(feature = "model-check"))]
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use axum::extract::ws::Utf8Bytes;
use haven_protocol::{ChatMessage, MessageKind, RiskLevel, Sender, ServerFrame};
use haven_safety::Earlier;
use haven_store::{CurrentRisk, SessionEvent};
use tokio::sync::{Notify, broadcast, watch};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::companion::Companion;
use super::delivery::Mode;

/// Events buffered per room before a slow receiver lags (and then catches
/// up from the database). Allocated when the room opens, so kept small:
/// a receiver only lags when its task stalls. A slot holds an
/// `Arc<Event>`, a pointer, so the buffer costs about 1 KiB a room.
const ROOM_CAPACITY: usize = 32;

/// How long a message waits for its predecessor's writer to publish it.
/// Writers publish as soon as their task runs after the commit, which on a
/// loaded machine can take tens of milliseconds (a batch's writers wake
/// together, in any order); this bounds the rare case of one that never
/// does (its instance's notification was lost). When it runs out, every
/// connection reads the gap from the database, and companion deltas can
/// then interleave differently on different connections.
const HOLD: Duration = Duration::from_millis(250);

type Rooms = Mutex<HashMap<Uuid, Weak<Room>>>;

/// All rooms of this process, and the therapists' dashboard feed.
pub struct Hub {
    /// Rooms are owned by their connections and companion tasks; the map
    /// holds weak references and a room removes itself when the last owner
    /// drops it.
    rooms: Arc<Rooms>,
    /// Ticks whenever the appointments list may have changed (a session was
    /// created, joined or written to). Carries no data: dashboards re-read
    /// the list through the API, which applies each therapist's rights.
    appointments: broadcast::Sender<()>,
    /// Therapist logins that just ended: their sockets close with 1008.
    revocations: broadcast::Sender<Revocation>,
    /// Sessions the crisis detector just flagged: therapists' sockets and
    /// dashboards alert at once.
    risks: Risks,
    /// This process among the instances sharing the database, in the
    /// presence it announces.
    instance: Uuid,
    /// Sessions whose client has a socket open, with the instances (this
    /// one included) where: the dashboards' "online now".
    clients_online: Mutex<Seen>,
    /// Therapists with an appointments list or a chat socket open: the
    /// waiting clients' "therapists online now".
    staff: Mutex<Staff>,
    /// What waiting clients are told, read again after changes
    /// (`chat::queue`).
    queue: watch::Sender<Arc<Queue>>,
    /// Wakes the queue's reader when a therapist came online or went (the
    /// appointments lists do not show it, so they are not refreshed).
    staffing: Notify,
}

/// Who has something open, by id (a session's client, a therapist), with
/// the instances (this one included) where.
#[derive(Debug, Default)]
struct Seen(HashMap<Uuid, HashSet<Uuid>>);

impl Seen {
    /// `id` has something open on `instance`, or nothing any more. Returns
    /// whether that made it come online or go.
    fn set(&mut self, id: Uuid, instance: Uuid, here: bool) -> bool {
        let before = self.0.contains_key(&id);
        if here {
            self.0.entry(id).or_default().insert(instance);
        } else if let Some(instances) = self.0.get_mut(&id) {
            instances.remove(&instance);
            if instances.is_empty() {
                self.0.remove(&id);
            }
        }
        self.0.contains_key(&id) != before
    }

    /// Forgets what the instances `forget` picks told. Returns whether
    /// anyone went offline.
    fn forget(&mut self, forget: &impl Fn(Uuid) -> bool) -> bool {
        let before = self.0.len();
        self.0.retain(|_, instances| {
            instances.retain(|&instance| !forget(instance));
            !instances.is_empty()
        });
        self.0.len() != before
    }
}

/// Therapists with an appointments list or a chat socket open.
#[derive(Debug, Default)]
struct Staff {
    /// How many each has open here.
    local: HashMap<Uuid, usize>,
    /// Where each has some open, on any instance.
    online: Seen,
}

/// What clients whose chats wait for a therapist are told.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Queue {
    pub therapists_online: u32,
    /// Each waiting chat's place: how many waiting chats come before it in
    /// the therapists' list.
    pub ahead: HashMap<Uuid, u32>,
}

/// A session was flagged; it concerns every therapist who can see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RiskAlert {
    pub session_id: Uuid,
    /// The session's level after the flag.
    pub level: RiskLevel,
    /// The therapist the session is assigned to; `None` while it is open.
    pub therapist_id: Option<Uuid>,
}

/// Flag alerts by who can see them: one channel for sessions open to every
/// therapist, and one per therapist with a socket or list open here for the
/// sessions assigned to them. A flag wakes only the connections that show
/// it: with one channel for all, each flag woke every therapist's sockets.
struct Risks {
    open: broadcast::Sender<RiskAlert>,
    assigned: Mutex<HashMap<Uuid, broadcast::Sender<RiskAlert>>>,
}

/// Alerts a therapist's own channel holds: flags of their sessions are rare.
const OWN_ALERTS: usize = 64;

impl Risks {
    fn assigned(&self) -> MutexGuard<'_, HashMap<Uuid, broadcast::Sender<RiskAlert>>> {
        self.assigned.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// What one therapist's socket or list hears of flags: the sessions open to
/// all, and their own.
pub struct RiskFeed {
    open: broadcast::Receiver<RiskAlert>,
    own: broadcast::Receiver<RiskAlert>,
}

impl RiskFeed {
    /// The next alert of either channel (cancel-safe, as each is).
    pub async fn recv(&mut self) -> Result<RiskAlert, broadcast::error::RecvError> {
        tokio::select! {
            alert = self.open.recv() => alert,
            alert = self.own.recv() => alert,
        }
    }
}

/// A therapist credential that is no longer valid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Revocation {
    /// One login (by its token hash), e.g. at logout.
    Login([u8; 32]),
    /// Every login of a therapist, e.g. after a password change.
    Therapist(Uuid),
    /// Every socket of a chat that was erased (by its client, or expired).
    Chat(Uuid),
}

impl Default for Hub {
    fn default() -> Self {
        Self::new()
    }
}

impl Hub {
    pub fn new() -> Self {
        Self {
            rooms: Arc::default(),
            appointments: broadcast::channel(16).0,
            revocations: broadcast::channel(64).0,
            risks: Risks { open: broadcast::channel(256).0, assigned: Mutex::default() },
            instance: Uuid::now_v7(),
            clients_online: Mutex::default(),
            staff: Mutex::default(),
            queue: watch::Sender::default(),
            staffing: Notify::new(),
        }
    }

    /// The one path from a committed write to this process's sockets and
    /// dashboards, for writes made here and for those other instances
    /// announce (`fanout`): publishes a message, takes over at a join,
    /// closes at a close, alerts to a flag, refreshes the appointments
    /// lists, and relays another instance's companion deltas. Returns the
    /// frame of the first message it published, for a writer that sends its
    /// own message at once.
    pub fn apply(&self, events: impl IntoIterator<Item = SessionEvent>) -> Option<Utf8Bytes> {
        let mut published = None;
        for event in events {
            let frame = self.apply_one(event);
            published = published.or(frame);
        }
        published
    }

    fn apply_one(&self, event: SessionEvent) -> Option<Utf8Bytes> {
        let room = event.session_id().and_then(|session_id| self.existing_room(session_id));
        match event {
            SessionEvent::Message { kind, message, .. } => {
                self.appointments_changed();
                let room = room?;
                // A remote message arrives without its text when it could
                // not be read: connections read the session again. (The
                // companion may answer again after a resume all the same;
                // every other change of mode silences it, and connections
                // learn the mode from the database.)
                let Some(message) = message else {
                    if kind == MessageKind::Resume {
                        room.companion().resume(None);
                    }
                    room.resync();
                    return None;
                };
                match kind {
                    MessageKind::Join => room.takeover(*message),
                    MessageKind::Close => room.close_chat(*message),
                    MessageKind::Handback => room.hand_back(*message),
                    MessageKind::Resume => room.resume(*message),
                    MessageKind::Chat | MessageKind::Crisis | MessageKind::Notice => {
                        return Some(room.publish(*message));
                    }
                }
            }
            SessionEvent::Flagged { session_id, level, therapist_id, at } => {
                // Before the alert: a reply that starts once the flag is
                // known anywhere is shaped by it.
                if let Some(room) = room {
                    room.companion().note_risk(CurrentRisk { level, last_flagged_at: at });
                }
                self.risk_flagged(RiskAlert { session_id, level, therapist_id });
            }
            SessionEvent::Acknowledged { .. } | SessionEvent::Created { .. } | SessionEvent::Read { .. } => {
                self.appointments_changed()
            }
            SessionEvent::Erased { session_id } => {
                // Nothing more from the companion; every socket closes.
                if let Some(room) = room {
                    room.companion().silence();
                }
                self.revoke(Revocation::Chat(session_id));
                self.appointments_changed();
            }
            SessionEvent::Sharing { shared, .. } => {
                // The dashboards' previews follow the choice.
                self.appointments_changed();
                room?.relay_sharing(shared);
            }
            SessionEvent::Delta { reply_id, delta, .. } => room?.relay_delta(reply_id, delta),
            SessionEvent::Cancelled { reply_id, .. } => room?.relay_cancelled(reply_id),
            SessionEvent::Typing { sender, active, .. } => room?.relay_typing(sender, active),
            SessionEvent::Presence { session_id, sender, instance, here, name, .. } => {
                if sender == Sender::User {
                    self.client_seen(session_id, instance, here);
                }
                let elsewhere = (instance != self.instance).then_some(instance);
                room?.presence_changed(sender, elsewhere.map(|instance| (instance, here, name)));
            }
            SessionEvent::PresenceQuestion { instance } => self.forget_presence(|other| other == instance),
            SessionEvent::Staff { instance, therapist_id, here } => {
                let changed = self.staff().online.set(therapist_id, instance, here);
                if changed {
                    self.staffing.notify_one();
                }
            }
        }
        None
    }

    /// A socket of `sender`'s side of the session opened here (`name`: the
    /// therapist's). Returns the presence to apply and announce when the
    /// side was not here before.
    pub fn arrive(&self, room: &Room, sender: Sender, name: Option<&str>) -> Option<SessionEvent> {
        let mut presence = room.presence();
        let side = side(sender)?;
        let ask = !std::mem::replace(&mut presence.asked, true);
        presence.local[side] += 1;
        if sender == Sender::Therapist {
            presence.local_name = name.map(str::to_owned);
        }
        (presence.local[side] == 1).then(|| self.presence_event(room, &presence, sender, ask))
    }

    /// A socket of `sender`'s side closed here. Returns the presence to
    /// apply and announce when it was the side's last one here.
    pub fn depart(&self, room: &Room, sender: Sender) -> Option<SessionEvent> {
        let mut presence = room.presence();
        let side = side(sender)?;
        presence.local[side] = presence.local[side].saturating_sub(1);
        (presence.local[side] == 0).then(|| self.presence_event(room, &presence, sender, false))
    }

    /// This process's presence in a session, for an instance that asked.
    pub fn presence_here(&self, session_id: Uuid) -> Vec<SessionEvent> {
        let Some(room) = self.existing_room(session_id) else { return Vec::new() };
        let presence = room.presence();
        present_sides(&presence).map(|sender| self.presence_event(&room, &presence, sender, false)).collect()
    }

    /// Whether the session's client has a socket open now, on any instance.
    pub fn client_online(&self, session_id: Uuid) -> bool {
        self.online().0.contains_key(&session_id)
    }

    /// A client's sockets on `instance` are some or none now; dashboards
    /// refresh when that makes the client come online or go.
    fn client_seen(&self, session_id: Uuid, instance: Uuid, here: bool) {
        let changed = self.online().set(session_id, instance, here);
        if changed {
            self.appointments_changed();
        }
    }

    /// A therapist opened their appointments list or a chat socket here.
    /// Returns the event to apply and announce when they had nothing open
    /// here before.
    pub fn on_duty(&self, therapist_id: Uuid) -> Option<SessionEvent> {
        let mut staff = self.staff();
        let open = staff.local.entry(therapist_id).or_default();
        *open += 1;
        (*open == 1).then_some(SessionEvent::Staff { instance: self.instance, therapist_id, here: true })
    }

    /// A therapist closed a list or a socket here. Returns the event to
    /// apply and announce when it was their last one here.
    pub fn off_duty(&self, therapist_id: Uuid) -> Option<SessionEvent> {
        let mut staff = self.staff();
        let open = staff.local.get_mut(&therapist_id)?;
        *open -= 1;
        if *open > 0 {
            return None;
        }
        staff.local.remove(&therapist_id);
        Some(SessionEvent::Staff { instance: self.instance, therapist_id, here: false })
    }

    /// How many therapists have a list or a chat open, on any instance.
    pub fn therapists_online(&self) -> usize {
        self.staff().online.0.len()
    }

    /// Whether any client waits to be told of the queue.
    pub fn queue_watched(&self) -> bool {
        self.queue.receiver_count() > 0
    }

    /// The queue, read again: waiting clients hear of it if it changed.
    pub fn set_queue(&self, queue: Queue) {
        self.queue.send_if_modified(|current| {
            let changed = **current != queue;
            if changed {
                *current = Arc::new(queue);
            }
            changed
        });
    }

    pub fn watch_queue(&self) -> watch::Receiver<Arc<Queue>> {
        self.queue.subscribe()
    }

    /// Resolves once a therapist came online or went since the last time.
    pub async fn staffing_changed(&self) {
        self.staffing.notified().await;
    }

    /// Forgets what the instances `forget` picks told of presence: one that
    /// asks again has restarted, or notifications may have been lost.
    fn forget_presence(&self, forget: impl Fn(Uuid) -> bool) {
        if self.online().forget(&forget) {
            self.appointments_changed();
        }
        if self.staff().online.forget(&forget) {
            self.staffing.notify_one();
        }
        for room in self.rooms() {
            room.presence().remote.retain(|&(instance, _), _| !forget(instance));
            for sender in [Sender::User, Sender::Therapist] {
                room.presence_changed(sender, None);
            }
        }
    }

    /// After notifications may have been lost: forgets what other instances
    /// told of presence, and returns the question to announce and this
    /// process's presence, for the others to forget theirs of it and tell
    /// again.
    pub fn ask_presence_again(&self) -> Vec<SessionEvent> {
        let own = self.instance;
        self.forget_presence(|instance| instance != own);
        let mut events = vec![SessionEvent::PresenceQuestion { instance: own }];
        events.extend(self.presence_everywhere());
        events
    }

    /// This process's presence in every session it has sockets of, and
    /// the therapists with something open here, for an instance that asked.
    pub fn presence_everywhere(&self) -> Vec<SessionEvent> {
        let therapists: Vec<Uuid> = self.staff().local.keys().copied().collect();
        let staff = therapists.into_iter().map(|therapist_id| SessionEvent::Staff {
            instance: self.instance,
            therapist_id,
            here: true,
        });
        let rooms = self.rooms();
        rooms.iter().flat_map(|room| self.presence_here(room.session_id)).chain(staff).collect()
    }

    fn online(&self) -> MutexGuard<'_, Seen> {
        // Single inserts and removes: consistent under every panic point.
        self.clients_online.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn staff(&self) -> MutexGuard<'_, Staff> {
        // Single inserts and removes: consistent under every panic point.
        self.staff.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn presence_event(&self, room: &Room, presence: &Presence, sender: Sender, ask: bool) -> SessionEvent {
        let here = side(sender).is_some_and(|side| presence.local[side] > 0);
        let name = (here && sender == Sender::Therapist).then(|| presence.local_name.clone()).flatten();
        SessionEvent::Presence {
            session_id: room.session_id,
            sender,
            instance: self.instance,
            here,
            name,
            ask,
        }
    }

    /// Closes the sockets that use a revoked credential, in this process.
    /// (Other processes notice at their next heartbeat, which re-checks.)
    pub fn revoke(&self, revocation: Revocation) {
        let _ = self.revocations.send(revocation);
    }

    pub fn watch_revocations(&self) -> broadcast::Receiver<Revocation> {
        self.revocations.subscribe()
    }

    /// Tells open dashboards to refresh.
    pub fn appointments_changed(&self) {
        let _ = self.appointments.send(());
    }

    pub fn watch_appointments(&self) -> broadcast::Receiver<()> {
        self.appointments.subscribe()
    }

    /// Alerts to a flagged session the sockets and dashboards of the
    /// therapists who see it in their appointments: all of them while it is
    /// open, else the one it is assigned to.
    fn risk_flagged(&self, alert: RiskAlert) {
        match alert.therapist_id {
            None => drop(self.risks.open.send(alert)),
            Some(therapist_id) => {
                let mut assigned = self.risks.assigned();
                // No receiver left: the therapist has nothing open here.
                if assigned.get(&therapist_id).is_some_and(|own| own.send(alert).is_err()) {
                    assigned.remove(&therapist_id);
                }
            }
        }
        self.appointments_changed();
    }

    /// The flags a therapist's socket or list is to show.
    pub fn watch_risks(&self, therapist_id: Uuid) -> RiskFeed {
        let mut assigned = self.risks.assigned();
        // The channels of therapists with nothing open here any more go.
        assigned.retain(|_, own| own.receiver_count() > 0);
        let own = assigned.entry(therapist_id).or_insert_with(|| broadcast::channel(OWN_ALERTS).0);
        RiskFeed { open: self.risks.open.subscribe(), own: own.subscribe() }
    }

    /// The room of a session, if this process has one (a connection or a
    /// companion reply for it).
    pub fn existing_room(&self, session_id: Uuid) -> Option<Arc<Room>> {
        lock(&self.rooms).get(&session_id).and_then(Weak::upgrade)
    }

    /// Every room of this process.
    pub fn rooms(&self) -> Vec<Arc<Room>> {
        lock(&self.rooms).values().filter_map(Weak::upgrade).collect()
    }

    /// The room of a session, created on first use.
    pub fn room(&self, session_id: Uuid) -> Arc<Room> {
        let mut rooms = lock(&self.rooms);
        if let Some(room) = rooms.get(&session_id).and_then(Weak::upgrade) {
            return room;
        }
        let (events, _) = broadcast::channel(ROOM_CAPACITY);
        let room = Arc::new(Room {
            session_id,
            events,
            order: Mutex::default(),
            companion: Mutex::default(),
            client_window: Mutex::default(),
            connections: AtomicUsize::new(0),
            presence: Mutex::default(),
            opened: Instant::now(),
            rooms: Arc::downgrade(&self.rooms),
        });
        rooms.insert(session_id, Arc::downgrade(&room));
        room
    }
}

/// Something to send to every connection of a session.
#[derive(Debug, Clone)]
pub struct Event {
    /// The message's seq; `None` for companion deltas, which are not stored.
    pub seq: Option<i64>,
    /// The frame, serialised once for every receiver.
    pub frame: Utf8Bytes,
    /// Set when this message changed the session's mode (the join, the
    /// hand-back and the client's yes after it).
    pub mode: Option<Mode>,
    /// The companion reply a delta belongs to.
    pub reply_id: Option<Uuid>,
    /// Some events may have been missed: read the session from the database.
    pub resync: bool,
    /// The chat was closed with this message: connections close after it.
    pub closes: bool,
    /// The chat was handed back with this message: therapists' connections
    /// close after it.
    pub hands_back: bool,
    /// A signal of this side of the chat, never stored: passed on whatever
    /// the mode to every connection of another side (typing and presence:
    /// the other side; the client's sharing choice, from `System`: every
    /// connection).
    pub from_side: Option<Sender>,
}

impl Event {
    /// A committed message.
    pub fn message(message: ChatMessage) -> Self {
        let seq = Some(message.seq);
        let mode = Mode::after(message.kind);
        let frame = frame_text(&ServerFrame::Message(message));
        Self {
            seq,
            frame,
            mode,
            reply_id: None,
            resync: false,
            closes: false,
            hands_back: false,
            from_side: None,
        }
    }

    /// A typing or presence signal of one side, for the other side.
    fn from_side(sender: Sender, frame: &ServerFrame) -> Self {
        Self {
            seq: None,
            frame: frame_text(frame),
            mode: None,
            reply_id: None,
            resync: false,
            closes: false,
            hands_back: false,
            from_side: Some(sender),
        }
    }

    fn companion(reply_id: Uuid, frame: &ServerFrame) -> Self {
        Self {
            seq: None,
            frame: frame_text(frame),
            mode: None,
            reply_id: Some(reply_id),
            resync: false,
            closes: false,
            hands_back: false,
            from_side: None,
        }
    }
}

/// A frame as WebSocket text.
pub fn frame_text(frame: &ServerFrame) -> Utf8Bytes {
    // Serialising these plain structs cannot fail.
    serde_json::to_string(frame).unwrap_or_default().into()
}

/// Messages waiting for their turn, in one room.
#[derive(Debug, Default)]
struct Order {
    /// The highest seq sent in order; `None` until the room's first message.
    published: Option<i64>,
    /// Messages beyond `published + 1`, by seq.
    held: BTreeMap<i64, Event>,
    /// A task will send the held messages when [`HOLD`] runs out.
    timer: bool,
}

/// How a generation ended, for [`Room::finish_generation`].
pub enum Finished {
    /// The reply was committed (and its message published, by
    /// [`Hub::apply`]).
    Committed,
    /// No reply was committed; clients drop the partial text.
    Abandoned,
}

/// Live state of one chat session in this process.
pub struct Room {
    pub session_id: Uuid,
    events: broadcast::Sender<Arc<Event>>,
    order: Mutex<Order>,
    /// The companion's replies and history, one lock: a delta is sent,
    /// and the takeover or close happens, under it.
    companion: Mutex<Companion>,
    /// The client's latest messages seen here: the crisis detector reads a
    /// new client message with them.
    client_window: Mutex<ClientWindow>,
    connections: AtomicUsize,
    presence: Mutex<Presence>,
    /// When this process opened the room.
    opened: Instant,
    rooms: Weak<Rooms>,
}

/// The client's latest messages seen here, oldest first, at most
/// [`haven_safety::WINDOW`], and the latest message screened here before
/// its commit: the window keeps what the detector read of it then, rather
/// than reading it again (an [`Earlier`] is the same for the same text,
/// whichever is kept).
#[derive(Default)]
struct ClientWindow {
    latest: VecDeque<Arc<Earlier>>,
    screened: Option<Arc<Earlier>>,
}

/// Who of each side of a chat has a socket open, here and on other
/// instances, and what the connections here were last told.
#[derive(Default)]
struct Presence {
    /// Sockets open here: the client's, the therapist's.
    local: [usize; 2],
    /// The therapist's name, from their latest socket here.
    local_name: Option<String>,
    /// Other instances with sockets of a side open (with the therapist's
    /// name): until they say otherwise, or their notifications are lost.
    remote: HashMap<(Uuid, usize), Option<String>>,
    /// A socket has opened here: the first one asks the other instances.
    asked: bool,
    /// The presence of each side last sent to the connections here.
    told: [Option<(bool, Option<String>)>; 2],
    /// When the therapist was last told here to have left.
    therapist_left: Option<Instant>,
}

impl Presence {
    /// Whether a side is here on any instance, with the therapist's name.
    fn of(&self, side: usize) -> (bool, Option<String>) {
        if self.local[side] > 0 {
            return (true, if side == 1 { self.local_name.clone() } else { None });
        }
        match self.remote.iter().find(|((_, remote_side), _)| *remote_side == side) {
            Some((_, name)) => (true, name.clone()),
            None => (false, None),
        }
    }
}

/// The sides with a socket open here.
fn present_sides(presence: &Presence) -> impl Iterator<Item = Sender> + '_ {
    [Sender::User, Sender::Therapist]
        .into_iter()
        .filter(|&sender| side(sender).is_some_and(|side| presence.local[side] > 0))
}

/// The index of a side of the chat in [`Presence`]: the client's or the
/// therapist's.
fn side(sender: Sender) -> Option<usize> {
    match sender {
        Sender::User => Some(0),
        Sender::Therapist => Some(1),
        Sender::Ai | Sender::System => None,
    }
}

impl Room {
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<Event>> {
        self.events.subscribe()
    }

    /// Sends a committed message to every connection of the session here.
    /// Returns its frame, for a connection that sends it at once.
    fn publish(self: &Arc<Self>, message: ChatMessage) -> Utf8Bytes {
        self.remember(&message);
        let event = Event::message(message);
        let frame = event.frame.clone();
        self.send_in_order(event);
        frame
    }

    /// Adds a committed message to the companion's history, if kept, and a
    /// client's message to the detector's window.
    fn remember(&self, message: &ChatMessage) {
        self.companion().remember(message);
        if message.sender == haven_protocol::Sender::User {
            let mut window = self.client_window.lock().unwrap_or_else(PoisonError::into_inner);
            let earlier = match window.screened.take_if(|screened| screened.text() == message.content) {
                Some(screened) => screened,
                None => Arc::new(Earlier::new(message.content.clone())),
            };
            if window.latest.len() == haven_safety::WINDOW {
                window.latest.pop_front();
            }
            window.latest.push_back(earlier);
        }
    }

    /// The client's latest messages seen by this process, oldest first
    /// (each read by the detector once, then kept: [`Earlier`]).
    pub fn client_window(&self) -> Vec<Arc<Earlier>> {
        self.client_window.lock().unwrap_or_else(PoisonError::into_inner).latest.iter().cloned().collect()
    }

    /// A client message the detector has just screened, before its commit:
    /// once published, the window keeps it as read.
    pub fn screened(&self, message: Arc<Earlier>) {
        self.client_window.lock().unwrap_or_else(PoisonError::into_inner).screened = Some(message);
    }

    /// The latest kept messages in seq order, reaching at least `last_seq`,
    /// when none is missing in between; else the caller reads them from the
    /// database. Kept messages always end the conversation: they start as
    /// its latest messages read from the database, and grow at the end.
    pub fn recent_history(&self, last_seq: i64) -> Option<Vec<ChatMessage>> {
        self.companion().recent_history(last_seq)
    }

    /// Starts keeping the history from the latest messages, read from the
    /// database, unless a therapist has joined.
    pub fn keep_history(&self, latest: &[ChatMessage]) {
        self.companion().keep_history(latest);
    }

    fn send(&self, event: Event) {
        // No receivers is fine: nobody is connected right now.
        let _ = self.events.send(Arc::new(event));
    }

    /// Sends a message event once every lower seq has been sent, or when
    /// it has waited [`HOLD`] for them.
    fn send_in_order(self: &Arc<Self>, event: Event) {
        let Some(seq) = event.seq else { return self.send(event) };
        let mut order = self.order();
        match order.published {
            Some(published) if seq > published + 1 => {
                // Outside a runtime (never in the server) nothing can wait.
                let Ok(runtime) = tokio::runtime::Handle::try_current() else { return self.send(event) };
                order.held.insert(seq, event);
                if !std::mem::replace(&mut order.timer, true) {
                    let room = Arc::downgrade(self);
                    runtime.spawn(async move {
                        tokio::time::sleep(HOLD).await;
                        if let Some(room) = room.upgrade() {
                            room.release_held();
                        }
                    });
                }
                return;
            }
            // Late after a hold ran out: receivers that lack it take it.
            Some(published) if seq <= published => return self.send(event),
            _ => {}
        }
        self.send(event);
        order.published = Some(seq);
        let mut next = seq + 1;
        while let Some(event) = order.held.remove(&next) {
            self.send(event);
            order.published = Some(next);
            next += 1;
        }
    }

    /// Sends the messages still held after [`HOLD`]; receivers read the
    /// gap before them from the database.
    fn release_held(&self) {
        let mut order = self.order();
        order.timer = false;
        for (seq, event) in std::mem::take(&mut order.held) {
            tracing::debug!(session_id = %self.session_id, seq, "message released after waiting for a lower seq");
            order.published = Some(seq);
            self.send(event);
        }
    }

    fn order(&self) -> MutexGuard<'_, Order> {
        // Each update leaves the state consistent; a panic cannot tear it.
        self.order.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The takeover, as seen by this room: no reply may start or stream
    /// after this; a reply in flight is cancelled and its partial text
    /// withdrawn before the join message goes out.
    fn takeover(self: &Arc<Self>, join_message: ChatMessage) {
        self.silence_companion_then(Event::message(join_message));
    }

    /// Publishes the closing message; every connection closes after it.
    fn close_chat(self: &Arc<Self>, closing_message: ChatMessage) {
        // Nothing from the companion after the chat ends, either.
        self.silence_companion_then(Event { closes: true, ..Event::message(closing_message) });
    }

    /// Publishes the hand-back message; therapists' connections close after
    /// it. The companion stays silent until the client's yes.
    fn hand_back(self: &Arc<Self>, hand_back_message: ChatMessage) {
        self.silence_companion_then(Event { hands_back: true, ..Event::message(hand_back_message) });
    }

    /// The client's yes after a hand-back: the companion may answer again,
    /// from the message on.
    fn resume(self: &Arc<Self>, resume_message: ChatMessage) {
        self.companion().resume(Some(resume_message.id));
        self.send_in_order(Event::message(resume_message));
    }

    /// Stops the companion for good (a reply in flight is cancelled and its
    /// partial text withdrawn), then sends `event`, under the lock that
    /// every delta takes: no delta can follow it.
    fn silence_companion_then(self: &Arc<Self>, event: Event) {
        let mut companion = self.companion();
        if let Some(reply_id) = companion.silence() {
            self.send(Event::companion(reply_id, &ServerFrame::AiCancelled { reply_id }));
        }
        self.send_in_order(event);
    }

    /// Starts a companion reply to a commit that reported the session up to
    /// seq `through`, flagged as `risk` says, unless one is running (then
    /// the running one is asked to answer again when done) or a therapist
    /// joined. Returns the new reply's id.
    pub fn start_generation(&self, through: i64, risk: Option<CurrentRisk>) -> Option<Uuid> {
        self.companion().start(through, risk)
    }

    /// What the next companion reply needs of the session: the seq its
    /// history must reach, and the session's flag.
    pub fn reply_inputs(&self) -> (i64, Option<CurrentRisk>) {
        self.companion().reply_inputs()
    }

    /// Relays a piece of a reply generated by another instance, unless a
    /// therapist has joined (or the reply began before the last hand-back).
    fn relay_delta(&self, reply_id: Uuid, delta: String) {
        let companion = self.companion();
        if companion.may_relay(reply_id) {
            self.send(Event::companion(reply_id, &ServerFrame::AiDelta { reply_id, delta }));
        }
    }

    /// Relays the end of another instance's reply that left no message.
    fn relay_cancelled(&self, reply_id: Uuid) {
        let companion = self.companion();
        if companion.may_relay(reply_id) {
            self.send(Event::companion(reply_id, &ServerFrame::AiCancelled { reply_id }));
        }
    }

    /// Passes a typing signal to the session's connections here (each one
    /// drops its own side's).
    fn relay_typing(&self, sender: Sender, active: bool) {
        self.send(Event::from_side(sender, &ServerFrame::Typing { sender, active }));
    }

    /// The client's sharing choice, for all of the client's tabs. (No
    /// therapist can have a socket open while the choice can change: it
    /// is fixed at the first join.)
    fn relay_sharing(&self, shared: bool) {
        self.send(Event::from_side(Sender::System, &ServerFrame::Sharing { shared: Some(shared) }));
    }

    /// A side's presence may have changed: here (`None`) or on another
    /// instance. Tells the connections here when it did.
    fn presence_changed(&self, sender: Sender, elsewhere: Option<(Uuid, bool, Option<String>)>) {
        let Some(side) = side(sender) else { return };
        let mut presence = self.presence();
        if let Some((instance, here, name)) = elsewhere {
            if here {
                presence.remote.insert((instance, side), name);
            } else {
                presence.remote.remove(&(instance, side));
            }
        }
        let now = presence.of(side);
        if presence.told[side].as_ref() == Some(&now) {
            return;
        }
        presence.told[side] = Some(now.clone());
        let (here, name) = now;
        if sender == Sender::Therapist && !here {
            presence.therapist_left = Some(Instant::now());
        }
        self.send(Event::from_side(sender, &ServerFrame::Presence { sender, here, name }));
    }

    /// How long the therapist has had no socket open on the session, as far
    /// as this process knows (at most since its room opened); `None` while
    /// one is open.
    pub fn therapist_away_for(&self) -> Option<Duration> {
        let presence = self.presence();
        if presence.of(1).0 {
            return None;
        }
        Some(presence.therapist_left.unwrap_or(self.opened).elapsed())
    }

    /// The presence of a side, for a connection that just opened.
    pub fn presence_frame(&self, sender: Sender) -> Option<ServerFrame> {
        let (here, name) = self.presence().of(side(sender)?);
        Some(ServerFrame::Presence { sender, here, name })
    }

    fn presence(&self) -> MutexGuard<'_, Presence> {
        // Every update leaves the counts consistent; a panic cannot tear them.
        self.presence.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Asks every connection here to re-read the session from the database
    /// (after notifications from other instances may have been lost).
    pub fn resync(&self) {
        self.send(Event {
            seq: None,
            frame: Utf8Bytes::default(),
            mode: None,
            reply_id: None,
            resync: true,
            closes: false,
            hands_back: false,
            from_side: None,
        });
    }

    /// The reply being generated right now, if any.
    pub fn reply_in_flight(&self) -> Option<Uuid> {
        self.companion().in_flight()
    }

    /// Streams a piece of reply `reply_id`. `false` means the reply was
    /// cancelled (a therapist joined) and must stop.
    pub fn publish_delta(&self, reply_id: Uuid, delta: String) -> bool {
        let companion = self.companion();
        if !companion.may_stream(reply_id) {
            return false;
        }
        self.send(Event::companion(reply_id, &ServerFrame::AiDelta { reply_id, delta }));
        true
    }

    /// Ends reply `reply_id`: withdraws its partial text unless it was
    /// committed. Returns the id of a follow-up reply to generate now, when client
    /// messages arrived meanwhile.
    pub fn finish_generation(self: &Arc<Self>, reply_id: Uuid, finished: Finished) -> Option<Uuid> {
        let mut companion = self.companion();
        let (current, next) = companion.finish(reply_id);
        // After a takeover the withdrawal already went out, before the join.
        if current && matches!(finished, Finished::Abandoned) {
            self.send(Event::companion(reply_id, &ServerFrame::AiCancelled { reply_id }));
        }
        next
    }

    /// Counts a connection until the returned guard drops; also returns the
    /// new count for the logs.
    pub fn connect(self: &Arc<Self>) -> (ConnectionGuard, usize) {
        let count = self.connections.fetch_add(1, Ordering::SeqCst) + 1;
        (ConnectionGuard { room: self.clone() }, count)
    }

    /// Cancelled when the companion is silenced (a therapist takes over, a
    /// hand-back, the close), stopping the reply in flight and with it the
    /// provider request.
    pub fn silenced(&self) -> CancellationToken {
        self.companion().silenced_token()
    }

    fn companion(&self) -> MutexGuard<'_, Companion> {
        // Every update leaves the state consistent; a panic cannot tear it.
        self.companion.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Drop for Room {
    fn drop(&mut self) {
        if let Some(rooms) = self.rooms.upgrade() {
            let mut rooms = lock(&rooms);
            // A new room for the same session may already have replaced this one.
            if rooms.get(&self.session_id).is_some_and(|room| room.strong_count() == 0) {
                rooms.remove(&self.session_id);
            }
        }
    }
}

/// Keeps a room's connection count while a socket is open.
pub struct ConnectionGuard {
    room: Arc<Room>,
}

impl ConnectionGuard {
    pub fn room(&self) -> &Arc<Room> {
        &self.room
    }
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        self.room.connections.fetch_sub(1, Ordering::SeqCst);
    }
}

fn lock(rooms: &Rooms) -> MutexGuard<'_, HashMap<Uuid, Weak<Room>>> {
    // The map stays consistent under every panic point (single insert/remove).
    rooms.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chat::companion::{HISTORY_BYTES, HISTORY_MESSAGES};

    #[test]
    fn a_room_is_shared_while_owned_and_removed_after() {
        let hub = Hub::default();
        let id = Uuid::now_v7();
        let room = hub.room(id);
        assert!(Arc::ptr_eq(&room, &hub.room(id)));
        drop(room);
        assert!(lock(&hub.rooms).is_empty());
    }

    #[test]
    fn one_generation_at_a_time_and_a_follow_up_for_messages_that_came_meanwhile() {
        let hub = Hub::default();
        let room = hub.room(Uuid::now_v7());
        let first = room.start_generation(0, None).expect("starts");
        assert_eq!(room.start_generation(0, None), None, "one at a time");
        assert_eq!(room.start_generation(0, None), None);
        let follow_up =
            room.finish_generation(first, Finished::Abandoned).expect("answers what came meanwhile");
        assert_eq!(room.finish_generation(follow_up, Finished::Abandoned), None, "only one follow-up");
    }

    #[test]
    fn presence_counts_tabs_here_and_instances_elsewhere_and_tells_only_changes() {
        let hub = Hub::default();
        let room = hub.room(Uuid::now_v7());
        let mut events = room.subscribe();
        let therapist = Sender::Therapist;
        let here = |event: Option<SessionEvent>| match event {
            Some(SessionEvent::Presence { here, ask, .. }) => Some((here, ask)),
            _ => None,
        };
        // Two tabs here: announced once, asking the other instances the first
        // time; the first to close changes nothing.
        let first = hub.arrive(&room, therapist, Some("Tess"));
        assert_eq!(here(first.clone()), Some((true, true)));
        hub.apply(first);
        assert_eq!(here(hub.arrive(&room, therapist, Some("Tess"))), None);
        assert_eq!(here(hub.depart(&room, therapist)), None);
        // Another instance has the therapist too: the last tab here leaving
        // leaves them here.
        let elsewhere = Uuid::now_v7();
        let remote = |here| SessionEvent::Presence {
            session_id: room.session_id,
            sender: therapist,
            instance: elsewhere,
            here,
            name: here.then(|| "Tess".to_owned()),
            ask: false,
        };
        hub.apply([remote(true)]);
        let last = hub.depart(&room, therapist);
        assert_eq!(here(last.clone()), Some((false, false)));
        hub.apply(last);
        assert_eq!(
            room.presence_frame(therapist),
            Some(ServerFrame::Presence { sender: therapist, here: true, name: Some("Tess".to_owned()) })
        );
        hub.apply([remote(false)]);
        assert_eq!(
            room.presence_frame(therapist),
            Some(ServerFrame::Presence { sender: therapist, here: false, name: None })
        );
        // The connections here were told twice: here, and gone at the end.
        let told: Vec<String> =
            std::iter::from_fn(|| events.try_recv().ok()).map(|event| event.frame.to_string()).collect();
        assert_eq!(told.len(), 2, "{told:?}");
        assert!(told[0].contains(r#""here":true"#) && told[1].contains(r#""here":false"#), "{told:?}");
        // What this process answers to another that asks: nobody here now.
        assert!(hub.presence_here(room.session_id).is_empty());
        assert_eq!(here(hub.arrive(&room, Sender::User, None)), Some((true, false)), "asked once per room");
        assert_eq!(hub.presence_here(room.session_id).len(), 1);
    }

    #[test]
    fn after_the_takeover_no_delta_is_published_and_nothing_starts() {
        let hub = Hub::default();
        let room = hub.room(Uuid::now_v7());
        let mut events = room.subscribe();
        let reply = room.start_generation(0, None).unwrap();
        assert!(room.publish_delta(reply, "Hel".into()));
        room.takeover(message(1, haven_protocol::Sender::System));
        assert!(!room.publish_delta(reply, "lo".into()), "no delta after the join");
        assert_eq!(room.start_generation(0, None), None);
        assert_eq!(room.finish_generation(reply, Finished::Abandoned), None);

        let kinds: Vec<String> = std::iter::from_fn(|| events.try_recv().ok())
            .map(|event| serde_json::from_str::<serde_json::Value>(&event.frame).unwrap()["type"].to_string())
            .collect();
        assert_eq!(kinds, ["\"ai_delta\"", "\"ai_cancelled\"", "\"message\""]);
    }

    fn seqs(events: &mut broadcast::Receiver<Arc<Event>>) -> Vec<i64> {
        std::iter::from_fn(|| events.try_recv().ok()).filter_map(|event| event.seq).collect()
    }

    fn message(seq: i64, sender: haven_protocol::Sender) -> ChatMessage {
        ChatMessage {
            seq,
            id: Uuid::now_v7(),
            sender,
            content: String::new(),
            created_at: time::OffsetDateTime::now_utc(),
            client_id: None,
            reply_id: None,
            kind: MessageKind::Chat,
            private: false,
        }
    }

    #[tokio::test]
    async fn a_flag_wakes_only_the_feeds_of_therapists_who_see_it_and_a_closed_feeds_channel_goes() {
        let hub = Hub::default();
        let (tess, omar) = (Uuid::now_v7(), Uuid::now_v7());
        let (mut tesss, mut omars) = (hub.watch_risks(tess), hub.watch_risks(omar));
        let flag =
            |therapist_id| RiskAlert { session_id: Uuid::now_v7(), level: RiskLevel::High, therapist_id };
        let (of_tess, open) = (flag(Some(tess)), flag(None));
        hub.risk_flagged(of_tess);
        hub.risk_flagged(open);
        assert_eq!(omars.open.try_recv(), Ok(open));
        assert!(omars.own.try_recv().is_err(), "Tess's session is not Omar's to see");
        assert_eq!((tesss.own.try_recv(), tesss.open.try_recv()), (Ok(of_tess), Ok(open)));

        drop(tesss);
        hub.risk_flagged(flag(Some(tess)));
        assert!(!hub.risks.assigned().contains_key(&tess), "nothing of Tess's is open here");
        drop(omars);
        hub.watch_risks(tess);
        assert!(!hub.risks.assigned().contains_key(&omar), "pruned when another subscribes");
    }

    #[tokio::test]
    async fn messages_published_out_of_order_go_out_in_seq_order() {
        let hub = Hub::default();
        let room = hub.room(Uuid::now_v7());
        let mut events = room.subscribe();
        for seq in [4, 6, 7, 5, 9, 8] {
            room.publish(message(seq, haven_protocol::Sender::System));
        }
        assert_eq!(seqs(&mut events), [4, 5, 6, 7, 8, 9]);
        room.publish(message(3, haven_protocol::Sender::System));
        assert_eq!(seqs(&mut events), [3], "a late message is passed on; receivers drop what they have");
    }

    #[tokio::test]
    async fn a_gap_that_never_fills_is_released_after_the_hold() {
        let hub = Hub::default();
        let room = hub.room(Uuid::now_v7());
        let mut events = room.subscribe();
        room.publish(message(1, haven_protocol::Sender::System));
        room.publish(message(3, haven_protocol::Sender::System));
        room.publish(message(4, haven_protocol::Sender::System));
        assert_eq!(seqs(&mut events), [1], "held while 2 may still come");
        let released = tokio::time::timeout(Duration::from_secs(5), events.recv()).await;
        assert_eq!(released.expect("released").expect("open").seq, Some(3));
        assert_eq!(seqs(&mut events), [4]);
        room.publish(message(5, haven_protocol::Sender::System));
        assert_eq!(seqs(&mut events), [5], "in order again after the release");
    }

    #[tokio::test]
    async fn the_companion_history_is_used_only_when_whole_and_is_dropped_at_the_takeover() {
        use haven_protocol::Sender::{Ai, System, User};
        let hub = Hub::default();
        let room = hub.room(Uuid::now_v7());
        let seqs_of = |history: Option<Vec<ChatMessage>>| {
            history.map(|history| history.iter().map(|message| message.seq).collect::<Vec<_>>())
        };
        room.publish(message(1, User));
        assert_eq!(seqs_of(room.recent_history(1)), None, "not kept before the first reply");
        room.keep_history(&[message(1, User)]);
        room.publish(message(2, User));
        room.publish(message(3, Ai));
        room.finish_generation(Uuid::now_v7(), Finished::Committed);
        assert_eq!(seqs_of(room.recent_history(3)), Some(vec![1, 2, 3]));
        assert_eq!(seqs_of(room.recent_history(4)), None, "seq 4 is committed but not here");
        room.publish(message(5, User));
        assert_eq!(seqs_of(room.recent_history(5)), None, "a gap at 4");
        room.keep_history(&[message(4, User), message(5, User)]);
        assert_eq!(seqs_of(room.recent_history(5)), Some(vec![1, 2, 3, 4, 5]));
        for seq in 6..=HISTORY_MESSAGES as i64 + 10 {
            room.publish(message(seq, User));
        }
        let kept = seqs_of(room.recent_history(HISTORY_MESSAGES as i64 + 10)).expect("whole");
        assert_eq!(kept.len(), HISTORY_MESSAGES);
        assert_eq!(kept[0], 11, "only the latest are kept");
        let next = HISTORY_MESSAGES as i64 + 11;
        for seq in next..next + 2 {
            room.publish(ChatMessage { content: "x".repeat(HISTORY_BYTES / 2 + 1), ..message(seq, User) });
        }
        assert_eq!(
            seqs_of(room.recent_history(next + 1)),
            Some(vec![next + 1]),
            "and no more text than the cap"
        );
        room.takeover(message(next + 2, System));
        room.keep_history(&[message(1, User)]);
        assert_eq!(seqs_of(room.recent_history(0)), None, "nothing is kept after the takeover");
    }

    mod properties {
        use proptest::prelude::*;

        use super::*;

        #[derive(Debug, Clone)]
        enum Step {
            Start,
            Delta,
            Commit,
            Abandon,
            Takeover,
        }

        fn step() -> impl Strategy<Value = Step> {
            prop_oneof![
                3 => Just(Step::Start),
                4 => Just(Step::Delta),
                2 => Just(Step::Commit),
                1 => Just(Step::Abandon),
                1 => Just(Step::Takeover),
            ]
        }

        proptest! {
            /// Whatever the order of client messages, deltas, commits and the
            /// takeover: one reply at a time, and nothing from the companion
            /// after the join message.
            #[test]
            fn the_companion_never_speaks_after_the_takeover(steps in prop::collection::vec(step(), 1..60)) {
                let hub = Hub::default();
                let room = hub.room(Uuid::now_v7());
                let mut events = room.subscribe();
                let mut current: Option<Uuid> = None;
                let mut seq = 0;
                let mut joined_in_database = false;
                for step in steps {
                    match step {
                        Step::Start => {
                            let started = room.start_generation(0, None);
                            prop_assert!(started.is_none() || current.is_none(), "two replies at once");
                            current = current.or(started);
                        }
                        Step::Delta => {
                            if let Some(reply) = current {
                                room.publish_delta(reply, "x".into());
                            }
                        }
                        Step::Commit | Step::Abandon => {
                            if let Some(reply) = current.take() {
                                // After the join the database refuses the
                                // commit (its mode check), so it is abandoned.
                                let finished = if matches!(step, Step::Commit) && !joined_in_database {
                                    seq += 1;
                                    hub.apply([SessionEvent::message(room.session_id, message(seq, haven_protocol::Sender::Ai))]);
                                    Finished::Committed
                                } else {
                                    Finished::Abandoned
                                };
                                current = room.finish_generation(reply, finished);
                            }
                        }
                        Step::Takeover => {
                            seq += 1;
                            joined_in_database = true;
                            let join = ChatMessage { kind: MessageKind::Join, ..message(seq, haven_protocol::Sender::System) };
                            hub.apply([SessionEvent::message(room.session_id, join)]);
                        }
                    }
                }
                let mut joined = false;
                while let Ok(event) = events.try_recv() {
                    let frame: serde_json::Value = serde_json::from_str(&event.frame).unwrap();
                    let is_join = frame["sender"] == "system";
                    let from_companion = frame["type"] == "ai_delta" || frame["sender"] == "ai";
                    prop_assert!(!(joined && from_companion), "companion output after the join: {frame}");
                    joined |= is_join;
                }
            }
        }
    }

    /// The room under a deterministic scheduler: Shuttle runs the writers,
    /// the companion, another instance's listener, the hold's timer and two
    /// connections as threads, switching between them at every lock, over
    /// thousands of schedules (PCT, which finds any bug of up to three
    /// ordering constraints with a known probability, and uniformly random
    /// ones). Run with `cargo test --features model-check --lib model_check`.
    #[cfg(feature = "model-check")]
    mod model_check {
        use haven_protocol::Sender::{Ai, System, User};
        use shuttle::sync::atomic::{AtomicBool, Ordering as Atomic};
        use shuttle::thread;
        use tokio::sync::broadcast::error::TryRecvError;

        use super::*;
        use crate::chat::delivery::{Delivery, Live};

        /// The store as the room's writers see it: one lock is one
        /// transaction. It refuses what the real stores refuse: anything
        /// after the close, and the companion's reply or a second join after
        /// the join (the mode check in the reply's commit).
        #[derive(Default)]
        struct Database {
            messages: Vec<ChatMessage>,
            joined: bool,
            closed: bool,
        }

        impl Database {
            fn commit(
                &mut self,
                sender: haven_protocol::Sender,
                kind: MessageKind,
                reply: Option<Uuid>,
            ) -> Option<ChatMessage> {
                let refused = self.closed || (self.joined && (sender == Ai || kind == MessageKind::Join));
                if refused {
                    return None;
                }
                self.joined |= kind == MessageKind::Join;
                self.closed |= kind == MessageKind::Close;
                let seq = self.messages.len() as i64 + 1;
                self.messages.push(ChatMessage { kind, reply_id: reply, ..message(seq, sender) });
                self.messages.last().cloned()
            }
        }

        /// One instance's view of the world: its hub, the session's room
        /// (held open, as a connection holds it) and the shared store.
        #[derive(Clone)]
        struct World {
            hub: Arc<Hub>,
            room: Arc<Room>,
            database: Arc<Mutex<Database>>,
        }

        impl World {
            /// Commits a message and applies its event, as every writer does.
            fn write(&self, sender: haven_protocol::Sender, kind: MessageKind, reply: Option<Uuid>) -> bool {
                let committed = self.database.lock().unwrap().commit(sender, kind, reply);
                let Some(message) = committed else { return false };
                self.hub.apply([SessionEvent::message(self.room.session_id, message)]);
                true
            }

            /// The companion task (`companion.rs`): one reply at a time,
            /// streamed in pieces until the room refuses one, committed
            /// unless the store refuses it, then the follow-up reply.
            fn companion(&self) {
                let mut next = self.room.start_generation(0, None);
                while let Some(reply) = next {
                    let streamed = (0..2).all(|_| self.room.publish_delta(reply, "x".into()));
                    let committed = streamed && self.write(Ai, MessageKind::Chat, Some(reply));
                    let finished = if committed { Finished::Committed } else { Finished::Abandoned };
                    next = self.room.finish_generation(reply, finished);
                }
            }
        }

        /// What a client was sent, in order.
        #[derive(Debug, Clone, PartialEq)]
        enum Seen {
            Message { seq: i64, sender: String, kind: String },
            Companion(String),
        }

        impl Seen {
            fn of(frame: &str) -> Self {
                let frame: serde_json::Value = serde_json::from_str(frame).unwrap();
                match frame["type"].as_str() {
                    Some("message") => Seen::Message {
                        seq: frame["seq"].as_i64().unwrap(),
                        sender: frame["sender"].as_str().unwrap().into(),
                        kind: frame["kind"].as_str().unwrap_or("chat").into(),
                    },
                    other => Seen::Companion(other.unwrap_or_default().into()),
                }
            }

            fn is_companion(&self) -> bool {
                matches!(self, Seen::Companion(_))
                    || matches!(self, Seen::Message { sender, .. } if sender == "ai")
            }

            fn kind(&self) -> Option<&str> {
                match self {
                    Seen::Message { kind, .. } => Some(kind),
                    Seen::Companion(_) => None,
                }
            }
        }

        /// A connection (`connection.rs`): its [`Delivery`] decides on each
        /// event; a resync reads the session's last seq and mode, then the
        /// messages up to that seq, as two reads. Returns what its client
        /// was sent, up to the closing message or until `done` and drained,
        /// and the events the room sent it.
        fn connection(
            world: World,
            mut events: broadcast::Receiver<Arc<Event>>,
            done: Arc<AtomicBool>,
        ) -> (Vec<Seen>, Vec<Arc<Event>>) {
            let mut delivery = Delivery::new(User, None);
            let (mut seen, mut raw) = (Vec::new(), Vec::new());
            loop {
                // Read before the channel: once set, every event is in it.
                let drained_when_empty = done.load(Atomic::SeqCst);
                let event = match events.try_recv() {
                    Ok(event) => event,
                    Err(TryRecvError::Empty) if drained_when_empty => return (seen, raw),
                    Err(TryRecvError::Empty) => {
                        thread::yield_now();
                        continue;
                    }
                    Err(TryRecvError::Lagged(_)) => {
                        Arc::new(Event { resync: true, ..Event::message(message(0, System)) })
                    }
                    Err(TryRecvError::Closed) => return (seen, raw),
                };
                raw.push(event.clone());
                match delivery.live(&event) {
                    Live::Send => seen.push(Seen::of(&event.frame)),
                    Live::Skip => {}
                    Live::Resync => {
                        let (up_to, mode) = {
                            let database = world.database.lock().unwrap();
                            let mode = if database.joined { Mode::THERAPIST_JOINED } else { Mode::BOT_ONLY };
                            (database.messages.len(), mode)
                        };
                        let stored = world.database.lock().unwrap().messages
                            [delivery.last_seq as usize..up_to]
                            .to_vec();
                        for message in stored {
                            delivery.stored(&message);
                            seen.push(Seen::of(&frame_text(&ServerFrame::Message(message.clone()))));
                            if let Some(mode) = Mode::after(message.kind) {
                                delivery.tell_mode(mode);
                            }
                            if message.kind == MessageKind::Close {
                                return (seen, raw);
                            }
                        }
                        delivery.tell_mode(mode);
                        continue;
                    }
                }
                if event.closes {
                    return (seen, raw);
                }
                if let Some(mode) = event.mode {
                    delivery.tell_mode(mode);
                }
            }
        }

        /// One schedule: a client writes twice and the companion answers,
        /// a client on another instance writes and that instance's reply
        /// streams in through the listener, a therapist joins, the hold's
        /// timer fires, and (with `close`) the chat is closed; two
        /// connections watch.
        fn schedule(close: bool) {
            let hub = Arc::new(Hub::default());
            let room = hub.room(Uuid::now_v7());
            let world = World { hub, room, database: Arc::default() };
            let done = Arc::new(AtomicBool::new(false));
            let connections: Vec<_> = (0..2)
                .map(|_| {
                    let (world, events, done) = (world.clone(), world.room.subscribe(), done.clone());
                    thread::spawn(move || connection(world, events, done))
                })
                .collect();
            let mut writers = vec![
                thread::spawn({
                    let world = world.clone();
                    move || {
                        for _ in 0..2 {
                            world.write(User, MessageKind::Chat, None);
                        }
                    }
                }),
                thread::spawn({
                    let world = world.clone();
                    move || world.companion()
                }),
                thread::spawn({
                    let world = world.clone();
                    move || {
                        let (session_id, reply_id) = (world.room.session_id, Uuid::now_v7());
                        world.hub.apply([SessionEvent::Delta { session_id, reply_id, delta: "y".into() }]);
                        world.write(User, MessageKind::Chat, None);
                    }
                }),
                thread::spawn({
                    let world = world.clone();
                    move || _ = world.write(System, MessageKind::Join, None)
                }),
                thread::spawn({
                    let room = world.room.clone();
                    move || room.release_held()
                }),
            ];
            if close {
                let world = world.clone();
                writers.push(thread::spawn(move || _ = world.write(System, MessageKind::Close, None)));
            }
            for writer in writers {
                writer.join().unwrap();
            }
            // A hold always runs out in the end.
            world.room.release_held();
            done.store(true, Atomic::SeqCst);
            let (views, streams): (Vec<Vec<Seen>>, Vec<Vec<Arc<Event>>>) =
                connections.into_iter().map(|c| c.join().unwrap()).unzip();
            // The room itself: no delta and no withdrawal of the companion's
            // after the join or closing message, in the order it sent them.
            for stream in &streams {
                let silenced = stream.iter().position(|event| event.mode.is_some() || event.closes);
                if let Some(silenced) = silenced {
                    assert!(
                        stream[silenced..].iter().all(|event| event.reply_id.is_none()),
                        "the room sent the companion's output after the join or close"
                    );
                }
            }

            let stored = world.database.lock().unwrap().messages.len() as i64;
            let mut orders = Vec::new();
            for view in &views {
                let order: Vec<(i64, Option<&str>)> = view
                    .iter()
                    .filter_map(|seen| match seen {
                        Seen::Message { seq, .. } => Some((*seq, seen.kind())),
                        Seen::Companion(_) => None,
                    })
                    .collect();
                let seqs: Vec<i64> = order.iter().map(|(seq, _)| *seq).collect();
                assert_eq!(seqs, (1..=stored).collect::<Vec<_>>(), "a gap or a repeat: {view:?}");
                if let Some(join) = view.iter().position(|seen| seen.kind() == Some("join")) {
                    assert!(
                        !view[join..].iter().any(Seen::is_companion),
                        "the companion after the join message: {view:?}"
                    );
                }
                if let Some(closed) = view.iter().position(|seen| seen.kind() == Some("close")) {
                    assert_eq!(closed, view.len() - 1, "something after the closing message: {view:?}");
                }
                orders.push(order);
            }
            assert_eq!(orders[0], orders[1], "two connections saw different orders");
        }

        /// The hold's timer is a task on the runtime, which these schedules
        /// never drive: each one calls `release_held` itself.
        fn check(close: bool) {
            let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
            let _runtime = runtime.enter();
            shuttle::check_pct(move || schedule(close), 3000, 3);
            shuttle::check_random(move || schedule(close), 3000);
        }

        #[test]
        fn no_schedule_lets_the_companion_speak_after_the_join_or_loses_a_message() {
            check(false);
        }

        #[test]
        fn no_schedule_sends_anything_after_the_closing_message() {
            check(true);
        }
    }
}
