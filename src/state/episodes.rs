//! Alert history as a function of the set of events.
//!
//! Each subject (a connection, a schedule) keeps a status timeline: every status observation an
//! event carried, with its version (event time, then event key). An alert row is an *episode*
//! of that timeline, a period of trouble:
//! - a connection's stale episode starts at a `stale` observation whose predecessor (among the
//!   `stale` and `active` ones) is not `stale`, and ends at the next `active` one (other
//!   statuses neither start nor end one);
//! - a schedule has no event that reactivates it, so its deactivations form one episode that
//!   only a person ends (`alerts resolve`); a deactivation after that starts the next one.
//!
//! Applying events only ever adds observations, so an episode can move its start earlier (a late
//! `stale` before it), end earlier (a late `active` inside it splits it in two), or appear; it
//! never vanishes. [`reconcile`] maps the episodes onto the subject's existing rows in place
//! (an existing row belongs to the episode that contains its `opened_at`), so ids, outbox rows
//! and manual resolutions survive, and the rows come out the same for any arrival order. What
//! is paged is not a function of the set, by nature: an episode seen open pages, an episode
//! first seen already over does not (it is history, not news).
//!
//! Pure functions, unit- and property-tested here; `state` reads the timelines and rows of the
//! subjects a batch touched and writes back what these return.

use chrono::{DateTime, Utc};
use uuid::Uuid;

/// An observation's version: event time, then event key (total, like the upserts' guards).
pub type Version = (DateTime<Utc>, String);

/// A connection status as far as its alert cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Health {
    Stale,
    Active,
    /// Any other Catena status (`inactive`, `deleted`, ...): neither opens nor resolves.
    Other,
}

impl Health {
    pub fn of(status: &str) -> Self {
        match status {
            "stale" => Health::Stale,
            "active" => Health::Active,
            _ => Health::Other,
        }
    }
}

/// A period of trouble, bounded by the versions of the observations that opened and ended it
/// (`resolved` is `None` while it lasts). Versions, not times: two observations of one
/// millisecond are still ordered by their keys.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Episode {
    pub opened: Version,
    pub resolved: Option<Version>,
}

impl Episode {
    pub fn opened_at(&self) -> DateTime<Utc> {
        self.opened.0
    }

    pub fn resolved_at(&self) -> Option<DateTime<Utc>> {
        self.resolved.as_ref().map(|v| v.0)
    }

    /// Whether a `stale` observation of this version lies inside. The end is inclusive: a
    /// `stale` and an `active` of one version (one event) order stale first.
    fn contains(&self, version: &Version) -> bool {
        self.opened <= *version && self.resolved.as_ref().is_none_or(|end| version <= end)
    }
}

/// A connection's stale episodes, from its observations in any order.
pub fn connection_episodes(observations: &[(Version, Health)]) -> Vec<Episode> {
    let mut timeline: Vec<&(Version, Health)> = observations
        .iter()
        .filter(|(_, health)| *health != Health::Other)
        .collect();
    // Total: one event carrying two statuses of a connection orders them stale first.
    timeline.sort_by(|a, b| (&a.0, a.1 == Health::Active).cmp(&(&b.0, b.1 == Health::Active)));
    let mut episodes: Vec<Episode> = Vec::new();
    let mut open = false;
    for (version, health) in timeline {
        match (health, open) {
            (Health::Stale, false) => {
                episodes.push(Episode {
                    opened: version.clone(),
                    resolved: None,
                });
                open = true;
            }
            (Health::Active, true) => {
                episodes.last_mut().expect("an open episode").resolved = Some(version.clone());
                open = false;
            }
            _ => {}
        }
    }
    episodes
}

/// A schedule's deactivation episodes: every deactivation belongs to the first row whose manual
/// resolution is not before it; those after the last resolution form the open episode.
/// A manual resolution's version: its time, after every key of that instant.
fn manual_end(at: DateTime<Utc>) -> Version {
    (at, char::MAX.to_string())
}

