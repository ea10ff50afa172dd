//! Account management from the shell, and the first-run setup page.

use std::os::unix::fs::PermissionsExt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::helpers::{EVENT_TIMEOUT, PASSWORD, TestApp, on_postgres, with_args};

#[tokio::test]
async fn therapist_add_reads_the_password_from_stdin_and_list_shows_the_account() {
    let app = TestApp::spawn().await;
    let added = app
        .cli(&["therapist", "add", "--email", "Ana@Clinic.test", "--name", "Ana"], &format!("{PASSWORD}\n"))
        .await;
    assert!(added.status.success(), "{}", String::from_utf8_lossy(&added.stderr));
    let listed = app.cli(&["therapist", "list"], "").await;
    let listing = String::from_utf8(listed.stdout).unwrap();
    assert!(listing.contains("ana@clinic.test\tAna"), "{listing}");
    assert_eq!(app.login("ana@clinic.test", PASSWORD).await.status(), 200, "the piped line is the password");

    let duplicate = app
        .cli(&["therapist", "add", "--email", "ana@clinic.test", "--name", "Ana"], "another password\n")
        .await;
    assert!(!duplicate.status.success());
    assert!(String::from_utf8_lossy(&duplicate.stderr).contains("already"), "{duplicate:?}");
    let short = app.cli(&["therapist", "add", "--email", "bo@clinic.test", "--name", "Bo"], "short\n").await;
    assert!(!short.status.success());
    let listing = String::from_utf8(app.cli(&["therapist", "list"], "").await.stdout).unwrap();
    assert_eq!(listing.lines().count(), 1, "{listing}");
}

#[tokio::test]
async fn first_run_prints_a_one_time_setup_url_that_creates_the_first_account() {
    let mut app = TestApp::spawn().await;
    let setup_url = app.setup_url.clone().expect("a fresh server prints a setup URL");
    let form = app.http.get(&setup_url).send().await.unwrap();
    assert_eq!(form.status(), 200);
    assert!(form.text().await.unwrap().contains("<form"));

    let wrong = app.http.get(setup_url.replace("/setup/setup_", "/setup/setup_0")).send().await.unwrap();
    assert_eq!(wrong.status(), 404);
    let weak = [("name", "Ana"), ("email", "ana@clinic.test"), ("password", "short")];
    assert_eq!(app.http.post(&setup_url).form(&weak).send().await.unwrap().status(), 400);

    let fields = [("name", "Ana"), ("email", "ana@clinic.test"), ("password", PASSWORD)];
    let created = app.http.post(&setup_url).form(&fields).send().await.unwrap();
    assert_eq!(created.status(), 201);
    assert_eq!(app.login("ana@clinic.test", PASSWORD).await.status(), 200);

    let reused = app.http.post(&setup_url).form(&fields).send().await.unwrap();
    assert_eq!(reused.status(), 404, "the link works once");
    app.restart().await;
    assert!(app.setup_url.is_none(), "no setup URL once an account exists");
}

#[tokio::test]
async fn the_setup_url_stops_working_once_an_account_exists() {
    let app = TestApp::spawn().await;
    let setup_url = app.setup_url.clone().expect("a fresh server prints a setup URL");
    app.add_therapist("ana@clinic.test", "Ana").await;
    assert_eq!(app.http.get(&setup_url).send().await.unwrap().status(), 404);
    let fields = [("name", "Eve"), ("email", "eve@clinic.test"), ("password", PASSWORD)];
    assert_eq!(app.http.post(&setup_url).form(&fields).send().await.unwrap().status(), 404);
    assert_eq!(app.login("eve@clinic.test", PASSWORD).await.status(), 401);
}

