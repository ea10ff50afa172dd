//! `haven therapist add|list`: account management from the shell.

use std::io::{BufRead, IsTerminal};

use anyhow::Context;
use haven_store::{NewTherapist, Origin};

use crate::auth;
use crate::config::{AccountArgs, AddTherapistArgs};
use crate::startup::open_store;

/// Creates an account. The password comes from standard input: prompted
/// without echo on a terminal, otherwise the first line.
pub async fn add(database: &str, args: AddTherapistArgs) -> anyhow::Result<()> {
    let password = read_password()?;
    let email = auth::normalise_email(&args.email);
    auth::validate_new_account(&email, &args.name, &password).map_err(anyhow::Error::msg)?;
    let store = open_store(database).await?;
    let password_hash = auth::hash_password(password).await?;
    let therapist = store
        .create_therapist(
            NewTherapist { email, name: args.name.trim().to_owned(), password_hash },
            Origin::OPERATOR,
        )
        .await
        .context("creating the account")?;
    println!("Created therapist {} <{}> ({})", therapist.name, therapist.email, therapist.id);
    Ok(())
}

/// Sets a new password and ends the account's logins; a running server
/// closes their sockets at its next heartbeat.
pub async fn passwd(database: &str, args: AccountArgs) -> anyhow::Result<()> {
    let password = read_password()?;
    let email = auth::normalise_email(&args.email);
    auth::validate_new_account(&email, "-", &password).map_err(anyhow::Error::msg)?;
    let store = open_store(database).await?;
    let password_hash = auth::hash_password(password).await?;
    let therapist = store
        .set_password(&email, &password_hash, Origin::OPERATOR)
        .await?
        .context("no account with that e-mail")?;
    println!("Password changed for {} <{}>; every login has ended.", therapist.name, therapist.email);
    Ok(())
}

/// Disables an account and ends its logins.
pub async fn disable(database: &str, args: AccountArgs) -> anyhow::Result<()> {
    let store = open_store(database).await?;
    let email = auth::normalise_email(&args.email);
    let therapist =
        store.disable_therapist(&email, Origin::OPERATOR).await?.context("no account with that e-mail")?;
    println!("Disabled {} <{}>; every login has ended.", therapist.name, therapist.email);
    Ok(())
}

pub async fn list(database: &str) -> anyhow::Result<()> {
    let store = open_store(database).await?;
    let therapists = store.therapists().await?;
    if therapists.is_empty() {
        println!("No therapist accounts. Create one with: haven therapist add --email E --name N");
    }
    for therapist in therapists {
        let state = if therapist.disabled { "\tdisabled" } else { "" };
        println!("{}\t{}\t{}{state}", therapist.id, therapist.email, therapist.name);
    }
    Ok(())
}

fn read_password() -> anyhow::Result<String> {
    if std::io::stdin().is_terminal() {
        let password = rpassword::prompt_password("Password: ")?;
        let again = rpassword::prompt_password("Password again: ")?;
        anyhow::ensure!(password == again, "the passwords do not match");
        Ok(password)
    } else {
        let mut line = String::new();
        std::io::stdin().lock().read_line(&mut line).context("reading the password from standard input")?;
        Ok(line.trim_end_matches(['\r', '\n']).to_owned())
    }
}
