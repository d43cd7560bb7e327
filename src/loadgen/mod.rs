//! Load and demo traffic: generated Catena lifecycles ([`scenario`]), delivered the way Catena
//! delivers them ([`send`]), and the end-to-end figures read back from PostgreSQL ([`report`]).
//!
//! For `scripts/bench.sh` (`catena-ingest bench`): CPU and memory of processes from `/proc`
//! ([`procstat`]), one JSON report per benchmark phase ([`measure`]) and the markdown summary
//! rendered from them ([`table`]).

pub mod measure;
pub mod procstat;
pub mod report;
pub mod scenario;
pub mod send;
pub mod table;