/// A backup taken while clients write holds every message acked before it
/// began; a restore is refused while Haven serves the file, and once it
/// is stopped puts the backup in place, keeping the database it replaced.
/// A second server on the same file is refused. (PostgreSQL deployments
/// use pg_dump, and the commands say so.)
#[tokio::test]
async fn a_backup_under_load_restores_every_acknowledged_message() {
    // The writer goes as fast as acks come back.
    let mut app =
        TestApp::spawn_with(with_args(&["--message-rate", "10000", "--message-burst", "10000"])).await;
    let copy = app.dir.path().join("backup.db");
    let copy_arg = copy.to_str().unwrap().to_owned();
    if on_postgres() {
        let refused = app.cli(&["backup", "--to", &copy_arg], "").await;
        assert!(!refused.status.success());
        assert!(String::from_utf8_lossy(&refused.stderr).contains("pg_dump"), "{refused:?}");
        assert!(!copy.exists());
        return;
    }
    // Audit records (the account, its login) before the backup.
    app.therapist("Tess").await;
    let session = app.create_session().await;
    let mut writer = app.connect(session.session_id, &session.client_token).await;
    writer.mode().await;
    // The writer sends and awaits each ack until told to stop; what was
    // acked before the backup began must be in it.
    let acked = Arc::new(Mutex::new(Vec::<(i64, String)>::new()));
    let (stop, mut stopped) = tokio::sync::oneshot::channel::<()>();
    let load = tokio::spawn({
        let acked = acked.clone();
        async move {
            for n in 0.. {
                if stopped.try_recv().is_ok() {
                    return writer;
                }
                let content = format!("message {n}");
                let client_id = writer.send_message(&content).await;
                let (seq, _) = writer.ack(&client_id).await;
                acked.lock().unwrap().push((seq, content));
            }
            unreachable!()
        }
    });
    let written = async |count: usize| {
        let enough = async {
            while acked.lock().unwrap().len() < count {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        };
        tokio::time::timeout(EVENT_TIMEOUT, enough).await.expect("the writer stalled");
    };
    written(20).await;
    let before: Vec<(i64, String)> = acked.lock().unwrap().clone();
    let backup = app.cli(&["backup", "--to", &copy_arg], "").await;
    assert!(backup.status.success(), "{}", String::from_utf8_lossy(&backup.stderr));
    assert!(String::from_utf8_lossy(&backup.stdout).contains("integrity check ok"), "{backup:?}");
    // A few more after it, which the backup cannot hold.
    let at_backup_end = acked.lock().unwrap().len();
    written(at_backup_end + 5).await;
    stop.send(()).unwrap();
    let writer = load.await.unwrap();
    let written = acked.lock().unwrap().len();
    assert_eq!(std::fs::metadata(&copy).unwrap().permissions().mode() & 0o777, 0o600);
    let again = app.cli(&["backup", "--to", &copy_arg], "").await;
    assert!(
        !again.status.success() && String::from_utf8_lossy(&again.stderr).contains("exists"),
        "{again:?}"
    );

    // Not under a running server, nor a second server beside it.
    let refused = app.cli(&["restore", "--from", &copy_arg], "").await;
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("stop it first"), "{refused:?}");
    let second = tokio::process::Command::new(env!("CARGO_BIN_EXE_haven"))
        .args(["--database", &app.database_url, "serve", "--bind", "127.0.0.1:0"])
        .env_clear()
        .output();
    let second = tokio::time::timeout(EVENT_TIMEOUT, second).await.expect("a second server exits").unwrap();
    assert!(!second.status.success());
    assert!(String::from_utf8_lossy(&second.stderr).contains("Haven is serving"), "{second:?}");
    drop(writer);

    app.stop().await;
    let restored = app.cli(&["restore", "--from", &copy_arg], "").await;
    assert!(restored.status.success(), "{}", String::from_utf8_lossy(&restored.stderr));
    let said = String::from_utf8_lossy(&restored.stdout).into_owned();
    assert!(said.contains("integrity check ok") && said.contains("kept as"), "{said}");
    app.start_again().await;
    let history = app.history(session.session_id, &session.client_token).await;
    let seqs: Vec<i64> = history.iter().map(|message| message.seq).collect();
    assert_eq!(seqs, (1..=seqs.len() as i64).collect::<Vec<_>>(), "no gap, no duplicate");
    for (seq, content) in &before {
        let message = history.iter().find(|message| message.seq == *seq).expect("acked before the backup");
        assert_eq!(&message.content, content);
    }
    let from_client = history.iter().filter(|message| message.sender == haven_protocol::Sender::User).count();
    assert!(
        from_client <= at_backup_end && from_client < written,
        "only what the backup held: {from_client}"
    );
    let verified = app.cli(&["audit", "verify"], "").await;
    let said = String::from_utf8_lossy(&verified.stdout).into_owned();
    assert!(verified.status.success() && said.contains("intact"), "{said}");
    let listed = String::from_utf8(app.cli(&["audit", "list"], "").await.stdout).unwrap();
    assert!(listed.contains("\taccount_add\t") && listed.contains("\tlogin\t"), "{listed}");
}

