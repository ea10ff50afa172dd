//! `haven backup` and `haven restore`: a SQLite database copied while Haven
//! serves it, and put back into a stopped deployment
//! (`haven_store::backup`).

use std::path::Path;

use haven_store::backup::{self, BackupSummary};

pub async fn backup(database: &str, to: &Path) -> anyhow::Result<()> {
    let summary = backup::backup(database, to).await?;
    println!("Backed up to {}: {}; integrity check ok.", to.display(), counts(&summary));
    Ok(())
}

pub async fn restore(database: &str, from: &Path) -> anyhow::Result<()> {
    let (summary, replaced) = backup::restore(database, from).await?;
    println!("Restored {}: {}; integrity check ok.", from.display(), counts(&summary));
    if let Some(replaced) = replaced {
        println!("The database it replaced is kept as {}.", replaced.display());
    }
    Ok(())
}

fn counts(summary: &BackupSummary) -> String {
    format!("{} chat sessions, {} messages", summary.sessions, summary.messages)
}
