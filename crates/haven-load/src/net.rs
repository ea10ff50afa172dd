//! Loopback networking shared by the scenarios: the target, source
//! addresses spread over 127.0.0.0/8, WebSocket connections and frames.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use clap::Args;
use futures_util::{SinkExt, Stream, StreamExt};
use haven_protocol::{ClientFrame, ServerFrame};
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::http::header::AUTHORIZATION;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tokio_tungstenite::tungstenite::{Error as WsError, Message};

pub type Error = Box<dyn std::error::Error + Send + Sync>;
pub type Result<T> = std::result::Result<T, Error>;

/// A client WebSocket to the server.
pub type Ws = WebSocketStream<TcpStream>;

/// Sockets one source address opens, under the server's 200 per address.
pub const SOCKETS_PER_ADDRESS: usize = 150;

/// Sessions one source address creates, under the server's 120 per address
/// per minute.
pub const SESSIONS_PER_ADDRESS: usize = 100;

/// Therapist logins per source address: each carries up to
/// [`SOCKETS_PER_LOGIN`] sockets, so 7 stay under [`SOCKETS_PER_ADDRESS`].
pub const LOGINS_PER_ADDRESS: usize = SOCKETS_PER_ADDRESS / SOCKETS_PER_LOGIN;

/// Sockets per therapist login: the server's default per-credential limit.
pub const SOCKETS_PER_LOGIN: usize = 20;

/// How long one connection or HTTP request may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(20);

/// Where the load goes, and how it is labelled.
#[derive(Debug, Clone, Args)]
pub struct Target {
    /// The server (or relay). Loopback addresses only.
    #[arg(long, default_value = "127.0.0.1:8000", value_parser = loopback)]
    pub target: SocketAddr,

    /// The server's process id: its CPU time and resident memory are
    /// measured (from /proc) and reported.
    #[arg(long)]
    pub server_pid: Option<u32>,

    /// Second octet of the source addresses, 127.N.x.y. The server counts
    /// new sessions per address per minute, so successive runs against one
    /// server should use different values.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=254))]
    pub source_net: u8,

    /// A free-form label copied into the JSON result, to group runs.
    #[arg(long, default_value = "")]
    pub label: String,
}

/// Accepts loopback socket addresses only: this tool must not load anyone
/// else's machine.
pub fn loopback(value: &str) -> std::result::Result<SocketAddr, String> {
    let address: SocketAddr = value.parse().map_err(|error| format!("{error}"))?;
    if !address.ip().is_loopback() {
        return Err(format!("{address} is not a loopback address"));
    }
    Ok(address)
}

/// Loopback source addresses: clients use 127.N.0-127.x, therapists
/// 127.N.128-255.x, so the two never share a per-address budget.
#[derive(Debug, Clone, Copy)]
pub struct Sources {
    net: u8,
}

impl Sources {
    pub fn new(net: u8) -> Self {
        Self { net }
    }

    /// The `n`th client source address.
    pub fn client(&self, n: usize) -> IpAddr {
        self.address(0, n)
    }

    /// The `n`th therapist source address.
    pub fn therapist(&self, n: usize) -> IpAddr {
        self.address(128, n)
    }

    fn address(&self, first_block: usize, n: usize) -> IpAddr {
        // 250 hosts per /24, and 128 /24s per role: 32,000 addresses each.
        let block = first_block + (n / 250) % 128;
        let host = 1 + n % 250;
        IpAddr::V4(Ipv4Addr::new(127, self.net, block as u8, host as u8))
    }
}

/// WebSocket buffers sized for many small sockets (tungstenite allocates
/// 128 KiB per socket by default).
fn socket_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(4 * 1024)
        .write_buffer_size(0)
        .max_write_buffer_size(1024 * 1024)
        .max_message_size(Some(1024 * 1024))
        .max_frame_size(Some(1024 * 1024))
}

/// Opens a WebSocket to `path` on `target` from `source`, with a bearer
/// token if given.
pub async fn connect(target: SocketAddr, source: IpAddr, path: &str, token: Option<&str>) -> Result<Ws> {
    let attempt = async {
        let socket = TcpSocket::new_v4()?;
        socket.bind(SocketAddr::new(source, 0))?;
        let stream = socket.connect(target).await?;
        stream.set_nodelay(true)?;
        let mut request = format!("ws://{target}{path}").into_client_request()?;
        if let Some(token) = token {
            request.headers_mut().insert(AUTHORIZATION, HeaderValue::from_str(&format!("Bearer {token}"))?);
        }
        let (ws, _) =
            tokio_tungstenite::client_async_with_config(request, stream, Some(socket_config())).await?;
        Ok::<_, Error>(ws)
    };
    tokio::time::timeout(CONNECT_TIMEOUT, attempt).await.map_err(|_| Error::from("connection timed out"))?
}

