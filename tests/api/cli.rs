//! Account management from the shell, and the first-run setup page.

use crate::helpers::{PASSWORD, TestApp};

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
