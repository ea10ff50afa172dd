//! Haven: real-time chat for therapy support.
//!
//! Read in this order: [`config`] (what can be set), [`startup`] (how the
//! service is assembled), [`http`] (the JSON API and the setup page),
//! [`chat`] (the WebSocket: roles, takeover, ordering) and [`auth`] (how a
//! credential becomes a role).

#![forbid(unsafe_code)]

use std::process::ExitCode;

pub mod auth;
pub mod chat;
pub mod config;
pub mod http;
pub mod limits;
pub mod pages;
pub mod safety;
pub mod startup;
pub mod telemetry;
mod therapist_cli;

use config::{Cli, Command, SafetyCommand, TherapistCommand};

/// Runs one CLI command to completion.
pub async fn run(cli: Cli) -> ExitCode {
    let result = match cli.command {
        Command::Serve(args) => {
            let _logs = telemetry::init(args.log_format);
            startup::serve(&cli.database, args).await
        }
        Command::Therapist { command: TherapistCommand::Add(args) } => {
            therapist_cli::add(&cli.database, args).await
        }
        Command::Therapist { command: TherapistCommand::List } => therapist_cli::list(&cli.database).await,
        Command::Therapist { command: TherapistCommand::Passwd(args) } => {
            therapist_cli::passwd(&cli.database, args).await
        }
        Command::Therapist { command: TherapistCommand::Disable(args) } => {
            therapist_cli::disable(&cli.database, args).await
        }
        Command::Safety { command: SafetyCommand::Check { text, safety_model } } => {
            safety::check_cli(&text, safety_model.as_deref())
        }
        Command::Safety { command: SafetyCommand::Report { days } } => {
            safety::report_cli(&cli.database, days).await
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}
