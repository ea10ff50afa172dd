//! `haven audit verify|list`: the audit trail from the shell
//! (`haven_store::trail`).

use std::collections::HashMap;

use anyhow::Context;
use haven_store::trail::Verifier;
use haven_store::{Store, TrailFilter, TrailRecord};
use time::OffsetDateTime;
use uuid::Uuid;

use crate::auth;
use crate::startup::open_store;

/// Records read at a time.
const PAGE: i64 = 1_000;

/// Walks the whole chain; an error names the first record that does not
/// fit.
pub async fn verify(database: &str) -> anyhow::Result<()> {
    let store = open_store(database).await?;
    let mut verifier = Verifier::default();
    each_record(&*store, TrailFilter::default(), |record| {
        verifier.check(record).context("the audit trail was tampered with")
    })
    .await?;
    println!("The audit trail is intact: {} records; head {}.", verifier.count(), verifier.head());
    Ok(())
}

pub async fn list(
    database: &str,
    session_id: Option<Uuid>,
    therapist: Option<&str>,
    since: Option<OffsetDateTime>,
) -> anyhow::Result<()> {
    let store = open_store(database).await?;
    let emails: HashMap<Uuid, String> =
        store.therapists().await?.into_iter().map(|therapist| (therapist.id, therapist.email)).collect();
    let therapist_id = match therapist {
        Some(email) => {
            let email = auth::normalise_email(email);
            let found = emails.iter().find(|(_, known)| **known == email).map(|(id, _)| *id);
            Some(found.context("no account with that e-mail")?)
        }
        None => None,
    };
    let filter = TrailFilter { session_id, therapist_id, since, ..TrailFilter::default() };
    each_record(&*store, filter, |record| {
        let email = record.therapist_id.and_then(|id| emails.get(&id)).map_or("-", String::as_str);
        let at = record.at.format(&time::format_description::well_known::Rfc3339)?;
        let or_dash = |value: Option<String>| value.unwrap_or_else(|| "-".to_owned());
        println!(
            "{}\t{at}\t{}\t{email}\t{}\t{}\t{}\t{}\t{}",
            record.seq,
            record.actor,
            record.action,
            or_dash(record.session_id.map(|id| id.to_string())),
            or_dash(record.address.clone()),
            record.outcome,
            or_dash(record.detail.clone()),
        );
        Ok(())
    })
    .await
}

/// Calls `each` on every record `filter` selects, in order, a page at a
/// time.
async fn each_record(
    store: &dyn Store,
    mut filter: TrailFilter,
    mut each: impl FnMut(&TrailRecord) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    filter.limit = PAGE;
    loop {
        let page = store.trail(&filter).await?;
        let Some(last) = page.last() else { return Ok(()) };
        filter.after = last.seq;
        page.iter().try_for_each(&mut each)?;
    }
}