/// What reading a socket gave.
#[derive(Debug)]
pub enum Incoming {
    Frame(ServerFrame),
    /// A frame that is not a known server frame (counted, never printed).
    Unparsed,
    /// The socket closed: the close code and reason, when there was one.
    Closed(Option<(u16, String)>),
}

/// The next server frame, skipping pings and pongs (answered by tungstenite).
pub async fn next_frame<S>(stream: &mut S) -> Incoming
where
    S: Stream<Item = std::result::Result<Message, WsError>> + Unpin,
{
    loop {
        match stream.next().await {
            Some(Ok(Message::Text(text))) => {
                return match serde_json::from_str(&text) {
                    Ok(frame) => Incoming::Frame(frame),
                    Err(_) => Incoming::Unparsed,
                };
            }
            Some(Ok(Message::Close(frame))) => {
                return Incoming::Closed(frame.map(|frame| (frame.code.into(), frame.reason.to_string())));
            }
            Some(Ok(Message::Binary(_))) => return Incoming::Unparsed,
            Some(Ok(_)) => continue,
            Some(Err(_)) | None => return Incoming::Closed(None),
        }
    }
}

/// Reads frames until a `mode` frame, which the server sends first.
pub async fn first_mode(ws: &mut Ws) -> Result<haven_protocol::ChatMode> {
    let read = async {
        loop {
            match next_frame(ws).await {
                Incoming::Frame(ServerFrame::Mode { chat_mode, .. }) => return Ok(chat_mode),
                Incoming::Frame(_) | Incoming::Unparsed => continue,
                Incoming::Closed(close) => return Err(Error::from(describe_close(&close))),
            }
        }
    };
    tokio::time::timeout(CONNECT_TIMEOUT, read).await.map_err(|_| Error::from("no mode frame"))?
}

/// Reads a socket (answering pings) until `ready` holds a value, which it
/// returns; an error if the socket closes or the sender is gone first.
pub async fn wait_ready<T: Copy>(
    ws: &mut Ws,
    ready: &mut tokio::sync::watch::Receiver<Option<T>>,
) -> std::result::Result<T, String> {
    loop {
        if let Some(value) = *ready.borrow_and_update() {
            return Ok(value);
        }
        tokio::select! {
            changed = ready.changed() => {
                if changed.is_err() {
                    return Err("cancelled before the start".to_owned());
                }
            }
            incoming = next_frame(ws) => {
                if let Incoming::Closed(close) = incoming {
                    return Err(describe_close(&close));
                }
            }
        }
    }
}

/// A close as text for reports: the code and the server's reason (which
/// never carries content).
pub fn describe_close(close: &Option<(u16, String)>) -> String {
    match close {
        Some((code, reason)) => format!("closed {code} {reason}"),
        None => "connection lost".to_owned(),
    }
}

/// A `message` frame as text.
pub fn message_frame(content: &str, client_id: String) -> Message {
    let frame = ClientFrame::Message { content: content.to_owned(), client_id };
    // Serialising this plain struct cannot fail.
    Message::text(serde_json::to_string(&frame).unwrap_or_default())
}

/// Message content of `size` bytes. Its text is irrelevant and never logged.
pub fn filler(size: usize) -> String {
    // Starts with a letter, so it is never only whitespace.
    const WORDS: &str = "steady breathing helps ";
    WORDS.chars().cycle().take(size.clamp(1, haven_protocol::MAX_CONTENT_CHARS)).collect()
}

/// Closes a socket politely, without waiting long.
pub async fn close(mut ws: Ws) {
    let frame = CloseFrame { code: 1000.into(), reason: "bye".into() };
    let _ = tokio::time::timeout(Duration::from_secs(2), ws.close(Some(frame))).await;
}

/// Closes a split socket politely, without waiting long.
pub async fn close_sink<S>(sink: &mut S)
where
    S: futures_util::Sink<Message> + Unpin,
{
    let frame = CloseFrame { code: 1000.into(), reason: "bye".into() };
    let _ = tokio::time::timeout(Duration::from_secs(2), sink.send(Message::Close(Some(frame)))).await;
}

/// The open-files limit of this process (soft), from /proc/self/limits.
pub fn open_files_limit() -> Option<u64> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|line| line.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

/// Refuses a scenario that would need more sockets than this process may open.
pub fn check_open_files(sockets: usize) -> Result<()> {
    if let Some(limit) = open_files_limit()
        && (sockets as u64) + 200 > limit
    {
        return Err(format!(
            "{sockets} sockets need more open files than this process may have ({limit}); raise `ulimit -n`"
        )
        .into());
    }
    Ok(())
}
