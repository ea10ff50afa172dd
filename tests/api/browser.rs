//! The web app in a real headless Chromium, driven through chromedriver.
//!
//! Each browser is its own WebDriver session with its own profile, so the
//! client and the therapist have separate cookie jars, as two people would.
//! Screenshots of every step land in `target/browser-screenshots/`.
//! Chromium, chromedriver and axe-core (`npm ci --prefix tests/browser`) are
//! required: a missing one fails the test, it never skips.

use std::path::PathBuf;
use std::process::Stdio;

use fantoccini::elements::Element;
use fantoccini::wd::Capabilities;
use fantoccini::{Client, ClientBuilder, Locator};
use haven_protocol::{ChatMode, Sender};
use hyper_util::client::legacy::connect::HttpConnector;
use serde_json::{Value, json};
use tempfile::TempDir;
use tokio::process::{Child, Command};

use crate::helpers::{EVENT_TIMEOUT, Options, PASSWORD, TestApp};

const ENTER: &str = "\u{E007}";

/// One chromedriver process for a test; every browser it starts is separate.
struct Driver {
    url: String,
    /// Killed on drop; each browser is closed by its test, which also ends
    /// its Chromium processes.
    _process: Child,
}

impl Driver {
    async fn start() -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let process = Command::new(std::env::var("CHROMEDRIVER").unwrap_or_else(|_| "chromedriver".into()))
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect(
                "chromedriver is required for the browser tests (apt-get install chromium chromium-driver)",
            );
        let url = format!("http://127.0.0.1:{port}");
        let ready = async {
            while tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_err() {
                tokio::task::yield_now().await;
            }
        };
        tokio::time::timeout(EVENT_TIMEOUT, ready).await.expect("chromedriver did not start");
        Driver { url, _process: process }
    }

    /// A new browser with an empty profile.
    async fn browser(&self) -> Browser {
        let profile = tempfile::tempdir().unwrap();
        let mut options = json!({
            "args": [
                "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--no-first-run", "--disable-quic", "--window-size=1280,900",
                // The dashboard's alert chime, without a click first.
                "--autoplay-policy=no-user-gesture-required",
                format!("--user-data-dir={}", profile.path().display()),
            ]
        });
        if let Ok(binary) = std::env::var("CHROMIUM") {
            options["binary"] = json!(binary);
        }
        let mut capabilities = Capabilities::new();
        capabilities.insert("goog:chromeOptions".into(), options);
        let client = ClientBuilder::new(HttpConnector::new())
            .capabilities(capabilities)
            .connect(&self.url)
            .await
            .expect("chromium is required for the browser tests (apt-get install chromium chromium-driver)");
        Browser { client, profile }
    }
}

struct Browser {
    client: Client,
    profile: TempDir,
}

impl Drop for Browser {
    fn drop(&mut self) {
        // A test that fails never reaches `close`: end this browser's
        // processes, found by their unique profile directory.
        let pattern = format!("user-data-dir={}", self.profile.path().display());
        let _ = std::process::Command::new("pkill").args(["-KILL", "-f", &pattern]).status();
    }
}

/// A rendered message as the page shows it.
#[derive(Debug)]
struct Shown {
    /// Distance from the list's left and right edges, and of its centre from the list's centre.
    left: f64,
    right: f64,
    centre: f64,
    /// `rgb(r, g, b)` of the bubble's computed background.
    background: (u8, u8, u8, f64),
    label: Option<String>,
    has_icon: bool,
}

impl Browser {
    async fn goto(&self, app: &TestApp, path: &str) {
        self.client.goto(&app.url(path)).await.expect("navigate");
    }

    async fn find(&self, css: &str) -> Element {
        // A search that meets the page's navigation (after a click that
        // opens another page) is asked again, on the new page.
        for _ in 0..3 {
            match self.client.wait().at_most(EVENT_TIMEOUT).for_element(Locator::Css(css)).await {
                Ok(element) => return element,
                Err(error) if error.to_string().contains("aborted by navigation") => continue,
                Err(error) => panic!("no element {css}: {error}"),
            }
        }
        panic!("no element {css}: every search was aborted by a navigation")
    }

    async fn js(&self, script: &str, args: Vec<Value>) -> Value {
        self.client
            .execute(script, args)
            .await
            .unwrap_or_else(|error| panic!("script failed: {error}\n{script}"))
    }

    /// Waits, on DOM changes, until the JavaScript expression `condition` is
    /// true in the page (arguments are available as `args`).
    async fn until(&self, condition: &str, args: Vec<Value>) {
        let script = format!(
            "const args = arguments[0]; const done = arguments[arguments.length - 1];
             const check = () => {{ try {{ return Boolean({condition}); }} catch (e) {{ return false; }} }};
             if (check()) {{ done(true); return; }}
             const observer = new MutationObserver(() => {{
               if (check()) {{ observer.disconnect(); clearTimeout(timer); done(true); }}
             }});
             observer.observe(document, {{ subtree: true, childList: true, attributes: true, characterData: true }});
             const timer = setTimeout(() => {{ observer.disconnect(); done(check()); }}, {timeout});",
            timeout = EVENT_TIMEOUT.as_millis()
        );
        let met = self
            .client
            .execute_async(&script, vec![Value::Array(args)])
            .await
            .unwrap_or_else(|error| panic!("waiting for `{condition}` failed: {error}"));
        if met != Value::Bool(true) {
            let page = self.js("return document.body.innerText", vec![]).await;
            panic!("timed out waiting for `{condition}`; page shows:\n{}", page.as_str().unwrap_or_default());
        }
    }

    async fn until_connected(&self) {
        self.until("document.getElementById('connection').dataset.state === 'open'", vec![]).await;
    }

    /// The client answers the question asked at their first message: yes,
    /// the therapist may read the conversation with the companion.
    async fn share_with_therapist(&self) {
        // The tap waits until the question is drawn and stays in one place
        // for two frames: a tap aimed while the list still moves can land
        // beside the button.
        self.client
            .execute_async(
                "const done = arguments[arguments.length - 1];
                 const card = document.getElementById('sharing-card');
                 const yes = document.getElementById('sharing-yes');
                 let last = null;
                 const step = () => {
                   const box = yes.getBoundingClientRect();
                   const here = card.hidden || box.height === 0 ? null : `${box.top},${box.left}`;
                   if (here !== null && here === last) { done(); return; }
                   last = here;
                   requestAnimationFrame(step);
                 };
                 requestAnimationFrame(step);",
                vec![],
            )
            .await
            .unwrap();
        self.find("#sharing-yes").await.click().await.unwrap();
        self.until(
            "(document.getElementById('sharing-card').hidden && !document.getElementById('sharing-status').hidden)
             || document.getElementById('composer-error').textContent !== ''",
            vec![],
        )
        .await;
        let error = self.js("return document.getElementById('composer-error').textContent", vec![]).await;
        assert_eq!(error, "", "the answer was not saved");
    }

    /// Types into the message box and presses Enter.
    async fn say(&self, text: &str) {
        let input = self.find("#message-input").await;
        input.send_keys(text).await.unwrap();
        input.send_keys(ENTER).await.unwrap();
    }

    /// Waits for a confirmed message from `sender` with exactly `text`.
    async fn until_message(&self, sender: &str, text: &str) {
        self.until(
            "[...document.querySelectorAll('#messages .msg[data-seq]')].some(m => m.dataset.sender === args[0] && m.querySelector('.msg__body').textContent === args[1])",
            vec![json!(sender), json!(text)],
        )
        .await;
    }

    /// Where and how the first message from `sender` with `text` is drawn.
    async fn shown(&self, sender: &str, text: &str) -> Shown {
        let value = self
            .js(
                "const [sender, text] = arguments;
                 const el = [...document.querySelectorAll('#messages .msg')]
                   .find(m => m.dataset.sender === sender && m.querySelector('.msg__body').textContent === text);
                 const list = document.getElementById('messages').getBoundingClientRect();
                 const box = el.getBoundingClientRect();
                 const label = el.querySelector('.msg__label');
                 return {
                   left: box.left - list.left, right: list.right - box.right,
                   centre: (box.left + box.right) / 2 - (list.left + list.right) / 2,
                   background: getComputedStyle(el).backgroundColor,
                   label: label ? label.textContent.trim() : null,
                   has_icon: Boolean(label && label.querySelector('svg')),
                 };",
                vec![json!(sender), json!(text)],
            )
            .await;
        Shown {
            left: value["left"].as_f64().unwrap(),
            right: value["right"].as_f64().unwrap(),
            centre: value["centre"].as_f64().unwrap(),
            background: parse_rgb(value["background"].as_str().unwrap()),
            label: value["label"].as_str().map(str::to_owned),
            has_icon: value["has_icon"].as_bool().unwrap(),
        }
    }

    /// `(seq, sender, text)` of every confirmed message on the page, in page order.
    async fn transcript(&self) -> Vec<(i64, String, String)> {
        let value = self
            .js(
                "return [...document.querySelectorAll('#messages .msg[data-seq]')]
                   .map(m => [Number(m.dataset.seq), m.dataset.sender, m.querySelector('.msg__body').textContent]);",
                vec![],
            )
            .await;
        serde_json::from_value(value).unwrap()
    }

    async fn count(&self, css: &str) -> usize {
        let value = self.js("return document.querySelectorAll(arguments[0]).length", vec![json!(css)]).await;
        value.as_u64().unwrap() as usize
    }

    async fn path(&self) -> String {
        self.client.current_url().await.unwrap().path().to_owned()
    }

    async fn screenshot(&self, name: &str) {
        let directory = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/browser-screenshots");
        std::fs::create_dir_all(&directory).unwrap();
        let png = self.client.screenshot().await.expect("screenshot");
        std::fs::write(directory.join(format!("{name}.png")), png).unwrap();
    }

    async fn close(self) {
        let _ = self.client.clone().close().await;
    }
}

fn parse_rgb(css: &str) -> (u8, u8, u8, f64) {
    let inner = css.trim_start_matches("rgba(").trim_start_matches("rgb(").trim_end_matches(')');
    let parts: Vec<f64> = inner.split(',').map(|part| part.trim().parse().unwrap()).collect();
    (parts[0] as u8, parts[1] as u8, parts[2] as u8, parts.get(3).copied().unwrap_or(1.0))
}

fn is_blue((r, g, b, a): (u8, u8, u8, f64)) -> bool {
    a > 0.9 && b as i32 > r as i32 + 60 && b as i32 > g as i32 + 40
}

fn is_green((r, g, b, a): (u8, u8, u8, f64)) -> bool {
    a > 0.9 && g as i32 > r as i32 + 15 && g as i32 > b as i32 + 10
}

fn is_gray((r, g, b, a): (u8, u8, u8, f64)) -> bool {
    a > 0.9 && r.abs_diff(g) < 16 && g.abs_diff(b) < 16 && r.abs_diff(b) < 16
}

/// Opens `/`, clicks "Chat Now" and waits for the chat to connect; returns the session id.
/// A server with the test therapist's account, a browser driver, and two
/// browsers: the client's and the therapist's (the driver must outlive them).
async fn client_and_therapist() -> (TestApp, Driver, Browser, Browser) {
    let app = TestApp::spawn().await;
    app.add_therapist("tess@clinic.test", "Tess").await;
    let driver = Driver::start().await;
    let client = driver.browser().await;
    let therapist = driver.browser().await;
    (app, driver, client, therapist)
}

