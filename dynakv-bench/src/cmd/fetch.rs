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
    /// Re-hash every cached asset against the stamp written when it was
    /// fetched (normally only a changed size or modification time does).
    #[arg(long)]
    pub verify: bool,
}

pub fn run(a: FetchArgs) -> Result<()> {
    let get = |spec: &assets::AssetSpec| {
        if a.verify {
            assets::verify(spec)
        } else {
            assets::ensure(spec)
        }
    };
    let model = get(&assets::SMOLLM2)?;
    let brown = get(&assets::BROWN)?;
    println!("model  {}", model.display());
    println!("corpus {}", brown.display());
    if a.texts {
        for kind in TextKind::ALL {
            let path = get(kind.asset())?;
            println!("{:<6} {}", kind.to_string(), path.display());
        }
    }
    if a.verify {
        println!("verified: every asset above hashes as when it was fetched");
    }
    Ok(())
}
