//! A private keepnet instance in a namespace of its own, for the demo and the benchmarks:
//! started by [`Instance::up`], stopped and removed on drop, on every exit path.

use std::path::{Path, PathBuf};

use super::client::{self, ClientError};
use super::lab;
use crate::config::Config;

/// A running private instance.
pub struct Instance {
    pub config: Config,
    pub config_path: PathBuf,
    pub netns: String,
    up: bool,
}

impl Instance {
    /// Brings up instance `TAG-PID` in a new namespace `kn-TAG-PID` with the default
    /// addresses, after the same checks as `keepnet up`.
    pub fn up(tag: &str) -> Result<Instance, ClientError> {
        Instance::up_with(tag, "")
    }

    /// [`Instance::up`] with the default config changed by `overrides`, TOML whose tables
    /// are merged into the defaults (e.g. `"[servers]\nmax_restarts = 1000\n"`); the result
    /// is checked as any config file is.
    pub fn up_with(tag: &str, overrides: &str) -> Result<Instance, ClientError> {
        let pid = std::process::id();
        let config_path = std::env::temp_dir().join(format!("keepnet-{tag}-{pid}.toml"));
        let bad = |e: String| ClientError::Protocol(format!("config overrides: {e}"));
        let mut table = toml::Table::try_from(Config {
            instance: format!("{tag}-{pid}"),
            ..Config::default()
        })
        .map_err(|e| bad(e.to_string()))?;
        let extra: toml::Table = overrides.parse().map_err(|e| bad(format!("{e}")))?;
        merge(&mut table, extra);
        let text = toml::to_string(&table).map_err(|e| bad(e.to_string()))?;
        let config = Config::parse(&text, &config_path)?;
        client::preflight(&config)?;
        std::fs::write(&config_path, text).map_err(|source| ClientError::Io {
            what: format!("write {}", config_path.display()),
            source,
        })?;
        let mut inst = Instance {
            config,
            config_path,
            netns: format!("kn-{tag}-{pid}"),
            up: false,
        };
        client::up(Some(&inst.config_path), Some(inst.netns.clone()), false)?;
        inst.up = true;
        Ok(inst)
    }

    /// The config file the instance runs with (for status, down, capture).
    pub fn config_path(&self) -> &Path {
        &self.config_path
    }

    /// Stops the instance now (drop does it too, silently).
    pub fn down(mut self) -> Result<bool, ClientError> {
        self.up = false;
        client::down(Some(&self.config_path))?;
        let _ = lab::netns_delete(&self.netns);
        Ok(!lab::netns_exists(&self.netns))
    }
}

/// Merges `extra` into `base`: tables recursively, any other value replaced.
fn merge(base: &mut toml::Table, extra: toml::Table) {
    for (k, v) in extra {
        match (base.get_mut(&k), v) {
            (Some(toml::Value::Table(b)), toml::Value::Table(e)) => merge(b, e),
            (_, v) => {
                base.insert(k, v);
            }
        }
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        if self.up {
            let _ = client::down(Some(&self.config_path));
        }
        let _ = lab::netns_delete(&self.netns);
        let _ = std::fs::remove_file(&self.config_path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overrides_merge_into_the_defaults_table_by_table() {
        let mut t = toml::Table::try_from(Config::default()).unwrap_or_default();
        let extra: toml::Table = "instance = \"x\"\n[tcp]\nbacklog = 7\n"
            .parse()
            .unwrap_or_default();
        merge(&mut t, extra);
        let text = toml::to_string(&t).unwrap_or_default();
        let c = Config::parse(&text, Path::new("test.toml")).unwrap_or_else(|e| panic!("{e}"));
        let d = Config::default();
        assert_eq!(c.instance, "x");
        assert_eq!(c.tcp.backlog, 7);
        assert_eq!(c.tcp.sndbuf, d.tcp.sndbuf, "the rest of [tcp] kept");
        assert_eq!(c.services, d.services);
    }
}