async fn chat_now(app: &TestApp, browser: &Browser) -> String {
    browser.goto(app, "/").await;
    browser.find("#chat-now").await.click().await.unwrap();
    // Waiting for an element of the next page survives the navigation; a
    // script waiting in the old page would not.
    browser.find("#chat").await;
    browser.until_connected().await;
    browser.path().await.trim_start_matches("/chat/").to_owned()
}

/// Tess logs in and opens the chat, which joins it.
async fn join_from_browser(app: &TestApp, therapist: &Browser, session_id: &str) {
    log_in(app, therapist, "tess@clinic.test").await;
    therapist.goto(app, &format!("/chat/{session_id}?therapist=true")).await;
    therapist.find("#chat").await;
    therapist.until_connected().await;
    // The socket opens before the join commits; the mode frame follows it.
    therapist
        .until("document.getElementById('mode-banner').dataset.mode === 'THERAPIST_JOINED'", vec![])
        .await;
}

async fn log_in(app: &TestApp, browser: &Browser, email: &str) {
    browser.goto(app, "/therapist/login").await;
    browser.find("#email").await.send_keys(email).await.unwrap();
    browser.find("#password").await.send_keys(PASSWORD).await.unwrap();
    browser.find("form.stack button[type=submit]").await.click().await.unwrap();
    browser.find("#appointments").await;
}

/// A client's tab in the background counts the join and what the therapist
/// says in its title and badges its icon, until the tab is seen again.
/// (Headless Chromium shows every tab WebDriver switches to, so the page is
/// told it is hidden the way the browser tells it: `visibilityState` and a
/// `visibilitychange` event.)
#[tokio::test]
async fn a_background_tab_shows_the_join_and_new_messages_in_its_title_and_icon() {
    let (app, _driver, client, therapist) = client_and_therapist().await;
    let session_id = chat_now(&app, &client).await;
    let set_visibility =
        "Object.defineProperty(document, 'visibilityState', { configurable: true, get: () => arguments[0] });
         document.dispatchEvent(new Event('visibilitychange'));";
    let title = client.js("return document.title", vec![]).await;
    assert_eq!(title, "Your chat · Haven");
    client.js(set_visibility, vec![json!("hidden")]).await;

    log_in(&app, &therapist, "tess@clinic.test").await;
    therapist.goto(&app, &format!("/chat/{session_id}?therapist=true")).await;
    therapist.until_connected().await;
    client.until("document.title === '(1) Your chat · Haven'", vec![]).await;
    client
        .until(
            "document.getElementById('favicon').getAttribute('href') === '/assets/icon-unread.svg'",
            vec![],
        )
        .await;
    assert!(
        client
            .transcript()
            .await
            .iter()
            .any(|(_, sender, text)| sender == "system" && text.contains("Therapist has joined: Tess.")),
        "the join names the therapist"
    );
    therapist.say("Hello, I'm Tess").await;
    client.until("document.title === '(2) Your chat · Haven'", vec![]).await;

    client.js(set_visibility, vec![json!("visible")]).await;
    client.until("document.title === 'Your chat · Haven'", vec![]).await;
    client
        .until("document.getElementById('favicon').getAttribute('href') === '/assets/icon.svg'", vec![])
        .await;
    client.close().await;
    therapist.close().await;
}

#[tokio::test]
async fn the_reference_procedure_works_in_a_real_browser() {
    let app = TestApp::spawn().await;
    app.add_therapist("tess@clinic.test", "Tess").await;
    let driver = Driver::start().await;

    // 1. Chat Now, hello, the companion answers.
    let client = driver.browser().await;
    let session_id = chat_now(&app, &client).await;
    client.say("hello").await;
    client.until_message("user", "hello").await;
    client.until("document.querySelector('#messages .msg--ai[data-seq]')", vec![]).await;
    client.until("!document.getElementById('sharing-card').hidden", vec![]).await;
    client.screenshot("1-client-asked-about-sharing").await;
    client.share_with_therapist().await;
    let own = client.shown("user", "hello").await;
    assert!(own.right < 2.0 && own.left > 40.0, "the user's message is on the right: {own:?}");
    assert!(is_blue(own.background), "the user's message is blue: {own:?}");
    let reply = client.transcript().await.into_iter().find(|(_, sender, _)| sender == "ai").unwrap().2;
    let companion = client.shown("ai", &reply).await;
    assert!(companion.left < 2.0 && companion.right > 40.0, "the companion is on the left: {companion:?}");
    assert!(is_gray(companion.background), "the companion is gray: {companion:?}");
    assert!(
        companion.label.as_deref().is_some_and(|label| label.contains("Automated companion")),
        "{companion:?}"
    );
    client.screenshot("1-client-hello").await;

    // Two more tabs of the same client, open before the therapist joins.
    let first_tab = client.client.window().await.unwrap();
    let mut tabs = vec![first_tab.clone()];
    for _ in 0..2 {
        let tab = client.client.new_window(true).await.unwrap().handle;
        client.client.switch_to_window(tab.clone()).await.unwrap();
        client.goto(&app, &format!("/chat/{session_id}")).await;
        client.until_connected().await;
        client.until_message("user", "hello").await;
        tabs.push(tab);
    }

    // 2. The therapist, in a separate browser, joins from the dashboard.
    let therapist = driver.browser().await;
    log_in(&app, &therapist, "tess@clinic.test").await;
    let row = format!("#appointments tr[data-session-id='{session_id}']");
    therapist.find(&format!("{row} a")).await;
    therapist.screenshot("2-dashboard").await;
    let join = therapist.find(&format!("{row} a")).await;
    assert_eq!(join.text().await.unwrap(), "Join Chat");
    join.click().await.expect("the row's link stays the same element while the list updates");
    therapist.find("#chat").await;
    therapist.until_connected().await;
    therapist
        .until("document.getElementById('mode-banner').dataset.mode === 'THERAPIST_JOINED'", vec![])
        .await;
    for tab in &tabs {
        client.client.switch_to_window(tab.clone()).await.unwrap();
        client.until("[...document.querySelectorAll('#messages .msg--system[data-kind=join]')].some(m => m.textContent.includes('Therapist has joined: Tess.'))", vec![]).await;
        client
            .until("document.getElementById('mode-banner').dataset.mode === 'THERAPIST_JOINED'", vec![])
            .await;
    }
    client.client.switch_to_window(first_tab.clone()).await.unwrap();
    let joined = client.transcript().await.into_iter().find(|(_, sender, _)| sender == "system").unwrap().2;
    let notice = client.shown("system", &joined).await;
    assert!(notice.centre.abs() < 4.0, "the system message is centred: {notice:?}");
    client.screenshot("2-client-sees-join").await;

    // 3. The client asks; the therapist sees it; the companion stays silent.
    client.say("are you there?").await;
    therapist.until_message("user", "are you there?").await;
    therapist.screenshot("3-therapist-sees-question").await;

    // 4. The therapist answers: left, green, labelled, with the stethoscope.
    therapist.say("Yes, I'm here to help").await;
    for tab in &tabs {
        client.client.switch_to_window(tab.clone()).await.unwrap();
        client.until_message("therapist", "Yes, I'm here to help").await;
        let answer = client.shown("therapist", "Yes, I'm here to help").await;
        assert!(answer.left < 2.0 && answer.right > 40.0, "the therapist is on the left: {answer:?}");
        assert!(is_green(answer.background), "the therapist is green: {answer:?}");
        assert_eq!(answer.label.as_deref(), Some("Therapist"));
        assert!(answer.has_icon, "the stethoscope icon is shown");
        assert_eq!(client.count("#messages .msg--ai").await, 1, "no companion reply after the join");
    }
    assert_eq!(therapist.count("#messages .msg--ai").await, 1, "only the reply from before the join");
    client.screenshot("4-client-sees-therapist").await;

    // 5. Three client tabs and the therapist show the same conversation.
    let expected = therapist.transcript().await;
    assert_eq!(expected.iter().map(|(seq, _, _)| *seq).collect::<Vec<_>>(), vec![1, 2, 3, 4, 5]);
    for (index, tab) in tabs.iter().enumerate() {
        client.client.switch_to_window(tab.clone()).await.unwrap();
        assert_eq!(client.transcript().await, expected, "tab {index}");
        client.screenshot(&format!("5-client-tab-{index}")).await;
    }
    let history = app.history(session_id.parse().unwrap(), &therapist_token(&app).await).await;
    assert_eq!(history.len(), expected.len());
    client.close().await;
    therapist.close().await;
}

/// A fresh API login of the test therapist.
async fn therapist_token(app: &TestApp) -> String {
    let response: Value = app.login("tess@clinic.test", PASSWORD).await.json().await.unwrap();
    response["token"].as_str().unwrap().to_owned()
}

#[tokio::test]
async fn a_dropped_connection_resumes_with_no_gap_and_no_duplicate() {
    let mut app = TestApp::spawn().await;
    app.add_therapist("tess@clinic.test", "Tess").await;
    let driver = Driver::start().await;
    let client = driver.browser().await;
    let session_id = chat_now(&app, &client).await;
    client.say("hello").await;
    client.until("document.querySelector('#messages .msg--ai[data-seq]')", vec![]).await;
    client.share_with_therapist().await;

    // The server dies; the page notices and keeps what is typed meanwhile.
    app.stop().await;
    client.until("document.getElementById('connection').dataset.state === 'connecting'", vec![]).await;
    client.say("typed while the connection was down").await;
    client.until("document.querySelector('#messages .msg--pending')", vec![]).await;
    app.start_again().await;

    // While the page is away, the therapist joins and writes.
    let token = therapist_token(&app).await;
    let mut desk = app.connect(session_id.parse().unwrap(), &token).await;
    assert_eq!(desk.mode().await, ChatMode::TherapistJoined);
    for text in ["first while you were away", "second while you were away"] {
        let id = desk.send_message(text).await;
        desk.ack(&id).await;
    }

    client.until_connected().await;
    client.until_message("user", "typed while the connection was down").await;
    client.until_message("therapist", "second while you were away").await;
    let history = app.history(session_id.parse().unwrap(), &token).await;
    let shown = client.transcript().await;
    let stored: Vec<_> =
        history.iter().map(|m| (m.seq, m.sender.as_str().to_owned(), m.content.clone())).collect();
    assert_eq!(shown, stored, "the page shows the stored conversation exactly once, in order");
    assert!(
        history
            .iter()
            .any(|m| m.sender == Sender::User && m.content == "typed while the connection was down")
    );
    assert_eq!(client.count("#messages .msg--pending").await, 0);
    client.screenshot("resume-after-drop").await;
    client.close().await;
}

#[tokio::test]
async fn a_client_opening_the_therapist_url_gets_no_therapist_rights() {
    let app = TestApp::spawn().await;
    let driver = Driver::start().await;
    let client = driver.browser().await;
    let session_id = chat_now(&app, &client).await;

    client.goto(&app, &format!("/chat/{session_id}?therapist=true")).await;
    assert_eq!(client.path().await, "/therapist/login");
    assert_eq!(client.find("h1").await.text().await.unwrap(), "Therapist login");
    // The client's own view still works, and the session was not taken over.
    client.goto(&app, &format!("/chat/{session_id}")).await;
    client.until_connected().await;
    assert_eq!(
        client.js("return document.getElementById('mode-banner').dataset.mode", vec![]).await,
        json!("BOT_ONLY")
    );
    let created: Value = client
        .js("return fetch(location.pathname.replace('/chat/', '/api/sessions/') + '/messages').then(r => r.json())", vec![])
        .await;
    assert_eq!(created["messages"], json!([]), "nothing was written");
    client.close().await;
}

