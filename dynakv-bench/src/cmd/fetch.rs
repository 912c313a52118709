//! `dynakv fetch`

use anyhow::Result;
use dynakv_models::assets;

pub fn run() -> Result<()> {
    let model = assets::default_model()?;
    let brown = assets::brown_dir()?;
    println!("model  {}", model.display());
    println!("corpus {}", brown.display());
    Ok(())
}
