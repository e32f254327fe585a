//! The driver's configuration: JSON in the environment variable `KEEPNET_DRIVER_CONFIG`.
//!
//! ```json
//! {"backend": "tap"}
//! {"backend": "wire", "side": "a"}
//! {"backend": "wire", "side": "b", "faults": {"seed": 7, "loss": 0.01, "delay": 0.1, "delay_us": 500}}
//! ```
//!
//! An unset or empty variable means `{"backend": "tap"}`. Errors name the bad field.
#![deny(unsafe_code)]

use serde::Deserialize;

use crate::wire::{FaultConfig, Side};

/// The environment variable read by [`DriverConfig::from_env`].
pub const ENV: &str = "KEEPNET_DRIVER_CONFIG";

/// Which link the driver serves.
#[derive(Clone, Debug, PartialEq)]
pub enum DriverConfig {
    /// The TAP device handed over as fd `tap`.
    Tap,
    /// One side of the memory wire handed over as region `wire`.
    Wire {
        side: Side,
        /// Faults this side injects into what it sends.
        faults: FaultConfig,
    },
}

/// Why the configuration was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{ENV}: {0}")]
pub struct ConfigError(pub String);

#[derive(Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
enum Backend {
    Tap,
    Wire,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Raw {
    backend: Backend,
    side: Option<Side>,
    faults: Option<FaultConfig>,
}

impl DriverConfig {
    /// Parses the JSON text.
    pub fn parse(text: &str) -> Result<DriverConfig, ConfigError> {
        if text.trim().is_empty() {
            return Ok(DriverConfig::Tap);
        }
        let de = &mut serde_json::Deserializer::from_str(text);
        let raw: Raw = serde_path_to_error::deserialize(de).map_err(|e| {
            let path = e.path().to_string();
            if path == "." || path.is_empty() {
                ConfigError(e.inner().to_string())
            } else {
                ConfigError(format!("field `{path}`: {}", e.inner()))
            }
        })?;
        match raw.backend {
            Backend::Tap => {
                if raw.side.is_some() {
                    return Err(ConfigError(
                        "field `side` applies to backend \"wire\" only".into(),
                    ));
                }
                if raw.faults.is_some() {
                    return Err(ConfigError(
                        "field `faults` applies to backend \"wire\" only".into(),
                    ));
                }
                Ok(DriverConfig::Tap)
            }
            Backend::Wire => {
                let side = raw.side.ok_or_else(|| {
                    ConfigError(
                        "field `side` (\"a\" or \"b\") is required for backend \"wire\"".into(),
                    )
                })?;
                let faults = raw.faults.unwrap_or_default();
                faults.validate().map_err(ConfigError)?;
                Ok(DriverConfig::Wire { side, faults })
            }
        }
    }

    /// Reads [`ENV`]; unset means TAP.
    pub fn from_env() -> Result<DriverConfig, ConfigError> {
        match std::env::var(ENV) {
            Ok(v) => DriverConfig::parse(&v),
            Err(std::env::VarError::NotPresent) => Ok(DriverConfig::Tap),
            Err(std::env::VarError::NotUnicode(_)) => Err(ConfigError("not UTF-8".into())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn good_configs() {
        assert_eq!(DriverConfig::parse("").unwrap(), DriverConfig::Tap);
        assert_eq!(
            DriverConfig::parse(r#"{"backend":"tap"}"#).unwrap(),
            DriverConfig::Tap
        );
        assert_eq!(
            DriverConfig::parse(r#"{"backend":"wire","side":"a"}"#).unwrap(),
            DriverConfig::Wire {
                side: Side::A,
                faults: FaultConfig::none()
            }
        );
        let c = DriverConfig::parse(
            r#"{"backend":"wire","side":"b","faults":{"seed":7,"loss":0.25,"delay_us":5}}"#,
        )
        .unwrap();
        let DriverConfig::Wire { side, faults } = c else {
            panic!("not wire")
        };
        assert_eq!(side, Side::B);
        assert_eq!((faults.seed, faults.loss, faults.delay_us), (7, 0.25, 5));
        assert_eq!(faults.reorder_hold_us, FaultConfig::none().reorder_hold_us);
    }

    #[test]
    fn bad_configs_name_the_field() {
        let cases = [
            (r#"{"backend":"tape"}"#, "backend"),
            (r#"{"backend":"wire"}"#, "side"),
            (r#"{"backend":"wire","side":"c"}"#, "side"),
            (r#"{"backend":"tap","side":"a"}"#, "side"),
            (r#"{"backend":"tap","mtu":1500}"#, "mtu"),
            (
                r#"{"backend":"wire","side":"a","faults":{"loss":"x"}}"#,
                "faults.loss",
            ),
            (
                r#"{"backend":"wire","side":"a","faults":{"loss":2.0}}"#,
                "faults.loss",
            ),
            (
                r#"{"backend":"wire","side":"a","faults":{"los":0.1}}"#,
                "los",
            ),
            (r#"{"side":"a"}"#, "backend"),
            ("nonsense", "expected"),
        ];
        for (text, field) in cases {
            let e = DriverConfig::parse(text).unwrap_err().to_string();
            assert!(e.contains(field), "{text}: {e:?} should name {field}");
            assert!(e.starts_with(ENV), "{e}");
        }
    }
}
