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
        let pid = std::process::id();
        let config = Config {
            instance: format!("{tag}-{pid}"),
            ..Config::default()
        };
        client::preflight(&config)?;
        let config_path = std::env::temp_dir().join(format!("keepnet-{tag}-{pid}.toml"));
        let text = toml::to_string(&config).map_err(|e| ClientError::Protocol(e.to_string()))?;
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

impl Drop for Instance {
    fn drop(&mut self) {
        if self.up {
            let _ = client::down(Some(&self.config_path));
        }
        let _ = lab::netns_delete(&self.netns);
        let _ = std::fs::remove_file(&self.config_path);
    }
}
