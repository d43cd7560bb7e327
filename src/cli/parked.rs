//! `catena-ingest parked list | show | replay | purge`

use std::time::Duration;

use anyhow::bail;
use clap::{Args, Subcommand};

use catena_ingest::config::{BrokerSettings, DedupRetention, human_duration, parse_duration};
use catena_ingest::ops::parked::{self, Filter, ReplayOptions};

#[derive(Args, Debug)]
pub struct Parked {
    #[command(flatten)]
    broker: BrokerSettings,
    #[command(subcommand)]
    command: ParkedCommand,
}

#[derive(Args, Debug, Clone)]
struct FilterArgs {
    /// Only this event name (routing key).
    #[arg(long = "event")]
    event_name: Option<String>,
    /// Only this park reason (malformed, invalid_record, unsupported_version, retries_exhausted,
    /// rejected_by_database, handler_panic, broker:delivery_limit, ...).
    #[arg(long)]
    reason: Option<String>,
    /// Only messages parked at least this long ago (e.g. 10m, 2h).
    #[arg(long, value_parser = parse_duration)]
    older_than: Option<Duration>,
}

impl FilterArgs {
    fn filter(self, id: Option<String>) -> Filter {
        Filter {
            event_name: self.event_name,
            reason: self.reason,
            older_than: self.older_than,
            id,
        }
    }
}

#[derive(Subcommand, Debug)]
enum ParkedCommand {
    /// List parked messages (nothing is changed).
    List {
        #[command(flatten)]
        filter: FilterArgs,
        #[arg(long, default_value_t = 100)]
        limit: usize,
        #[arg(long)]
        json: bool,
    },
    /// Show one message: headers, reason, attempts, and the body with secrets masked.
    Show { id: String },
    /// Republish matching messages to the events exchange (confirmed), then drop the parked copy.
    /// Messages received longer ago than RETENTION_DEDUP_KEYS less a day are left parked (their
    /// dedup keys may be pruned, so a duplicate could apply twice) unless --force.
    Replay {
        #[command(flatten)]
        filter: FilterArgs,
        /// Only this message.
        #[arg(long)]
        id: Option<String>,
        /// Count what would be replayed; change nothing.
        #[arg(long)]
        dry_run: bool,
        /// Replays per second (0 = unlimited).
        #[arg(long, default_value_t = 0.0)]
        rate: f64,
        /// Also replay messages older than the dedup horizon. Their dedup keys may be gone: an
        /// event that was applied already (through Catena's own retry) may apply a second time.
        #[arg(long)]
        force: bool,
        /// The workers' dedup-key retention (the same variables as the worker's).
        #[command(flatten)]
        dedup: DedupRetention,
    },
    /// Delete matching messages for good.
    Purge {
        #[command(flatten)]
        filter: FilterArgs,
        #[arg(long)]
        id: Option<String>,
        /// Required: purging cannot be undone.
        #[arg(long)]
        yes: bool,
    },
}