/// `deploy/haven.service` is a unit systemd accepts, its sandbox rates
/// "OK" in `systemd-analyze security` (exposure at most 2.0 of 10), and
/// the command line and environment it gives `serve` start Haven.
#[tokio::test]
async fn the_service_unit_is_accepted_sandboxed_and_starts_haven() {
    use tokio::io::AsyncBufReadExt;
    let unit = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/haven.service")).unwrap();
    let binary = env!("CARGO_BIN_EXE_haven");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("haven.service");
    std::fs::write(&path, unit.replace("/usr/local/bin/haven", binary)).unwrap();
    let analyze = |args: &[&str]| {
        std::process::Command::new("systemd-analyze")
            .args(args)
            .arg(&path)
            .output()
            .expect("systemd-analyze (Debian's systemd) is needed")
    };
    let verify = analyze(&["verify"]);
    let complaints = String::from_utf8_lossy(&verify.stderr);
    assert!(verify.status.success() && complaints.trim().is_empty(), "{complaints}");
    let security = analyze(&["security", "--offline=true"]);
    let report = String::from_utf8_lossy(&security.stdout);
    let exposure: f64 = report
        .lines()
        .find_map(|line| line.split("haven.service: ").nth(1))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|score| score.parse().ok())
        .unwrap_or_else(|| panic!("no exposure level in {report}"));
    assert!(exposure <= 2.0, "{report}");

    // The configuration file it reads is valid.
    let config = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/haven.toml");
    let (ok, effective, errors) = haven(&["config", "check", "--config", config], &[]).await;
    assert!(ok, "{errors}");
    assert!(effective.contains("database = \"sqlite:///var/lib/haven/haven.db\"  # file"), "{effective}");

    // Its ExecStart= line with that file, the database in a temporary
    // directory and a free port (the environment overrides the file, as
    // /etc/haven/haven.env would).
    let exec = unit.lines().find_map(|line| line.strip_prefix("ExecStart=")).unwrap();
    let exec = exec.replace("/etc/haven/haven.toml", config);
    let args: Vec<&str> = exec.split_whitespace().skip(1).collect();
    let mut command = tokio::process::Command::new(binary);
    command.args(&args).env_clear().stdout(std::process::Stdio::piped()).kill_on_drop(true);
    let database = dir.path().join("haven.db");
    command.env("HAVEN_DATABASE_URL", format!("sqlite://{}", database.display()));
    command.env("HAVEN_BIND", "127.0.0.1:0");
    command.env("HAVEN_METRICS_BIND", "127.0.0.1:0");
    let mut serve = command.spawn().unwrap();
    let mut lines = tokio::io::BufReader::new(serve.stdout.take().unwrap()).lines();
    let listening = tokio::time::timeout(EVENT_TIMEOUT, async {
        while let Some(line) = lines.next_line().await.unwrap() {
            if let Some(address) = line.strip_prefix("Haven is listening on ") {
                return address.to_owned();
            }
        }
        panic!("serve stopped before listening");
    })
    .await
    .expect("serve started in time");
    let client = crate::contract::Http::new(reqwest::Client::new(), &listening);
    let ready = client.get(format!("{listening}/readyz")).send().await.unwrap();
    assert_eq!(ready.status(), 200);
    serve.kill().await.unwrap();
}

/// Runs the `haven` binary with only these environment variables: whether
/// it succeeded, its standard output and its standard error (after its
/// exit status, when it failed).
async fn haven(args: &[&str], env: &[(&str, &str)]) -> (bool, String, String) {
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_haven"))
        .args(args)
        .env_clear()
        .envs(env.iter().copied())
        .output()
        .await
        .expect("run haven");
    let text = |bytes: Vec<u8>| String::from_utf8(bytes).unwrap();
    let errors = match output.status.code() {
        Some(0) => text(output.stderr),
        code => format!("exit {code:?}\n{}", text(output.stderr)),
    };
    (output.status.success(), text(output.stdout), errors)
}

#[tokio::test]
async fn the_example_file_has_every_flag_and_checks_clean_at_the_defaults() {
    let (ok, help, _) = haven(&["serve", "--help"], &[]).await;
    assert!(ok);
    let flags: Vec<&str> = help
        .split_whitespace()
        .filter_map(|word| word.strip_prefix("--"))
        .map(|flag| flag.split(['=', ' ', '<', ',']).next().unwrap())
        .filter(|flag| !["", "help", "version", "config"].contains(flag))
        .collect();
    assert!(flags.len() > 35, "{flags:?}");
    let (ok, example, _) = haven(&["config", "example"], &[]).await;
    assert!(ok);
    for flag in &flags {
        assert!(example.contains(&format!("\n# {flag} = ")), "`{flag}` has no key in:\n{example}");
    }
    // Every key that has a default, uncommented, is a valid file that
    // changes nothing.
    let file: String = example
        .lines()
        .filter(|line| !line.contains("(not set by default)"))
        .filter_map(|line| line.strip_prefix("# "))
        .filter(|line| {
            line.split_once(" = ")
                .is_some_and(|(key, _)| key.chars().all(|c| c.is_ascii_lowercase() || c == '-'))
        })
        .map(|line| format!("{line}\n"))
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("haven.toml");
    std::fs::write(&path, &file).unwrap();
    let (ok, from_file, errors) = haven(&["config", "check", "--config", path.to_str().unwrap()], &[]).await;
    assert!(ok, "{errors}\n{file}");
    let (ok, defaults, _) = haven(&["config", "check"], &[]).await;
    assert!(ok);
    assert_eq!(from_file.replace("# file", "# default"), defaults, "the example's values are the defaults");
    assert!(!from_file.contains("# default"), "every key came from the file:\n{from_file}");
    assert!(defaults.contains("message-rate = 10  # default\n"), "{defaults}");
    assert!(defaults.contains("# crisis-line is not set\n"), "{defaults}");
}

