//! The calculator's tools: expressions evaluated by exmex, and unit conversion over a table of
//! linear units plus the temperature scales.

/// An expression.
#[derive(serde::Deserialize, schemars::JsonSchema)]
pub struct ExprArg {
    /// The expression, e.g. "(2+3)*4^2" or "sqrt(2)".
    #[schemars(pattern(r"^[-(0-9a-z][-+*/^()., 0-9a-z]{0,59}$"))]
    pub expression: String,
}

/// A conversion.
#[derive(serde::Deserialize, schemars::JsonSchema)]
pub struct ConvertArg {
    /// The amount.
    pub value: f64,
    /// Its unit, e.g. "km", "lb", "h", "celsius".
    #[schemars(pattern(r"^[a-z]{1,12}$"))]
    pub from: String,
    /// The unit wanted.
    #[schemars(pattern(r"^[a-z]{1,12}$"))]
    pub to: String,
}

/// Evaluates `expression`.
pub fn evaluate(expression: &str) -> Result<String, String> {
    let v = exmex::eval_str::<f64>(expression).map_err(|e| format!("{expression:?}: {e}"))?;
    if !v.is_finite() {
        return Err(format!("{expression:?} has no finite value"));
    }
    Ok(format_number(v))
}

fn format_number(v: f64) -> String {
    if v.fract() == 0.0 && v.abs() < 1e15 {
        format!("{}", v as i64)
    } else {
        format!("{v:.6}").trim_end_matches('0').to_owned()
    }
}

/// (unit names, dimension, size in the dimension's base unit).
const UNITS: &[(&[&str], &str, f64)] = &[
    (&["m", "meter", "meters", "metre"], "length", 1.0),
    (&["km", "kilometer", "kilometers"], "length", 1000.0),
    (&["cm", "centimeter", "centimeters"], "length", 0.01),
    (&["mi", "mile", "miles"], "length", 1609.344),
    (&["ft", "foot", "feet"], "length", 0.3048),
    (&["in", "inch", "inches"], "length", 0.0254),
    (&["kg", "kilogram", "kilograms"], "mass", 1.0),
    (&["g", "gram", "grams"], "mass", 0.001),
    (&["lb", "lbs", "pound", "pounds"], "mass", 0.453_592_37),
    (&["s", "sec", "second", "seconds"], "time", 1.0),
    (&["min", "minute", "minutes"], "time", 60.0),
    (&["h", "hour", "hours"], "time", 3600.0),
    (&["day", "days"], "time", 86400.0),
];

fn kelvin(value: f64, unit: &str) -> Option<f64> {
    match unit {
        "c" | "celsius" => Some(value + 273.15),
        "f" | "fahrenheit" => Some((value - 32.0) * 5.0 / 9.0 + 273.15),
        "k" | "kelvin" => Some(value),
        _ => None,
    }
}

fn from_kelvin(k: f64, unit: &str) -> Option<f64> {
    match unit {
        "c" | "celsius" => Some(k - 273.15),
        "f" | "fahrenheit" => Some((k - 273.15) * 9.0 / 5.0 + 32.0),
        "k" | "kelvin" => Some(k),
        _ => None,
    }
}

/// Converts `value` from `from` to `to`.
pub fn convert(value: f64, from: &str, to: &str) -> Result<String, String> {
    let (f, t) = (from.trim().to_lowercase(), to.trim().to_lowercase());
    if let (Some(k), true) = (kelvin(value, &f), from_kelvin(0.0, &t).is_some()) {
        let v = from_kelvin(k, &t).expect("checked");
        return Ok(format!("{} {to}", format_number((v * 1e6).round() / 1e6)));
    }
    let find = |u: &str| UNITS.iter().find(|(names, _, _)| names.contains(&u));
    let (Some(a), Some(b)) = (find(&f), find(&t)) else {
        return Err(format!(
            "unknown unit: {}",
            if find(&f).is_none() { from } else { to }
        ));
    };
    if a.1 != b.1 {
        return Err(format!(
            "cannot convert {} ({}) to {} ({})",
            from, a.1, to, b.1
        ));
    }
    let v = value * a.2 / b.2;
    Ok(format!("{} {to}", format_number((v * 1e6).round() / 1e6)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expressions_and_units() {
        assert_eq!(evaluate("(2+3)*4^2").unwrap(), "80");
        assert_eq!(evaluate("12*7").unwrap(), "84");
        assert!(evaluate("2 +* 3").is_err());
        assert!(evaluate("1/0").is_err());
        assert_eq!(convert(5.0, "km", "m").unwrap(), "5000 m");
        assert_eq!(
            convert(100.0, "celsius", "fahrenheit").unwrap(),
            "212 fahrenheit"
        );
        assert!(convert(1.0, "kg", "m")
            .unwrap_err()
            .contains("cannot convert"));
        assert!(convert(1.0, "parsec", "m")
            .unwrap_err()
            .contains("unknown unit"));
    }
}
