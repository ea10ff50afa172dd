//! The HTTP setup of a scenario: chat sessions ("Chat Now") and therapist
//! logins, each from a loopback source address that stays within the
//! server's per-address limits.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use clap::Args;
use futures_util::{StreamExt, TryStreamExt, stream};
use haven_protocol::api::{CreatedSession, LoginRequest, LoginResponse};

use crate::net::{CONNECT_TIMEOUT, Error, LOGINS_PER_ADDRESS, Result, Sources};
use crate::report::progress;

/// Attempts for a request the server answered with 503 (database busy).
const ATTEMPTS: usize = 5;

/// The therapist accounts a scenario logs in with. The bench script creates
/// them with `haven therapist add`.
#[derive(Debug, Clone, Args)]
pub struct Therapists {
    /// E-mail of the accounts; `{n}` stands for 1, 2, … up to
    /// `--therapist-accounts`.
    #[arg(long, default_value = "bench-{n}@load.test")]
    pub therapist_email: String,

    /// How many accounts to spread the logins over.
    #[arg(long, default_value_t = 1)]
    pub therapist_accounts: usize,

    /// The accounts' password.
    #[arg(long, env = "HAVEN_LOAD_PASSWORD", hide_env_values = true)]
    pub therapist_password: Option<String>,
}

/// An HTTP client whose connections come from `source`. It keeps one idle
/// connection: with more, the requests in flight at once would each leave
/// one open on the server until the client is dropped (thousands, over a
/// big setup), and their freed memory would blur the server's memory
/// figures that follow.
fn http_client(source: IpAddr) -> Result<reqwest::Client> {
    Ok(reqwest::Client::builder()
        .local_address(source)
        .pool_max_idle_per_host(1)
        .timeout(CONNECT_TIMEOUT)
        .tcp_nodelay(true)
        .no_proxy()
        .build()?)
}

/// POSTs `body` (JSON) and decodes the answer, retrying on 503.
async fn post<T: serde::de::DeserializeOwned>(
    client: &reqwest::Client,
    url: &str,
    body: Option<&serde_json::Value>,
) -> Result<T> {
    for attempt in 1..=ATTEMPTS {
        let mut request = client.post(url);
        if let Some(body) = body {
            request = request.json(body);
        }
        let response = request.send().await?;
        let status = response.status();
        if status.is_success() {
            return Ok(response.json().await?);
        }
        if status == reqwest::StatusCode::SERVICE_UNAVAILABLE && attempt < ATTEMPTS {
            tokio::time::sleep(Duration::from_millis(200 * attempt as u64)).await;
            continue;
        }
        let error: serde_json::Value = response.json().await.unwrap_or_default();
        let code = error["error"].as_str().unwrap_or("?").to_owned();
        let hint = if status == reqwest::StatusCode::TOO_MANY_REQUESTS {
            " (source addresses reused within a minute? use another --source-net)"
        } else {
            ""
        };
        return Err(format!("POST {url}: {status} {code}{hint}").into());
    }
    Err(Error::from(format!("POST {url}: still unavailable")))
}

/// Creates `count` chat sessions; session `i` is created from client source
/// address `i / per_address`, the address its sockets will use.
pub async fn create_sessions(
    target: SocketAddr,
    sources: Sources,
    count: usize,
    per_address: usize,
) -> Result<Vec<CreatedSession>> {
    let per_address = per_address.max(1);
    let clients = (0..count.div_ceil(per_address))
        .map(|address| http_client(sources.client(address)))
        .collect::<Result<Vec<_>>>()?;
    let url = format!("http://{target}/api/sessions");
    let started = std::time::Instant::now();
    let sessions: Vec<CreatedSession> = stream::iter(0..count)
        .map(|index| {
            let client = &clients[index / per_address];
            let url = &url;
            async move { post::<CreatedSession>(client, url, None).await }
        })
        .buffered(32)
        .try_collect()
        .await?;
    progress(format!("created {count} sessions in {:.1} s", started.elapsed().as_secs_f64()));
    Ok(sessions)
}

impl Therapists {
    /// Logs in `count` times, round-robin over the accounts; login `j`
    /// comes from therapist source address `j / LOGINS_PER_ADDRESS`.
    pub async fn login(&self, target: SocketAddr, sources: Sources, count: usize) -> Result<Vec<String>> {
        let Some(password) = &self.therapist_password else {
            return Err("therapist logins need --therapist-password (or HAVEN_LOAD_PASSWORD)".into());
        };
        let accounts = self.therapist_accounts.max(1);
        let url = format!("http://{target}/api/auth/login");
        let started = std::time::Instant::now();
        let tokens: Vec<String> = stream::iter(0..count)
            .map(|login| {
                let email = self.therapist_email.replace("{n}", &(login % accounts + 1).to_string());
                let body = serde_json::to_value(LoginRequest { email, password: password.clone() });
                let url = &url;
                async move {
                    let client = http_client(sources.therapist(login / LOGINS_PER_ADDRESS))?;
                    let response: LoginResponse = post(&client, url, Some(&body?)).await?;
                    Ok::<_, Error>(response.token)
                }
            })
            // The server hashes two passwords at a time by default.
            .buffered(4)
            .try_collect()
            .await?;
        progress(format!("logged in {count} times in {:.1} s", started.elapsed().as_secs_f64()));
        Ok(tokens)
    }
}