#[tokio::test]
async fn a_foreign_origin_websocket_with_valid_cookies_is_refused() {
    let app = TestApp::spawn().await;
    let driver = Driver::start().await;
    let client = driver.browser().await;
    let session_id = chat_now(&app, &client).await;

    // Another site on the same host (so the browser sends Haven's cookies).
    let socket_url = format!("{}/api/chat/ws/{session_id}", app.address.replace("http://", "ws://"));
    let page = format!(
        "<!doctype html><title>evil</title><script>
           const ws = new WebSocket({socket_url:?});
           ws.onmessage = (e) => {{ document.title = 'message ' + e.data; }};
           ws.onclose = (e) => {{ if (!document.title.startsWith('message')) document.title = 'closed ' + e.code + ' ' + e.reason; }};
         </script>"
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let evil = format!("http://{}", listener.local_addr().unwrap());
    let router =
        axum::Router::new().route("/", axum::routing::get(move || async move { axum::response::Html(page) }));
    let server = tokio::spawn(async move { axum::serve(listener, router).await });

    client.client.goto(&evil).await.unwrap();
    client.until("document.title.startsWith('closed') || document.title.startsWith('message')", vec![]).await;
    let title = client.client.title().await.unwrap();
    assert_eq!(title, "closed 1008 origin not allowed", "the cookie was sent, and refused for its origin");
    server.abort();
    client.close().await;
}

/// axe-core's script, installed by `npm ci --prefix tests/browser`.
fn axe_source() -> String {
    let axe_path =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/browser/node_modules/axe-core/axe.min.js");
    std::fs::read_to_string(&axe_path).unwrap_or_else(|_| {
        panic!("axe-core is required: run `npm ci --prefix tests/browser` ({})", axe_path.display())
    })
}

/// axe-core's serious and critical violations on the current page.
async fn serious_axe_violations(browser: &Browser, axe: &str) -> Value {
    browser.js(&format!("{axe}\nreturn true;"), vec![]).await;
    browser
        .client
        .execute_async(
            "const done = arguments[arguments.length - 1];
             axe.run(document).then(result => done(result.violations
               .filter(v => v.impact === 'serious' || v.impact === 'critical')
               .map(v => ({ id: v.id, impact: v.impact, nodes: v.nodes.map(n => n.target.join(' ')) }))));",
            vec![],
        )
        .await
        .unwrap()
}

#[tokio::test]
async fn first_run_setup_is_styled_keeps_what_was_typed_and_ends_with_a_log_in_link() {
    let app = TestApp::spawn().await;
    let setup = app.setup_url.clone().expect("a fresh server prints a setup URL");
    let axe = axe_source();
    let driver = Driver::start().await;
    let browser = driver.browser().await;
    for (width, height) in [(1280, 800), (390, 844)] {
        browser.client.set_window_size(width, height).await.unwrap();
        browser.client.goto(&setup).await.unwrap();
        browser.find("main h1").await;
        let button = browser
            .js("return getComputedStyle(document.querySelector('form button')).backgroundColor", vec![])
            .await;
        assert_eq!(parse_rgb(button.as_str().unwrap()), (29, 78, 216, 1.0), "the app's styles");
        assert_eq!(serious_axe_violations(&browser, &axe).await, json!([]), "axe on setup at {width}px");
        browser.screenshot(&format!("page-setup-{width}")).await;
    }
    // A refused form keeps what was typed, except the password.
    browser.find("#name").await.send_keys("   ").await.unwrap();
    browser.find("#email").await.send_keys("ana@clinic.test").await.unwrap();
    browser.find("#password").await.send_keys(PASSWORD).await.unwrap();
    browser.find("form button").await.click().await.unwrap();
    browser.find(".form-error").await;
    let kept = browser
        .js("return ['name', 'email', 'password'].map(id => document.getElementById(id).value)", vec![])
        .await;
    assert_eq!(kept, json!(["   ", "ana@clinic.test", ""]));
    let name = browser.find("#name").await;
    name.clear().await.unwrap();
    name.send_keys("Ana Example").await.unwrap();
    browser.find("#password").await.send_keys(PASSWORD).await.unwrap();
    browser.find("form button").await.click().await.unwrap();
    browser.find("#log-in").await.click().await.unwrap();
    browser.find("#email").await;
    assert_eq!(browser.path().await, "/therapist/login");
    assert_eq!(app.login("ana@clinic.test", PASSWORD).await.status(), 200);
    browser.close().await;
}

#[tokio::test]
async fn every_page_passes_axe_and_fits_a_phone() {
    let axe = axe_source();
    let (app, _driver, client, therapist) = client_and_therapist().await;

    let session_id = chat_now(&app, &client).await;
    // A flagged session, so the alert banner and risk badges are checked too.
    client.say("I've been cutting myself again").await;
    client.until("document.querySelector('#messages .msg--ai[data-seq]')", vec![]).await;
    log_in(&app, &therapist, "tess@clinic.test").await;
    therapist.find("#appointments tbody tr a").await;
    therapist.until("!document.getElementById('risk-alert').hidden", vec![]).await;

    let pages: [(&Browser, &str, String); 7] = [
        (&client, "home", "/".into()),
        (&client, "client-chat", format!("/chat/{session_id}")),
        (&client, "not-found", "/no/such/page".into()),
        (&therapist, "login", "/therapist/login".into()),
        (&therapist, "dashboard", "/therapist".into()),
        (&therapist, "invalid-chat-link", format!("/chat/{session_id}")),
        (&therapist, "therapist-chat", format!("/chat/{session_id}?therapist=true")),
    ];
    for (browser, name, path) in pages {
        for (width, height) in [(1280, 900), (360, 740)] {
            browser.client.set_window_size(width, height).await.unwrap();
            browser.goto(&app, &path).await;
            browser.find("main h1").await;
            if path.starts_with("/chat/") && name != "invalid-chat-link" {
                browser.until_connected().await;
            }
            let overflow =
                browser.js("return document.documentElement.scrollWidth - window.innerWidth", vec![]).await;
            assert!(overflow.as_i64().unwrap() <= 0, "{name} scrolls sideways at {width}px: {overflow}");
            assert_eq!(serious_axe_violations(browser, &axe).await, json!([]), "axe on {name} at {width}px");
            browser.screenshot(&format!("page-{name}-{width}")).await;
        }
    }
    client.close().await;
    therapist.close().await;
}

#[tokio::test]
async fn the_chat_page_shows_a_reply_as_it_streams() {
    let mock = crate::mock_llm::MockLlm::start().await;
    let chunks: Vec<String> =
        ["That sounds ", "hard. ", "I'm here ", "to listen. ", "What happened?"].map(String::from).to_vec();
    let script = crate::mock_llm::Script {
        chunks: chunks.clone(),
        chunk_delay: std::time::Duration::from_millis(250),
        ..Default::default()
    };
    mock.script("", script);
    let args = ["--ai-provider", "openai", "--ai-base-url", &mock.openai_url()].map(String::from).to_vec();
    let app = TestApp::spawn_with(crate::helpers::Options { args, ..Default::default() }).await;
    let driver = Driver::start().await;
    let client = driver.browser().await;
    chat_now(&app, &client).await;
    client.say("my day was awful").await;

    // Part of the reply is on the page before the rest has been generated.
    client
        .until(
            "(() => { const m = document.querySelector('#messages .msg--streaming'); return m && m.textContent.includes(args[0]) && !m.textContent.includes(args[1])
                && document.getElementById('activity').textContent === 'The companion is writing…'; })()",
            vec![json!(chunks[0]), json!(chunks[4])],
        )
        .await;
    client.screenshot("streaming-reply").await;
    let full = chunks.concat();
    client.until_message("ai", &full).await;
    assert_eq!(
        client.count("#messages .msg--streaming").await,
        0,
        "the committed message replaced the partial one"
    );
    assert_eq!(client.count("#messages .msg--ai").await, 1);
    client.until("document.getElementById('activity').hidden", vec![]).await;
    client.close().await;
}

#[tokio::test]
async fn each_side_sees_the_other_typing_until_it_sends_stops_or_goes_quiet() {
    let (app, _driver, client, therapist) = client_and_therapist().await;
    let session_id = chat_now(&app, &client).await;
    join_from_browser(&app, &therapist, &session_id).await;
    client.until("document.getElementById('mode-banner').dataset.mode === 'THERAPIST_JOINED'", vec![]).await;
    let name = format!("Client {}", &session_id.replace('-', "")[28..]);
    let shows = |text: &str| {
        format!(
            "document.getElementById('activity').textContent === {text:?} && !document.getElementById('activity').hidden"
        )
    };

    // The client types: the therapist sees it; sending ends it.
    client.find("#message-input").await.send_keys("I wanted to ask").await.unwrap();
    therapist.until(&shows(&format!("{name} is typing…")), vec![]).await;
    assert_eq!(
        client.js("return document.getElementById('activity').hidden", vec![]).await,
        json!(true),
        "not to itself"
    );
    client.find("#message-input").await.send_keys("\n").await.unwrap();
    therapist.until_message("user", "I wanted to ask").await;
    therapist.until("document.getElementById('activity').hidden", vec![]).await;

    // The therapist types, then goes quiet: it goes after five seconds.
    therapist.find("#message-input").await.send_keys("Of course").await.unwrap();
    client.until(&shows("The therapist is typing…"), vec![]).await;
    client.screenshot("typing-indicator").await;
    let started = std::time::Instant::now();
    client.until("document.getElementById('activity').hidden", vec![]).await;
    assert!(started.elapsed() >= std::time::Duration::from_secs(3), "it expired, not vanished");

    // Typing again, then leaving: it ends at once.
    therapist.find("#message-input").await.send_keys(", anything").await.unwrap();
    client.until(&shows("The therapist is typing…"), vec![]).await;
    therapist.goto(&app, "/therapist").await;
    client.until("document.getElementById('activity').hidden", vec![]).await;
    let history = app.history(session_id.parse().unwrap(), &therapist_token(&app).await).await;
    assert_eq!(history.len(), 2, "typing is never stored: {history:?}");
    client.close().await;
    therapist.close().await;
}

