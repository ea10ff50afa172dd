//! Haven: real-time chat for therapy support.
//!
//! Read in this order: [`config`] (what can be set; [`config_file`] reads
//! the file), [`startup`] (how the service is assembled), [`http`] (the
//! JSON API and the setup page), [`chat`] (the WebSocket: roles, takeover,
//! ordering) and [`auth`] (how a credential becomes a role).

#![forbid(unsafe_code)]

use std::process::ExitCode;

mod audit_cli;
pub mod auth;
mod backup_cli;
pub mod chat;
pub mod config;
pub mod config_file;
pub mod http;
pub mod limits;
pub mod pages;
pub mod prometheus;
pub mod retention;
pub mod safety;
pub mod startup;
pub mod telemetry;
mod therapist_cli;

use config::{AuditCommand, Cli, Command, ConfigCommand, RetentionCommand, SafetyCommand, TherapistCommand};

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
        Command::Backup { to } => backup_cli::backup(&cli.database, &to).await,
        Command::Restore { from } => backup_cli::restore(&cli.database, &from).await,
        Command::Retention { command: RetentionCommand::Run { policy, apply } } => {
            retention::run_cli(&cli.database, &policy, apply).await
        }
        Command::Audit { command: AuditCommand::Verify } => audit_cli::verify(&cli.database).await,
        Command::Audit { command: AuditCommand::List { session, therapist, since } } => {
            audit_cli::list(&cli.database, session, therapist.as_deref(), since).await
        }
        Command::Config { command: ConfigCommand::Check } => config_file::check(cli.config.as_deref()),
        Command::Config { command: ConfigCommand::Example } => {
            std::io::Write::write_all(&mut std::io::stdout(), config_file::example().as_bytes())
                .map_err(Into::into)
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
