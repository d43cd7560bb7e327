//! Entity advisory locks: taken for every row a batch may write, in one sorted sweep, so
//! concurrent batches queue in one global order instead of deadlocking on row locks.

use uuid::Uuid;

use crate::envelope::{Change, Event};

/// Advisory lock keys for the rows an event can write: one per entity, salted per kind so a
/// fleet and a connection with equal ids do not share a key (a collision would only serialise).
pub(super) fn entity_locks(event: &Event) -> Vec<i64> {
    fn key(kind: u64, id: Uuid) -> i64 {
        let (hi, lo) = id.as_u64_pair();
        (hi ^ lo.rotate_left(17) ^ kind.wrapping_mul(0x9E37_79B9_7F4A_7C15)) as i64
    }
    const INVITATION: u64 = 1;
    const FLEET: u64 = 2;
    const SHARE: u64 = 3;
    const CONNECTION: u64 = 4;
    const FLEET_CONNECTION: u64 = 5;
    const SCHEDULE: u64 = 6;
    const EXECUTION: u64 = 7;
    let mut keys = Vec::new();
    match &event.change {
        Change::Invitation(_, records) => {
            for r in records {
                keys.push(key(INVITATION, r.id));
                keys.extend(r.fleet_id.map(|f| key(FLEET, f)));
            }
        }
        Change::ShareAgreement(records) => {
            for r in records {
                keys.push(key(SHARE, r.id));
                keys.push(key(FLEET, r.fleet_id));
                keys.extend(r.invitation_id.map(|i| key(INVITATION, i)));
            }
        }
        Change::Connection { records, .. } => {
            // The fleet too, when the record names one: the connection's alerts take their
            // fleet's reference, so the two must not be written by concurrent parts.
            for r in records {
                keys.push(key(CONNECTION, r.id));
                keys.extend(r.fleet_id.map(|f| key(FLEET, f)));
            }
        }
        Change::FleetConnection(records) => {
            for r in records {
                keys.push(key(FLEET_CONNECTION, r.id));
                keys.push(key(FLEET, r.fleet_id));
                keys.push(key(CONNECTION, r.connection_id));
            }
        }
        Change::ExecutionFailed(records) => {
            for r in records {
                keys.push(key(EXECUTION, r.id));
                keys.push(key(SCHEDULE, r.schedule_id));
                keys.extend(r.connection_id.map(|c| key(CONNECTION, c)));
            }
        }
        Change::ScheduleDeactivated(records) => {
            for r in records {
                keys.push(key(SCHEDULE, r.id));
                keys.push(key(CONNECTION, r.connection_id));
            }
        }
        Change::Webhook(_) | Change::Ignored => {}
    }
    keys
}