/// Each side sees whether the other has the chat open: the client sees the
/// therapist by name and that they left; the therapist sees the client.
#[tokio::test]
async fn each_side_sees_whether_the_other_is_in_the_chat() {
    let (app, _driver, client, therapist) = client_and_therapist().await;
    let session_id = chat_now(&app, &client).await;
    join_from_browser(&app, &therapist, &session_id).await;
    let banner =
        |text: &str| format!("document.getElementById('mode-banner').textContent.includes({text:?})");
    let name = format!("Client {}", &session_id.replace('-', "")[28..]);
    client.until(&banner("Tess is here."), vec![]).await;
    therapist.until(&banner(&format!("{name} is here.")), vec![]).await;
    for (width, height) in [(1280, 800), (390, 844)] {
        client.client.set_window_size(width, height).await.unwrap();
        client.screenshot(&format!("presence-here-{width}")).await;
    }

    // The client's tab goes: the therapist is told; it comes back.
    client.goto(&app, "/").await;
    therapist.until(&banner(&format!("{name} has left the chat")), vec![]).await;
    client.goto(&app, &format!("/chat/{session_id}")).await;
    client.find("#chat").await;
    therapist.until(&banner(&format!("{name} is here.")), vec![]).await;

    // The therapist goes: the client learns the companion stays silent.
    therapist.goto(&app, "/therapist").await;
    client.until(&banner("The therapist has left the chat; they can come back"), vec![]).await;
    for (width, height) in [(1280, 800), (390, 844)] {
        client.client.set_window_size(width, height).await.unwrap();
        client.screenshot(&format!("presence-left-{width}")).await;
    }
    assert_eq!(
        client.js("return document.getElementById('mode-banner').dataset.mode", vec![]).await,
        json!("THERAPIST_JOINED"),
        "leaving is not a hand-back"
    );

    // The dashboard shows whether the client is online now.
    let row = format!("document.querySelector(\"#appointments tr[data-session-id='{session_id}']\")");
    therapist
        .until(
            &format!(
                "{row}.dataset.clientOnline === 'true' && {row}.querySelector('.client').textContent.endsWith('online now')"
            ),
            vec![],
        )
        .await;
    client.goto(&app, "/").await;
    therapist
        .until(
            &format!(
                "{row}.dataset.clientOnline === 'false' && {row}.querySelector('.client').textContent.endsWith('offline')"
            ),
            vec![],
        )
        .await;
    client.close().await;
    therapist.close().await;
}

/// While the chat waits, the client sees the companion's greeting, whether
/// a therapist is online and how many wait before them, in plain words;
/// the line goes at the join.
#[tokio::test]
async fn a_waiting_client_sees_who_is_online_and_how_many_wait_before_them() {
    let (app, _driver, client, therapist) = client_and_therapist().await;
    let earlier = app.create_session().await;
    let session_id = chat_now(&app, &client).await;
    assert!(client.find("#greeting").await.text().await.unwrap().contains("I'm here to listen"));
    let line = |text: &str| {
        format!(
            "!document.getElementById('queue').hidden && document.getElementById('queue').textContent.includes({text:?})"
        )
    };
    client.until(&line("No therapist is online right now."), vec![]).await;

    log_in(&app, &therapist, "tess@clinic.test").await;
    client.until(&line("1 therapist is online now. 1 person is waiting before you."), vec![]).await;
    let axe = axe_source();
    for (width, height) in [(1280, 800), (390, 844)] {
        client.client.set_window_size(width, height).await.unwrap();
        assert_eq!(
            serious_axe_violations(&client, &axe).await,
            json!([]),
            "axe with the queue line at {width}px"
        );
        client.screenshot(&format!("queue-{width}")).await;
    }
    // Tess takes the earlier chat in another tab: this one is next.
    let mut desk = app.connect(earlier.session_id, &therapist_token(&app).await).await;
    assert_eq!(desk.mode().await, ChatMode::TherapistJoined);
    client.until(&line("Your chat is next on their list."), vec![]).await;

    therapist.goto(&app, &format!("/chat/{session_id}?therapist=true")).await;
    therapist.find("#chat").await;
    client.until("document.getElementById('queue').hidden", vec![]).await;
    client.close().await;
    therapist.close().await;
}

/// A therapist who joined and has been away for the away time (1 s here):
/// the client is offered the crisis resources and the companion, and can
/// take it.
#[tokio::test]
async fn a_client_whose_therapist_is_away_is_offered_help_and_the_companion() {
    let options = Options { args: vec!["--therapist-away-seconds".into(), "1".into()], ..Options::default() };
    let app = TestApp::spawn_with(options).await;
    app.add_therapist("tess@clinic.test", "Tess").await;
    let driver = Driver::start().await;
    let (client, therapist) = (driver.browser().await, driver.browser().await);
    let session_id = chat_now(&app, &client).await;
    join_from_browser(&app, &therapist, &session_id).await;
    client
        .until("document.getElementById('mode-banner').textContent.includes('Tess is here.')", vec![])
        .await;
    let offered = "!document.getElementById('resume-card').hidden && document.getElementById('resume-text').textContent.includes('has been away')";
    assert_eq!(
        client.js(&format!("return {offered}"), vec![]).await,
        json!(false),
        "not while the therapist is here"
    );

    therapist.goto(&app, "/therapist").await;
    client.until(offered, vec![]).await;
    assert_eq!(
        client.js("return document.getElementById('crisis-open').hidden", vec![]).await,
        json!(false),
        "the crisis resources are one tap away"
    );
    for (width, height) in [(1280, 800), (390, 844)] {
        client.client.set_window_size(width, height).await.unwrap();
        client.screenshot(&format!("therapist-away-{width}")).await;
    }
    client.find("#resume-companion").await.click().await.unwrap();
    client
        .until(
            "document.getElementById('mode-banner').dataset.mode === 'BOT_ONLY' && document.getElementById('resume-card').hidden",
            vec![],
        )
        .await;
    let replies = "return document.querySelectorAll('#messages .msg[data-sender=\"ai\"]').length";
    let before = client.js(replies, vec![]).await.as_u64().unwrap();
    client.find("#message-input").await.send_keys("are you there?\n").await.unwrap();
    client
        .until(
            "document.querySelectorAll('#messages .msg[data-sender=\"ai\"]').length > args[0]",
            vec![json!(before)],
        )
        .await;
    client.close().await;
    therapist.close().await;
}

/// A client who starts waiting makes a sound on the dashboard once the
/// therapist opts in (remembered in this browser), and none before.
#[tokio::test]
async fn a_new_waiting_client_sounds_on_the_dashboard_when_the_therapist_opts_in() {
    let (app, _driver, client, therapist) = client_and_therapist().await;
    let waiting_before = chat_now(&app, &client).await;
    log_in(&app, &therapist, "tess@clinic.test").await;
    therapist.find(&format!("#appointments tr[data-session-id='{waiting_before}']")).await;
    let sounds = "return document.body.dataset.waitingCount ?? '0'";
    let opted_in = "return document.getElementById('waiting-sound').checked";
    assert_eq!(therapist.js(opted_in, vec![]).await, json!(false));

    // Opted out: a new client changes the title, and makes no sound.
    let quiet = chat_now(&app, &client).await;
    therapist.find(&format!("#appointments tr[data-session-id='{quiet}']")).await;
    therapist.until("document.title.startsWith('2 waiting')", vec![]).await;
    assert_eq!(therapist.js(sounds, vec![]).await, json!("0"));

    // Opted in, and still so after a reload: the next one sounds once.
    therapist.find("#waiting-sound").await.click().await.unwrap();
    therapist.goto(&app, "/therapist").await;
    therapist.find(&format!("#appointments tr[data-session-id='{quiet}']")).await;
    assert_eq!(therapist.js(opted_in, vec![]).await, json!(true));
    let heard = chat_now(&app, &client).await;
    therapist.find(&format!("#appointments tr[data-session-id='{heard}']")).await;
    therapist.until("document.body.dataset.waitingCount === '1'", vec![]).await;
    therapist.until("document.title.startsWith('3 waiting')", vec![]).await;
    client.close().await;
    therapist.close().await;
}

#[tokio::test]
async fn a_flagged_session_alerts_the_dashboard_within_seconds_while_the_model_is_down() {
    let mock = crate::mock_llm::MockLlm::start().await;
    mock.script("", crate::mock_llm::Script { failures: vec![500; 100], ..Default::default() });
    let args = ["--ai-provider", "openai", "--ai-base-url", &mock.openai_url(), "--ai-retries", "0"]
        .map(String::from)
        .to_vec();
    let app = TestApp::spawn_with(crate::helpers::Options { args, ..Default::default() }).await;
    app.add_therapist("tess@clinic.test", "Tess").await;
    let driver = Driver::start().await;
    let therapist = driver.browser().await;
    let client = driver.browser().await;
    let calm = chat_now(&app, &client).await;
    log_in(&app, &therapist, "tess@clinic.test").await;
    therapist.find(&format!("#appointments tr[data-session-id='{calm}']")).await;
    assert!(therapist.js("return document.getElementById('risk-alert').hidden", vec![]).await == json!(true));

    let session_id = chat_now(&app, &client).await;
    let sent = std::time::Instant::now();
    client.say("i have the pills in front of me and im going to take them all tonight").await;
    therapist
        .until(
            "(() => { const box = document.getElementById('risk-alert');
                      return !box.hidden && box.querySelector(`li[data-session-id='${args[0]}'][data-risk='imminent']`)
                        && document.body.dataset.alertSound === 'played'; })()",
            vec![json!(session_id)],
        )
        .await;
    let elapsed = sent.elapsed();
    assert!(elapsed < std::time::Duration::from_secs(5), "the alert took {elapsed:?}");
    let first = therapist.js("const tr = document.querySelector('#appointments tbody tr'); return [tr.dataset.sessionId, tr.dataset.risk, tr.cells[1].textContent];", vec![]).await;
    assert_eq!(first[0], json!(session_id), "the flagged session floats to the top");
    assert_eq!(first[1], json!("imminent"));
    assert!(first[2].as_str().unwrap().contains("Imminent risk"), "{first}");
    assert!(therapist.js("return document.title", vec![]).await.as_str().unwrap().contains("Safety alert"));
    therapist.screenshot("risk-dashboard-alert").await;

    // The client got the crisis resources, then the safety script.
    client.until("[...document.querySelectorAll('#messages .msg--system[data-kind=crisis]')].some(m => m.textContent.includes('emergency'))", vec![]).await;
    client.until_message("ai", haven::safety::SAFETY_SCRIPT[0]).await;
    client.screenshot("risk-client-resources").await;

    // Acknowledge with a note: the banner goes, the level stays.
    let row = format!("#appointments tr[data-session-id='{session_id}']");
    therapist.find(&format!("{row} details.acknowledge summary")).await.click().await.unwrap();
    therapist
        .find(&format!("{row} details.acknowledge textarea"))
        .await
        .send_keys("Called; safe at home")
        .await
        .unwrap();
    therapist.find(&format!("{row} details.acknowledge button[type=submit]")).await.click().await.unwrap();
    therapist
        .until(
            "document.getElementById('risk-alert').hidden && document.querySelector(args[0]).cells[1].textContent.includes('(acknowledged)')",
            vec![json!(row)],
        )
        .await;
    let token = therapist_token(&app).await;
    let risk: Value = app
        .http
        .get(app.url(&format!("/api/sessions/{session_id}/risk")))
        .bearer_auth(token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(risk["audit"][1]["note"], json!("Called; safe at home"), "{risk}");
    therapist.screenshot("risk-acknowledged").await;
    client.close().await;
    therapist.close().await;
}