#[tokio::test]
async fn config_check_names_every_unknown_key_and_invalid_value() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("haven.toml");
    std::fs::write(
        &path,
        "mesage-rate = 5\nmessage-rate = \"fast\"\nbind = \"nowhere\"\ncookie-secure = \"yes\"\n\
         ai-provider = \"claude\"\nheartbeat-seconds = 5\nallowed-origin = [\"https://chat.example.org\"]\n",
    )
    .unwrap();
    let path = path.to_str().unwrap();
    let (ok, printed, errors) = haven(&["config", "check", "--config", path], &[]).await;
    assert!(!ok);
    assert!(printed.is_empty(), "nothing is printed as effective: {printed}");
    for named in ["`mesage-rate`", "`message-rate`", "`bind`", "`cookie-secure`", "`ai-provider`"] {
        assert!(errors.contains(named), "{named} is not named in:\n{errors}");
    }
    assert!(!errors.contains("heartbeat-seconds") && !errors.contains("allowed-origin"), "{errors}");
    assert!(errors.starts_with("exit Some(2)\n"), "{errors}");
    assert_eq!(errors.lines().filter(|line| line.starts_with("error: ")).count(), 5, "{errors}");
    // `serve` refuses the same file before it opens anything.
    let (ok, _, errors) = haven(&["serve", "--config", path, "--bind", "127.0.0.1:0"], &[]).await;
    assert!(!ok && errors.starts_with("exit Some(2)\n"), "{errors}");
    assert!(errors.contains("`mesage-rate`") && errors.contains("`ai-provider`"), "{errors}");
    let (ok, _, errors) = haven(&["config", "check", "--config", "/nonexistent/haven.toml"], &[]).await;
    assert!(!ok && errors.contains("/nonexistent/haven.toml"), "{errors}");
}

#[tokio::test]
async fn flags_beat_the_environment_which_beats_the_file_which_beats_the_defaults() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("haven.toml");
    std::fs::write(
        &path,
        "message-rate = 3\nmessage-burst = 4\nai-api-key = \"sk-from-the-file\"\n\
         database = \"postgres://haven:db-password@db.internal/haven\"\n\
         emergency-number = \"112\"\ncrisis-line = \"999 (from the file)\"\n\
         bind = \"203.0.113.7:9\"\nlog-format = \"text\"\n",
    )
    .unwrap();
    let config = path.to_str().unwrap();
    let env = [("HAVEN_MESSAGE_BURST", "5"), ("HAVEN_CONFIG", config)];
    let (ok, printed, errors) = haven(&["config", "check"], &env).await;
    assert!(ok, "{errors}");
    for line in [
        "message-rate = 3  # file",
        "message-burst = 5  # environment HAVEN_MESSAGE_BURST",
        "outbound-queue = 256  # default",
        "ai-api-key = \"********\"  # file",
        "database = \"postgres://haven:********@db.internal/haven\"  # file",
    ] {
        assert!(printed.lines().any(|printed| printed == line), "no `{line}` in:\n{printed}");
    }
    assert!(!printed.contains("sk-from-the-file") && !printed.contains("db-password"), "{printed}");

    // A server run with the file: the harness's `--bind` and `--log-format`
    // flags win over the file's, the environment's crisis line over the
    // file's, and the file's emergency number over the default (none).
    let app = TestApp::spawn_with(crate::helpers::Options {
        args: vec!["--config".into(), config.into()],
        env: vec![("HAVEN_CRISIS_LINE".into(), "116 123 (from the environment)".into())],
        ..Default::default()
    })
    .await;
    let session = app.create_session().await;
    let mut client = app.connect(session.session_id, &session.client_token).await;
    client.mode().await;
    let client_id =
        client.send_message("i have the pills in front of me and im going to take them all tonight").await;
    client.ack(&client_id).await;
    let crisis = loop {
        let message = client.message().await;
        if message.sender == haven_protocol::Sender::System {
            break message;
        }
    };
    assert!(crisis.content.contains("112"), "{}", crisis.content);
    assert!(crisis.content.contains("116 123 (from the environment)"), "{}", crisis.content);
    assert!(!crisis.content.contains("from the file"), "{}", crisis.content);
}