pub fn schedule_episodes(deactivations: &[Version], rows: &[AlertRow]) -> Vec<Episode> {
    let mut times = deactivations.to_vec();
    times.sort_unstable();
    let mut ends: Vec<Version> = rows
        .iter()
        .filter(|r| r.manual)
        .filter_map(|r| r.resolved_at.map(manual_end))
        .collect();
    ends.sort_unstable();
    let mut episodes = Vec::new();
    let mut times = times.into_iter().peekable();
    for end in ends {
        let mut first = None;
        while let Some(version) = times.next_if(|v| *v <= end) {
            first.get_or_insert(version);
        }
        if let Some(opened) = first {
            episodes.push(Episode {
                opened,
                resolved: Some(end),
            });
        }
    }
    if let Some(opened) = times.next() {
        episodes.push(Episode {
            opened,
            resolved: None,
        });
    }
    episodes
}

/// An existing alert row of one subject, as far as reconciling cares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AlertRow {
    pub alert_id: Uuid,
    /// The version of the observation that opened it.
    pub opened: Version,
    pub resolved_at: Option<DateTime<Utc>>,
    /// Resolved by a person: left as it is.
    pub manual: bool,
    /// An `open` notification was written for it (so its end is announced too).
    pub paged: bool,
}

/// What to write for one subject.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AlertChange {
    /// A new row; `page` when the episode is still going on.
    Insert { episode: Episode, page: bool },
    /// Move an existing row to its episode's bounds; `announce_resolve` when it was open, has
    /// paged, and is over now.
    Update {
        alert_id: Uuid,
        episode: Episode,
        announce_resolve: bool,
    },
}

/// Map `episodes` onto the subject's existing `rows` (see the module doc): the changes that
/// make the rows equal the episodes, and nothing for rows already equal.
pub fn reconcile(episodes: &[Episode], rows: &[AlertRow]) -> Vec<AlertChange> {
    let mut rows: Vec<&AlertRow> = rows.iter().collect();
    rows.sort_by(|a, b| a.opened.cmp(&b.opened));
    let mut taken = vec![false; rows.len()];
    let mut changes = Vec::new();
    for episode in episodes {
        let found = rows
            .iter()
            .enumerate()
            .find(|(i, row)| !taken[*i] && episode.contains(&row.opened));
        let Some((i, row)) = found else {
            changes.push(AlertChange::Insert {
                episode: episode.clone(),
                page: episode.resolved.is_none(),
            });
            continue;
        };
        taken[i] = true;
        let unchanged = row.opened == episode.opened && row.resolved_at == episode.resolved_at();
        if row.manual || unchanged {
            continue;
        }
        changes.push(AlertChange::Update {
            alert_id: row.alert_id,
            episode: episode.clone(),
            announce_resolve: row.resolved_at.is_none() && episode.resolved.is_some() && row.paged,
        });
    }
    changes
}

#[cfg(test)]
mod tests {
    use chrono::TimeZone;
    use proptest::prelude::*;

    use super::*;

    fn t(minute: i64) -> DateTime<Utc> {
        Utc.timestamp_opt(1_700_000_000 + minute * 60, 0).unwrap()
    }

    fn obs(minute: i64, health: Health) -> (Version, Health) {
        ((t(minute), format!("k{minute}")), health)
    }

    fn v(minute: i64) -> Version {
        (t(minute), format!("k{minute}"))
    }

    fn episode(open: i64, close: Option<i64>) -> Episode {
        Episode {
            opened: v(open),
            resolved: close.map(v),
        }
    }

    fn manual(open: i64, resolved_minute: i64) -> AlertRow {
        AlertRow {
            alert_id: Uuid::new_v4(),
            opened: v(open),
            resolved_at: Some(t(resolved_minute)),
            manual: true,
            paged: true,
        }
    }