#[tokio::test]
async fn the_crisis_message_is_a_card_with_tap_to_call_links_that_stays_reachable() {
    let args = [
        "--emergency-number",
        "112",
        "--crisis-line",
        "116 123 (Samaritans)",
        "--crisis-text-line",
        "text SHOUT to 85258",
    ]
    .map(String::from)
    .to_vec();
    let app = TestApp::spawn_with(crate::helpers::Options { args, ..Default::default() }).await;
    let driver = Driver::start().await;
    let client = driver.browser().await;
    for (width, height) in [(1280, 800), (390, 844)] {
        client.client.set_window_size(width, height).await.unwrap();
        let session_id = chat_now(&app, &client).await;
        assert!(
            client.js("return document.getElementById('crisis-card').hidden", vec![]).await == json!(true)
        );
        client.say("i have the pills in front of me and im going to take them all tonight").await;
        client.until("!document.getElementById('crisis-card').hidden", vec![]).await;
        let card = client
            .js(
                "const card = document.getElementById('crisis-card');
                 const text = document.getElementById('crisis-text');
                 const link = card.querySelector('.crisis-link');
                 const box = card.getBoundingClientRect();
                 return {
                   role: card.getAttribute('role'),
                   text: text.textContent,
                   fontSize: parseFloat(getComputedStyle(text).fontSize),
                   ink: getComputedStyle(text).color,
                   linkInk: getComputedStyle(link).color,
                   linkBackground: getComputedStyle(link).backgroundColor,
                   linkHeight: link.getBoundingClientRect().height,
                   inside: box.left >= 0 && box.right <= window.innerWidth,
                   links: [...card.querySelectorAll('a')].map(a => a.getAttribute('href')),
                 };",
                vec![],
            )
            .await;
        assert_eq!(card["role"], "alert");
        let text = card["text"].as_str().unwrap();
        assert!(
            text.contains("call 112 now") && text.contains("116 123 (Samaritans)"),
            "worded for the level: {text}"
        );
        assert_eq!(
            card["links"],
            json!(["tel:112", "tel:116123", "sms:85258?body=SHOUT", "https://findahelpline.com"])
        );
        assert!(card["fontSize"].as_f64().unwrap() >= 16.0, "{card}");
        assert_eq!(parse_rgb(card["ink"].as_str().unwrap()), (17, 24, 39, 1.0), "dark text: {card}");
        assert_eq!(parse_rgb(card["linkInk"].as_str().unwrap()), (255, 255, 255, 1.0));
        assert_eq!(parse_rgb(card["linkBackground"].as_str().unwrap()), (127, 29, 29, 1.0));
        assert!(card["linkHeight"].as_f64().unwrap() >= 44.0, "a tap target: {card}");
        assert_eq!(card["inside"], json!(true), "the card fits at {width}px");
        client.js("document.getElementById('crisis-card').scrollIntoView()", vec![]).await;
        client.screenshot(&format!("crisis-card-{width}")).await;

        // Hidden, it can be opened again from the header.
        client.find("#crisis-hide").await.click().await.unwrap();
        client.until("document.getElementById('crisis-card').hidden && document.activeElement.id === 'crisis-open'", vec![]).await;
        client.find("#crisis-open").await.click().await.unwrap();
        client.until("!document.getElementById('crisis-card').hidden && document.activeElement.id === 'crisis-card'", vec![]).await;

        // And after a reload, from the stored crisis message.
        client.goto(&app, &format!("/chat/{session_id}")).await;
        client.find("#chat").await;
        client.until("!document.getElementById('crisis-card').hidden && !document.getElementById('crisis-open').hidden", vec![]).await;
    }
    client.close().await;
}

#[tokio::test]
async fn on_a_phone_the_conversation_scrolls_between_a_fixed_header_and_composer() {
    let (app, _driver, client, therapist) = client_and_therapist().await;
    client.client.set_window_size(390, 844).await.unwrap();
    therapist.client.set_window_size(390, 844).await.unwrap();
    let session_id = chat_now(&app, &client).await;
    assert_eq!(
        client.js("return document.activeElement.id", vec![]).await,
        "message-input",
        "focus after Chat Now"
    );
    let greeting = client
        .js("const g = document.getElementById('greeting'); return [g.hidden, g.textContent]", vec![])
        .await;
    assert_eq!(greeting[0], json!(false), "the chat opens with the companion's greeting");
    assert!(
        greeting[1].as_str().unwrap().starts_with("Automated companionHello, I'm Haven's companion."),
        "{greeting}"
    );
    let hint =
        client.js("return getComputedStyle(document.getElementById('composer-hint')).display", vec![]).await;
    assert_eq!(hint, "none", "no Shift+Enter hint on a phone");
    for turn in 1..=6 {
        client.say(&format!("message number {turn} of a long conversation")).await;
        client
            .until(
                &format!("document.querySelectorAll('#messages .msg--ai[data-seq]').length >= {turn}"),
                vec![],
            )
            .await;
        if turn == 1 {
            client.share_with_therapist().await;
        }
    }
    let layout = client
        .js(
            "const scroll = document.getElementById('chat-scroll');
             const composer = document.getElementById('composer').getBoundingClientRect();
             const head = document.getElementById('chat-title').getBoundingClientRect();
             return {
               pageScrolls: document.documentElement.scrollHeight > window.innerHeight + 1,
               listScrolls: scroll.scrollHeight > scroll.clientHeight,
               composerInView: composer.top >= 0 && composer.bottom <= window.innerHeight,
               headInView: head.top >= 0,
               lastInView: document.querySelector('#messages li:last-child').getBoundingClientRect().bottom
                 <= scroll.getBoundingClientRect().bottom + 1,
             };",
            vec![],
        )
        .await;
    assert_eq!(
        layout,
        json!({"pageScrolls": false, "listScrolls": true, "composerInView": true, "headInView": true, "lastInView": true})
    );
    client.screenshot("phone-long-chat").await;

    // Join Chat puts the therapist in the message box too.
    log_in(&app, &therapist, "tess@clinic.test").await;
    therapist
        .find(&format!("#appointments tr[data-session-id='{session_id}'] a"))
        .await
        .click()
        .await
        .unwrap();
    therapist.find("#chat").await;
    therapist.until_connected().await;
    assert_eq!(
        therapist.js("return document.activeElement.id", vec![]).await,
        "message-input",
        "focus after Join Chat"
    );
    // The socket opens before the join commits: the transcript is the
    // therapist's once the page shows the join.
    therapist
        .until("document.getElementById('mode-banner').dataset.mode === 'THERAPIST_JOINED'", vec![])
        .await;
    // The chat's therapist downloads its transcript from the page.
    let markdown = therapist
        .client
        .execute_async(
            "const done = arguments[arguments.length - 1];
             const link = document.getElementById('transcript-markdown');
             fetch(link.href).then(r => r.text().then(text => done([link.hasAttribute('download'), r.headers.get('content-disposition'), text])));",
            vec![],
        )
        .await
        .unwrap();
    assert_eq!(markdown[0], json!(true));
    assert!(markdown[1].as_str().unwrap().starts_with("attachment; filename=\"haven-chat-"), "{markdown}");
    let text = markdown[2].as_str().unwrap();
    assert!(
        text.contains("> message number 6 of a long conversation") && text.contains("**Companion**"),
        "{text}"
    );

    // A closed chat has no editable box, and keeps its transcript.
    let token = therapist_token(&app).await;
    let closed = app
        .http
        .post(app.url(&format!("/api/sessions/{session_id}/close")))
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    assert!(closed.status().is_success(), "{}", closed.status());
    client
        .until(
            "document.getElementById('connection').dataset.state === 'closed'
             && document.getElementById('message-input').offsetParent === null
             && document.getElementById('message-input').disabled
             && document.getElementById('new-chat')",
            vec![],
        )
        .await;
    assert!(client.count("#messages li").await >= 13, "the transcript stays");
    assert_eq!(
        client.js("return document.getElementById('new-chat').getAttribute('href')", vec![]).await,
        "/"
    );
    client.screenshot("phone-closed-chat").await;
    client.close().await;
    therapist.close().await;
}

#[tokio::test]
async fn a_browser_keeps_every_chat_it_started_and_a_closed_one_opens_read_only() {
    let app = TestApp::spawn().await;
    let therapist = app.therapist("Tess").await;
    let driver = Driver::start().await;
    let client = driver.browser().await;
    for (width, height) in [(1280, 800), (390, 844)] {
        client.client.set_window_size(width, height).await.unwrap();
        let first = chat_now(&app, &client).await;
        client.say("i have the pills in front of me and im going to take them all tonight").await;
        client.until("!document.getElementById('crisis-card').hidden", vec![]).await;
        let second = chat_now(&app, &client).await;
        client.goto(&app, "/").await;
        let listed = client
            .js("return [...document.querySelectorAll('#your-chats li')].map(li => [li.dataset.sessionId, li.dataset.state])", vec![])
            .await;
        assert_eq!(listed[0], json!([second, "companion"]), "newest first: {listed}");
        assert!(listed.as_array().unwrap().contains(&json!([first, "companion"])), "{listed}");
        client.screenshot(&format!("home-your-chats-{width}")).await;

        // The first chat still opens in this browser.
        client.find(&format!("#your-chats li[data-session-id='{first}'] a")).await.click().await.unwrap();
        client.find("#chat").await;
        client.until_connected().await;
        client.until("document.querySelectorAll('#messages li[data-seq]').length >= 2", vec![]).await;

        // Its therapist joins and closes it; a reload shows it read-only.
        let session_id: uuid::Uuid = first.parse().unwrap();
        let mut desk = app.connect(session_id, &therapist.token).await;
        desk.mode().await;
        let closed = app
            .http
            .post(app.url(&format!("/api/sessions/{first}/close")))
            .bearer_auth(&therapist.token)
            .send()
            .await
            .unwrap();
        assert_eq!(closed.status(), 204);
        client.until("document.getElementById('connection').dataset.state === 'closed'", vec![]).await;
        client.goto(&app, &format!("/chat/{first}")).await;
        client.find("#chat").await;
        client
            .until(
                "document.querySelector('#messages li[data-kind=close]')
                 && document.querySelector('#messages li[data-kind=crisis]')
                 && !document.getElementById('crisis-card').hidden
                 && document.getElementById('message-input').offsetParent === null
                 && document.getElementById('new-chat')",
                vec![],
            )
            .await;
        let kinds = client
            .js("return [...document.querySelectorAll('#messages li')].map(li => li.dataset.kind)", vec![])
            .await;
        assert_eq!(kinds.as_array().unwrap().first(), Some(&json!("chat")), "the whole transcript: {kinds}");
        client.screenshot(&format!("closed-chat-read-only-{width}")).await;
        client.goto(&app, "/").await;
        client.find(&format!("#your-chats li[data-session-id='{first}'][data-state='closed']")).await;
    }
    client.close().await;
}

