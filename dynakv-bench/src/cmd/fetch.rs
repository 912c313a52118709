//! `dynakv fetch`

use anyhow::Result;
use clap::Args;
use dynakv_models::assets::{self, KnownModel};
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
    /// The model to fetch by name (`smollm2-135m`, the default, or
    /// `gemma3-270m`); `all` fetches every one.
    #[arg(long, default_value = "smollm2-135m", value_parser = model_names)]
    pub model: String,
}

/// `--model`: a known model's name or `all`.
fn model_names(s: &str) -> Result<String, String> {
    if s == "all" || KnownModel::from_name(s).is_some() {
        return Ok(s.to_string());
    }
    let names: Vec<&str> = KnownModel::ALL.iter().map(|m| m.name()).collect();
    Err(format!(
        "`{s}` is not a model this command fetches (names: {}, all)",
        names.join(", ")
    ))
}

pub fn run(a: FetchArgs) -> Result<()> {
    let get = |spec: &assets::AssetSpec| {
        if a.verify {
            assets::verify(spec)
        } else {
            assets::ensure(spec)
        }
    };
    let models: Vec<KnownModel> = match KnownModel::from_name(&a.model) {
        Some(m) => vec![m],
        None => KnownModel::ALL.to_vec(),
    };
    for m in models {
        let path = if a.verify { m.verify()? } else { m.ensure()? };
        println!("model  {} ({})", path.display(), m.name());
    }
    let brown = get(&assets::BROWN)?;
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
