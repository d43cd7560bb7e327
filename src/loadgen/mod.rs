//! Load and demo traffic: generated Catena lifecycles ([`scenario`]), delivered the way Catena
//! delivers them ([`send`]), and the end-to-end figures read back from PostgreSQL ([`report`]).

pub mod report;
pub mod scenario;
pub mod send;