#[tokio::test]
async fn a_therapist_opening_a_flagged_chat_sees_the_alert_the_client_name_and_every_messages_time() {
    let (app, _driver, client, therapist) = client_and_therapist().await;
    let session_id = chat_now(&app, &client).await;
    client.say("i have the pills in front of me and im going to take them all tonight").await;
    client.until("document.querySelector('#messages .msg--ai[data-seq]')", vec![]).await;
    client.share_with_therapist().await;
    let name = format!("Client {}", &session_id.replace('-', "")[28..]);

    log_in(&app, &therapist, "tess@clinic.test").await;
    let row = format!("#appointments tr[data-session-id='{session_id}']");
    therapist
        .until(
            "document.querySelector(args[0])?.querySelector('.client').textContent === args[1] + ' · online now'",
            vec![json!(row), json!(name)],
        )
        .await;
    // The title counts who waits; on a phone the row is compact.
    let title = therapist.js("return document.title", vec![]).await;
    assert!(title.as_str().unwrap().contains("1 waiting"), "{title}");
    therapist.client.set_window_size(390, 844).await.unwrap();
    let height = therapist
        .js("return document.querySelector(arguments[0]).getBoundingClientRect().height", vec![json!(row)])
        .await;
    assert!(
        height.as_f64().unwrap() < 200.0,
        "a compact row on a phone (a label per line took 260 px): {height}px"
    );
    therapist.screenshot("dashboard-compact-390").await;
    for (width, height) in [(1280, 800), (390, 844)] {
        therapist.client.set_window_size(width, height).await.unwrap();
        therapist.goto(&app, &format!("/chat/{session_id}?therapist=true")).await;
        therapist.find("#chat").await;
        // The alert is there from the first paint, before any event.
        let banner = therapist
            .js("const b = document.getElementById('risk-banner'); return [b.hidden, b.textContent, document.getElementById('chat-title').textContent];", vec![])
            .await;
        assert_eq!(banner[0], json!(false), "{banner}");
        assert!(banner[1].as_str().unwrap().contains("Imminent risk"), "{banner}");
        assert_eq!(banner[2], json!(format!("Chat with {name}")));
        therapist.until_connected().await;
        therapist.until("document.querySelectorAll('#messages li[data-seq]').length >= 4", vec![]).await;
        let times = therapist
            .js(
                "return [...document.querySelectorAll('#messages li[data-seq]')].map(li => {
                   const t = li.querySelector('time.msg__time');
                   return t && [t.textContent, t.title.length > 0, !Number.isNaN(Date.parse(t.dateTime))];
                 });",
                vec![],
            )
            .await;
        for time in times.as_array().unwrap() {
            assert_eq!(time, &json!(["just now", true, true]), "{times}");
        }
        let label = therapist
            .js("return document.querySelector('#messages .msg--user .msg__label').textContent", vec![])
            .await;
        assert_eq!(label, json!(name));
        // Focus shows the exact time.
        therapist.js("document.querySelector('#messages time.msg__time').focus()", vec![]).await;
        let shown = therapist
            .js("const t = document.activeElement; return [t.className, getComputedStyle(t, '::after').content.includes(t.dataset.exact)];", vec![])
            .await;
        assert_eq!(shown, json!(["msg__time", true]));
        therapist.screenshot(&format!("therapist-flagged-chat-{width}")).await;
    }
    // Once joined, the chat no longer waits.
    therapist.client.set_window_size(1280, 800).await.unwrap();
    therapist.goto(&app, "/therapist").await;
    therapist
        .until(
            "document.querySelector(args[0])?.dataset.chatMode === 'THERAPIST_JOINED'
             && document.querySelector(args[0]).cells[4].textContent === '—' && !document.title.includes('waiting')",
            vec![json!(row)],
        )
        .await;
    therapist.screenshot("dashboard-1280").await;
    client.close().await;
    therapist.close().await;
}

#[tokio::test]
async fn an_ended_login_is_explained_on_every_open_page_and_log_in_again_returns_there() {
    let app = TestApp::spawn().await;
    app.add_therapist("tess@clinic.test", "Tess").await;
    let session = app.create_session().await;
    let driver = Driver::start().await;
    let therapist = driver.browser().await;
    log_in(&app, &therapist, "tess@clinic.test").await;
    let dashboard = therapist.client.window().await.unwrap();
    let chat_path = format!("/chat/{}?therapist=true", session.session_id);
    let chat = therapist.client.new_window(true).await.unwrap().handle;
    therapist.client.switch_to_window(chat.clone()).await.unwrap();
    therapist.goto(&app, &chat_path).await;
    therapist.find("#chat").await;
    therapist.until_connected().await;
    let other = therapist.client.new_window(true).await.unwrap().handle;
    therapist.client.switch_to_window(other).await.unwrap();
    therapist.goto(&app, "/therapist").await;
    therapist.find("form.inline button").await.click().await.unwrap();
    therapist.find("#email").await;

    for (tab, path) in [(dashboard, "/therapist".to_owned()), (chat, chat_path.clone())] {
        therapist.client.switch_to_window(tab).await.unwrap();
        therapist.until("document.getElementById('login-ended')", vec![]).await;
        let shown = therapist
            .js("const box = document.getElementById('login-ended'); return [box.getAttribute('role'), box.textContent, document.getElementById('log-in-again').getAttribute('href'), location.pathname + location.search];", vec![])
            .await;
        assert_eq!(shown[0], "alert");
        assert!(shown[1].as_str().unwrap().contains("Your login has ended"), "{shown}");
        assert_eq!(shown[2], json!(format!("/therapist/login?next={}", urlencode(&path))), "{shown}");
        assert_eq!(shown[3], json!(path), "the page stays where it was");
    }
    therapist.screenshot("login-ended-chat").await;
    // Log in again: back to the same chat.
    therapist.find("#log-in-again").await.click().await.unwrap();
    therapist.find("#email").await.send_keys("tess@clinic.test").await.unwrap();
    therapist.find("#password").await.send_keys(PASSWORD).await.unwrap();
    therapist.find("form.stack button[type=submit]").await.click().await.unwrap();
    therapist.find("#chat").await;
    therapist.until_connected().await;
    assert_eq!(therapist.js("return location.pathname + location.search", vec![]).await, json!(chat_path));
    therapist.close().await;
}

/// `encodeURIComponent` of a path, as the page builds its `next`.
fn urlencode(path: &str) -> String {
    path.bytes()
        .map(|byte| match byte {
            b'A'..=b'Z'
            | b'a'..=b'z'
            | b'0'..=b'9'
            | b'-'
            | b'_'
            | b'.'
            | b'!'
            | b'~'
            | b'*'
            | b'\''
            | b'('
            | b')' => (byte as char).to_string(),
            other => format!("%{other:02X}"),
        })
        .collect()
}

#[tokio::test]
async fn the_dashboard_pages_a_long_list_and_coalesces_its_refreshes() {
    let app = TestApp::spawn_with(crate::helpers::Options {
        args: ["--sessions-per-ip-per-minute", "1000"].map(String::from).to_vec(),
        ..Default::default()
    })
    .await;
    app.add_therapist("tess@clinic.test", "Tess").await;
    for _ in 0..205 {
        app.create_session().await;
    }
    let driver = Driver::start().await;
    let therapist = driver.browser().await;
    log_in(&app, &therapist, "tess@clinic.test").await;
    // One page of 200, and a way to the rest.
    therapist
        .until("document.querySelectorAll('#appointments tbody tr').length === 200 && !document.getElementById('appointments-more').hidden", vec![])
        .await;
    therapist.find("#appointments-more").await.click().await.unwrap();
    therapist
        .until("document.querySelectorAll('#appointments tbody tr').length === 205 && document.getElementById('appointments-more').hidden", vec![])
        .await;

    // Five clients in crisis at the same moment, and ten new chats: every
    // one reaches the list, with at most one refresh in flight at a time.
    let mut clients = Vec::new();
    for _ in 0..5 {
        let session = app.create_session().await;
        let mut client = app.connect(session.session_id, &session.client_token).await;
        client.mode().await;
        clients.push(client);
    }
    for client in &mut clients {
        client.send_message("i have the pills in front of me and im going to take them all tonight").await;
    }
    for _ in 0..10 {
        app.create_session().await;
    }
    therapist
        .until("document.querySelectorAll('#appointments tbody tr').length === 220 && document.querySelectorAll('#appointments tbody tr[data-risk=imminent]').length === 5", vec![])
        .await;
    let loads = therapist
        .js(
            "const loads = performance.getEntriesByType('resource')
               .filter((entry) => new URL(entry.name).pathname === '/api/appointments');
             let most = 0;
             for (const load of loads) {
               const overlapping = loads.filter((other) =>
                 other.startTime < load.responseEnd && load.startTime < other.responseEnd);
               most = Math.max(most, overlapping.length);
             }
             return [loads.length, most];",
            vec![],
        )
        .await;
    assert!(loads[0].as_u64().unwrap() >= 3, "the page loaded its list: {loads}");
    assert_eq!(loads[1], json!(1), "refreshes overlapped: {loads}");
    therapist.screenshot("dashboard-paged").await;
    therapist.close().await;
}

/// The therapist hands the chat back with a note: the client sees it, the
/// hand-back message and a question, and the companion stays silent until
/// the client says yes. The therapist's page does not reconnect (that
/// would join again) but offers "Join again", which is a new join.
#[tokio::test]
async fn a_therapist_can_hand_back_and_the_client_chooses_to_continue_with_the_companion() {
    let axe = axe_source();
    let (app, _driver, client, therapist) = client_and_therapist().await;
    let session_id = chat_now(&app, &client).await;
    client.say("hello").await;
    client.until("document.querySelector('#messages .msg--ai[data-seq]')", vec![]).await;

    log_in(&app, &therapist, "tess@clinic.test").await;
    therapist
        .find(&format!("#appointments tr[data-session-id='{session_id}'] a"))
        .await
        .click()
        .await
        .unwrap();
    therapist.find("#chat").await;
    therapist.until_connected().await;
    therapist
        .until("document.getElementById('mode-banner').dataset.mode === 'THERAPIST_JOINED'", vec![])
        .await;
    let joins = "return document.querySelectorAll('#messages .msg--system[data-kind=join]').length";
    client.until("document.querySelector('#messages .msg--system[data-kind=join]')", vec![]).await;

    // The form opens with the focus in the note, and Escape closes it.
    let open_form = "!document.getElementById('hand-back').hidden
        && document.activeElement.id === 'hand-back-note'
        && document.getElementById('hand-back-open').getAttribute('aria-expanded') === 'true'";
    therapist.find("#hand-back-open").await.click().await.unwrap();
    therapist.until(open_form, vec![]).await;
    therapist.find("#hand-back-note").await.send_keys("\u{E00C}").await.unwrap();
    therapist
        .until(
            "document.getElementById('hand-back').hidden && document.activeElement.id === 'hand-back-open'",
            vec![],
        )
        .await;
    therapist.find("#hand-back-open").await.click().await.unwrap();
    therapist.until(open_form, vec![]).await;
    let label =
        therapist.js("return document.querySelector('label[for=hand-back-note]').textContent", vec![]).await;
    assert_eq!(label, "Note to the client (optional)");
    assert_eq!(serious_axe_violations(&therapist, &axe).await, json!([]), "axe on the hand-back form");
    let note = "Thank you for today. The companion is here whenever you want to keep talking.";
    therapist.find("#hand-back-note").await.send_keys(note).await.unwrap();
    therapist.screenshot("hand-back-form").await;
    therapist.find("#hand-back-submit").await.click().await.unwrap();

    // The client: the note, the hand-back message, then the question; the
    // box stays usable.
    client.until_message("therapist", note).await;
    client
        .until(
            "(() => { const back = document.querySelector('#messages .msg--system[data-kind=handback]');
                      const card = document.getElementById('resume-card');
                      return back && back.textContent.includes('Tess has ended their part of this chat')
                        && Number(back.dataset.seq) > Number(document.querySelector('#messages .msg--therapist').dataset.seq)
                        && !card.hidden
                        && document.getElementById('mode-banner').textContent.includes('The companion is paused until you say yes'); })()",
            vec![],
        )
        .await;
    let card = client
        .js(
            "const card = document.getElementById('resume-card');
             return [card.getAttribute('role'), document.getElementById(card.getAttribute('aria-labelledby')).textContent,
                     card.querySelector('button').textContent, document.getElementById('message-input').disabled];",
            vec![],
        )
        .await;
    assert_eq!(
        card,
        json!([
            "region",
            "Would you like to continue with the companion?",
            "Yes, continue with the companion",
            false
        ])
    );
    for (width, height) in [(1280, 800), (390, 844)] {
        client.client.set_window_size(width, height).await.unwrap();
        let fits = client
            .js(
                "const box = document.getElementById('resume-card').getBoundingClientRect();
                 return box.top >= 0 && box.bottom <= window.innerHeight && box.left >= 0 && box.right <= window.innerWidth
                   && document.documentElement.scrollWidth <= window.innerWidth;",
                vec![],
            )
            .await;
        assert_eq!(fits, json!(true), "the question is in view at {width}px");
        assert_eq!(
            serious_axe_violations(&client, &axe).await,
            json!([]),
            "axe on the question at {width}px"
        );
        client.screenshot(&format!("hand-back-question-{width}")).await;
    }

    // The therapist: out of the chat, not reconnecting, offered to join again.
    therapist
        .until(
            "!document.getElementById('handed-back').hidden
             && document.getElementById('handed-back-text').textContent === 'You handed this chat back to the companion.'
             && document.getElementById('join-again').textContent === 'Join again'
             && document.activeElement.id === 'join-again'
             && document.getElementById('message-input').disabled
             && document.getElementById('hand-back-open').hidden
             && document.getElementById('connection').dataset.state === 'handed-back'
             && document.querySelector('#messages .msg--system[data-kind=handback]')",
            vec![],
        )
        .await;
    therapist.until_message("therapist", note).await;
    therapist.screenshot("hand-back-therapist-handed-back").await;

    // Yes: the resume message, and the companion answers the next message.
    client.find("#resume-companion").await.click().await.unwrap();
    client
        .until(
            "document.getElementById('resume-card').hidden
             && document.querySelector('#messages .msg--system[data-kind=resume]')
             && document.getElementById('mode-banner').dataset.companionPaused === 'false'",
            vec![],
        )
        .await;
    client.say("yes, I'd like to keep talking").await;
    client
        .until(
            "(() => { const resumed = Number(document.querySelector('#messages .msg--system[data-kind=resume]').dataset.seq);
                      return [...document.querySelectorAll('#messages .msg--ai[data-seq]')].some(m => Number(m.dataset.seq) > resumed); })()",
            vec![],
        )
        .await;
    client.screenshot("hand-back-companion-answers").await;

    // All the while the therapist's page stayed out: one join so far.
    assert_eq!(client.js(joins, vec![]).await, json!(1));
    let out = therapist.js("return document.getElementById('connection').dataset.state", vec![]).await;
    assert_eq!(out, "handed-back", "the therapist's page did not reconnect by itself");

    // Join again: a new join, and the conversation meanwhile is replayed.
    therapist.find("#join-again").await.click().await.unwrap();
    therapist.until_connected().await;
    therapist
        .until(
            "document.getElementById('mode-banner').dataset.mode === 'THERAPIST_JOINED'
             && !document.getElementById('message-input').disabled
             && document.getElementById('handed-back').hidden
             && !document.getElementById('hand-back-open').hidden
             && document.querySelectorAll('#messages .msg--system[data-kind=join]').length === 2",
            vec![],
        )
        .await;
    therapist.until_message("user", "yes, I'd like to keep talking").await;
    client
        .until(
            "document.querySelectorAll('#messages .msg--system[data-kind=join]').length === 2
             && document.getElementById('mode-banner').dataset.mode === 'THERAPIST_JOINED'",
            vec![],
        )
        .await;
    let history = app.history(session_id.parse().unwrap(), &therapist_token(&app).await).await;
    assert_eq!(client.transcript().await.len(), history.len(), "the client shows the stored conversation");
    client.close().await;
    therapist.close().await;
}

