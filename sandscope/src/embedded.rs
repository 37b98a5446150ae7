//! The example functions compiled into the binary, so `sandscope demo` and a bare
//! `sandscope agent` work on a fresh machine without a config file.

use host_agent::AgentConfig;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

const CONFIG: &str = include_str!("../../examples/sandscope.toml");
const FILES: &[(&str, &str)] = &[
    (
        "functions/hello/handler.sh",
        include_str!("../../examples/functions/hello/handler.sh"),
    ),
    (
        "functions/echo/handler.sh",
        include_str!("../../examples/functions/echo/handler.sh"),
    ),
];

/// Write the example functions under `state_dir/examples` and load the example config
/// with paths resolved there.
pub fn config(state_dir: &Path) -> anyhow::Result<AgentConfig> {
    let base = state_dir.join("examples");
    for (rel, text) in FILES {
        let p = base.join(rel);
        if let Some(d) = p.parent() {
            std::fs::create_dir_all(d)?;
        }
        std::fs::write(&p, text)?;
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755))?;
    }
    let mut cfg = AgentConfig::parse(CONFIG, "<embedded examples/sandscope.toml>", &base)?;
    cfg.state_dir = state_dir.to_path_buf();
    Ok(cfg)
}
