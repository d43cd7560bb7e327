//! `catena-ingest migrate`

use clap::Args;

use catena_ingest::config::DatabaseSettings;

#[derive(Args, Debug)]
pub struct Migrate {
    #[command(flatten)]
    database: DatabaseSettings,
}

impl Migrate {
    pub async fn run(self) -> anyhow::Result<()> {
        let applied = catena_ingest::store::migrate(&self.database.database_url).await?;
        println!("migrations applied: {applied:?} (none means up to date)");
        Ok(())
    }
}
