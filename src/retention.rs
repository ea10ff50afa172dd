//! Retention: chats expire by tier, counted from their last activity
//! (docs/privacy.md). `haven retention run` and the daily job in `serve`
//! both run [`haven_store::Store::apply_retention`], which records each run
//! in the audit trail.

use std::time::Duration;

use haven_store::{Actor, Origin, RetentionReport};
use tokio::time::Instant;

use crate::config::RetentionArgs;
use crate::startup::{AppState, open_store};

/// How often `serve` removes expired chats; the first run is at start.
const EVERY: Duration = Duration::from_secs(24 * 60 * 60);

/// The daily job: removes expired chats at start and then every day, until
/// shutdown. Their sockets close and they leave the dashboards, on every
/// instance.
pub async fn daily(state: AppState, policy: RetentionArgs) {
    let mut interval = tokio::time::interval_at(Instant::now(), EVERY);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = state.shutdown.cancelled() => return,
            _ = interval.tick() => {}
        }
        let cutoffs = policy.cutoffs(haven_store::now());
        match state.store.apply_retention(cutoffs, true, Origin::new(Actor::System, None)).await {
            Ok(removed) => {
                let report = removed.outcome;
                tracing::info!(
                    bot_only_chats = report.bot_only_chats,
                    clinical_chats = report.clinical_chats,
                    "retention run: expired chats removed"
                );
                state.hub.apply(removed.events);
            }
            Err(error) => tracing::warn!(error = %error, "retention run failed; next try tomorrow"),
        }
    }
}

/// `haven retention run [--apply]`, by the operator. A running `serve`
/// learns of the removed chats at its next look at them (sockets at their
/// next heartbeat, dashboards at their next refresh).
pub async fn run_cli(database: &str, policy: &RetentionArgs, apply: bool) -> anyhow::Result<()> {
    let store = open_store(database).await?;
    let cutoffs = policy.cutoffs(haven_store::now());
    let report = store.apply_retention(cutoffs, apply, Origin::OPERATOR).await?.outcome;
    println!("{}", describe(&report));
    Ok(())
}

fn describe(report: &RetentionReport) -> String {
    let counts = format!(
        "{} chats no therapist joined ({} messages) and {} clinical chats ({} messages)",
        report.bot_only_chats, report.bot_only_messages, report.clinical_chats, report.clinical_messages
    );
    if report.applied {
        format!("Removed {counts}.")
    } else {
        format!("Dry run: {counts} have expired. Run with --apply to remove them.")
    }
}
