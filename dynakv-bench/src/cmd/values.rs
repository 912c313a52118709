//! Value parsers for numeric options: a value out of its range is refused
//! when the command line is parsed, before a model loads, with the option's
//! name and the range in clap's one-line error.
//!
//! Why: a zero context, a NaN learning rate or a depth of 1.5 used to reach
//! the library (a panic, a division by zero, an all-NaN artifact written
//! with exit code 0). Each option names the parser that states its range.

/// A count that must be at least one (`--ctx`, `--reps`, `--steps`, ...).
pub fn at_least_one(s: &str) -> Result<usize, String> {
    let n: usize = s
        .trim()
        .parse()
        .map_err(|e| format!("`{s}` is not a whole number: {e}"))?;
    if n == 0 {
        return Err("must be at least 1".into());
    }
    Ok(n)
}

fn finite(s: &str) -> Result<f64, String> {
    let x: f64 = s
        .trim()
        .parse()
        .map_err(|e| format!("`{s}` is not a number: {e}"))?;
    if !x.is_finite() {
        return Err(format!("`{s}` is not a finite number"));
    }
    Ok(x)
}

/// A fraction in (0, 1] (`--budget`, `--target`).
pub fn fraction(s: &str) -> Result<f64, String> {
    let x = finite(s)?;
    if !(x > 0.0 && x <= 1.0) {
        return Err(format!("{x} is not in (0, 1]"));
    }
    Ok(x)
}

/// A number in [0, 1] (`--keep-threshold`, a needle depth).
pub fn unit(s: &str) -> Result<f64, String> {
    let x = finite(s)?;
    if !(0.0..=1.0).contains(&x) {
        return Err(format!("{x} is not in [0, 1]"));
    }
    Ok(x)
}

/// A fraction removed in [0, 1) (`--snapkv`: 1 would keep nothing).
pub fn removed_fraction(s: &str) -> Result<f64, String> {
    let x = finite(s)?;
    if !(0.0..1.0).contains(&x) {
        return Err(format!("{x} is not in [0, 1)"));
    }
    Ok(x)
}

/// A finite number above zero (`--lr`, `--key-factor`).
pub fn positive(s: &str) -> Result<f64, String> {
    let x = finite(s)?;
    if x <= 0.0 {
        return Err(format!("{x} must be above 0"));
    }
    Ok(x)
}

/// A finite number at or above zero (`--alpha`, `--temperature`).
pub fn non_negative(s: &str) -> Result<f64, String> {
    let x = finite(s)?;
    if x < 0.0 {
        return Err(format!("{x} must not be negative"));
    }
    Ok(x)
}

/// As [`positive`], for f32 options.
pub fn positive_f32(s: &str) -> Result<f32, String> {
    narrow(positive(s)?)
}

/// As [`non_negative`], for f32 options.
pub fn non_negative_f32(s: &str) -> Result<f32, String> {
    narrow(non_negative(s)?)
}

/// A fraction in (0, 1], for f32 options (`--top-p`).
pub fn fraction_f32(s: &str) -> Result<f32, String> {
    narrow(fraction(s)?)
}

fn narrow(x: f64) -> Result<f32, String> {
    let y = x as f32;
    if !y.is_finite() {
        return Err(format!("{x} is out of range"));
    }
    Ok(y)
}

/// Any `FromStr` value, its error as text (for [`list`] of enums).
pub fn parsed<T: std::str::FromStr>(s: &str) -> Result<T, String>
where
    T::Err: std::fmt::Display,
{
    s.parse().map_err(|e: T::Err| e.to_string())
}

/// A comma-separated list whose entries each pass `one`; empty entries are
/// skipped, and a list with none is refused when `non_empty`.
pub fn list<T>(
    s: &str,
    what: &str,
    non_empty: bool,
    one: impl Fn(&str) -> Result<T, String>,
) -> anyhow::Result<Vec<T>> {
    let out = s
        .split(',')
        .map(str::trim)
        .filter(|x| !x.is_empty())
        .map(|x| one(x).map_err(|e| anyhow::anyhow!("bad {what} `{x}`: {e}")))
        .collect::<anyhow::Result<Vec<T>>>()?;
    if non_empty && out.is_empty() {
        anyhow::bail!("no {what} given (`{s}`)");
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_hold_at_their_edges() {
        assert_eq!(at_least_one("1"), Ok(1));
        for bad in ["0", "-1", "1.5", "", "x"] {
            assert!(at_least_one(bad).is_err(), "{bad}");
        }
        assert_eq!(fraction("1"), Ok(1.0));
        for bad in ["0", "1.01", "NaN", "inf", "-0.5"] {
            assert!(fraction(bad).is_err(), "{bad}");
        }
        assert_eq!(unit("0"), Ok(0.0));
        assert!(unit("1.5").is_err() && unit("nan").is_err());
        assert_eq!(removed_fraction("0"), Ok(0.0));
        assert!(removed_fraction("1").is_err());
        assert!(positive("0").is_err() && positive("NaN").is_err());
        assert_eq!(non_negative("0"), Ok(0.0));
        assert!(non_negative("-1e-9").is_err());
        assert!(positive_f32("1e300").is_err());
        assert!(fraction_f32("0.9").is_ok());
    }

    #[test]
    fn lists_name_the_bad_entry() {
        assert_eq!(list("0.1, 0.5,", "depth", true, unit).unwrap(), [0.1, 0.5]);
        let e = list("0.1,1.5", "depth", true, unit)
            .unwrap_err()
            .to_string();
        assert!(e.contains("depth") && e.contains("1.5"), "{e}");
        assert!(list(" , ", "depth", true, unit).is_err());
        assert!(list("", "budget", false, fraction).unwrap().is_empty());
    }
}