/// A therapist's private name for a client: given and cleared on the chat
/// page, kept by the server (the page loads it), shown on their dashboard,
/// and seen by no one else: not the client, not another therapist.
#[tokio::test]
async fn a_therapist_can_rename_a_client_privately_and_clear_the_name() {
    let axe = axe_source();
    let (app, driver, client, therapist) = client_and_therapist().await;
    app.add_therapist("ana@clinic.test", "Ana").await;
    let session_id = chat_now(&app, &client).await;
    client.say("hello").await;
    client.until("document.querySelector('#messages .msg--ai[data-seq]')", vec![]).await;
    client.share_with_therapist().await;
    let short = format!("Client {}", &session_id.replace('-', "")[28..]);
    let label = "Sam, Tuesday group";
    let named = format!("{label} ({short})");
    let chat_path = format!("/chat/{session_id}?therapist=true");
    let row = format!("#appointments tr[data-session-id='{session_id}']");
    let title = "document.getElementById('chat-title').textContent === args[0]";

    log_in(&app, &therapist, "tess@clinic.test").await;
    therapist.find(&format!("{row} a")).await.click().await.unwrap();
    therapist.find("#chat").await;
    therapist.until_connected().await;
    therapist
        .until("document.getElementById('mode-banner').dataset.mode === 'THERAPIST_JOINED'", vec![])
        .await;
    therapist.until(title, vec![json!(format!("Chat with {short}"))]).await;

    // The form opens with the focus in the name, and Escape closes it.
    let open_form = "!document.getElementById('rename').hidden
        && document.activeElement.id === 'rename-input'
        && document.getElementById('rename-open').getAttribute('aria-expanded') === 'true'";
    let closed_form = "document.getElementById('rename').hidden
        && document.activeElement.id === 'rename-open'
        && document.getElementById('rename-open').getAttribute('aria-expanded') === 'false'";
    let rename = therapist.find("#rename-open").await;
    assert_eq!(rename.text().await.unwrap(), "Rename");
    rename.click().await.unwrap();
    therapist.until(open_form, vec![]).await;
    therapist.find("#rename-input").await.send_keys("\u{E00C}").await.unwrap();
    therapist.until(closed_form, vec![]).await;
    therapist.find("#rename-open").await.click().await.unwrap();
    therapist.until(open_form, vec![]).await;
    let form = therapist
        .js(
            "const input = document.getElementById('rename-input');
             return [input.labels[0].textContent, input.value,
                     document.getElementById(input.getAttribute('aria-describedby')).textContent,
                     [...document.querySelectorAll('#rename button')].map(b => b.textContent)];",
            vec![],
        )
        .await;
    assert_eq!(
        form,
        json!(["Your private name for this client", "", "Only you see this name.", ["Cancel", "Save"]])
    );
    therapist.find("#rename-input").await.send_keys(label).await.unwrap();
    for (width, height) in [(1280, 800), (390, 844)] {
        therapist.client.set_window_size(width, height).await.unwrap();
        let overflow =
            therapist.js("return document.documentElement.scrollWidth - window.innerWidth", vec![]).await;
        assert!(overflow.as_i64().unwrap() <= 0, "the rename form scrolls sideways at {width}px: {overflow}");
        assert_eq!(
            serious_axe_violations(&therapist, &axe).await,
            json!([]),
            "axe on the rename form at {width}px"
        );
        therapist.screenshot(&format!("rename-form-{width}")).await;
    }
    therapist.client.set_window_size(1280, 800).await.unwrap();
    therapist.find("#rename-save").await.click().await.unwrap();
    therapist.until(&format!("{title} && {closed_form}"), vec![json!(format!("Chat with {named}"))]).await;
    therapist.screenshot("rename-saved").await;

    // The page renders the usual name; the private one comes from the server.
    therapist.goto(&app, &chat_path).await;
    therapist.find("#chat").await;
    therapist.until_connected().await;
    therapist.until(title, vec![json!(format!("Chat with {named}"))]).await;
    // The client's messages go by it too.
    therapist
        .until(
            "[...document.querySelectorAll('#messages .msg--user .msg__label')].every(l => l.textContent === args[0])
             && document.querySelector('#messages .msg--user .msg__label')",
            vec![json!(label)],
        )
        .await;

    // The dashboard's row names the client the same way.
    therapist.goto(&app, "/therapist").await;
    therapist
        .until(
            "document.querySelector(args[0])?.cells[0].textContent.startsWith(args[1] + ' · ')
             && document.querySelector(args[0] + ' a').getAttribute('aria-label') === 'Open chat, ' + args[1]",
            vec![json!(row), json!(named)],
        )
        .await;
    therapist.screenshot("rename-dashboard").await;

    // The client never sees it: not on the open page, not after a reload,
    // not from the API with its own credential.
    let client_sees = "return [document.body.innerText, document.title]";
    for reload in [false, true] {
        if reload {
            client.goto(&app, &format!("/chat/{session_id}")).await;
            client.until_connected().await;
            client.until_message("user", "hello").await;
        }
        let shown = client.js(client_sees, vec![]).await;
        for text in shown.as_array().unwrap() {
            assert!(!text.as_str().unwrap().contains(label), "the client's page shows the name: {shown}");
        }
    }
    let asked = client
        .js(
            "return fetch(arguments[0]).then(async r => [r.status, await r.text()])",
            vec![json!(format!("/api/sessions/{session_id}/label"))],
        )
        .await;
    assert_eq!(asked[0], json!(401), "{asked}");
    assert!(!asked[1].as_str().unwrap().contains(label), "{asked}");

    // Another therapist: the chat is Tess's, so not on Ana's list, and the
    // name is refused to her.
    let other = driver.browser().await;
    log_in(&app, &other, "ana@clinic.test").await;
    other.until("document.getElementById('appointments-status').textContent !== 'Loading…'", vec![]).await;
    let dashboard = other
        .js(
            "return [document.body.innerText, document.title, document.querySelector(arguments[0]) === null]",
            vec![json!(row)],
        )
        .await;
    assert!(!dashboard[0].as_str().unwrap().contains(label), "{dashboard}");
    assert!(!dashboard[1].as_str().unwrap().contains(label), "{dashboard}");
    assert_eq!(dashboard[2], json!(true), "Tess's chat is not on Ana's list");
    let refused = other
        .js(
            "const url = arguments[0];
             return Promise.all([
               fetch(url).then(async r => [r.status, await r.text()]),
               fetch(url, { method: 'PUT', headers: { 'Content-Type': 'application/json' },
                            body: JSON.stringify({ label: 'Ana was here' }) }).then(r => r.status),
             ]);",
            vec![json!(format!("/api/sessions/{session_id}/label"))],
        )
        .await;
    assert_eq!(refused[0][0], json!(403), "{refused}");
    assert!(!refused[0][1].as_str().unwrap().contains(label), "{refused}");
    assert_eq!(refused[1], json!(403), "{refused}");
    other.close().await;

    // An empty Save forgets the name: the title is the usual one again.
    therapist.goto(&app, &chat_path).await;
    therapist.find("#chat").await;
    therapist.until(title, vec![json!(format!("Chat with {named}"))]).await;
    therapist.find("#rename-open").await.click().await.unwrap();
    therapist.until(open_form, vec![]).await;
    let input = therapist.find("#rename-input").await;
    assert_eq!(input.prop("value").await.unwrap().as_deref(), Some(label), "the form starts from the name");
    input.clear().await.unwrap();
    therapist.find("#rename-save").await.click().await.unwrap();
    therapist.until(&format!("{title} && {closed_form}"), vec![json!(format!("Chat with {short}"))]).await;
    let stored = therapist
        .js(
            "return fetch(arguments[0]).then(r => r.json())",
            vec![json!(format!("/api/sessions/{session_id}/label"))],
        )
        .await;
    assert_eq!(stored, json!({ "label": null }));
    let error = therapist.js("return document.getElementById('composer-error').textContent", vec![]).await;
    assert_eq!(error, "", "no error on the page");
    client.close().await;
    therapist.close().await;
}