/// Split a batch into at most `parts` sub-batches that share no entity and no dedup key, so
/// they can commit in concurrent transactions without waiting on each other's locks (which
/// would serialise them again). Entities connect into components (a fleet with its
/// invitations, shares, connections, schedules and executions); events that lock nothing
/// (webhook and ignored events) form one component, since they may write the same rows
/// without an advisory lock ordering them. Components go whole to the smallest part, largest
/// first; each part keeps the batch order. Returns indexes into `events`.
pub fn partition(events: &[&Event], parts: usize) -> Vec<Vec<usize>> {
    use std::collections::HashMap;
    use std::collections::hash_map::Entry;
    if parts <= 1 || events.len() < 2 {
        return vec![(0..events.len()).collect()];
    }
    // Union-find over the events, joined through every key they share.
    fn root(parent: &mut [usize], mut i: usize) -> usize {
        while parent[i] != i {
            parent[i] = parent[parent[i]];
            i = parent[i];
        }
        i
    }
    fn join(parent: &mut [usize], a: usize, b: usize) {
        let (ra, rb) = (root(parent, a), root(parent, b));
        if ra != rb {
            parent[ra.max(rb)] = ra.min(rb);
        }
    }
    let mut parent: Vec<usize> = (0..events.len()).collect();
    let mut owner: HashMap<i64, usize> = HashMap::with_capacity(events.len() * 3);
    let mut by_key: HashMap<&str, usize> = HashMap::with_capacity(events.len());
    let mut lock_free: Option<usize> = None;
    for (i, event) in events.iter().enumerate() {
        let locks = entity_locks(event);
        if locks.is_empty() {
            match lock_free {
                Some(first) => join(&mut parent, first, i),
                None => lock_free = Some(i),
            }
        }
        for lock in locks {
            match owner.entry(lock) {
                Entry::Occupied(o) => join(&mut parent, *o.get(), i),
                Entry::Vacant(v) => {
                    v.insert(i);
                }
            }
        }
        match by_key.entry(event.key.as_str()) {
            Entry::Occupied(o) => join(&mut parent, *o.get(), i),
            Entry::Vacant(v) => {
                v.insert(i);
            }
        }
    }
    let mut components: HashMap<usize, Vec<usize>> = HashMap::new();
    for i in 0..events.len() {
        let r = root(&mut parent, i);
        components.entry(r).or_default().push(i);
    }
    let mut components: Vec<Vec<usize>> = components.into_values().collect();
    components.sort_unstable_by(|a, b| b.len().cmp(&a.len()).then(a[0].cmp(&b[0])));
    let mut split: Vec<Vec<usize>> = vec![Vec::new(); parts.min(components.len())];
    for component in components {
        let smallest = split
            .iter_mut()
            .min_by_key(|part| part.len())
            .expect("at least one part");
        smallest.extend(component);
    }
    for part in &mut split {
        part.sort_unstable();
    }
    split
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::plan::tests::{INVITATION, event};

    #[test]
    fn every_entity_an_event_writes_is_locked_and_kinds_never_share_a_key() {
        let shared_id = INVITATION;
        let share = event(
            "share_agreement.created",
            3,
            serde_json::json!({
                "id": shared_id, "fleet_id": shared_id, "invitation_id": shared_id,
                "status": "active",
            }),
        );
        let mut keys = entity_locks(&share);
        assert_eq!(keys.len(), 3, "share agreement, fleet and invitation");
        keys.sort_unstable();
        keys.dedup();
        assert_eq!(
            keys.len(),
            3,
            "the same id under three kinds gives three keys"
        );

        let invitation = event(
            "invitation.created",
            0,
            serde_json::json!({"id": shared_id, "fleet_id": shared_id}),
        );
        let invitation_keys = entity_locks(&invitation);
        assert_eq!(invitation_keys.len(), 2);
        let mut share_keys = entity_locks(&share);
        share_keys.sort_unstable();
        for key in &invitation_keys {
            assert!(
                share_keys.contains(key),
                "one entity, one key, whatever the event"
            );
        }
        let unknown = event("vehicle.added", 1, serde_json::json!({"x": 1}));
        assert!(entity_locks(&unknown).is_empty());
    }

    fn invited(minute: u32, invitation: u128, fleet: u128) -> Event {
        event(
            "invitation.created",
            minute,
            serde_json::json!({
                "id": Uuid::from_u128(invitation), "fleet_id": Uuid::from_u128(fleet),
                "fleet_ref": "FLEET-1", "created_at": "2025-11-26T10:00:00Z",
            }),
        )
    }

    /// No entity and no dedup key crosses parts; every event is in exactly one, in order.
    fn assert_independent(events: &[&Event], parts: &[Vec<usize>]) {
        let mut seen: Vec<usize> = parts.iter().flatten().copied().collect();
        seen.sort_unstable();
        assert_eq!(seen, (0..events.len()).collect::<Vec<_>>());
        for part in parts {
            assert!(part.windows(2).all(|w| w[0] < w[1]), "batch order kept");
        }
        for (a, part_a) in parts.iter().enumerate() {
            for part_b in &parts[a + 1..] {
                for &i in part_a {
                    for &j in part_b {
                        let (x, y) = (entity_locks(events[i]), entity_locks(events[j]));
                        assert_ne!(events[i].key, events[j].key, "a dedup key in two parts");
                        assert!(x.iter().all(|k| !y.contains(k)), "an entity in two parts");
                        assert!(
                            !(x.is_empty() && y.is_empty()),
                            "lock-free events in two parts"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn a_batch_splits_into_parts_that_share_no_entity_and_no_key() {
        let mut events = Vec::new();
        for fleet in 0..6u32 {
            let invitation = 100 + fleet as u128 * 2;
            events.push(invited(fleet * 2, invitation, fleet as u128));
            events.push(invited(fleet * 2 + 1, invitation + 1, fleet as u128));
        }
        // A share agreement of fleet 1 naming fleet 0's invitation joins the two fleets.
        events.push(event(
            "share_agreement.created",
            20,
            serde_json::json!({
                "id": Uuid::from_u128(900), "fleet_id": Uuid::from_u128(1),
                "invitation_id": Uuid::from_u128(100), "status": "active",
            }),
        ));
        events.push(event("vehicle.added", 21, serde_json::json!({"x": 1})));
        events.push(event("vehicle.removed", 22, serde_json::json!({"x": 2})));
        // The same event twice (a redelivery inside one batch).
        events.push(invited(4, 104, 2));
        let refs: Vec<&Event> = events.iter().collect();
        for parts in 1..=8 {
            let split = partition(&refs, parts);
            assert_independent(&refs, &split);
            // Components: fleets {0, 1}, 2, 3, 4, 5 and the two lock-free events.
            assert_eq!(split.len(), parts.min(6), "{parts} parts asked");
        }
        let sizes: Vec<usize> = partition(&refs, 2).iter().map(Vec::len).collect();
        assert!(sizes.iter().all(|&n| n >= 5), "balanced: {sizes:?}");
    }

    #[test]
    fn one_component_stays_whole() {
        let events: Vec<Event> = (0..10).map(|m| invited(m, 7, 8)).collect();
        let refs: Vec<&Event> = events.iter().collect();
        assert_eq!(partition(&refs, 4), vec![(0..10).collect::<Vec<_>>()]);
    }
}
