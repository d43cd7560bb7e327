//! `catena-ingest fleet show`: one fleet's onboarding, connections, schedules, alerts and last
//! events, straight from the read model. Magic links and tokens are never printed.

use serde::Serialize;
use serde_json::{Map, Value};
use uuid::Uuid;

use crate::store::DbError;

#[derive(Debug, Serialize)]
pub struct FleetView {
    pub fleet: Value,
    pub invitation: Value,
    pub share_agreement: Value,
    pub connections: Vec<Value>,
    pub schedules: Vec<Value>,
    pub open_alerts: Vec<Value>,
    pub last_events: Vec<Value>,
}

fn to_json(row: &tokio_postgres::Row) -> Value {
    let mut map = Map::new();
    for (i, column) in row.columns().iter().enumerate() {
        let value: Option<String> = row.get(i);
        map.insert(
            column.name().to_owned(),
            value.map_or(Value::Null, Value::String),
        );
    }
    Value::Object(map)
}

async fn rows(
    client: &tokio_postgres::Client,
    sql: &str,
    fleet_id: &Uuid,
) -> Result<Vec<Value>, DbError> {
    Ok(client
        .query(sql, &[fleet_id])
        .await?
        .iter()
        .map(to_json)
        .collect())
}

/// Find a fleet by `fleet_id` or `fleet_ref` (also through an invitation that has no fleet yet).
pub async fn show(
    client: &tokio_postgres::Client,
    ref_or_id: &str,
) -> Result<Option<FleetView>, DbError> {
    let as_uuid = Uuid::parse_str(ref_or_id).ok();
    let fleet_id: Option<Uuid> = client
        .query_opt(
            "SELECT fleet_id FROM fleets WHERE fleet_id = $1 OR fleet_ref = $2
             UNION ALL SELECT fleet_id FROM invitations WHERE fleet_ref = $2 AND fleet_id IS NOT NULL
             LIMIT 1",
            &[&as_uuid, &ref_or_id],
        )
        .await?
        .map(|r| r.get(0));
    let Some(fleet_id) = fleet_id else {
        // Invited but never accepted: only the invitation exists.
        let invitation = client
            .query_opt(
                "SELECT invitation_id::text, fleet_ref, status, decline_reason, expires_at::text, updated_at::text
                 FROM invitations WHERE fleet_ref = $1 OR invitation_id::text = $1 ORDER BY updated_at DESC LIMIT 1",
                &[&ref_or_id],
            )
            .await?;
        return Ok(invitation.map(|row| FleetView {
            fleet: Value::Null,
            invitation: to_json(&row),
            share_agreement: Value::Null,
            connections: Vec::new(),
            schedules: Vec::new(),
            open_alerts: Vec::new(),
            last_events: Vec::new(),
        }));
    };
    let one = |mut v: Vec<Value>| v.pop().unwrap_or(Value::Null);
    Ok(Some(FleetView {
        fleet: one(rows(client, "SELECT fleet_id::text, fleet_ref, onboarding_status, share_status, invitation_id::text, share_agreement_id::text, first_seen_at::text FROM fleets WHERE fleet_id = $1", &fleet_id).await?),
        invitation: one(rows(client, "SELECT invitation_id::text, fleet_ref, status, decline_reason, expires_at::text, accepted_at::text, updated_at::text FROM invitations WHERE fleet_id = $1 ORDER BY updated_at DESC LIMIT 1", &fleet_id).await?),
        share_agreement: one(rows(client, "SELECT share_agreement_id::text, status, scopes::text, effective_date::text, expiration_date::text, updated_at::text FROM share_agreements WHERE fleet_id = $1 ORDER BY updated_at DESC LIMIT 1", &fleet_id).await?),
        connections: rows(client, "SELECT c.connection_id::text, c.source_name, c.status, c.staled_at::text, c.updated_at::text FROM connections c WHERE c.fleet_id = $1 OR c.connection_id IN (SELECT connection_id FROM fleet_connections WHERE fleet_id = $1) ORDER BY c.connection_id", &fleet_id).await?,
        schedules: rows(client, "SELECT s.schedule_id::text, s.connection_id::text, s.resource, s.status, s.failed_executions::text, s.last_failed_at::text, s.deactivated_at::text FROM schedules s JOIN connections c ON c.connection_id = s.connection_id WHERE c.fleet_id = $1 ORDER BY s.schedule_id", &fleet_id).await?,
        open_alerts: rows(client, "SELECT alert_id::text, kind, subject_id::text, opened_at::text FROM alerts WHERE fleet_id = $1 AND state = 'open' ORDER BY opened_at", &fleet_id).await?,
        last_events: rows(client, "SELECT event_name, event_time::text, processed_at::text, outcome FROM webhook_events WHERE fleet_id = $1 ORDER BY event_time DESC LIMIT 10", &fleet_id).await?,
    }))
}