/// The dashboard counts unread messages, previews the last one (the
/// companion's only by sender and time), fits 1280 px without wrapping its
/// buttons, and lists closed chats in a "Closed" tab that opens each
/// transcript read-only.
#[tokio::test]
async fn the_dashboard_shows_unread_counts_previews_and_a_closed_tab() {
    let (app, _driver, client, therapist) = client_and_therapist().await;
    let session_id = chat_now(&app, &client).await;
    client.say("hi there, how does this work").await;
    client
        .until("document.querySelectorAll('#messages li[data-sender=\"ai\"][data-seq]').length >= 1", vec![])
        .await;
    client.share_with_therapist().await;

    log_in(&app, &therapist, "tess@clinic.test").await;
    let row = format!("document.querySelector(\"#appointments tr[data-session-id='{session_id}']\")");
    therapist
        .until(
            &format!(
                "{row}.dataset.unread === '2' && {row}.querySelector('.unread').textContent === '2 new'
                 && {row}.cells[5].textContent.includes('Companion wrote (open the chat to read)')"
            ),
            vec![],
        )
        .await;
    // At 1280 px nothing wraps: every button and link is one line high.
    therapist.client.set_window_size(1280, 800).await.unwrap();
    let wrapped = therapist
        .js(
            "return [...document.querySelectorAll('#appointments .button, #appointments summary')]
               .filter(b => b.getClientRects().length > 1 || b.offsetHeight > 2.2 * parseFloat(getComputedStyle(b).fontSize) + 18)
               .map(b => b.textContent)",
            vec![],
        )
        .await;
    assert_eq!(wrapped, json!([]), "buttons wrap at 1280 px");
    let fits = "document.querySelector('#panel-open .table-wrap').scrollWidth <= document.querySelector('#panel-open .table-wrap').clientWidth";
    assert_eq!(therapist.js(&format!("return {fits}"), vec![]).await, json!(true), "the table fits 1280 px");
    for (width, height) in [(1280, 800), (390, 844)] {
        therapist.client.set_window_size(width, height).await.unwrap();
        therapist.screenshot(&format!("dashboard-unread-{width}")).await;
    }

    // Tess reads the chat; back on the list, nothing is unread, and the
    // client's next words are previewed.
    therapist.goto(&app, &format!("/chat/{session_id}?therapist=true")).await;
    therapist.find("#chat").await;
    therapist.until_connected().await;
    therapist.goto(&app, "/therapist").await;
    therapist
        .until(
            &format!("{row}.dataset.unread === '0' && {row}.querySelector('.unread').offsetParent === null"),
            vec![],
        )
        .await;
    client.say("could we talk about my sleep").await;
    therapist
        .until(
            &format!("{row}.dataset.unread === '1' && {row}.cells[5].textContent.includes('Client: could we talk about my sleep')"),
            vec![],
        )
        .await;

    // Closed, it leaves the list for the "Closed" tab, which opens it.
    let token = therapist_token(&app).await;
    let closed =
        app.http.post(app.url(&format!("/api/sessions/{session_id}/close"))).bearer_auth(token).send();
    assert_eq!(closed.await.unwrap().status(), 204);
    therapist.until(&format!("{row} === null"), vec![]).await;
    therapist.find("#tab-closed").await.click().await.unwrap();
    let closed_row = format!("document.querySelector(\"#closed tr[data-session-id='{session_id}']\")");
    therapist
        .until(&format!("!document.getElementById('panel-closed').hidden && {closed_row} !== null && document.getElementById('panel-open').hidden"), vec![])
        .await;
    assert_eq!(
        therapist
            .js("return document.getElementById('tab-closed').getAttribute('aria-selected')", vec![])
            .await,
        json!("true")
    );
    let axe = axe_source();
    for (width, height) in [(1280, 800), (390, 844)] {
        therapist.client.set_window_size(width, height).await.unwrap();
        assert_eq!(
            serious_axe_violations(&therapist, &axe).await,
            json!([]),
            "axe on the Closed tab at {width}px"
        );
        therapist.screenshot(&format!("dashboard-closed-{width}")).await;
    }
    therapist.find(&format!("#closed tr[data-session-id='{session_id}'] a")).await.click().await.unwrap();
    therapist.find("#chat").await;
    therapist
        .until(
            "document.getElementById('mode-banner').dataset.mode === 'CLOSED'
             && [...document.querySelectorAll('#messages .msg__body')].some(m => m.textContent === 'could we talk about my sleep')
             && document.getElementById('message-input').disabled",
            vec![],
        )
        .await;
    client.close().await;
    therapist.close().await;
}

/// A client deletes a chat no therapist joined, after confirming: it leaves
/// the page, "Your chats" and the therapist's dashboard at once. A chat a
/// therapist joined says why it cannot be deleted and whom to ask.
#[tokio::test]
async fn a_client_deletes_a_chat_after_confirming_and_a_joined_one_says_whom_to_ask() {
    let (app, _driver, client, therapist) = client_and_therapist().await;
    log_in(&app, &therapist, "tess@clinic.test").await;
    for (width, height) in [(1280, 800), (390, 844)] {
        client.client.set_window_size(width, height).await.unwrap();
        let session_id = chat_now(&app, &client).await;
        client.say("please forget this").await;
        client.until_message("user", "please forget this").await;
        let row = format!("document.querySelector(\"#appointments tr[data-session-id='{session_id}']\")");
        therapist.until(&format!("{row} !== null"), vec![]).await;

        // "Keep the chat" changes nothing, and gives the focus back.
        client.find("#erase-open").await.click().await.unwrap();
        client.until("document.getElementById('erase-dialog').open", vec![]).await;
        client.screenshot(&format!("erase-confirm-{width}")).await;
        client.find("#erase-cancel").await.click().await.unwrap();
        client
            .until(
                "!document.getElementById('erase-dialog').open && document.activeElement.id === 'erase-open'",
                vec![],
            )
            .await;
        client.until_message("user", "please forget this").await;

        client.find("#erase-open").await.click().await.unwrap();
        client.until("document.getElementById('erase-dialog').open", vec![]).await;
        client.find("#erase-confirm").await.click().await.unwrap();
        client
            .until(
                "document.getElementById('mode-banner').dataset.mode === 'ERASED'
                 && document.querySelectorAll('#messages li').length === 0
                 && document.activeElement.id === 'new-chat'
                 && document.getElementById('message-input').disabled",
                vec![],
            )
            .await;
        client.screenshot(&format!("erased-{width}")).await;
        therapist.until(&format!("{row} === null"), vec![]).await;
        client.goto(&app, "/").await;
        client.find("#chat-now").await;
        assert_eq!(client.count(&format!("#your-chats li[data-session-id='{session_id}']")).await, 0);
    }

    // Joined: no delete button, and the reason.
    let session_id = chat_now(&app, &client).await;
    client.say("hello").await;
    join_from_browser(&app, &therapist, &session_id).await;
    client
        .until(
            "document.getElementById('erase-open').hidden
             && !document.getElementById('erase-joined').hidden
             && document.getElementById('erase-joined').textContent.includes('ask the clinic')",
            vec![],
        )
        .await;

    // The therapist's access log lists the join and the history read.
    therapist.find("#access-log summary").await.click().await.unwrap();
    therapist
        .until(
            "[...document.querySelectorAll('#access-log-table tbody tr')].map(r => r.cells[2].textContent).join(',').startsWith('join,read')",
            vec![],
        )
        .await;
    let who = therapist
        .js("return document.querySelector('#access-log-table tbody tr').cells[1].textContent", vec![])
        .await;
    assert_eq!(who, json!("Tess"));
    therapist.screenshot("access-log-1280").await;
    client.close().await;
    therapist.close().await;
}

/// The client keeps the conversation with the companion private: their
/// other tab shows the answer at once, the therapist who joins sees one
/// line in its place, and the client's page says the choice is fixed now.
#[tokio::test]
async fn a_client_who_keeps_the_companion_part_private_shows_the_therapist_a_placeholder() {
    let (app, _driver, client, therapist) = client_and_therapist().await;
    let session_id = chat_now(&app, &client).await;
    client.say("something only the companion should read").await;
    client.until("document.querySelector('#messages .msg--ai[data-seq]')", vec![]).await;
    let first_tab = client.client.window().await.unwrap();
    let second_tab = client.client.new_window(true).await.unwrap().handle;
    client.client.switch_to_window(second_tab.clone()).await.unwrap();
    client.goto(&app, &format!("/chat/{session_id}")).await;
    client.until_connected().await;
    client.until("!document.getElementById('sharing-card').hidden", vec![]).await;
    client.client.switch_to_window(first_tab.clone()).await.unwrap();
    client.find("#sharing-no").await.click().await.unwrap();
    let answered = "document.getElementById('sharing-card').hidden
         && document.getElementById('sharing-status-text').textContent.includes('stays private')
         && !document.getElementById('sharing-change').hidden";
    client.until(answered, vec![]).await;
    client.client.switch_to_window(second_tab).await.unwrap();
    client.until(answered, vec![]).await;
    client.client.switch_to_window(first_tab).await.unwrap();
    join_from_browser(&app, &therapist, &session_id).await;
    therapist
        .until(
            "[...document.querySelectorAll('#messages .msg--private')].map(m => m.textContent).join('|')
               === '2 earlier messages with the companion are private'",
            vec![],
        )
        .await;
    let page = therapist.js("return document.getElementById('messages').textContent", vec![]).await;
    assert!(!page.as_str().unwrap().contains("only the companion should read"), "{page}");
    therapist.screenshot("private-companion-part-1280").await;
    client
        .until(
            "document.getElementById('sharing-change').hidden
             && document.getElementById('sharing-status-text').textContent.includes('before the therapist joined stays private')",
            vec![],
        )
        .await;
    client.close().await;
    therapist.close().await;
}

/// The API reference (`/api/docs`) draws every operation of the document in
/// a real browser, from files of this server alone: it works offline, under
/// the pages' Content-Security-Policy.
#[tokio::test]
async fn the_api_reference_renders_every_operation_from_this_server_alone() {
    let app = TestApp::spawn().await;
    let driver = Driver::start().await;
    let browser = driver.browser().await;
    let document = crate::contract::contract().document();
    let methods = ["get", "put", "post", "delete", "patch"];
    let operations: usize = document["paths"]
        .as_object()
        .unwrap()
        .values()
        .map(|item| methods.iter().filter(|method| item.get(**method).is_some()).count())
        .sum();
    browser.goto(&app, "/api/docs").await;
    browser.until("document.querySelectorAll('.opblock').length >= args[0]", vec![json!(operations)]).await;
    // The frames are among the schemas shown.
    browser.until("document.body.innerText.includes('ServerFrame')", vec![]).await;
    // Its style sheet applies: a GET is drawn in its colour.
    let colour = browser
        .js("return getComputedStyle(document.querySelector('.opblock-get')).backgroundColor", vec![])
        .await;
    assert_ne!(parse_rgb(colour.as_str().unwrap()).3, 0.0, "swagger-ui.css applies");
    // Everything the page loaded came from this server.
    let loaded = browser
        .js("return performance.getEntriesByType('resource').map((entry) => entry.name)", vec![])
        .await;
    let loaded: Vec<String> = serde_json::from_value(loaded).unwrap();
    assert!(loaded.iter().any(|url| url.ends_with("/api/openapi.json")), "{loaded:?}");
    for url in &loaded {
        assert!(
            url.starts_with(&format!("{}/", app.address)) || url.starts_with("data:"),
            "{url} is not this server's"
        );
    }
    browser.screenshot("api-docs").await;
    browser.close().await;
}
