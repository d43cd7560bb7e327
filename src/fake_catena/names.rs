//! The `event_name` enum a create is checked against (catena-webhooks.md §5.3), and the
//! expansion of a catch-all `x.*` into one name per action.

use super::config::EventEnum;

/// The concrete names of G4's `WebhookEventNameEnum` (plus `fleet_info.*`, shown by S8's list
/// and get pages). Catch-alls are derived from these, not listed.
const NEW_ENUM: &[&str] = &[
    "dvir_log.added",
    "dvir_log.modified",
    "dvir_log.removed",
    "driver_vehicle_association.added",
    "driver_vehicle_association.modified",
    "trailer_vehicle_association.added",
    "trailer_vehicle_association.modified",
    "invitation.created",
    "invitation.rejected",
    "invitation.declined",
    "invitation.viewed",
    "invitation.sent",
    "invitation.accepted",
    "invitation.expired",
    "invitation.deleted",
    "connection.created",
    "connection.staled",
    "fleet_connection.created",
    "fleet_info.added",
    "fleet_info.modified",
    "fleet_info.removed",
    "share_agreement.created",
    "share_agreement.updated",
    "share_agreement.deleted",
    "webhook.created",
    "webhook.updated",
    "webhook.deleted",
    "webhook.staled",
    "webhook.activated",
    "webhook.paused",
    "workflow.added",
    "workflow.modified",
    "workflow.removed",
    "tsp.created",
    "tsp.requested",
    "vehicle.added",
    "vehicle.modified",
    "vehicle.removed",
    "trailer.added",
    "trailer.modified",
    "trailer.removed",
    "trailer_location.added",
    "trailer_location.modified",
    "trailer_status.added",
    "trailer_status.modified",
    "execution.created",
    "execution.staled",
    "execution.failed",
    "schedule.deactivated",
    "user.added",
    "user.modified",
    "user.removed",
    "vehicle_location.added",
    "ifta_summary.added",
    "ifta_summary.modified",
    "ifta_summary.removed",
    "hos_availability.added",
    "hos_availability.modified",
    "hos_availability.removed",
    "hos_daily_snapshot.added",
    "hos_daily_snapshot.modified",
    "hos_daily_snapshot.removed",
    "hos_event.added",
    "hos_event.modified",
    "hos_event.removed",
    "hos_violation.added",
    "hos_violation.modified",
    "hos_violation.removed",
    "engine_log.added",
    "engine_log.modified",
    "engine_log.removed",
    "engine_status.added",
    "engine_status.modified",
    "group_message.added",
    "group_message.modified",
    "message.added",
    "message.modified",
    "fuel_transaction.added",
    "fuel_transaction.modified",
    "resource_operation.created",
    "resource_operation.succeeded",
    "resource_operation.failed",
];

/// What the older spec (G4 `WebhookEventName.md`, G1 @43cdb44) lacks.
const NOT_IN_OLD_ENUM: &[&str] = &[
    "webhook.activated",
    "webhook.paused",
    "tsp.requested",
    "dvir_log.",
    "workflow.",
    "trailer_status.",
    "engine_status.",
    "message.",
    "fuel_transaction.",
    "resource_operation.",
];

fn names(which: EventEnum) -> impl Iterator<Item = &'static str> {
    NEW_ENUM.iter().copied().filter(move |name| {
        which == EventEnum::New
            || !NOT_IN_OLD_ENUM
                .iter()
                .any(|gone| name == gone || (gone.ends_with('.') && name.starts_with(gone)))
    })
}

/// The concrete names an `event_name` of a create stands for: itself, or every action of a
/// catch-all `x.*`. `None` when the enum has no such name.
pub fn expand(event_name: &str, which: EventEnum) -> Option<Vec<&'static str>> {
    let matched: Vec<&'static str> = match event_name.strip_suffix('*') {
        Some(prefix) if prefix.ends_with('.') => {
            names(which).filter(|n| n.starts_with(prefix)).collect()
        }
        _ => names(which).filter(|n| *n == event_name).collect(),
    };
    (!matched.is_empty()).then_some(matched)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catena::model::DESIRED_EVENTS;

    fn is_known(event_name: &str, which: EventEnum) -> bool {
        expand(event_name, which).is_some()
    }

    #[test]
    fn the_new_enum_has_our_desired_set_and_the_old_lacks_activated_and_paused() {
        assert!(DESIRED_EVENTS.iter().all(|n| is_known(n, EventEnum::New)));
        assert!(!is_known("webhook.activated", EventEnum::Old));
        assert!(!is_known("webhook.paused", EventEnum::Old));
        assert!(is_known("webhook.staled", EventEnum::Old));
        assert!(!is_known("message.added", EventEnum::Old));
        assert!(is_known("group_message.added", EventEnum::Old));
    }

    #[test]
    fn catch_alls_expand_to_every_action() {
        assert_eq!(
            expand("webhook.*", EventEnum::New).unwrap().len(),
            6,
            "created updated deleted staled activated paused"
        );
        assert_eq!(expand("webhook.*", EventEnum::Old).unwrap().len(), 4);
        assert_eq!(
            expand("schedule.deactivated", EventEnum::New),
            Some(vec!["schedule.deactivated"])
        );
        assert_eq!(expand("nope.*", EventEnum::New), None);
        assert_eq!(expand("vehicle.crashed", EventEnum::New), None);
    }
}
