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
            keys.extend(records.iter().map(|r| key(CONNECTION, r.id)));
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
}
