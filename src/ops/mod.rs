//! The operator's commands, as a library: what `parked`, `fleet`, `alerts` and `ignored` do, returning
//! data (printing is the CLI's job), so tests drive them the way an operator does.

pub mod alerts;
pub mod fleet;
pub mod ignored;
pub mod parked;
