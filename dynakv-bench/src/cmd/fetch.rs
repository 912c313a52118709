//! `dynakv fetch`

use anyhow::Result;
use clap::Args;
use dynakv_models::assets;
use dynakv_models::texts::TextKind;

#[derive(Args, Debug)]
pub struct FetchArgs {
    /// Also the held-out texts of other kinds (`--corpus mail|code|mixed`),
    /// which are otherwise fetched on first use.
    #[arg(long)]
    pub texts: bool,
}

pub fn run(a: FetchArgs) -> Result<()> {
    let model = assets::default_model()?;
    let brown = assets::brown_dir()?;
    println!("model  {}", model.display());
    println!("corpus {}", brown.display());
    if a.texts {
        for kind in TextKind::ALL {
            let path = assets::ensure(kind.asset())?;
            println!("{:<6} {}", kind.to_string(), path.display());
        }
    }
    Ok(())
}