    /// Apply `changes` to `rows` the way `state` writes them, paging like the outbox does;
    /// `ends` keeps each row's exact episode (the table keeps only the end's time).
    fn apply(
        rows: &mut Vec<AlertRow>,
        ends: &mut Vec<(Version, Option<Version>)>,
        changes: Vec<AlertChange>,
        pages: &mut Vec<&'static str>,
    ) {
        for change in changes {
            match change {
                AlertChange::Insert { episode, page } => {
                    if page {
                        pages.push("open");
                    }
                    rows.push(AlertRow {
                        alert_id: Uuid::new_v4(),
                        opened: episode.opened.clone(),
                        resolved_at: episode.resolved_at(),
                        manual: false,
                        paged: page,
                    });
                    ends.push((episode.opened, episode.resolved));
                }
                AlertChange::Update {
                    alert_id,
                    episode,
                    announce_resolve,
                } => {
                    if announce_resolve {
                        pages.push("resolve");
                    }
                    let at = rows.iter().position(|r| r.alert_id == alert_id).unwrap();
                    rows[at].opened = episode.opened.clone();
                    rows[at].resolved_at = episode.resolved_at();
                    ends[at] = (episode.opened, episode.resolved);
                }
            }
        }
    }

    /// Feed the observations batch by batch, reconciling after each, as the worker does.
    fn run(batches: &[Vec<(Version, Health)>]) -> (Vec<Episode>, Vec<&'static str>) {
        let (mut seen, mut rows, mut ends, mut pages) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for batch in batches {
            seen.extend(batch.iter().cloned());
            let changes = reconcile(&connection_episodes(&seen), &rows);
            apply(&mut rows, &mut ends, changes, &mut pages);
        }
        let mut out: Vec<Episode> = ends
            .into_iter()
            .map(|(opened, resolved)| Episode { opened, resolved })
            .collect();
        out.sort_by(|a, b| a.opened.cmp(&b.opened));
        (out, pages)
    }

    #[test]
    fn episodes_start_at_the_first_stale_and_end_at_the_next_active() {
        use Health::*;
        let timeline = [
            obs(5, Active),
            obs(1, Stale),
            obs(2, Stale),
            obs(3, Other),
            obs(7, Stale),
            obs(4, Active),
            obs(0, Active),
        ];
        assert_eq!(
            connection_episodes(&timeline),
            [episode(1, Some(4)), episode(7, None)]
        );
        assert!(connection_episodes(&[obs(1, Active), obs(2, Other)]).is_empty());
    }

    #[test]
    fn a_recovery_applied_first_still_leaves_its_resolved_row_and_does_not_page() {
        use Health::*;
        let (rows, pages) = run(&[vec![obs(2, Active)], vec![obs(1, Stale)]]);
        assert_eq!(rows, [episode(1, Some(2))]);
        assert!(
            pages.is_empty(),
            "a period already over is history: {pages:?}"
        );
        let (rows, pages) = run(&[vec![obs(1, Stale)], vec![obs(2, Active)]]);
        assert_eq!(rows, [episode(1, Some(2))]);
        assert_eq!(pages, ["open", "resolve"]);
    }

    #[test]
    fn a_late_recovery_splits_an_episode_and_a_late_stale_moves_its_start() {
        use Health::*;
        let (rows, pages) = run(&[vec![obs(1, Stale), obs(3, Stale)], vec![obs(2, Active)]]);
        assert_eq!(rows, [episode(1, Some(2)), episode(3, None)]);
        assert_eq!(pages, ["open", "resolve", "open"]);
        let (rows, pages) = run(&[vec![obs(3, Stale)], vec![obs(1, Stale)]]);
        assert_eq!(rows, [episode(1, None)]);
        assert_eq!(pages, ["open"], "the same trouble, paged once");
    }