impl Parked {
    pub async fn run(self) -> anyhow::Result<()> {
        let names = self.broker.names();
        let url = &self.broker.amqp_url;
        match self.command {
            ParkedCommand::List {
                filter,
                limit,
                json,
            } => {
                let mut found = parked::list(url, &names, &filter.filter(None), limit).await?;
                if json {
                    println!("{}", serde_json::to_string_pretty(&found)?);
                } else {
                    for p in &mut found {
                        p.headers.remove("body");
                    }
                    print_table(&found);
                }
            }
            ParkedCommand::Show { id } => {
                let filter = Filter {
                    id: Some(id.clone()),
                    ..Default::default()
                };
                let found = parked::list(url, &names, &filter, 1).await?;
                let Some(p) = found.first() else {
                    bail!("no parked message with id {id}");
                };
                let mut headers = p.headers.clone();
                let body = headers.remove("body").unwrap_or_default();
                println!(
                    "id:        {}\nevent:     {}\nreason:    {}\ndetail:    {}\nparked_at: {}\nreceived:  {}\nattempts:  {}",
                    p.id,
                    p.event_name,
                    p.reason,
                    p.detail.as_deref().unwrap_or("-"),
                    p.parked_at
                        .map(|t| t.to_rfc3339())
                        .unwrap_or_else(|| "-".into()),
                    p.received_at
                        .map(|t| t.to_rfc3339())
                        .unwrap_or_else(|| "-".into()),
                    p.attempts
                        .map(|a| a.to_string())
                        .unwrap_or_else(|| "-".into())
                );
                println!("headers:\n{}", serde_json::to_string_pretty(&headers)?);
                println!("body (secrets masked):\n{}", body.as_str().unwrap_or(""));
            }
            ParkedCommand::Replay {
                filter,
                id,
                dry_run,
                rate,
                force,
                dedup,
            } => {
                dedup.validate().map_err(anyhow::Error::msg)?;
                let options = ReplayOptions {
                    dry_run,
                    rate,
                    force,
                    ..ReplayOptions::new(&dedup)
                };
                let report = parked::replay(url, &names, &filter.filter(id), &options).await?;
                println!(
                    "{}examined={} matched={} replayed={} too_old={} forced={}",
                    if dry_run { "dry run: " } else { "" },
                    report.examined,
                    report.matched,
                    report.replayed,
                    report.too_old,
                    report.forced
                );
                warn_too_old(&report, &options);
                if report.too_old > 0 {
                    bail!(
                        "{} parked message(s) received more than {} ago were NOT replayed: the \
                         workers keep dedup keys for {} (RETENTION_DEDUP_KEYS), so a duplicate \
                         of one of them may already be applied and would apply again. Check the \
                         fleet state first (`catena-ingest fleet show`); replay them with --force \
                         or drop them with `parked purge`",
                        report.too_old,
                        human_duration(options.max_age),
                        human_duration(dedup.keys)
                    );
                }
            }
            ParkedCommand::Purge { filter, id, yes } => {
                if !yes {
                    bail!("purge deletes parked messages for good: add --yes");
                }
                let report = parked::purge(url, &names, &filter.filter(id)).await?;
                println!("examined={} purged={}", report.examined, report.purged);
            }
        }
        Ok(())
    }
}

/// Name the messages older than the dedup horizon on stderr, loudly.
fn warn_too_old(report: &parked::Report, options: &ReplayOptions) {
    if report.refused.is_empty() {
        return;
    }
    let what = if options.force {
        "REPLAYED ANYWAY (--force)"
    } else {
        "LEFT PARKED"
    };
    eprintln!(
        "WARNING: {} message(s) are older than the dedup horizon ({}) and were {what}:",
        report.too_old + report.forced,
        human_duration(options.max_age)
    );
    for old in &report.refused {
        eprintln!(
            "  {}  {}  received {}  ({} old)",
            old.id,
            old.event_name,
            old.received_at
                .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
                .unwrap_or_else(|| "-".into()),
            human_duration(std::time::Duration::from_secs(old.age_seconds))
        );
    }
    let listed = report.refused.len() as u64;
    if report.too_old + report.forced > listed {
        eprintln!("  ... and {} more", report.too_old + report.forced - listed);
    }
}

/// Print a table of parked messages.
fn print_table(items: &[parked::Parked]) {
    println!(
        "{:<36}  {:<26}  {:<22}  {:<25}  {:>8}",
        "ID", "EVENT", "REASON", "PARKED_AT", "ATTEMPTS"
    );
    for p in items {
        println!(
            "{:<36}  {:<26}  {:<22}  {:<25}  {:>8}",
            p.id,
            p.event_name,
            p.reason,
            p.parked_at
                .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
                .unwrap_or_else(|| "-".into()),
            p.attempts
                .map(|a| a.to_string())
                .unwrap_or_else(|| "-".into())
        );
    }
    println!("({} messages)", items.len());
}