    #[test]
    fn a_manual_resolution_is_left_alone() {
        let manual = manual(1, 9);
        assert!(reconcile(&[episode(1, None)], std::slice::from_ref(&manual)).is_empty());
        assert!(reconcile(&[episode(0, Some(4))], std::slice::from_ref(&manual)).is_empty());
    }

    #[test]
    fn schedule_deactivations_form_one_episode_until_a_person_ends_it() {
        let deactivations = [v(5), v(2), v(9)];
        assert_eq!(schedule_episodes(&deactivations, &[]), [episode(2, None)]);
        let resolved = manual(5, 6);
        let episodes = schedule_episodes(&deactivations, std::slice::from_ref(&resolved));
        assert_eq!(episodes.len(), 2);
        assert_eq!(episodes[0].opened, v(2));
        assert_eq!(episodes[0].resolved_at(), Some(t(6)));
        assert_eq!(episodes[1], episode(9, None));
        let changes = reconcile(&episodes, std::slice::from_ref(&resolved));
        assert_eq!(
            changes,
            [AlertChange::Insert {
                episode: episode(9, None),
                page: true
            }],
            "the manual row stays, the deactivation after it pages anew"
        );
    }

    fn timeline() -> impl Strategy<Value = Vec<(Version, Health)>> {
        let health = prop_oneof![
            4 => Just(Health::Stale),
            4 => Just(Health::Active),
            1 => Just(Health::Other),
        ];
        // Few distinct minutes, so equal times (ordered by key) turn up too.
        prop::collection::vec((0i64..12, 0u8..3, health), 0..24).prop_map(|items| {
            items
                .into_iter()
                .map(|(minute, key, health)| ((t(minute), format!("{key}")), health))
                .collect()
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 2000, .. ProptestConfig::default() })]

        /// Any arrival order, any batching and duplicates give the rows of the timeline itself,
        /// and the pages obey the outbox's rules: at most one open per row, a resolve only
        /// after an open, and an open row has paged.
        #[test]
        fn rows_are_a_function_of_the_set(
            (observations, shuffled) in timeline().prop_flat_map(|obs| {
                // Every observation once or twice (Catena's retries), in any order.
                let doubled: Vec<_> = obs.iter().chain(obs.iter()).cloned().collect();
                let copies = prop::sample::subsequence(doubled.clone(), obs.len()..=doubled.len());
                (Just(obs), copies.prop_shuffle())
            }),
            cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..6),
        ) {
            let mut cuts: Vec<usize> = cuts.iter().map(|c| c.index(shuffled.len() + 1)).collect();
            cuts.sort_unstable();
            let mut batches = Vec::new();
            let mut from = 0;
            for cut in cuts.into_iter().chain([shuffled.len()]) {
                batches.push(shuffled[from..cut].to_vec());
                from = cut;
            }
            // Every observation at least once: the subsequence may drop copies, so add back
            // whatever it dropped entirely.
            let missing: Vec<_> = observations.iter().filter(|o| !shuffled.contains(o)).cloned().collect();
            batches.push(missing);
            let one_by_one: Vec<_> = observations.iter().map(|o| vec![o.clone()]).collect();
            // What the table keeps: the opening version and the end's time.
            let stored = |episodes: &[Episode]| -> Vec<(Version, Option<DateTime<Utc>>)> {
                episodes.iter().map(|e| (e.opened.clone(), e.resolved_at())).collect()
            };
            let (want, _) = run(&one_by_one);
            let (got, pages) = run(&batches);
            prop_assert_eq!(stored(&got), stored(&connection_episodes(&observations)));
            prop_assert_eq!(stored(&got), stored(&want));
            let opens = pages.iter().filter(|p| **p == "open").count();
            let resolves = pages.iter().filter(|p| **p == "resolve").count();
            prop_assert!(resolves <= opens);
            let open_now = connection_episodes(&observations).iter().filter(|e| e.resolved.is_none()).count();
            prop_assert!(opens >= open_now);
        }
    }
}
